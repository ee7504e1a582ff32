"""SeededCriterion (OneFormer3D's sparse matcher): one-hot weights from the instance at each query's seed, the pick
among an instance's seeded queries by cost, K = 0, a seed on background, aux layers, gradients, errors."""
import pytest
import torch
import torch.nn.functional as F

from influencerformer.losses.registry import build_criterion
from influencerformer.losses.seeded import SeededCriterion, seed_owner, top_seeded

P = 8
# scene 0: instance 0 = points 0-2 (class 1), instance 1 = points 4-6 (class 0); points 3 and 7 on background
MASKS = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
TARGET = {"labels": torch.tensor([1, 0]), "masks": MASKS}
SEEDS = torch.tensor([[1, 3, 5, 2, 7]])  # q0, q3 in instance 0; q2 in instance 1; q1, q4 on background


def outputs(seeds=SEEDS, num_classes=2, grad=False, aux=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, q = seeds.shape

    def layer():
        return {"pred_logits": torch.randn(b, q, num_classes + 1, generator=g).requires_grad_(grad),
                "pred_masks": torch.randn(b, q, P, generator=g).requires_grad_(grad)}

    out = {**layer(), "query_seeds": seeds}
    out["aux_outputs"] = [layer() for _ in range(aux)]
    return out


def test_weights_are_the_hand_computed_one_hot():
    owner = seed_owner(MASKS[None].float(), torch.ones(1, 2, dtype=torch.bool), SEEDS)
    expected = torch.tensor([[1, 0], [0, 0], [0, 1], [1, 0], [0, 0]], dtype=torch.bool)
    assert torch.equal(owner[0], expected)
    crit = SeededCriterion(2, per_instance=None)  # every seeded query is kept: the weights are the owner itself
    crit(outputs(), [TARGET])
    assert torch.equal(crit.last_weights[0], expected.float())


def test_top1_keeps_the_cheaper_of_two_seeded_queries():
    out = outputs()
    with torch.no_grad():
        out["pred_masks"][0, 3] = torch.where(MASKS[0], 10.0, -10.0)  # q3 predicts instance 0 exactly
        out["pred_masks"][0, 0] = torch.where(MASKS[0], -10.0, 10.0)  # q0, seeded there too, predicts its opposite
    crit = build_criterion("seeded", 2)
    crit(out, [TARGET])
    expected = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 0], [0, 0]], dtype=torch.float)
    assert torch.equal(crit.last_weights[0], expected)
    q, k = crit.last_indices[0]
    assert q.tolist() == [2, 3] and k.tolist() == [1, 0]
    assert crit.last_assignment[0].tolist() == [3, 2]  # the owner diagnostic the assignment probe reads
    # the pick follows the cost: swap the two queries' masks and q0 is kept instead
    out["pred_masks"][0, [0, 3]] = out["pred_masks"][0, [3, 0]].clone()
    crit(out, [TARGET])
    assert crit.last_weights[0, :, 0].tolist() == [1, 0, 0, 0, 0]


def test_top_seeded_ties_go_to_the_lower_query_and_two_per_instance_keeps_both():
    owner = torch.tensor([[[True], [False], [True], [True]]])
    cost = torch.tensor([[[1.0], [0.0], [1.0], [0.5]]])
    assert top_seeded(owner, cost, 1)[0, :, 0].tolist() == [False, False, False, True]
    assert top_seeded(owner, torch.ones_like(cost), 1)[0, :, 0].tolist() == [True, False, False, False]
    assert top_seeded(owner, cost, 2)[0, :, 0].tolist() == [True, False, False, True]


def test_losses_equal_cross_entropy_bce_and_dice_on_the_picked_pairs():
    out, crit = outputs(), SeededCriterion(2, per_instance=None)
    losses = crit(out, [TARGET])
    target = torch.tensor([[1, 2, 0, 1, 2]])  # seeded queries learn their instance's class, the rest "no object"
    ce = F.cross_entropy(out["pred_logits"].transpose(1, 2), target, weight=torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(losses["loss_ce"], ce)
    logits, tgt = out["pred_masks"][0, [0, 2, 3]], MASKS[[0, 1, 0]].float()
    bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none").mean(-1).sum() / 2  # 2 instances
    s = logits.sigmoid()
    dice = (1 - (2 * (s * tgt).sum(-1) + 1) / (s.sum(-1) + tgt.sum(-1) + 1)).sum() / 2
    torch.testing.assert_close(losses["loss_mask"], bce)
    torch.testing.assert_close(losses["loss_dice"], dice)


def test_the_layer_context_holds_one_minus_dice_a_cost():
    """The pair term handed to ``loss_dice`` is ``1 - dice`` (named ``one_minus_dice``, as in ``pair_kernel``)."""
    out, crit = outputs(), SeededCriterion(2)
    crit._seeds = SEEDS  # what forward holds during a call
    context = crit.layer_context([(out["pred_logits"], out["pred_masks"])], [TARGET])[0]
    assert "dice" not in context
    s, t = out["pred_masks"][0].sigmoid(), MASKS.float()  # (Q, P), (K, P)
    dice = (2 * s @ t.T + 1) / (s.sum(-1, keepdim=True) + t.sum(-1) + 1)
    torch.testing.assert_close(context["one_minus_dice"][0], 1 - dice)
    assert ((context["one_minus_dice"] >= 0) & (context["one_minus_dice"] <= 1)).all()  # a cost: 0 = perfect

def test_no_instances_and_seeds_on_background_give_no_object():
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, P, dtype=torch.bool)}
    out = outputs(torch.tensor([[0, 3, 7], [1, 2, 4]]), grad=True)
    background = {"labels": torch.tensor([0]), "masks": torch.tensor([[0, 0, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)}
    crit = build_criterion("seeded", 2)
    losses = crit(out, [empty, background])  # K = 0 in item 0; item 1's seeds all miss its one instance
    assert crit.last_weights.shape == (2, 3, 1) and crit.last_weights.sum() == 0
    assert [a.tolist() for a in crit.last_assignment] == [[], [-1]]  # an instance without a picked query: -1
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    ce = F.cross_entropy(out["pred_logits"].transpose(1, 2), torch.full((2, 3), 2))  # every query: "no object"
    torch.testing.assert_close(losses["loss_ce"], ce)
    losses["loss"].backward()
    assert torch.isfinite(out["pred_logits"].grad).all() and out["pred_masks"].grad.abs().sum() == 0


def test_aux_layers_use_the_same_seeds_and_pick_by_their_own_cost():
    out = outputs(grad=True, aux=2)
    with torch.no_grad():  # the final layer prefers q3 for instance 0, aux layer 1 prefers q0
        out["pred_masks"][0, 3] = torch.where(MASKS[0], 10.0, -10.0)
        out["aux_outputs"][1]["pred_masks"][0, 0] = torch.where(MASKS[0], 10.0, -10.0)
        out["aux_outputs"][1]["pred_masks"][0, 3] = torch.where(MASKS[0], -10.0, 10.0)
    crit = build_criterion("seeded", 2)
    losses = crit(out, [TARGET])
    assert {"loss_ce_0", "loss_mask_1", "loss_dice_1"} <= set(losses)
    assert crit.last_weights[0, :, 0].tolist() == [0, 0, 0, 1, 0]
    crit._seeds = SEEDS  # what forward holds during a call
    aux = crit.layer_context([(a["pred_logits"], a["pred_masks"]) for a in out["aux_outputs"][1:]], [TARGET])[0]
    assert aux["weights"][0, :, 0].tolist() == [1, 0, 0, 0, 0]
    assert aux["weights"][0, :, 1].tolist() == [0, 0, 1, 0, 0]  # instance 1 has one seed in every layer
    losses["loss"].backward()
    for layer in [out, *out["aux_outputs"]]:
        assert torch.isfinite(layer["pred_masks"].grad).all() and layer["pred_masks"].grad.abs().sum() > 0
        assert torch.isfinite(layer["pred_logits"].grad).all()


def test_batched_equals_per_item():
    seeds = torch.tensor([[1, 3, 5, 2, 7], [0, 4, 6, 7, 3]])
    out = outputs(seeds)
    second = {"labels": torch.tensor([1]), "masks": MASKS[1:]}
    crit = build_criterion("seeded", 2)
    both = crit(out, [TARGET, second])
    one = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in out.items()}
    two = {k: (v[1:] if torch.is_tensor(v) else v) for k, v in out.items()}
    a, b = crit(one, [TARGET]), crit(two, [second])
    # the mask terms are sums over pairs / all instances (3 in the batch; 2 and 1 alone)
    torch.testing.assert_close(both["loss_mask"], (2 * a["loss_mask"] + b["loss_mask"]) / 3)
    torch.testing.assert_close(both["loss_dice"], (2 * a["loss_dice"] + b["loss_dice"]) / 3)


def test_errors_name_the_field():
    crit = build_criterion("seeded", 2)
    out = outputs()
    with pytest.raises(ValueError, match=r"query_seeds.*query_init=sampled"):
        crit({k: v for k, v in out.items() if k != "query_seeds"}, [TARGET])
    with pytest.raises(ValueError, match=r"query_seeds.*\[0, 8\)"):
        crit({**out, "query_seeds": SEEDS + 5}, [TARGET])
    with pytest.raises(ValueError, match=r"query_seeds.*integer \(1, 5\)"):
        crit({**out, "query_seeds": SEEDS[:, :3]}, [TARGET])
    with pytest.raises(ValueError, match="point-cloud masks"):
        crit({**out, "pred_masks": out["pred_masks"].reshape(1, 5, 2, 4)}, [TARGET])
    with pytest.raises(ValueError, match="per_instance must be None or an int >= 1, got 0"):
        build_criterion("seeded", 2, per_instance=0)
    assert crit._seeds is None  # nothing held after a failed call
