"""MaskInfluencerCriterion through the SetCriterion interface, and its forms against references."""

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from influencerformer.losses.influencer import mask_influencer_loss
from influencerformer.losses.influencer_criterion import FORMS, MaskInfluencerCriterion
from influencerformer.losses.mask_losses import dice_loss, pairwise_dice, pairwise_sigmoid_bce, sigmoid_bce_loss

C, Q = 3, 6
TERMS = {
    "transport": {"loss_ce", "loss_mask", "loss_dice"},
    "ownership": {"loss_ce", "loss_mask", "loss_dice"},
    "seed": {"loss_attr", "loss_rep", "loss_bg", "loss_cls"},
}


def make_targets(sizes, spatial, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, C, (k,), generator=gen),
             "masks": torch.rand(k, *spatial, generator=gen) > 0.6} for k in sizes]


def make_outputs(batch, spatial, num_aux=0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed + 100)

    def layer():
        return {"pred_logits": torch.randn(batch, Q, C + 1, generator=gen, dtype=dtype).requires_grad_(True),
                "pred_masks": torch.randn(batch, Q, *spatial, generator=gen, dtype=dtype).requires_grad_(True)}

    out = layer()
    out["aux_outputs"] = [layer() for _ in range(num_aux)]
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", ["image_other_resolution", "points", "one_empty", "all_empty"])
def test_runs_through_the_interface(form, case):
    sizes = {"one_empty": [2, 0], "all_empty": [0, 0]}.get(case, [2, 3])
    pred_spatial, tgt_spatial = ((40,), (40,)) if case == "points" else ((8, 8), (16, 12))
    outputs = make_outputs(2, pred_spatial, num_aux=2)
    crit = MaskInfluencerCriterion(C, form=form, num_points=50)
    losses = crit(outputs, make_targets(sizes, tgt_spatial))
    expected = TERMS[form] | {f"{t}_{i}" for t in TERMS[form] for i in range(2)} | {"loss"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for layer in [outputs] + outputs["aux_outputs"]:
        for key in ("pred_logits", "pred_masks"):
            assert layer[key].grad is not None and torch.isfinite(layer[key].grad).all()
    assert layer["pred_logits"].grad.abs().sum() > 0  # classification always contributes
    assert [a.shape[0] for a in crit.last_assignment] == sizes


def test_weighted_total_uses_the_form_weights():
    crit = MaskInfluencerCriterion(C, form="seed", attr_weight=1.5, rep_weight=0.5, bg_weight=0.2,
                                   claim_class_weight=3.0, num_points=None)
    losses = crit(make_outputs(1, (8, 8)), make_targets([2], (8, 8)))
    want = 1.5 * losses["loss_attr"] + 0.5 * losses["loss_rep"] + 0.2 * losses["loss_bg"] + 3.0 * losses["loss_cls"]
    torch.testing.assert_close(losses["loss"], want)


def test_old_cls_weight_keyword_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="cls_weight is deprecated: use claim_class_weight"):
        crit = MaskInfluencerCriterion(C, form="seed", cls_weight=3.0)
    assert crit.weight_dict["loss_cls"] == 3.0
    assert MaskInfluencerCriterion(C, form="seed").weight_dict["loss_cls"] == 0.5


def test_seed_form_equals_pure_function_on_one_item():
    outputs = make_outputs(1, (8, 8), dtype=torch.float64)
    targets = make_targets([3], (8, 8), seed=1)
    crit = MaskInfluencerCriterion(C, form="seed", temperature=0.7, rep_margin=1.3, num_points=None)
    losses = crit(outputs, targets)
    ref = mask_influencer_loss(outputs["pred_masks"][0].flatten(1), targets[0]["masks"].flatten(1),
                               temperature=0.7, rep_margin=1.3)
    for ours, name in (("loss_attr", "attractive"), ("loss_rep", "repulsive"), ("loss_bg", "background")):
        torch.testing.assert_close(losses[ours], ref[name])


def test_seed_classification_targets_claimed_instances():
    # Query 0 covers instance 0 confidently; every other query is empty -> "no object".
    masks = torch.zeros(1, 2, 16, dtype=torch.bool)
    masks[0, 0, :8], masks[0, 1, 8:12] = True, True
    pred_masks = torch.full((1, Q, 16), -10.0)
    pred_masks[0, 0] = torch.where(masks[0, 0], 10.0, -10.0)
    logits = torch.randn(1, Q, C + 1)
    crit = MaskInfluencerCriterion(C, form="seed")
    targets = [{"labels": torch.tensor([2, 1]), "masks": masks[0]}]
    losses = crit({"pred_logits": logits, "pred_masks": pred_masks}, targets)
    target = torch.full((1, Q), C)
    target[0, 0] = 2
    want = F.cross_entropy(logits.transpose(1, 2), target, weight=crit.empty_weight)
    torch.testing.assert_close(losses["loss_cls"], want)


def mask2former_cost(logits, points, tgt_points, labels):
    prob = logits.softmax(-1)[:, labels]
    return 2 * (1 - prob) + 5 * pairwise_sigmoid_bce(points, tgt_points) + 5 * pairwise_dice(points, tgt_points)


def test_transport_small_epsilon_is_the_hungarian_assignment_and_losses():
    outputs = make_outputs(2, (8, 8), dtype=torch.float64, seed=3)
    targets = make_targets([3, 2], (8, 8), seed=3)
    crit = MaskInfluencerCriterion(C, num_points=None, epsilon=1e-3, sinkhorn_iters=3000)
    losses = crit(outputs, targets)
    bce, dice, num_masks = 0.0, 0.0, 5.0
    ce_target = torch.full((2, Q), C)
    for b, t in enumerate(targets):
        logits, points = outputs["pred_logits"][b].detach(), outputs["pred_masks"][b].detach().flatten(1)
        tgt = t["masks"].flatten(1).double()
        rows, cols = linear_sum_assignment(mask2former_cost(logits, points, tgt, t["labels"]).numpy())
        assert torch.equal(crit.last_assignment[b][torch.as_tensor(cols)], torch.as_tensor(rows))
        bce += sigmoid_bce_loss(points[rows], tgt[cols], num_masks)
        dice += dice_loss(points[rows], tgt[cols], num_masks)
        ce_target[b, torch.as_tensor(rows)] = t["labels"][torch.as_tensor(cols)]
    ce = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), ce_target, weight=crit.empty_weight.double())
    for name, want in (("loss_mask", bce), ("loss_dice", dice), ("loss_ce", ce)):
        torch.testing.assert_close(losses[name], want, rtol=1e-3, atol=1e-6)  # eps > 0: plan ~ permutation


def test_transport_batched_equals_per_image_for_mask_terms():
    outputs = make_outputs(2, (30,), seed=4)
    targets = make_targets([2, 3], (30,), seed=4)
    crit = MaskInfluencerCriterion(C)
    together = crit(outputs, targets)
    for name in ("loss_mask", "loss_dice"):
        parts = [crit({k: outputs[k][b:b + 1] for k in ("pred_logits", "pred_masks")}, [targets[b]])[name] * len(
            targets[b]["labels"]) for b in range(2)]
        torch.testing.assert_close(together[name] * 5, sum(parts))


def test_transport_topk_covering_all_queries_equals_dense():
    outputs = make_outputs(2, (30,), seed=5)
    targets = make_targets([2, 4], (30,), seed=5)
    dense = MaskInfluencerCriterion(C)(outputs, targets)
    sparse = MaskInfluencerCriterion(C, topk=Q)(outputs, targets)
    for name in ("loss_mask", "loss_dice", "loss_ce"):
        torch.testing.assert_close(sparse[name], dense[name])
    top1 = MaskInfluencerCriterion(C, topk=1)(outputs, targets)
    assert top1["loss_mask"] < dense["loss_mask"]  # fewer pairs, same non-negative weights


def test_transport_more_instances_than_queries_claims_every_query():
    outputs = make_outputs(1, (40,), seed=6)
    targets = make_targets([Q + 3], (40,), seed=6)
    crit = MaskInfluencerCriterion(C)
    losses = crit(outputs, targets)
    assert torch.isfinite(losses["loss"])
    torch.testing.assert_close(crit.last_weights.sum(-1), torch.ones(1, Q))  # no mass left for "no object"


def test_transport_gradient_through_plan_differs_when_not_detached():
    targets = make_targets([2], (30,), seed=7)
    grads = []
    for detach in (True, False):
        outputs = make_outputs(1, (30,), seed=7)
        MaskInfluencerCriterion(C, detach_plan=detach)(outputs, targets)["loss"].backward()
        grads.append(outputs["pred_masks"].grad)
    assert torch.isfinite(grads[1]).all() and not torch.allclose(grads[0], grads[1])


def test_bad_class_id_and_unknown_form_raise():
    targets = make_targets([2], (8, 8))
    targets[0]["labels"][1] = C + 2
    with pytest.raises(ValueError, match=r"class id 5 out of range \[0, 3\)"):
        MaskInfluencerCriterion(C)(make_outputs(1, (8, 8)), targets)
    with pytest.raises(ValueError, match="form: expected one of transport, ownership, seed, got 'hungry'"):
        MaskInfluencerCriterion(C, form="hungry")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        MaskInfluencerCriterion(C, epsilon=0)


# ------------------------------------------------------------------------------ shared pixels (speed path)
from influencerformer.losses import sampling as ic  # noqa: E402
from influencerformer.losses import pair_kernel  # noqa: E402
from influencerformer.losses.pair_kernel import pair_terms  # noqa: E402
from influencerformer.losses.criterion import pad_targets  # noqa: E402
from influencerformer.losses.sampling import point_sample, target_masks_at_prediction_grid  # noqa: E402


class GridSampleReference(MaskInfluencerCriterion):
    """The same criterion reading predictions and targets with ``point_sample`` (grid_sample) at the centres of
    the pixels ``sample_pixels`` draws, and computing the pair terms with the plain autograd functions."""

    def _target_points(self, targets, pred_masks, dtype):
        index, pt = super()._target_points(targets, pred_masks, dtype)  # the same random draw
        height, width = pred_masks.shape[2:]
        self.coords = ic.pixel_centres(index, height, width, torch.float64)
        masks = point_sample(pad_targets(targets, pred_masks.device).masks.double(), self.coords).to(dtype)
        ones = torch.ones_like(masks[:, :1])
        return index, pt._replace(masks=masks, masks_and_ones=torch.cat([masks, ones], 1))

    def _pred_points(self, pred_masks, index):
        return point_sample(pred_masks, self.coords.to(pred_masks.dtype))

    def _pair_terms(self, pred_logits, pred_masks, index, tgt):
        points = self._pred_points(pred_masks, index)
        prob = pred_logits.softmax(-1).gather(-1, tgt.labels.unsqueeze(1).expand(-1, pred_logits.shape[1], -1))
        return {"bce": pairwise_sigmoid_bce(points, tgt.masks), "one_minus_dice": pairwise_dice(points, tgt.masks),
                "prob": prob}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("tgt_spatial", [(8, 8), (16, 16), (24, 8), (13, 10), (4, 6)])
def test_pixel_gather_equals_grid_sample_at_pixel_centres(form, tgt_spatial):
    """The index path (gather predictions, read targets at pixel centres) == point_sample at those centres,
    values and gradients, for every target resolution: equal, integer multiples (odd, even), other ratios."""
    targets = make_targets([3, 0], tgt_spatial, seed=8)
    results = []
    for cls in (MaskInfluencerCriterion, GridSampleReference):
        outputs = make_outputs(2, (8, 8), num_aux=1, seed=8, dtype=torch.float64)
        torch.manual_seed(0)
        losses = cls(C, form=form, num_points=40, epsilon=0.2)(outputs, targets)
        losses["loss"].backward()
        grads = [layer[key].grad for layer in [outputs] + outputs["aux_outputs"]
                 for key in ("pred_logits", "pred_masks")]
        results.append((losses, grads))
    (ours, our_grads), (ref, ref_grads) = results
    assert set(ours) == set(ref)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_num_points_at_least_the_grid_uses_every_pixel_without_randomness():
    outputs, targets = make_outputs(2, (6, 5), seed=9), make_targets([2, 3], (12, 10), seed=9)
    every = MaskInfluencerCriterion(C, num_points=None)(outputs, targets)
    state = torch.get_rng_state()
    for n in (30, 1000):
        losses = MaskInfluencerCriterion(C, num_points=n)(outputs, targets)
        for name in every:
            torch.testing.assert_close(losses[name], every[name])
    assert torch.equal(state, torch.get_rng_state())
    grid = target_masks_at_prediction_grid(targets[1]["masks"], (6, 5))
    pt = MaskInfluencerCriterion(C, num_points=None)._target_points(targets, outputs["pred_masks"], torch.float32)[1]
    torch.testing.assert_close(pt.masks[1], grid)


def test_sample_pixels_are_distinct_sorted_and_cover_the_grid():
    torch.manual_seed(1)
    index = ic.sample_pixels(3, 50, 8, 9)
    assert index.shape == (3, 50) and index.dtype == torch.long
    assert (index.diff(dim=1) > 0).all() and index.min() >= 0 and index.max() < 72
    counts = torch.bincount(ic.sample_pixels(400, 36, 8, 9).flatten(), minlength=72).float()
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()  # uniform: mean 200
    with pytest.raises(ValueError, match="num_points must be in"):
        ic.sample_pixels(1, 73, 8, 9)


@pytest.mark.parametrize("tgt_spatial", [(6, 7), (12, 21), (18, 14), (13, 9), (3, 5)])
@pytest.mark.parametrize("every_pixel", [False, True])
def test_targets_at_pixels_equal_point_sample_at_centres(tgt_spatial, every_pixel):
    gen = torch.Generator().manual_seed(2)
    masks = [torch.rand(4, *tgt_spatial, generator=gen) > 0.5, torch.zeros(0, *tgt_spatial, dtype=torch.bool),
             torch.rand(2, *tgt_spatial, generator=gen) > 0.5]
    index = None if every_pixel else ic.sample_pixels(3, 20, 6, 7)
    out = ic.targets_at_pixels(masks, index, (6, 7), torch.float64, torch.device("cpu"), ones_row=True)
    assert out.shape == (3, 5, 42 if every_pixel else 20)
    assert (out[:, -1] == 1).all() and (out[1, :-1] == 0).all() and (out[2, 2:-1] == 0).all()
    for b, m in enumerate(masks):
        if not len(m):
            continue
        pixels = torch.arange(42)[None] if every_pixel else index[b:b + 1]
        want = point_sample(m.double()[None], ic.pixel_centres(pixels, 6, 7, torch.float64))[0]
        torch.testing.assert_close(out[b, :len(m)], want, rtol=0, atol=1e-12)
        if every_pixel:  # the num_points=None reference (float32 coordinates)
            torch.testing.assert_close(out[b, :len(m)].float(), target_masks_at_prediction_grid(m, (6, 7)))
    floats = [m.double() * 0.5 for m in masks]  # non-boolean masks take the general path
    half = ic.targets_at_pixels(floats, index, (6, 7), torch.float64, torch.device("cpu"))
    torch.testing.assert_close(half, out[:, :-1] * 0.5)


@pytest.mark.parametrize("with_index", [True, False])
@pytest.mark.parametrize("chunk", [None, 2 * 20 * 3])  # None: one chunk; else 3 queries per chunk (3, 3, 1)
def test_pair_terms_node_values_and_gradients(monkeypatch, with_index, chunk):
    if chunk is not None:
        monkeypatch.setattr(pair_kernel, "_CPU_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(3)
    masks = (3 * torch.randn(2, 7, 6, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    masks.data[0, 0, 0, :3] = torch.tensor([-120.0, 60.0, 0.0], dtype=torch.float64)  # saturated logits
    index = ic.sample_pixels(2, 20, 6, 7) if with_index else None
    p = 20 if with_index else 42
    tgt = torch.rand(2, 3, p, generator=gen, dtype=torch.float64).round()
    tgt1 = torch.cat([tgt, torch.ones(2, 1, p, dtype=torch.float64)], 1)

    def node(m):
        return pair_terms(m.flatten(2), index, tgt1)

    points = masks.flatten(2) if index is None else masks.flatten(2).gather(2, index[:, None].expand(-1, 7, -1))
    bce, dice = node(masks)
    torch.testing.assert_close(bce, pairwise_sigmoid_bce(points, tgt), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dice, pairwise_dice(points, tgt), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(node, (masks,))  # several backward passes: also the retain_graph path
    w1, w2 = torch.rand(2, 7, 3, generator=gen, dtype=torch.float64), torch.rand(2, 7, 3, generator=gen,
                                                                                 dtype=torch.float64)
    bce, dice = node(masks)
    loss = (w1 * bce + w2 * dice).sum()
    first = torch.autograd.grad(loss, masks, retain_graph=True)[0]
    second = torch.autograd.grad(loss, masks)[0]  # s is recomputed: the first backward reused its buffer
    want = torch.autograd.grad((w1 * pairwise_sigmoid_bce(points, tgt) + w2 * pairwise_dice(points, tgt)).sum(),
                               masks)[0]
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(second, want)


def test_pair_terms_node_half_precision_masks():
    gen = torch.Generator().manual_seed(4)
    masks = torch.randn(2, 5, 6, 7, generator=gen).bfloat16().requires_grad_()
    index = ic.sample_pixels(2, 20, 6, 7)
    tgt = torch.rand(2, 3, 20, generator=gen).round()
    bce, dice = pair_terms(masks.flatten(2), index, torch.cat([tgt, torch.ones(2, 1, 20)], 1))
    assert bce.dtype == dice.dtype == torch.float32
    (bce.sum() + dice.sum()).backward()
    assert masks.grad.dtype == torch.bfloat16 and torch.isfinite(masks.grad).all()
    points = masks.detach().float().flatten(2).gather(2, index[:, None].expand(-1, 5, -1))
    torch.testing.assert_close(bce, pairwise_sigmoid_bce(points, tgt))
    torch.testing.assert_close(dice, pairwise_dice(points, tgt))
