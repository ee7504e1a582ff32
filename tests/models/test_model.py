"""MaskFormer / QueryDecoder: shapes, presets, point-cloud mode, masked attention, gradients."""

import math

import pytest
import torch

from influencerformer.models import (
    PRESETS,
    MaskFormer,
    MaskFormerConfig,
    QueryDecoder,
    attention_mask_from_masks,
    sine_position_embedding,
)

# Shrinks widths so every preset runs in well under a second; queries and layers keep the preset's values.
SMALL = dict(hidden_dim=32, nheads=4, dim_feedforward=64, mask_dim=32, backbone_widths=(8, 16, 16, 32),
             backbone_depths=(1, 1, 1, 1), stem_width=8)


def small_decoder(**kw):
    args = dict(num_classes=3, hidden_dim=32, num_queries=6, num_layers=3, nheads=4, dim_feedforward=64, mask_dim=32)
    return QueryDecoder(**{**args, **kw})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_forward_shapes_every_preset(name):
    torch.manual_seed(0)
    cfg = MaskFormerConfig.preset(name, **SMALL)
    model = MaskFormer(cfg).eval()
    out = model(torch.rand(2, 3, 64, 96))
    q, c, s = cfg.num_queries, cfg.num_classes, cfg.mask_stride
    grid = (64 // s, 96 // s)
    assert out["pred_logits"].shape == (2, q, c + 1)
    assert out["pred_masks"].shape == (2, q, *grid)
    assert len(out["aux_outputs"]) == cfg.num_decoder_layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, q, c + 1) and aux["pred_masks"].shape == (2, q, *grid)
    assert torch.isfinite(out["pred_masks"]).all()


def test_presets_follow_the_design_recipes():
    crowded, base = MaskFormerConfig.preset("crowded"), MaskFormerConfig.preset("base")
    assert (crowded.num_queries, crowded.num_decoder_layers) == (100, 6)
    assert (base.hidden_dim, base.num_queries, base.num_decoder_layers) == (256, 100, 9)
    assert MaskFormerConfig.preset("medium").num_queries == 50
    tiny = MaskFormerConfig.preset("tiny", num_queries=20, backbone_widths=[8, 8, 16, 16])
    assert tiny.num_queries == 20 and tiny.backbone_widths == (8, 8, 16, 16)  # YAML lists become tuples
    assert MaskFormerConfig.from_dict(tiny.to_dict()) == tiny


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"unknown MaskFormerConfig preset 'huge'.*'base', 'crowded'"):
        MaskFormerConfig.preset("huge")
    with pytest.raises(ValueError, match=r"unknown MaskFormerConfig key\(s\) \['queries'\].*num_queries"):
        MaskFormerConfig.preset("tiny", queries=3)
    with pytest.raises(ValueError, match=r"hidden_dim \(66\) must be divisible by nheads \(4\)"):
        MaskFormerConfig.preset("tiny", hidden_dim=66)
    with pytest.raises(ValueError, match=r"num_queries must be >= 1, got 0"):
        MaskFormerConfig(num_queries=0)


def test_image_errors():
    model = MaskFormer(MaskFormerConfig.preset("tiny", **SMALL))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\), got \(1, 1, 64, 64\)"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"multiples of 32, got \(64, 70\)"):
        model(torch.rand(1, 3, 64, 70))


def test_images_in_a_batch_are_independent():
    """GroupNorm and per-image attention: an image's output must not depend on its batch mates."""
    torch.manual_seed(0)
    model = MaskFormer(MaskFormerConfig.preset("tiny", **SMALL)).eval()
    x = torch.rand(3, 3, 64, 64)
    both, alone = model(x), model(x[1:2])
    torch.testing.assert_close(both["pred_masks"][1:2], alone["pred_masks"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both["pred_logits"][1:2], alone["pred_logits"], atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = MaskFormer(MaskFormerConfig.preset("tiny", **{**SMALL, "num_decoder_layers": 2}))
    out = model(torch.rand(2, 3, 64, 64))
    # Random weights: a plain sum has zero gradient through LayerNorm's normalised outputs.
    preds = [out] + out["aux_outputs"]
    loss = sum((p[k] * torch.randn_like(p[k])).sum() for p in preds for k in ("pred_logits", "pred_masks"))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_decoder_is_equivariant_to_query_permutation():
    torch.manual_seed(0)
    dec = small_decoder().eval()
    memory = [torch.randn(2, 12, 32), torch.randn(2, 20, 32)]
    feats = torch.randn(2, 32, 4, 5)
    shapes = [(3, 4), (4, 5)]
    out = dec(memory, feats, memory_shapes=shapes)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        dec.query_feat.weight.copy_(dec.query_feat.weight[perm])
        dec.query_embed.weight.copy_(dec.query_embed.weight[perm])
    permuted = dec(memory, feats, memory_shapes=shapes)
    torch.testing.assert_close(permuted["pred_masks"], out["pred_masks"][:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted["pred_logits"], out["pred_logits"][:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_pos", [True, False])
def test_point_cloud_mode(with_pos):
    torch.manual_seed(0)
    dec = small_decoder(num_layers=2)
    memory = [torch.randn(2, 50, 32)]
    pos = [torch.randn(2, 50, 32)] if with_pos else None
    out = dec(memory, torch.randn(2, 32, 50), memory_pos=pos)
    assert out["pred_logits"].shape == (2, 6, 4)
    assert out["pred_masks"].shape == (2, 6, 50)
    assert [a["pred_masks"].shape for a in out["aux_outputs"]] == [(2, 6, 50)] * 2


def test_point_cloud_mode_rejects_mismatched_memory():
    dec = small_decoder()
    with pytest.raises(ValueError, match=r"needs P_l == P = 50; memory levels \[1\] have \[40\]"):
        dec([torch.randn(1, 50, 32), torch.randn(1, 40, 32)], torch.randn(1, 32, 50))
    out = small_decoder(masked_attention=False)([torch.randn(1, 40, 32)], torch.randn(1, 32, 50))
    assert out["pred_masks"].shape == (1, 6, 50)  # without masked attention any memory size works


def test_decoder_input_errors():
    dec = small_decoder()
    with pytest.raises(ValueError, match=r"memory\[0\] must be \(1, P, 32\), got \(1, 12, 16\)"):
        dec([torch.randn(1, 12, 16)], torch.randn(1, 32, 3, 4), memory_shapes=[(3, 4)])
    with pytest.raises(ValueError, match=r"mask_features must be \(B, 32, H, W\) or \(B, 32, P\), got \(1, 8, 3, 4\)"):
        dec([torch.randn(1, 12, 32)], torch.randn(1, 8, 3, 4), memory_shapes=[(3, 4)])
    with pytest.raises(ValueError, match=r"memory_shapes .* is required"):
        dec([torch.randn(1, 12, 32)], torch.randn(1, 32, 3, 4))
    with pytest.raises(ValueError, match=r"memory_shapes\[0\] = \(3, 5\) has 15 cells, memory\[0\] has 12"):
        dec([torch.randn(1, 12, 32)], torch.randn(1, 32, 3, 4), memory_shapes=[(3, 5)])


def test_attention_mask_from_masks_known_answer():
    logits = torch.full((1, 2, 8, 8), -5.0)
    logits[0, 0, :, :4] = 5.0  # query 0: left half only; query 1: empty everywhere
    blocked = attention_mask_from_masks(logits, nheads=3, memory_shape=(2, 2))
    assert blocked.shape == (3, 2, 4) and blocked.dtype == torch.bool
    # Query 0 attends to the left column of the 2x2 grid (cells 0 and 2) only.
    assert blocked[:, 0].tolist() == [[False, True, False, True]] * 3
    # An empty mask would block every key (NaN softmax): Mask2Former un-blocks the whole row.
    assert not blocked[:, 1].any()


def test_masked_cross_attention_gives_zero_weight_outside_the_mask():
    """End to end: capture each layer's attention mask, check it is the previous prediction's
    mask at that memory's resolution, and that attention outside it is exactly zero."""
    torch.manual_seed(0)
    dec = small_decoder(num_layers=3).eval()
    memory = [torch.randn(1, 4, 32), torch.randn(1, 16, 32), torch.randn(1, 64, 32)]
    shapes = [(2, 2), (4, 4), (8, 8)]
    feats = torch.randn(1, 32, 8, 8)
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: captured.append((m, a, kw)), with_kwargs=True)
             for layer in dec.cross]
    out = dec(memory, feats, memory_shapes=shapes)
    for h in hooks:
        h.remove()
    assert len(captured) == 3
    previous = [a["pred_masks"] for a in out["aux_outputs"]]
    some_blocked = some_changed = False
    for i, (layer, args, kwargs) in enumerate(captured):
        size = shapes[i % 3]
        expected = torch.nn.functional.interpolate(previous[i], size=size, mode="bilinear").flatten(2).sigmoid() < 0.5
        expected &= ~expected.all(-1, keepdim=True)
        assert torch.equal(kwargs["attn_mask"], expected.repeat_interleave(4, dim=0))
        weights = layer.attention_weights(*args, **kwargs)  # (1, heads, Q, P)
        blocked = expected[:, None].expand_as(weights)
        assert torch.all(weights[blocked] == 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
        some_blocked |= bool(blocked.any())
        # The forward pass honours the mask: changing memory a query cannot see leaves it unchanged.
        partly = torch.nonzero(expected[0].any(-1) & ~expected[0].all(-1)).flatten()
        if len(partly):
            q = int(partly[0])
            tgt, mem = args
            noisy = mem + 10 * expected[0, q][None, :, None] * torch.randn_like(mem)
            before, after = layer(tgt, mem, **kwargs), layer(tgt, noisy, **kwargs)
            torch.testing.assert_close(after[:, q], before[:, q])
            sees = (~expected[0] & expected[0, q]).any(-1)  # queries that can see the changed memory
            if sees.any():
                assert not torch.allclose(after[:, sees], before[:, sees])
                some_changed = True
    assert some_blocked and some_changed  # the checks above must not be vacuous


def test_masked_attention_off_passes_no_mask():
    dec = small_decoder(masked_attention=False, num_layers=1)
    seen = []
    dec.cross[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attn_mask"]), with_kwargs=True)
    dec([torch.randn(1, 12, 32)], torch.randn(1, 32, 3, 4))
    assert seen == [None]


def test_sine_position_embedding_known_values():
    pos = sine_position_embedding(2, 3, 8)
    assert pos.shape == (6, 8)
    # Frequencies for 4 channels per axis are 1, 1, 100, 100: channels (sin y, cos y, sin y/100, cos y/100).
    y = (1 + 0.5) / 2 * 2 * math.pi  # row 1
    x = (2 + 0.5) / 3 * 2 * math.pi  # column 2
    expected = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    torch.testing.assert_close(pos[1 * 3 + 2], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        sine_position_embedding(2, 2, 6)


def test_mask_stride_2_doubles_the_mask_grid_and_rejects_other_strides():
    torch.manual_seed(0)
    out4 = MaskFormer(MaskFormerConfig.preset("tiny")).eval()(torch.rand(1, 3, 64, 64))
    out2 = MaskFormer(MaskFormerConfig.preset("tiny", mask_stride=2)).eval()(torch.rand(1, 3, 64, 64))
    assert out4["pred_masks"].shape[-2:] == (16, 16) and out2["pred_masks"].shape[-2:] == (32, 32)
    with pytest.raises(ValueError, match="mask_stride must be 2 or 4"):
        MaskFormerConfig.preset("tiny", mask_stride=8)
