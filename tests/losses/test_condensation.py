"""InfluencerLoss (embedding / condensation form) against a per-instance Python-loop reference."""

import pytest
import torch
import torch.nn.functional as F

from influencerformer.losses.condensation import InfluencerLoss

WEIGHTS = {"attractive": 1.0, "repulsive": 2.0, "beta": 0.5, "background": 0.3}


def reference(x, beta, ids, batch, temperature, margin):
    """Loops over items and instances, straight from the module docstring."""
    zero = x.sum() * 0
    infl, soft_beta, attr, item_of = [], [], [], []
    for item in batch.unique().tolist():
        for k in ids[(batch == item) & (ids >= 0)].unique().tolist():
            sel = (batch == item) & (ids == k)
            w = torch.softmax(beta[sel] / temperature, 0)
            e = (w[:, None] * x[sel]).sum(0)
            infl.append(e)
            soft_beta.append((w * beta[sel]).sum())
            attr.append(((x[sel] - e) ** 2).sum(1).mean())
            item_of.append(item)
    reps = [torch.relu(margin - torch.linalg.norm(infl[i] - infl[j]))
            for i in range(len(infl)) for j in range(len(infl)) if i != j and item_of[i] == item_of[j]]
    bg = beta[ids < 0]
    return {
        "attractive": torch.stack(attr).mean() if attr else zero,
        "repulsive": torch.stack(reps).mean() if reps else zero,
        "beta": (-F.logsigmoid(torch.stack(soft_beta))).mean() if soft_beta else zero,
        "background": (-F.logsigmoid(-bg)).mean() if bg.numel() else zero,
    }


def make_points(n=60, d=3, num_items=2, max_id=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.6
    beta = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    ids = torch.randint(-1, max_id, (n,), generator=gen)
    batch = torch.randint(0, num_items, (n,), generator=gen).sort().values
    return x, beta, ids, batch


@pytest.mark.parametrize("temperature,margin,num_items", [(1.0, 1.0, 2), (0.3, 2.0, 3), (2.0, 0.5, 1)])
def test_matches_reference_values_and_gradients(temperature, margin, num_items):
    x, beta, ids, batch = make_points(num_items=num_items, seed=num_items)
    x.requires_grad_(True)
    beta.requires_grad_(True)
    loss = InfluencerLoss(attr_weight=1.0, rep_weight=2.0, beta_weight=0.5, bg_weight=0.3,
                          rep_margin=margin, temperature=temperature)
    ours = loss(x, beta, ids, batch)
    ref = reference(x, beta, ids, batch, temperature, margin)
    for name in WEIGHTS:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-12)
    ref_total = sum(WEIGHTS[k] * ref[k] for k in WEIGHTS)
    torch.testing.assert_close(ours["loss"], ref_total)
    g_ours = torch.autograd.grad(ours["loss"], (x, beta), retain_graph=True)
    g_ref = torch.autograd.grad(ref_total, (x, beta))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_gradcheck():
    x, beta, ids, batch = make_points(n=14, d=2, seed=5)
    loss = InfluencerLoss(temperature=0.5)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, ids, batch)["loss"],
                                    (x.requires_grad_(True), beta.requires_grad_(True)))


def test_batch_vector_equals_separate_calls_for_instance_means():
    x, beta, ids, batch = make_points(num_items=2, seed=6)
    loss = InfluencerLoss()
    together = loss(x, beta, ids, batch)
    parts = [loss(x[batch == i], beta[batch == i], ids[batch == i]) for i in range(2)]
    counts = [len(ids[(batch == i) & (ids >= 0)].unique()) for i in range(2)]
    want = sum(p["attractive"] * c for p, c in zip(parts, counts)) / sum(counts)
    torch.testing.assert_close(together["attractive"], want)  # pooled mean over instances


def test_same_ids_in_different_items_are_different_instances():
    x = torch.tensor([[0.0], [0.0], [5.0], [5.0]], dtype=torch.float64)
    beta = torch.zeros(4, dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 0])
    out = InfluencerLoss()(x, beta, ids, torch.tensor([0, 0, 1, 1]))
    assert out["attractive"] == 0  # each item's instance sits on its own influencer
    assert out["repulsive"] == 0  # no pair within an item


def test_no_instances():
    x, beta, _, _ = make_points(n=10, seed=7)
    x.requires_grad_(True)
    out = InfluencerLoss()(x, beta, torch.full((10,), -1))
    assert out["attractive"] == 0 and out["repulsive"] == 0 and out["beta"] == 0
    torch.testing.assert_close(out["background"], (-F.logsigmoid(-beta)).mean())
    out["loss"].backward()
    assert torch.isfinite(x.grad).all()


def test_one_instance_and_empty_input():
    x, beta, _, _ = make_points(n=8, seed=8)
    out = InfluencerLoss()(x, beta, torch.zeros(8, dtype=torch.long))
    assert out["repulsive"] == 0 and out["background"] == 0 and out["attractive"] > 0
    empty = InfluencerLoss()(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert all(v == 0 for v in empty.values())


def test_condensed_prediction_scores_below_spread_one():
    ids = torch.tensor([0, 0, 0, 1, 1, 1, -1, -1])
    condensed = torch.tensor([[0.0, 0]] * 3 + [[3.0, 0]] * 3 + [[9.0, 9]] * 2)
    beta = torch.tensor([8.0, -8, -8, 8, -8, -8, -8, -8])
    loss = InfluencerLoss()
    good = loss(condensed, beta, ids)
    spread = loss(condensed + torch.randn(8, 2), beta.flip(0), ids)
    assert good["loss"] < 1e-2 < spread["loss"]


def test_bad_inputs_raise():
    loss = InfluencerLoss()
    with pytest.raises(ValueError, match=r"beta_logits must be \(5,\) to match embeddings \(5, 2\), got \(4,\)"):
        loss(torch.zeros(5, 2), torch.zeros(4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="instance_ids must be >= -1"):
        loss(torch.zeros(2, 2), torch.zeros(2), torch.tensor([0, -3]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        InfluencerLoss(temperature=0.0)
