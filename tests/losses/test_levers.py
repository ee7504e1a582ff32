"""The training levers of both criteria: one-to-many on aux layers, quality-aware class targets, epsilon schedule."""

import pytest
import torch
import torch.nn.functional as F

from influencerformer.losses.criterion import HungarianCriterion
from influencerformer.losses.influencer_criterion import MaskInfluencerCriterion
from influencerformer.losses.weighted_terms import class_targets, loss_ce
from influencerformer.losses.weights import instance_mass, transport_weights

from .test_influencer_criterion import C, Q, make_outputs, make_targets


def test_transport_aux_multiplicity_gives_each_instance_m_queries_on_aux_layers_only():
    outputs, targets = make_outputs(2, (8, 8), num_aux=2), make_targets([2, 1], (8, 8))
    crit = MaskInfluencerCriterion(C, num_points=None, aux_multiplicity=2, epsilon=0.1, sinkhorn_iters=1000)
    contexts = crit.layer_context(crit_layers(outputs), targets)
    final, aux = contexts[0]["weights"], contexts[1]["weights"]
    assert torch.allclose(final.sum(1), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), atol=1e-3)
    assert torch.allclose(aux.sum(1), torch.tensor([[2.0, 2.0], [2.0, 0.0]]), atol=1e-3)
    assert aux.sum(2).max() <= 1 + 1e-4  # a query's capacity is still 1
    losses = crit(outputs, targets)
    assert torch.isfinite(losses["loss"])


def crit_layers(outputs):
    return [(outputs["pred_logits"], outputs["pred_masks"])] + [
        (a["pred_logits"], a["pred_masks"]) for a in outputs["aux_outputs"]]


def test_instance_mass_is_capped_so_instances_fit_the_queries():
    sizes = torch.tensor([0, 2, 4, 12])
    assert instance_mass(sizes, 6).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5])
    assert instance_mass(sizes, 6, 3.0).tolist() == pytest.approx([3.0, 3.0, 1.5, 0.5])


def test_transport_weights_column_masses_with_multiplicity():
    cost = torch.rand(2, 1, 6, 2)
    plan = transport_weights(cost, torch.tensor([[True, True]]), torch.tensor([[1.0], [2.5]]), 0.1, 200)
    assert torch.allclose(plan.sum(-1), torch.ones(2, 1, 6), atol=1e-5)  # every query fully claimed
    cols = plan.sum(-2)
    assert torch.allclose(cols[0, 0], torch.tensor([1.0, 1.0, 4.0]), atol=1e-3)
    assert torch.allclose(cols[1, 0], torch.tensor([2.5, 2.5, 1.0]), atol=1e-3)


def test_aux_multiplicity_changes_only_aux_layers_and_defaults_to_4():
    outputs, targets = make_outputs(2, (8, 8), num_aux=2), make_targets([2, 3], (8, 8))
    default = MaskInfluencerCriterion(C, num_points=None)
    assert default.aux_multiplicity == 4.0
    a = default(outputs, targets)
    one = MaskInfluencerCriterion(C, num_points=None, aux_multiplicity=1.0)(outputs, targets)
    assert all(torch.equal(a[k], one[k]) for k in ("loss_ce", "loss_mask", "loss_dice"))  # final layer: one-to-one
    assert not torch.equal(a["loss_ce_0"], one["loss_ce_0"])


def test_class_targets_with_quality_put_the_shortfall_on_no_object():
    weights = torch.tensor([[[1.0, 0.0], [0.0, 0.5], [0.0, 0.0]]])
    labels = torch.tensor([[1, 2]])
    quality = torch.tensor([[[0.8, 0.1], [0.3, 0.6], [0.5, 0.5]]])
    t = class_targets(weights, labels, 3, quality)
    expected = torch.tensor([[[0, 0.8, 0, 0.2], [0, 0, 0.3, 0.7], [0, 0, 0, 1.0]]])
    assert torch.allclose(t, expected)
    assert torch.allclose(class_targets(weights, labels, 3), class_targets(weights, labels, 3, torch.ones_like(quality)))


def test_transport_quality_targets_lower_the_class_target_of_poor_masks():
    outputs, targets = make_outputs(1, (8, 8)), make_targets([2], (8, 8))
    plain = MaskInfluencerCriterion(C, num_points=None)(outputs, targets)["loss_ce"]
    quality = MaskInfluencerCriterion(C, num_points=None, quality_targets=True)(outputs, targets)["loss_ce"]
    assert torch.isfinite(quality) and not torch.isclose(plain, quality)


def test_epsilon_schedule_is_geometric_in_progress():
    crit = MaskInfluencerCriterion(C, epsilon=0.1, epsilon_end=0.01)
    assert crit.current_epsilon() == pytest.approx(0.1)
    crit.set_progress(0.5)
    assert crit.current_epsilon() == pytest.approx(0.1 * 0.1 ** 0.5)
    crit.set_progress(2.0)
    assert crit.current_epsilon() == pytest.approx(0.01)
    assert MaskInfluencerCriterion(C, epsilon=0.1).current_epsilon() == 0.1
    with pytest.raises(ValueError, match="epsilon_end"):
        MaskInfluencerCriterion(C, epsilon_end=0.0)
    with pytest.raises(ValueError, match="aux_multiplicity"):
        MaskInfluencerCriterion(C, aux_multiplicity=0.5)


# ----------------------------------------------------------------------------------------------- Hungarian


@pytest.mark.parametrize("num_points", [None, 30])
def test_hungarian_aux_multiplicity_repeats_targets_on_aux_layers(num_points):
    outputs, targets = make_outputs(2, (8, 8), num_aux=2), make_targets([2, 4], (8, 8))
    crit = HungarianCriterion(C, num_points=num_points, aux_multiplicity=3)
    losses = crit(outputs, targets)
    assert torch.isfinite(losses["loss"])
    final, aux = crit.last_layer_indices[0], crit.last_layer_indices[1]
    for (rows, cols), k in zip(final, [2, 4]):
        assert sorted(cols.tolist()) == list(range(k)) and len(set(rows.tolist())) == k
    # Q = 6: image 0 (K 2) gets 3 copies, image 1 (K 4) only 6 // 4 = 1
    for (rows, cols), k, r in zip(aux, [2, 4], [3, 1]):
        assert sorted(cols.tolist()) == sorted(list(range(k)) * r) and len(set(rows.tolist())) == r * k


def test_hungarian_defaults_unchanged_by_the_levers_off():
    outputs, targets = make_outputs(2, (8, 8), num_aux=1), make_targets([2, 3], (8, 8))
    a = HungarianCriterion(C, num_points=None)(outputs, targets)
    b = HungarianCriterion(C, num_points=None, aux_multiplicity=1, quality_targets=False)(outputs, targets)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hungarian_quality_targets_equal_soft_ce_with_the_matched_dice():
    outputs, targets = make_outputs(1, (8, 8)), make_targets([3], (8, 8))
    crit = HungarianCriterion(C, num_points=None, quality_targets=True)
    got = crit(outputs, targets)["loss_ce"]
    rows, cols = crit.last_indices[0]
    probs = outputs["pred_masks"][0, rows].detach().flatten(1).sigmoid()
    tgt = targets[0]["masks"][cols].flatten(1).float()
    dice = (2 * (probs * tgt).sum(-1) + 1) / (probs.sum(-1) + tgt.sum(-1) + 1)
    soft = F.one_hot(torch.full((Q,), C), C + 1).float()
    soft[rows] = 0
    soft[rows, targets[0]["labels"][cols]] = dice
    soft[rows, C] = 1 - dice
    assert torch.allclose(got, loss_ce(outputs["pred_logits"], soft[None], crit.empty_weight), atol=1e-6)
    with pytest.raises(ValueError, match="aux_multiplicity"):
        HungarianCriterion(C, aux_multiplicity=0)


def test_ownership_class_targets_keep_their_gradient_to_the_masks():
    """Ownership weights are a softmax of the masks' coverage: its soft class targets pass gradient to the masks
    (as before the weight-producer restructure); the transport plan is detached, so its loss_ce does not."""
    outputs, targets = make_outputs(1, (8, 8)), make_targets([2], (8, 8))
    ce = MaskInfluencerCriterion(C, form="ownership", num_points=None)(outputs, targets)["loss_ce"]
    (grad,) = torch.autograd.grad(ce, outputs["pred_masks"], allow_unused=True)
    assert grad is not None and grad.abs().sum() > 0
    ce = MaskInfluencerCriterion(C, num_points=None)(outputs, targets)["loss_ce"]
    (grad,) = torch.autograd.grad(ce, outputs["pred_masks"], allow_unused=True)
    assert grad is None or grad.abs().sum() == 0


def test_sinkhorn_epsilon_start_reaches_the_plan_and_is_checked():
    outputs, targets = make_outputs(2, (8, 8), num_aux=1), make_targets([2, 3], (8, 8))
    outputs["pred_masks"] = outputs["pred_masks"] * 40  # sharp costs: 30 plain iterations leave marginals off
    layers = crit_layers(outputs)
    plain = MaskInfluencerCriterion(C, num_points=None, epsilon=0.02, sinkhorn_iters=30, aux_multiplicity=1)
    scaled = MaskInfluencerCriterion(C, num_points=None, epsilon=0.02, sinkhorn_iters=30, aux_multiplicity=1,
                                     sinkhorn_epsilon_start=5.0)
    converged = MaskInfluencerCriterion(C, num_points=None, epsilon=0.02, sinkhorn_iters=4000, aux_multiplicity=1)
    w_plain, w_scaled, w_ref = (c.layer_context(layers, targets)[0]["weights"] for c in (plain, scaled, converged))
    err = lambda w: (w.sum(1) - torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])).abs().max()  # noqa: E731
    assert err(w_plain) > 0.1 and err(w_scaled) < 1e-2 and err(w_ref) < 1e-3
    torch.testing.assert_close(w_scaled, w_ref, atol=1e-2, rtol=0)
    assert MaskInfluencerCriterion(C).sinkhorn_epsilon_start is None  # off by default
    with pytest.raises(ValueError, match="sinkhorn_epsilon_start must be None or a finite number > 0, got 0"):
        MaskInfluencerCriterion(C, sinkhorn_epsilon_start=0)
