"""Per-location mask losses — BCE (sigmoid, with logits), Brier and dice — in two forms.

*Pairwise* forms score every (query, instance) pair: ``logits (..., Q, P)`` against ``targets (..., K, P)``
gives ``(..., Q, K)``; this is the matching cost (Mask2Former's ``batch_sigmoid_ce_loss`` /
``batch_dice_loss``). *Matched* forms score aligned pairs ``(N, P)`` vs ``(N, P)`` and return
``sum over pairs / num_masks`` (Mask2Former's ``sigmoid_ce_loss`` / ``dice_loss``).
Targets are floats in [0, 1] (bilinear sampling of a binary mask gives fractions at edges).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pairwise(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() < 2 or targets.dim() != logits.dim():
        raise ValueError(f"expected logits (..., Q, P) and targets (..., K, P) of equal rank, "
                         f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    try:  # leading dims broadcast (e.g. targets shared by every decoder layer)
        torch.broadcast_shapes(logits.shape[:-2], targets.shape[:-2])
    except RuntimeError:
        ok = False
    else:
        ok = logits.shape[-1] == targets.shape[-1]
    if not ok:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must agree in P and "
                         f"have broadcastable leading dims")


def _check_matched(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"expected logits (N, P) and targets (N, P), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")


def pairwise_sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over P of BCE-with-logits for every pair: ``(..., Q, P), (..., K, P) -> (..., Q, K)``.

    Per location ``bce(x, t) = t * softplus(-x) + (1 - t) * softplus(x) = softplus(x) - t * x``,
    so the pairwise sum is a row term plus one einsum (same value as Mask2Former's two matmuls).
    """
    _check_pairwise(logits, targets)
    targets = targets.to(logits.dtype)
    num_points = logits.shape[-1]
    row = F.softplus(logits).sum(-1, keepdim=True)  # (..., Q, 1): cost of predicting all-background
    cross = torch.einsum("...qp,...kp->...qk", logits, targets)
    return (row - cross) / num_points


def pairwise_brier(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over P of ``(sigmoid(x) - t)^2`` for every pair: ``(..., Q, P), (..., K, P) -> (..., Q, K)``.

    Expanded as ``mean(s^2) - 2 <s, t> / P + mean(t^2)`` so that it costs one einsum.
    """
    _check_pairwise(logits, targets)
    targets = targets.to(logits.dtype)
    probs = logits.sigmoid()
    num_points = logits.shape[-1]
    cross = torch.einsum("...qp,...kp->...qk", probs, targets)
    sq_pred = probs.square().sum(-1).unsqueeze(-1)  # (..., Q, 1)
    sq_tgt = targets.square().sum(-1).unsqueeze(-2)  # (..., 1, K)
    return (sq_pred - 2 * cross + sq_tgt) / num_points


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """``1 - dice`` for every pair with +1 smoothing: ``(..., Q, P), (..., K, P) -> (..., Q, K)``.

    ``1 - (2 <s, t> + 1) / (sum s + sum t + 1)`` with ``s = sigmoid(x)`` (Mask2Former's batch_dice_loss).
    """
    _check_pairwise(logits, targets)
    targets = targets.to(logits.dtype)
    probs = logits.sigmoid()
    numerator = 2 * torch.einsum("...qp,...kp->...qk", probs, targets)
    denominator = probs.sum(-1).unsqueeze(-1) + targets.sum(-1).unsqueeze(-2)
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, num_masks: float | Tensor) -> Tensor:
    """Matched BCE: ``(N, P), (N, P) -> scalar`` = sum over pairs of mean-over-P BCE, / num_masks."""
    _check_matched(logits, targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return loss.mean(1).sum() / num_masks


def brier_loss(logits: Tensor, targets: Tensor, num_masks: float | Tensor) -> Tensor:
    """Matched Brier: ``(N, P), (N, P) -> scalar`` = sum over pairs of mean ``(sigmoid(x) - t)^2``, / num_masks."""
    _check_matched(logits, targets)
    loss = (logits.sigmoid() - targets.to(logits.dtype)).square()
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float | Tensor) -> Tensor:
    """Matched dice: ``(N, P), (N, P) -> scalar`` = sum over pairs of ``1 - dice`` (+1 smoothing), / num_masks."""
    _check_matched(logits, targets)
    probs = logits.sigmoid()
    targets = targets.to(logits.dtype)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
