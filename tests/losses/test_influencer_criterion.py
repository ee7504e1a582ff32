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
    crit = MaskInfluencerCriterion(C, form="seed", attr_weight=1.5, rep_weight=0.5, bg_weight=0.2, cls_weight=3.0,
                                   num_points=None)
    losses = crit(make_outputs(1, (8, 8)), make_targets([2], (8, 8)))
    want = 1.5 * losses["loss_attr"] + 0.5 * losses["loss_rep"] + 0.2 * losses["loss_bg"] + 3.0 * losses["loss_cls"]
    torch.testing.assert_close(losses["loss"], want)


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
