"""Mask losses: pairwise forms equal HF/Mask2Former's reference math; matched forms equal the pairwise diagonal."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.mask2former import modeling_mask2former as hf

from influencerformer.losses.mask_losses import (
    brier_loss,
    dice_loss,
    pairwise_brier,
    pairwise_dice,
    pairwise_sigmoid_bce,
    sigmoid_bce_loss,
)


def _inputs(q=7, k=4, p=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(q, p, generator=g, dtype=torch.float64) * 4
    targets = (torch.rand(k, p, generator=g) > 0.5).double()
    return logits, targets


def test_pairwise_bce_equals_hf_reference():
    logits, targets = _inputs()
    ref = hf.pair_wise_sigmoid_cross_entropy_loss(logits, targets)
    torch.testing.assert_close(pairwise_sigmoid_bce(logits, targets), ref)


def test_pairwise_dice_equals_hf_reference():
    logits, targets = _inputs()
    torch.testing.assert_close(pairwise_dice(logits, targets), hf.pair_wise_dice_loss(logits, targets))


def test_pairwise_brier_equals_brute_force():
    logits, targets = _inputs()
    ref = (logits.sigmoid()[:, None, :] - targets[None, :, :]).square().mean(-1)
    torch.testing.assert_close(pairwise_brier(logits, targets), ref)


def test_bce_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, -1e4]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cost = pairwise_sigmoid_bce(logits, targets)
    assert torch.isfinite(cost).all()
    torch.testing.assert_close(cost, torch.tensor([[0.0, 1e4]]))


@pytest.mark.parametrize(
    "pairwise, matched",
    [(pairwise_sigmoid_bce, sigmoid_bce_loss), (pairwise_brier, brier_loss), (pairwise_dice, dice_loss)],
)
def test_matched_form_is_the_pairwise_diagonal(pairwise, matched):
    logits, targets = _inputs(q=5, k=5)
    diag = pairwise(logits, targets).diagonal()
    num_masks = 3.0
    torch.testing.assert_close(matched(logits, targets, num_masks), diag.sum() / num_masks)


def test_matched_forms_equal_hf_reference():
    logits, targets = _inputs(q=6, k=6)
    torch.testing.assert_close(sigmoid_bce_loss(logits, targets, 4), hf.sigmoid_cross_entropy_loss(logits, targets, 4))
    torch.testing.assert_close(dice_loss(logits, targets, 4), hf.dice_loss(logits, targets, 4))


def test_pairwise_batched_leading_dims_equal_per_item():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 6, 40, generator=g)  # (L, B, Q, P)
    targets = (torch.rand(2, 4, 40, generator=g) > 0.5).float()  # (B, K, P), broadcast over L
    for fn in (pairwise_sigmoid_bce, pairwise_brier, pairwise_dice):
        out = fn(logits, targets[None])
        assert out.shape == (3, 2, 6, 4)
        torch.testing.assert_close(out[2, 1], fn(logits[2, 1], targets[1]))


@pytest.mark.parametrize("fn", [sigmoid_bce_loss, brier_loss, dice_loss])
def test_matched_gradcheck(fn):
    logits, targets = _inputs(q=3, k=3, p=8)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, targets, 2.0), (logits,))


@pytest.mark.parametrize("fn", [pairwise_sigmoid_bce, pairwise_brier, pairwise_dice])
def test_pairwise_gradcheck(fn):
    logits, targets = _inputs(q=3, k=2, p=8)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, targets), (logits,))


def test_empty_instance_set_gives_empty_costs():
    logits, _ = _inputs(q=4)
    for fn in (pairwise_sigmoid_bce, pairwise_brier, pairwise_dice):
        assert fn(logits, torch.zeros(0, logits.shape[1], dtype=logits.dtype)).shape == (4, 0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"must agree in P"):
        pairwise_dice(torch.zeros(3, 10), torch.zeros(2, 11))
    with pytest.raises(ValueError, match=r"expected logits \(N, P\) and targets \(N, P\)"):
        dice_loss(torch.zeros(3, 10), torch.zeros(2, 10), 1)
    with pytest.raises(ValueError, match=r"equal rank"):
        pairwise_sigmoid_bce(torch.zeros(2, 3, 10), torch.zeros(3, 10))


def test_matched_bce_matches_torch_builtin():
    logits, targets = _inputs(q=4, k=4)
    ref = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / 2
    torch.testing.assert_close(sigmoid_bce_loss(logits, targets, torch.tensor(2.0, dtype=torch.float64)), ref)
