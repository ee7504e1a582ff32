"""mask_influencer_loss (seed form) and the ownership pure functions against naive references."""

import pytest
import torch
import torch.nn.functional as F

from influencerformer.losses.weighted_terms import class_targets as soft_class_targets, loss_ce as soft_cross_entropy
from influencerformer.losses.influencer import (
    mask_influencer_loss,
    ownership_weights,
    soft_dice_coverage,
)

TERMS = ("attractive", "repulsive", "background")


def reference_loss(logits, masks, temperature=1.0, margin=1.0):
    """Per-instance, per-query Python loops straight from the formulas of docs/loss.md."""
    q_count, k_count = logits.shape[0], masks.shape[0]
    logsig = F.logsigmoid(logits)
    insts = [k for k in range(k_count) if masks[k].any()]
    g = {k: torch.stack([logsig[q, masks[k]].mean() for q in range(q_count)]) for k in insts}
    attr = [-temperature * torch.logsumexp(g[k] / temperature, 0) for k in insts]
    rep = [torch.relu(margin - torch.linalg.norm(g[k].exp() - g[l].exp())) for k in insts for l in insts if k != l]
    bg = ~masks.any(0)
    zero = logits.sum() * 0
    return {
        "attractive": torch.stack(attr).mean() if attr else zero,
        "repulsive": torch.stack(rep).mean() if rep else zero,
        "background": torch.sigmoid(logits[:, bg]).mean() if bg.any() else zero,
    }


def random_case(q=6, k=4, p=40, seed=0, background=True):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(q, p, generator=gen, dtype=torch.float64) * 2
    owner = torch.randint(0, k + int(background), (p,), generator=gen)
    owner[: k + int(background)] = torch.arange(k + int(background))  # every instance non-empty
    masks = owner.unsqueeze(0) == torch.arange(k).unsqueeze(1)
    return logits, masks


@pytest.mark.parametrize("q,k,temperature,margin", [(6, 4, 1.0, 1.0), (5, 8, 0.5, 2.0), (3, 1, 2.0, 1.0)])
def test_matches_reference_values_and_gradients(q, k, temperature, margin):
    logits, masks = random_case(q, k)
    logits.requires_grad_(True)
    ours = mask_influencer_loss(logits, masks, temperature=temperature, rep_margin=margin)
    ref = reference_loss(logits, masks, temperature, margin)
    for name in TERMS:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-10, atol=1e-12)
        g_ours, = torch.autograd.grad(ours[name], logits, retain_graph=True)
        g_ref, = torch.autograd.grad(ref[name], logits, retain_graph=True, allow_unused=True)
        torch.testing.assert_close(g_ours, torch.zeros_like(g_ours) if g_ref is None else g_ref)


def test_gradcheck():
    logits, masks = random_case(4, 3, 12, seed=1)
    logits.requires_grad_(True)

    def total(x):
        out = mask_influencer_loss(x, masks, temperature=0.7, rep_margin=1.5)
        return out["attractive"] + 2 * out["repulsive"] + 3 * out["background"]

    assert torch.autograd.gradcheck(total, (logits,))


def test_permuting_queries_and_instances_changes_nothing():
    logits, masks = random_case(7, 4, seed=2)
    base = mask_influencer_loss(logits, masks)
    perm_q, perm_k = torch.randperm(7), torch.randperm(4)
    permuted = mask_influencer_loss(logits[perm_q], masks[perm_k])
    for name in TERMS:
        torch.testing.assert_close(permuted[name], base[name])


def _confident(masks_per_query, q, p):
    logits = torch.full((q, p), -12.0, dtype=torch.float64)
    for i, m in enumerate(masks_per_query):
        logits[i, m] = 12.0
    return logits


def test_perfect_scores_below_two_instances_merged():
    _, masks = random_case(6, 3, seed=3)
    perfect = mask_influencer_loss(_confident(list(masks), 6, 40), masks)
    merged = mask_influencer_loss(_confident([masks[0] | masks[1], masks[2]], 6, 40), masks)
    total = lambda t: t["attractive"] + t["repulsive"] + 0.1 * t["background"]  # noqa: E731
    # Merged: instances 0 and 1 have the same profile, so 2 of the 6 ordered pairs pay the full margin.
    torch.testing.assert_close(merged["repulsive"], torch.tensor(2 / 6, dtype=torch.float64))
    assert total(perfect) < total(merged) - 0.3


def test_no_instances():
    logits, _ = random_case(5, 2, seed=4)
    out = mask_influencer_loss(logits, torch.zeros(0, 40, dtype=torch.bool))
    assert out["attractive"] == 0 and out["repulsive"] == 0
    torch.testing.assert_close(out["background"], torch.sigmoid(logits).mean())


def test_one_instance_has_no_repulsion():
    logits, masks = random_case(5, 1, seed=5)
    out = mask_influencer_loss(logits, masks)
    assert out["repulsive"] == 0
    torch.testing.assert_close(out["attractive"], reference_loss(logits, masks)["attractive"])


def test_more_instances_than_queries_is_finite_with_gradient():
    logits, masks = random_case(2, 9, p=60, seed=6)
    logits.requires_grad_(True)
    out = mask_influencer_loss(logits, masks)
    sum(out.values()).backward()
    assert all(torch.isfinite(v) for v in out.values()) and torch.isfinite(logits.grad).all()


def test_no_background_location():
    logits, masks = random_case(4, 3, seed=7, background=False)
    assert masks.any(0).all()
    out = mask_influencer_loss(logits, masks)
    assert out["background"] == 0


def test_identical_profiles_give_finite_gradient():
    # Two instances covered identically: distance 0, where a naive sqrt has an infinite gradient.
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[0, :4], masks[1, 4:] = True, True
    logits = torch.zeros(3, 8, dtype=torch.float64, requires_grad=True)
    out = mask_influencer_loss(logits, masks)
    out["repulsive"].backward()
    torch.testing.assert_close(out["repulsive"], torch.tensor(1.0, dtype=torch.float64))
    assert torch.isfinite(logits.grad).all()


def test_empty_instance_is_ignored():
    logits, masks = random_case(5, 3, seed=8)
    padded = torch.cat([masks, torch.zeros(1, 40, dtype=torch.bool)])
    for name in TERMS:
        want = mask_influencer_loss(logits, masks)[name]
        torch.testing.assert_close(mask_influencer_loss(logits, padded)[name], want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise(bad):
    logits, masks = random_case(4, 2, seed=9)
    logits[1, 3] = bad
    with pytest.raises(ValueError, match="mask_logits contains NaN or Inf"):
        mask_influencer_loss(logits, masks)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(3, 9\)"):
        mask_influencer_loss(torch.zeros(4, 10), torch.zeros(3, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(2, 4, 10\).*\(3, 10\)"):
        mask_influencer_loss(torch.zeros(2, 4, 10), torch.zeros(3, 10, dtype=torch.bool))


def test_bad_dtype_and_options_raise():
    logits, masks = random_case(4, 2)
    with pytest.raises(ValueError, match="instance_masks must be bool"):
        mask_influencer_loss(logits, masks.double())
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        mask_influencer_loss(logits, masks, temperature=0)


# ----------------------------------------------------------------------------- ownership functions
def test_soft_dice_coverage_matches_loop():
    logits, masks = random_case(4, 3, seed=10)
    ours = soft_dice_coverage(logits, masks)
    probs = torch.sigmoid(logits)
    for k in range(3):
        for q in range(4):
            m = masks[k].double()
            want = (2 * (probs[q] * m).sum() + 1) / (probs[q].sum() + m.sum() + 1)
            torch.testing.assert_close(ours[k, q], want)


def test_ownership_weights_rows_and_padding():
    cov = torch.rand(2, 3, 5, dtype=torch.float64)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    w = ownership_weights(cov, valid, temperature=0.3)
    torch.testing.assert_close(w.sum(-1), valid.double())
    torch.testing.assert_close(w[0, 0], torch.softmax(cov[0, 0] / 0.3, 0))


def test_soft_class_targets_remainder_and_normalisation():
    weights = torch.tensor([[0.25, 0.5], [0.9, 0.6], [0.0, 0.0]], dtype=torch.float64)  # (Q=3, K=2)
    labels = torch.tensor([1, 0])
    t = soft_class_targets(weights, labels, num_classes=2)
    want = torch.tensor([[0.5, 0.25, 0.25], [0.6 / 1.5, 0.9 / 1.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(t, want)


def test_soft_cross_entropy_equals_weighted_hard_ce_on_one_hot():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 6), generator=gen)
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64)
    ours = soft_cross_entropy(logits, F.one_hot(labels, 4).double(), weight)
    torch.testing.assert_close(ours, F.cross_entropy(logits.transpose(1, 2), labels, weight=weight))
