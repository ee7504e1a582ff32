"""The weighted terms every matching-free form shares: weights ``(B, Q, K)`` in, three scalar losses out.

A form (transport plan, softmax ownership, ...) only decides *how much* query ``q`` answers for instance ``k``;
these functions turn that into the same three terms as Mask2Former's criterion, so a new assignment idea is one
small weight producer (``weights.py``), not a new branch in every term.  With one-hot weights from a Hungarian
matching they are exactly Mask2Former's ``loss_ce`` / ``loss_mask`` / ``loss_dice`` on every location.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_targets", "loss_ce", "loss_mask", "loss_dice", "matching_cost"]


def matching_cost(prob: Tensor, bce: Tensor, one_minus_dice: Tensor, weights: tuple[float, float, float]) -> Tensor:
    """The pair cost the weights are produced from, ``(B, Q, K)``:
    ``class_weight (1 - p_q(c_k)) + mask_weight BCE(q, k) + dice_weight (1 - dice(q, k))`` with
    ``weights = (class_weight, mask_weight, dice_weight)`` (the transport and seeded forms' matching cost)."""
    wc, wm, wd = weights
    return wc * (1 - prob) + wm * bce + wd * one_minus_dice


def class_targets(weights: Tensor, labels: Tensor, num_classes: int, quality: Tensor | None = None) -> Tensor:
    """Per-query soft class targets ``(B, Q, C + 1)``, rows summing to 1.

    ``t_q = sum_k a_qk onehot(c_k) / max(claim_q, 1)`` plus ``1 - min(claim_q, 1)`` on "no object", with
    ``claim_q = sum_k a_qk`` and ``a_qk = w_qk`` (plain) or ``w_qk * quality_qk`` (quality-aware: a query is
    taught the class only as far as its mask already matches the instance, so duplicates and poor masks learn
    low scores -- what AP without NMS rewards; Stable-DINO's position-supervised loss, Align-DETR).

    Args:
        weights: ``(B, Q, K)`` >= 0, padded instances 0.
        labels: ``(B, K)`` long in ``[0, C)`` (padded entries: any valid id).
        quality: optional ``(B, Q, K)`` in [0, 1], detached (e.g. the pair's dice coefficient).
    """
    amount = weights if quality is None else weights * quality
    onehot = F.one_hot(labels, num_classes + 1).to(amount.dtype)
    claim = amount.sum(-1, keepdim=True)
    cls = torch.matmul(amount, onehot) / claim.clamp_min(1.0)
    return cls + F.pad((1.0 - claim).clamp_min(0.0), (num_classes, 0))


def loss_ce(pred_logits: Tensor, targets: Tensor, class_weight: Tensor) -> Tensor:
    """Class-weighted soft cross-entropy ``sum w_c t_qc (-log p_qc) / sum w_c t_qc``.

    ``pred_logits`` and ``targets`` ``(B, Q, C + 1)``; ``class_weight (C + 1,)`` (``no_object_weight`` last).
    Equals ``F.cross_entropy(..., weight=class_weight)`` for one-hot targets.
    """
    weighted = targets * class_weight.to(targets.dtype)
    logits = pred_logits if pred_logits.dtype == torch.float64 else pred_logits.float()
    nll = -torch.log_softmax(logits, dim=-1)
    return (weighted * nll).sum() / weighted.sum().clamp_min(1e-12)


def loss_mask(weights: Tensor, bce: Tensor, num_masks: Tensor) -> Tensor:
    """``sum_{q,k} w_qk BCE(q, k) / num_masks`` -- ``weights`` and ``bce`` ``(B, Q, K)``."""
    return (weights * bce).sum() / num_masks


def loss_dice(weights: Tensor, one_minus_dice: Tensor, num_masks: Tensor) -> Tensor:
    """``sum_{q,k} w_qk (1 - dice(q, k)) / num_masks`` -- both ``(B, Q, K)``."""
    return (weights * one_minus_dice).sum() / num_masks
