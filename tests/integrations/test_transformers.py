"""HF transformers drop-in: Mask2Former (and MaskFormer) trained with our criteria through ``model.criterion``."""
import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DetrConfig,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerModel,
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    SwinConfig,
)

from influencerformer.data import Shapes2D, collate_batch  # noqa: E402
from influencerformer.integrations.transformers import (  # noqa: E402
    HFCriterionAdapter,
    check_weight_keys,
    use_criterion,
    use_hungarian_loss,
    use_influencer_loss,
)
from influencerformer.losses.criterion import HungarianCriterion, base_name  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
C = 4  # foreground classes
HW = 64  # image side; masks are predicted at HW / 4


def tiny_swin() -> SwinConfig:
    return SwinConfig(image_size=HW, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                      out_features=["stage1", "stage2", "stage3", "stage4"])


def tiny_mask2former(seed: int = 0, **config) -> Mask2FormerForUniversalSegmentation:
    """About 0.37 M parameters: 3 decoder layers (2 aux), 10 queries; eval mode so forward draws no randomness."""
    kwargs = dict(backbone_config=tiny_swin(), num_labels=C, feature_size=32, mask_feature_size=32, hidden_dim=32,
                  encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=3, num_attention_heads=2,
                  dim_feedforward=64, num_queries=10, train_num_points=256)
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**{**kwargs, **config})).eval()


def tiny_maskformer(seed: int = 0) -> MaskFormerForInstanceSegmentation:
    decoder = DetrConfig(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10)
    config = MaskFormerConfig(backbone_config=tiny_swin(), decoder_config=decoder, num_labels=C, fpn_feature_size=32,
                              mask_feature_size=32, num_queries=10, use_auxiliary_loss=True)
    torch.manual_seed(seed)
    return MaskFormerForInstanceSegmentation(config).eval()


def random_batch(sizes=(3, 0, 2), seed=0):
    """Pixel values ``(B, 3, HW, HW)`` and HF-style labels: float 0/1 masks ``(K_i, HW, HW)``, long ``(K_i,)``."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(sizes), 3, HW, HW, generator=g)
    mask_labels = [(torch.rand(k, HW, HW, generator=g) > 0.6).float() for k in sizes]
    class_labels = [torch.randint(0, C, (k,), generator=g) for k in sizes]
    return pixels, mask_labels, class_labels


def design_inputs(class_logits, mask_logits, aux, mask_labels, class_labels):
    """Our contract's ``outputs`` / ``targets`` (docs/background.md §1) built by hand from the same tensors
    (not through the adapter)."""
    outputs = {"pred_logits": class_logits, "pred_masks": mask_logits,
               "aux_outputs": [{"pred_logits": a["class_queries_logits"], "pred_masks": a["masks_queries_logits"]}
                               for a in aux]}
    targets = [{"labels": lab, "masks": m.bool()} for m, lab in zip(mask_labels, class_labels)]
    return outputs, targets


def param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def assert_grads_close(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- equality with references


@pytest.mark.parametrize("name", ["influencer", "seed", "hungarian"])
def test_weighted_loss_dict_equals_criterion_called_directly(name):
    """transformers' own weighting (``get_loss_dict`` / ``get_loss``) of the adapter's dict gives the criterion's
    terms times their weights and the criterion's ``loss``, aux layers included."""
    model = tiny_mask2former()
    adapter = use_criterion(model, name)
    g = torch.Generator().manual_seed(1)
    _, mask_labels, class_labels = random_batch(seed=1)
    layers = [(torch.randn(3, 10, C + 1, generator=g).requires_grad_(),
               (3 * torch.randn(3, 10, 16, 16, generator=g)).requires_grad_()) for _ in range(3)]
    aux = [{"class_queries_logits": lg, "masks_queries_logits": m} for lg, m in layers[:-1]]
    torch.manual_seed(7)
    weighted = model.get_loss_dict(layers[-1][1], layers[-1][0], mask_labels, class_labels, aux)
    total = model.get_loss(weighted)
    torch.manual_seed(7)  # same seed -> the criterion draws the same points
    ref = adapter.criterion(*design_inputs(layers[-1][0], layers[-1][1], aux, mask_labels, class_labels))
    assert set(weighted) == set(ref) - {"loss"} and any(k.endswith("_1") for k in weighted)
    for key, value in weighted.items():
        torch.testing.assert_close(value, adapter.criterion.weight_dict[base_name(key)] * ref[key])
    torch.testing.assert_close(total, ref["loss"])
    inputs = [t for layer in layers for t in layer]
    assert_grads_close(torch.autograd.grad(total, inputs), torch.autograd.grad(ref["loss"], inputs))


def test_model_loss_is_influencer_criterion_on_model_outputs():
    model = tiny_mask2former()
    adapter = use_influencer_loss(model)
    pixels, mask_labels, class_labels = random_batch()
    torch.manual_seed(3)
    out = model(pixels, mask_labels=mask_labels, class_labels=class_labels, output_auxiliary_logits=True)
    assert len(out.auxiliary_logits) == 2
    torch.manual_seed(3)
    ref = adapter.criterion(*design_inputs(out.class_queries_logits, out.masks_queries_logits, out.auxiliary_logits,
                                           mask_labels, class_labels))
    torch.testing.assert_close(out.loss, ref["loss"])
    torch.testing.assert_close(adapter.last_losses["loss"], ref["loss"].detach())
    assert not adapter.last_losses["loss"].requires_grad
    assert_grads_close(param_grads(model, out.loss), param_grads(model, ref["loss"]))


def test_hungarian_model_loss_equals_transformers_mask2former_loss():
    """Same weights, same seed: the swapped model's loss and parameter gradients are transformers' own."""
    stock = tiny_mask2former()
    ours = copy.deepcopy(stock)
    adapter = use_hungarian_loss(ours)
    assert isinstance(adapter.criterion, HungarianCriterion) and adapter.criterion.num_points == 256
    pixels, mask_labels, class_labels = random_batch(sizes=(3, 0, 12))  # K = 0 and K > Q images
    torch.manual_seed(11)
    ref = stock(pixels, mask_labels=mask_labels, class_labels=class_labels).loss
    torch.manual_seed(11)
    loss = ours(pixels, mask_labels=mask_labels, class_labels=class_labels).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert_grads_close(param_grads(ours, loss), param_grads(stock, ref))


def test_maskformer_loss_is_criterion_on_model_outputs():
    model = tiny_maskformer()
    adapter = use_influencer_loss(model)
    pixels, mask_labels, class_labels = random_batch()
    torch.manual_seed(5)
    # transformers' MaskFormer needs output_hidden_states=True to build its aux logits (it drops them otherwise)
    out = model(pixels, mask_labels=mask_labels, class_labels=class_labels, output_auxiliary_logits=True,
                output_hidden_states=True)
    assert len(out.auxiliary_logits) >= 1
    torch.manual_seed(5)
    ref = adapter.criterion(*design_inputs(out.class_queries_logits, out.masks_queries_logits, out.auxiliary_logits,
                                           mask_labels, class_labels))
    torch.testing.assert_close(out.loss, ref["loss"])
    # MaskFormer's mask_weight=20 belongs to its focal loss: ours keeps its own weights, takes the no-object weight
    assert adapter.criterion.weight_dict == {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    torch.testing.assert_close(adapter.criterion.empty_weight[-1], torch.tensor(model.config.no_object_weight))


# ------------------------------------------------------------------------------------------ training


def shapes_batch(num_images=2):
    batch = collate_batch([Shapes2D("train", preset="medium", num_images=num_images)[i] for i in range(num_images)])
    targets = batch["targets"]
    return batch["images"], [t["masks"].float() for t in targets], [t["labels"] for t in targets]


@pytest.mark.parametrize("use", [use_hungarian_loss, use_influencer_loss], ids=["hungarian", "influencer"])
def test_twenty_steps_lower_the_loss(use):
    model = tiny_mask2former(seed=0).train()
    use(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pixels, mask_labels, class_labels = shapes_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(20):
        loss = model(pixels, mask_labels=mask_labels, class_labels=class_labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "class_predictor.weight" in changed and any(n.startswith("model.pixel_level_module") for n in changed)


# --------------------------------------------------------------------------------------- checkpoints, swapping


def test_save_pretrained_and_stock_from_pretrained(tmp_path):
    model = tiny_mask2former()
    use_influencer_loss(model)
    assert model.state_dict().keys() == tiny_mask2former().state_dict().keys()  # criterion.empty_weight kept
    model.save_pretrained(tmp_path)
    loaded, info = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    reloaded = loaded.state_dict()
    assert all(torch.equal(value, reloaded[name]) for name, value in model.state_dict().items())
    assert not isinstance(loaded.criterion, HFCriterionAdapter)  # the criterion is not part of the checkpoint
    use_influencer_loss(loaded.eval())
    pixels, mask_labels, class_labels = random_batch()
    torch.manual_seed(2)
    first = model(pixels, mask_labels=mask_labels, class_labels=class_labels).loss
    torch.manual_seed(2)
    torch.testing.assert_close(loaded(pixels, mask_labels=mask_labels, class_labels=class_labels).loss, first)


def test_config_defaults_overrides_and_weight_dict_sharing():
    model = tiny_mask2former(class_weight=3.0, no_object_weight=0.2, train_num_points=128)
    adapter = use_hungarian_loss(model, dice_weight=4.0)
    criterion = adapter.criterion
    assert criterion.weight_dict == {"loss_ce": 3.0, "loss_mask": 5.0, "loss_dice": 4.0}
    assert criterion.num_points == 128 and model.weight_dict is criterion.weight_dict
    torch.testing.assert_close(criterion.empty_weight, torch.tensor([1.0] * C + [0.2]))
    again = use_criterion(model, "seed", bg_weight=0.5)  # swapping twice keeps the checkpoint buffer
    assert model.criterion is again and again.criterion.form == "seed"
    assert model.weight_dict == {"loss_attr": 1.0, "loss_rep": 1.0, "loss_bg": 0.5, "loss_cls": 0.5}
    torch.testing.assert_close(again.empty_weight, torch.tensor([1.0] * C + [0.2]))
    built = HungarianCriterion(C, num_points=None)
    assert use_criterion(model, built).criterion is built


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_swap_before_and_after_moving_the_model():
    pixels, mask_labels, class_labels = random_batch()
    cuda_labels = ([m.cuda() for m in mask_labels], [c.cuda() for c in class_labels])
    before = tiny_mask2former()
    use_influencer_loss(before)
    after = tiny_mask2former().cuda()
    use_influencer_loss(after)  # the adapter follows the model's device
    for model in (before.cuda(), after):
        assert model.criterion.criterion.empty_weight.is_cuda
        torch.manual_seed(0)
        loss = model(pixels.cuda(), mask_labels=cuda_labels[0], class_labels=cuda_labels[1]).loss
        assert loss.is_cuda and torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------ errors


def test_unsupported_model_raises_type_error_naming_classes():
    expected = r"is not supported: the criterion can be swapped on Mask2FormerForUniversalSegmentation and " \
               r"MaskFormerForInstanceSegmentation"
    with pytest.raises(TypeError, match=r"^Linear " + expected):
        use_influencer_loss(torch.nn.Linear(2, 2))
    base = Mask2FormerModel(tiny_mask2former().config)  # no head, no criterion
    with pytest.raises(TypeError, match=r"^Mask2FormerModel " + expected):
        use_hungarian_loss(base)


def test_bad_arguments_raise():
    model = tiny_mask2former()
    with pytest.raises(TypeError, match=r"keyword arguments \['num_points'\] only apply when the criterion is given "
                                        r"by name, not as a built HungarianCriterion"):
        use_criterion(model, HungarianCriterion(C), num_points=3)
    with pytest.raises(ValueError, match=r"criterion has num_classes=3, but the model predicts config.num_labels=4"):
        use_criterion(model, HungarianCriterion(3))
    with pytest.raises(ValueError, match=r"unknown criterion 'focal'"):
        use_criterion(model, "focal")
    with pytest.raises(ValueError, match=r"'loss_mask_bce' would be multiplied by the weights of \['loss_mask', "
                                         r"'loss_mask_bce'\]"):
        check_weight_keys({"loss_mask": 1.0, "loss_mask_bce": 1.0})
    with pytest.raises(ValueError, match=r"weight_dict key 'loss_x_2' ends in an aux-layer suffix"):
        check_weight_keys({"loss_x_2": 1.0})
    assert isinstance(model.criterion, transformers.models.mask2former.modeling_mask2former.Mask2FormerLoss)


def test_module_imports_without_transformers():
    """transformers is an optional extra: importing works without it; using it names the extra."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch\n"
        "from influencerformer.integrations.transformers import use_influencer_loss\n"
        "try:\n"
        "    use_influencer_loss(torch.nn.Linear(1, 1))\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'influencerformer[transformers]'" in result.stdout
