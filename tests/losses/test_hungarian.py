"""HungarianCriterion: equals HF transformers' Mask2FormerLoss, and the SetCriterion contract it shares."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Mask2FormerConfig
from transformers.models.mask2former import modeling_mask2former as hf

from influencerformer.losses.criterion import (
    HungarianCriterion,
    SetCriterion,
    base_name,
    reduced_num_masks,
    suffixed,
)
from influencerformer.losses.mask_losses import brier_loss, dice_loss
from influencerformer.losses.sampling import grid_point_coords

C = 4  # foreground classes


def make_batch(sizes, q=10, hw=(24, 24), target_hw=(48, 48), aux=2, seed=0, dtype=torch.float32):
    """Random outputs with ``aux`` aux layers and targets with K_i = sizes[i] instances."""
    g = torch.Generator().manual_seed(seed)
    b = len(sizes)
    layers = [
        (torch.randn(b, q, C + 1, generator=g, dtype=dtype).requires_grad_(),
         (3 * torch.randn(b, q, *hw, generator=g, dtype=dtype)).requires_grad_())
        for _ in range(aux + 1)
    ]
    outputs = {"pred_logits": layers[-1][0], "pred_masks": layers[-1][1],
               "aux_outputs": [{"pred_logits": lg, "pred_masks": m} for lg, m in layers[:-1]]}
    targets = [{"labels": torch.randint(0, C, (k,), generator=g),
                "masks": torch.rand(k, *target_hw, generator=g) > 0.6} for k in sizes]
    return outputs, targets


def run_hf(outputs, targets, config):
    """HF's criterion with the weight_dict applied exactly as Mask2FormerForUniversalSegmentation.get_loss_dict."""
    weight_dict = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight,
                   "loss_dice": config.dice_weight}
    loss = hf.Mask2FormerLoss(config, weight_dict)
    loss_dict = loss(
        masks_queries_logits=outputs["pred_masks"], class_queries_logits=outputs["pred_logits"],
        mask_labels=[t["masks"].float() for t in targets], class_labels=[t["labels"] for t in targets],
        auxiliary_predictions=[{"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
                               for a in outputs["aux_outputs"]],
    )
    for key, weight in weight_dict.items():
        for loss_key, value in loss_dict.items():
            if key in loss_key:
                value *= weight
    return loss_dict


def assert_equal_to_hf(ours, ref, criterion):
    assert len(ours) == len(ref) + 1
    for key, value in ours.items():
        if key != "loss":
            expected = ref[key.replace("loss_ce", "loss_cross_entropy")]
            torch.testing.assert_close(criterion.weight_dict[base_name(key)] * value, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["loss"], sum(ref.values()), atol=1e-5, rtol=1e-5)


def all_inputs(outputs):
    return [outputs["pred_logits"], outputs["pred_masks"]] + [
        t for a in outputs["aux_outputs"] for t in (a["pred_logits"], a["pred_masks"])]


def grads(outputs, loss):
    return torch.autograd.grad(loss, all_inputs(outputs), allow_unused=True)


@pytest.mark.parametrize("sizes", [[2, 5, 3], [0, 4, 3], [0, 0, 0], [12, 3, 1]], ids=["K", "K0-one", "K0-all", "K>Q"])
def test_equals_hf_mask2former_loss_with_aux_layers(sizes):
    config = Mask2FormerConfig(num_labels=C, train_num_points=300)
    outputs, targets = make_batch(sizes)
    criterion = HungarianCriterion(C, num_points=300)
    torch.manual_seed(123)
    ref = run_hf(outputs, targets, config)
    torch.manual_seed(123)  # same seed -> same random draws, in the same order
    ours = criterion(outputs, targets)
    assert_equal_to_hf(ours, ref, criterion)
    for g_ours, g_ref in zip(grads(outputs, ours["loss"]), grads(outputs, sum(ref.values()))):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)


class _RandAtGrid:
    """Stand-in for the ``torch`` module inside HF's file: ``torch.rand`` returns the pixel-centre grid."""

    def __init__(self, grid):
        self.grid = grid

    def __getattr__(self, name):
        return getattr(torch, name)

    def rand(self, n, num_points, two, device=None):
        return self.grid.expand(n, -1, -1).clone()


def test_every_location_equals_hf_read_at_every_pixel_centre(monkeypatch):
    hw = (12, 10)
    outputs, targets = make_batch([3, 0, 6], hw=hw, target_hw=(36, 30))
    grid = grid_point_coords(*hw)[None]
    config = Mask2FormerConfig(num_labels=C, train_num_points=hw[0] * hw[1])
    monkeypatch.setattr(hf, "torch", _RandAtGrid(grid))  # HF matcher: uniform points -> every pixel centre
    monkeypatch.setattr(hf.Mask2FormerLoss, "sample_points_using_uncertainty",
                        lambda self, logits, *args: grid.expand(logits.shape[0], -1, -1))
    ref = run_hf(outputs, targets, config)
    criterion = HungarianCriterion(C, num_points=None)
    ours = criterion(outputs, targets)
    assert_equal_to_hf(ours, ref, criterion)
    for g_ours, g_ref in zip(grads(outputs, ours["loss"]), grads(outputs, sum(ref.values()))):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)


def test_every_location_is_deterministic_and_seed_free():
    outputs, targets = make_batch([3, 2], aux=1)
    criterion = HungarianCriterion(C, num_points=None)
    torch.manual_seed(0)
    first = criterion(outputs, targets)
    torch.manual_seed(1)
    second = criterion(outputs, targets)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_known_answer_recovers_a_permutation():
    """Queries that are a permutation of the instances (right class, sharp masks) are matched back to them."""
    q, k = 6, 4
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(k, 16, 16, generator=g) > 0.5
    labels = torch.tensor([0, 3, 1, 2])
    owner = torch.tensor([4, 0, 5, 2])  # query owning instance j
    pred_masks = torch.full((1, q, 16, 16), -8.0)
    pred_masks[0, owner] = masks.float() * 16 - 8
    pred_logits = torch.full((1, q, C + 1), -5.0)
    pred_logits[0, :, C] = 5.0
    pred_logits[0, owner, labels] = 8.0
    pred_logits[0, owner, C] = -5.0
    criterion = HungarianCriterion(C, num_points=None)
    out = criterion({"pred_logits": pred_logits, "pred_masks": pred_masks}, [{"labels": labels, "masks": masks}])
    rows, cols = criterion.last_indices[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == dict(enumerate(owner.tolist()))
    assert criterion.last_assignment[0].tolist() == owner.tolist()  # the same name as the transport criterion's
    assert out["loss_mask"] < 1e-3 and out["loss_ce"] < 1e-3


def test_batched_matching_equals_per_image_matching():
    outputs, targets = make_batch([3, 0, 5, 2], aux=1)
    criterion = HungarianCriterion(C, num_points=None)
    criterion(outputs, targets)
    batched = criterion.last_layer_indices
    for b, target in enumerate(targets):
        single = {"pred_logits": outputs["pred_logits"][b:b + 1], "pred_masks": outputs["pred_masks"][b:b + 1],
                  "aux_outputs": [{k: v[b:b + 1] for k, v in a.items()} for a in outputs["aux_outputs"]]}
        criterion(single, [target])
        for layer in range(2):
            (r1, c1), (r2, c2) = batched[layer][b], criterion.last_layer_indices[layer][0]
            assert torch.equal(r1, r2) and torch.equal(c1, c2)
            assert len(r1) == min(10, len(target["labels"]))


def test_brier_mask_loss_equals_matched_pairs():
    outputs, targets = make_batch([3, 4], aux=0, hw=(8, 8), target_hw=(8, 8))
    criterion = HungarianCriterion(C, num_points=None, mask_loss="brier")
    out = criterion(outputs, targets)
    pred = torch.cat([outputs["pred_masks"][b, r].flatten(1) for b, (r, _) in enumerate(criterion.last_indices)])
    tgt = torch.cat([targets[b]["masks"][c].float().flatten(1) for b, (_, c) in enumerate(criterion.last_indices)])
    torch.testing.assert_close(out["loss_mask"], brier_loss(pred, tgt, 7))
    torch.testing.assert_close(out["loss_dice"], dice_loss(pred, tgt, 7))


def test_point_cloud_masks_equal_flattened_images():
    outputs, targets = make_batch([3, 5], aux=1, hw=(6, 7), target_hw=(6, 7))
    cloud = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"].flatten(2),
             "aux_outputs": [{"pred_logits": a["pred_logits"], "pred_masks": a["pred_masks"].flatten(2)}
                             for a in outputs["aux_outputs"]]}
    cloud_targets = [{"labels": t["labels"], "masks": t["masks"].flatten(1)} for t in targets]
    image = HungarianCriterion(C, num_points=None)(outputs, targets)
    points = HungarianCriterion(C, num_points=4)(cloud, cloud_targets)  # num_points unused for point clouds
    assert image.keys() == points.keys()
    assert all(torch.allclose(image[k], points[k]) for k in image)


def test_gradcheck_every_location():
    outputs, targets = make_batch([2, 1], q=3, hw=(3, 3), target_hw=(6, 6), aux=0, dtype=torch.float64)
    criterion = HungarianCriterion(C, num_points=None)

    def total(logits, masks):
        return criterion({"pred_logits": logits, "pred_masks": masks}, targets)["loss"]

    assert torch.autograd.gradcheck(total, (outputs["pred_logits"], outputs["pred_masks"]))


def test_gradients_reach_every_layer_and_k0_keeps_graph():
    for sizes in ([3, 0], [0, 0]):
        outputs, targets = make_batch(sizes, aux=2)
        out = HungarianCriterion(C, num_points=200)(outputs, targets)
        assert set(out) == {f"loss_{t}{s}" for t in ("ce", "mask", "dice") for s in ("", "_0", "_1")} | {"loss"}
        gs = grads(outputs, out["loss"])
        assert all(g is not None and torch.isfinite(g).all() for g in gs)
        assert all(g.abs().sum() > 0 for g in gs[::2])  # class logits always receive a gradient
        assert (gs[1].abs().sum() > 0) == (sum(sizes) > 0)


def test_autocast_bf16_matches_in_fp32():
    outputs, targets = make_batch([4, 2], aux=1)
    criterion = HungarianCriterion(C, num_points=None)
    criterion(outputs, targets)
    ref = [[(r.clone(), c.clone()) for r, c in layer] for layer in criterion.last_layer_indices]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = criterion(outputs, targets)
    assert torch.isfinite(out["loss"])
    assert all(torch.equal(r1, r2) and torch.equal(c1, c2) for l1, l2 in zip(ref, criterion.last_layer_indices)
               for (r1, c1), (r2, c2) in zip(l1, l2))


def test_targets_of_different_sizes_are_zero_padded_bottom_right():
    """Mask2Former pads every target to the batch's padded frame (``prepare_targets``); HF pads only in its
    loss, not in its matcher, so HF is given the padded targets here."""
    outputs, targets = make_batch([2, 3], aux=0, target_hw=(40, 40))
    padded = [dict(t) for t in targets]
    targets[1]["masks"] = targets[1]["masks"][:, :32, :36]
    padded[1]["masks"] = torch.zeros_like(padded[1]["masks"])
    padded[1]["masks"][:, :32, :36] = targets[1]["masks"]
    config = Mask2FormerConfig(num_labels=C, train_num_points=256)
    torch.manual_seed(5)
    ref = run_hf(outputs, padded, config)
    torch.manual_seed(5)
    criterion = HungarianCriterion(C, num_points=256)
    assert_equal_to_hf(criterion(outputs, targets), ref, criterion)


# ------------------------------------------------------------------------------------------- input errors


def test_nan_logits_raise():
    outputs, targets = make_batch([2, 2], aux=2)
    with torch.no_grad():
        outputs["aux_outputs"][1]["pred_logits"][0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"outputs\['aux_outputs'\]\[1\]\['pred_logits'\] contains NaN or Inf"):
        HungarianCriterion(C)(outputs, targets)
    with torch.no_grad():
        outputs["pred_masks"][1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"outputs\['pred_masks'\] contains NaN or Inf"):
        HungarianCriterion(C)(outputs, targets)


def test_bad_class_id_names_item_and_id():
    outputs, targets = make_batch([2, 3], aux=0)
    targets[1]["labels"][2] = C
    with pytest.raises(ValueError, match=rf"targets\[1\]\['labels'\]: class id {C} out of range \[0, {C}\)"):
        HungarianCriterion(C)(outputs, targets)
    targets[1]["labels"][2] = -1
    with pytest.raises(ValueError, match=r"class id -1 out of range"):
        HungarianCriterion(C)(outputs, targets)


def test_mask_shape_mismatch_names_both_shapes():
    outputs, targets = make_batch([2, 3], aux=0, hw=(6, 7))
    cloud = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"].flatten(2)}
    bad = [{"labels": t["labels"], "masks": torch.zeros(len(t["labels"]), 41, dtype=torch.bool)} for t in targets]
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]: shape \(2, 41\) has P = 41, but pred_masks "
                                         r"\(2, 10, 42\) has P = 42"):
        HungarianCriterion(C)(cloud, bad)
    targets[1]["masks"] = targets[1]["masks"][:2]
    with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\]: shape \(2, 48, 48\) does not fit labels "
                                         r"\(K = 3,\) and pred_masks \(2, 10, 6, 7\)"):
        HungarianCriterion(C)(outputs, targets)


def test_structural_errors():
    outputs, targets = make_batch([2, 3], aux=1)
    with pytest.raises(ValueError, match=r"targets: expected one dict per image \(B = 2\), got 1"):
        HungarianCriterion(C)(outputs, targets[:1])
    with pytest.raises(ValueError, match=r"pred_logits: expected \(B, Q, num_classes \+ 1 = 4\), got \(2, 10, 5\)"):
        HungarianCriterion(C - 1)(outputs, targets)
    with pytest.raises(ValueError, match=r"outputs\['aux_outputs'\]\[1\]: missing key\(s\) \['pred_masks'\]"):
        HungarianCriterion(C)({**outputs, "aux_outputs": [outputs["aux_outputs"][0], {"pred_logits": None}]}, targets)
    outputs["aux_outputs"][0]["pred_masks"] = outputs["aux_outputs"][0]["pred_masks"][:, :5]
    with pytest.raises(ValueError, match=r"aux_outputs\[0\]: expected pred_logits"):
        HungarianCriterion(C)(outputs, targets)
    with pytest.raises(ValueError, match=r"mask_loss: expected one of \['bce', 'brier'\], got 'focal'"):
        HungarianCriterion(C, mask_loss="focal")
    with pytest.raises(ValueError, match=r"num_points must be a positive int or None, got 0"):
        HungarianCriterion(C, num_points=0)


# ------------------------------------------------------------------------------------ SetCriterion contract


class _Constant(SetCriterion):
    """Each layer returns its mean class logit, to check suffixes and the weighted total."""

    def layer_losses(self, pred_logits, pred_masks, targets, num_masks):
        return {"loss_a": pred_logits.mean(), "loss_b": num_masks}


def test_set_criterion_suffixes_and_weighted_total():
    outputs, targets = make_batch([2, 5], aux=2)
    out = _Constant(C, {"loss_a": 2.0, "loss_b": 0.5})(outputs, targets)
    assert set(out) == {"loss_a", "loss_b", "loss_a_0", "loss_b_0", "loss_a_1", "loss_b_1", "loss"}
    torch.testing.assert_close(out["loss_a_1"], outputs["aux_outputs"][1]["pred_logits"].mean())
    torch.testing.assert_close(out["loss_b"], torch.tensor(7.0))
    expected = sum(2.0 * v for k, v in out.items() if k.startswith("loss_a")) + 0.5 * 3 * 7.0
    torch.testing.assert_close(out["loss"], expected)


def test_set_criterion_missing_weight_raises_and_helpers():
    outputs, targets = make_batch([1, 0], aux=0)
    with pytest.raises(ValueError, match=r"loss terms \['loss_b'\] have no weight in weight_dict"):
        _Constant(C, {"loss_a": 1.0})(outputs, targets)
    assert base_name("loss_dice_12") == "loss_dice" and base_name("loss_dice") == "loss_dice"
    assert suffixed({"loss_x": 1}, 3) == {"loss_x_3": 1} and suffixed({"loss_x": 1}, None) == {"loss_x": 1}
    assert reduced_num_masks([{"labels": torch.zeros(0)}], torch.device("cpu")).item() == 1.0  # clamped


def test_empty_weight_buffer():
    criterion = HungarianCriterion(C, no_object_weight=0.25)
    assert "empty_weight" in dict(criterion.named_buffers())
    torch.testing.assert_close(criterion.empty_weight, torch.tensor([1.0] * C + [0.25]))


def _ddp_worker(rank, world_size, init_file, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        targets = [{"labels": torch.zeros(3 if rank == 0 else 1)}]
        results[rank] = reduced_num_masks(targets, torch.device("cpu")).item()
    finally:
        torch.distributed.destroy_process_group()


def test_num_masks_is_averaged_over_ddp_ranks(tmp_path):
    results = mp.Manager().dict()
    # fork: the children reuse the parent's imports (spawn would re-import transformers, ~10 s)
    mp.start_processes(_ddp_worker, args=(2, os.fspath(tmp_path / "init"), results), nprocs=2, start_method="fork")
    assert dict(results) == {0: 2.0, 1: 2.0}  # (3 + 1) / 2 on both ranks
