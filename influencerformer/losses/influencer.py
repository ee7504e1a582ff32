"""The mask form of the Influencer loss, and the soft "ownership" form, as pure tensor functions.

Notation (one item): mask logits ``L (Q, P)`` for ``Q`` queries over ``P`` locations (pixels,
sampled points, voxels, superpoints); instance masks ``M (K, P)``; ``n_k = sum_p M[k, p]``.

Seed form (the formulation of the original seeds, vectorised):
    G[k, q]  = sum_p M[k, p] * logsigmoid(L[q, p]) / n_k       log geometric-mean coverage  (K, Q)
    A_k      = -T * logsumexp_q(G[k, q] / T)                   soft-min over queries of -log GM
    R        = exp(G)                                          coverage profile of each instance
    rep      = mean over ordered pairs k != l of relu(margin - ||R_k - R_l||_2)
    bg       = mean over queries and background locations of sigmoid(L[q, p])
Known flaw: logsumexp rewards every extra query covering an instance, so duplicated and
all-covering predictions score below the perfect one (kept as ``form="seed"`` for comparison).

Ownership form (softmax over queries of soft-dice coverage, docs/background.md §2):
    D[k, q] = soft dice(sigmoid(L_q), M_k);  W = softmax_q(D / T)
    mask loss = sum_{k,q} W[k, q] * pair_loss[k, q] / #instances;  class target of q =
    sum_k W[k, q] onehot(c_k) + remainder on "no object" (``weighted_terms.class_targets``).

The batched functions take leading batch dimensions ``...`` and padded instances (all-zero mask
rows are "invalid" and contribute nothing), so a criterion can run a whole batch in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "log_coverage",
    "attractive_per_instance",
    "repulsive_term",
    "background_term",
    "mask_influencer_loss",
    "soft_dice_coverage",
    "ownership_weights",
]


# --------------------------------------------------------------------------- input checks
def _check_pair_shapes(mask_logits: Tensor, instance_masks: Tensor, *, batched: bool) -> None:
    """Raise ValueError unless logits ``(..., Q, P)`` and masks ``(..., K, P)`` agree."""
    shapes = f"mask_logits {tuple(mask_logits.shape)} vs instance_masks {tuple(instance_masks.shape)}"
    if not batched and (mask_logits.dim() != 2 or instance_masks.dim() != 2):
        raise ValueError(f"expected mask_logits (Q, P) and instance_masks (K, P); got {shapes}")
    if mask_logits.dim() < 2 or mask_logits.dim() != instance_masks.dim():
        raise ValueError(f"expected mask_logits (..., Q, P) and instance_masks (..., K, P); got {shapes}")
    if mask_logits.shape[:-2] != instance_masks.shape[:-2] or mask_logits.shape[-1] != instance_masks.shape[-1]:
        raise ValueError(f"batch dims and P must agree; got {shapes}")
    if not mask_logits.is_floating_point():
        raise ValueError(f"mask_logits must be floating point, got dtype {mask_logits.dtype}")


def _check_finite(name: str, x: Tensor) -> None:
    # This is a host sync; only the public single-item entry point pays for it.
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")


# --------------------------------------------------------------------------- seed form terms
def log_coverage(mask_logits: Tensor, instance_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Log geometric-mean coverage of each instance by each query.

    Args:
        mask_logits: ``(..., Q, P)`` float logits.
        instance_masks: ``(..., K, P)`` bool or float in [0, 1] (soft, e.g. sampled targets).
    Returns:
        ``G (..., K, Q)`` with ``G[k, q] = sum_p M[k, p] logsigmoid(L[q, p]) / n_k`` (one matmul,
        logsigmoid keeps it finite for any logit), and ``valid (..., K)`` bool, ``n_k > 0``.
        Rows of empty (padded) instances are 0 and marked invalid.
    """
    m = instance_masks.to(mask_logits.dtype)
    n = m.sum(-1)
    g = torch.matmul(m, F.logsigmoid(mask_logits).transpose(-1, -2))
    return g / n.clamp_min(1e-12).unsqueeze(-1), n > 0


def attractive_per_instance(g: Tensor, temperature: float = 1.0) -> Tensor:
    """Attractive term of each instance, ``A_k = -T logsumexp_q(G[k, q] / T)``.

    Args:
        g: ``(..., K, Q)`` log coverage from ``log_coverage``.
    Returns:
        ``(..., K)``; ``>= -T log Q``, ~0 when exactly one query covers the instance perfectly.
    """
    return -temperature * torch.logsumexp(g / temperature, dim=-1)


def repulsive_term(g: Tensor, valid: Tensor, margin: float = 1.0) -> Tensor:
    """Hinge between coverage profiles of different instances.

    Args:
        g: ``(..., K, Q)`` log coverage; ``valid``: ``(..., K)`` bool (padded instances False).
    Returns:
        ``(...)``: mean over ordered pairs ``k != l`` of valid instances of
        ``relu(margin - ||exp(G_k) - exp(G_l)||_2)``; 0 with fewer than two valid instances.
    """
    profiles = g.exp()
    lead, (k, q) = profiles.shape[:-2], profiles.shape[-2:]
    flat = profiles.reshape(lead.numel(), k, q)
    # Exact differences (not the |a|^2+|b|^2-2ab shortcut, which cancels badly in float32
    # exactly where the hinge is active); cdist's backward is 0 at zero distance, not NaN.
    dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").reshape(*lead, k, k)
    pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    pair = pair & ~torch.eye(k, dtype=torch.bool, device=g.device)
    hinge = torch.relu(margin - dist) * pair
    return hinge.sum((-1, -2)) / pair.sum((-1, -2)).clamp_min(1)


def background_term(mask_logits: Tensor, instance_masks: Tensor) -> Tensor:
    """Mean foreground probability that queries put on background locations.

    Args:
        mask_logits: ``(..., Q, P)``; instance_masks: ``(..., K, P)`` bool or soft.
    Returns:
        ``(...)``: mean over queries and background locations of ``sigmoid(L)``, where a
        location's background weight is ``1 - max_k M[k, p]``; 0 when no location is background.
    """
    m = instance_masks.to(mask_logits.dtype)
    if m.shape[-2] == 0:
        bg = torch.ones_like(mask_logits[..., 0, :])
    else:
        bg = 1.0 - m.amax(dim=-2)
    num = (torch.sigmoid(mask_logits) * bg.unsqueeze(-2)).sum((-1, -2))
    den = bg.sum(-1) * mask_logits.shape[-2]
    return num / den.clamp_min(1e-12)


def mask_influencer_loss(
    mask_logits: Tensor, instance_masks: Tensor, *, temperature: float = 1.0, rep_margin: float = 1.0
) -> dict[str, Tensor]:
    """Seed-form mask Influencer loss of one item, unweighted terms.

    Args:
        mask_logits: ``(Q, P)`` float, finite.
        instance_masks: ``(K, P)`` bool.  Instances with no location are ignored.
        temperature: ``T > 0`` of the soft-min over queries; rep_margin: hinge margin ``>= 0``.
    Returns:
        ``{"attractive", "repulsive", "background"}``, scalar tensors:
        attractive = mean_k A_k (0 when K = 0);  repulsive = mean over ordered pairs (0 when
        K <= 1);  background = mean sigmoid over queries x background locations (0 when every
        location belongs to an instance; all locations are background when K = 0).
    Raises:
        ValueError: on bad shapes / dtype (naming both shapes), NaN/Inf logits, bad T or margin.
    """
    _check_pair_shapes(mask_logits, instance_masks, batched=False)
    if instance_masks.dtype != torch.bool:
        raise ValueError(f"instance_masks must be bool, got dtype {instance_masks.dtype}")
    _check_finite("mask_logits", mask_logits)
    _check_positive("temperature", temperature)
    _check_positive("rep_margin", rep_margin, allow_zero=True)
    g, valid = log_coverage(mask_logits, instance_masks)
    attr = attractive_per_instance(g, temperature) * valid
    return {
        "attractive": attr.sum() / valid.sum().clamp_min(1),
        "repulsive": repulsive_term(g, valid, rep_margin),
        "background": background_term(mask_logits, instance_masks),
    }


# --------------------------------------------------------------------------- ownership form
def soft_dice_coverage(mask_logits: Tensor, instance_masks: Tensor) -> Tensor:
    """Soft dice between every instance and every query mask (Mask2Former's +1 smoothing).

    Args:
        mask_logits: ``(..., Q, P)``; instance_masks: ``(..., K, P)`` bool or soft.
    Returns:
        ``D (..., K, Q)`` in (0, 1]: ``(2 sum sigma(L_q) M_k + 1) / (sum sigma(L_q) + sum M_k + 1)``.
    """
    _check_pair_shapes(mask_logits, instance_masks, batched=True)
    p = torch.sigmoid(mask_logits)
    m = instance_masks.to(p.dtype)
    inter = torch.matmul(m, p.transpose(-1, -2))
    return (2 * inter + 1) / (m.sum(-1).unsqueeze(-1) + p.sum(-1).unsqueeze(-2) + 1)


def ownership_weights(coverage: Tensor, valid: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Soft ownership ``W = softmax_q(coverage / T)``; each valid instance spreads mass 1.

    Args:
        coverage: ``(..., K, Q)`` (e.g. ``soft_dice_coverage``); valid: ``(..., K)`` bool or None.
    Returns:
        ``W (..., K, Q)``, rows sum to 1 for valid instances, 0 for invalid (padded) ones.
    """
    _check_positive("temperature", temperature)
    w = torch.softmax(coverage / temperature, dim=-1)
    return w if valid is None else w * valid.unsqueeze(-1).to(w.dtype)
