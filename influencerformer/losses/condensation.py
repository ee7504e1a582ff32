"""The embedding ("condensation") form of the Influencer Loss (Murnane 2024; Object Condensation).

Every point ``i`` has an embedding ``x_i (D,)``, a logit ``beta_i`` and an instance id (-1 = background).
For each instance ``k`` (within one batch item) with points ``S_k``:
    w_i   = softmax_{i in S_k}(beta_i / T)            soft influencer selection (segment softmax)
    e_k   = sum_{i in S_k} w_i x_i                     the instance's soft influencer embedding
    b_k   = sum_{i in S_k} w_i beta_i                  soft-max of beta within the instance
    attractive = mean_k mean_{i in S_k} ||x_i - e_k||^2
    repulsive  = mean over ordered pairs k != l of the same item of relu(margin - ||e_k - e_l||)
    beta       = mean_k -logsigmoid(b_k)              one confident influencer per instance
    background = mean over background points of -logsigmoid(-beta_i)   (beta suppressed)
    loss = attr_weight*attractive + rep_weight*repulsive + beta_weight*beta + bg_weight*background
Means over instances pool all instances of the batch.  A term with nothing to average is 0 (no
instances: attractive = repulsive = beta = 0; one instance per item: repulsive = 0; no background
point: background = 0).  As T -> 0, ``e_k`` is the embedding of the highest-beta point (the
original hard influencer) and ``b_k`` its beta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InfluencerLoss"]


def _check_inputs(embeddings: Tensor, beta_logits: Tensor, instance_ids: Tensor, batch: Tensor | None) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    for name, t in (("beta_logits", beta_logits), ("instance_ids", instance_ids), ("batch", batch)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(
                f"{name} must be ({n},) to match embeddings {tuple(embeddings.shape)}, got {tuple(t.shape)}")
    if instance_ids.is_floating_point() or (batch is not None and batch.is_floating_point()):
        raise ValueError("instance_ids and batch must be integer tensors")
    if n and int(instance_ids.min()) < -1:
        raise ValueError(f"instance_ids must be >= -1 (-1 = background), got min {int(instance_ids.min())}")


def _segments(instance_ids: Tensor, batch: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Map foreground points to dense segment ids, one segment per (batch item, instance).

    Returns:
        fg ``(N,)`` bool, seg ``(N_fg,)`` long in ``[0, S)``, seg_item ``(S,)`` the item of each segment.
    """
    fg = instance_ids >= 0
    item = torch.zeros_like(instance_ids) if batch is None else batch
    keys = torch.stack([item[fg], instance_ids[fg]], dim=1)
    uniq, seg = torch.unique(keys, dim=0, return_inverse=True)
    return fg, seg, uniq[:, 0]


def _segment_softmax(scores: Tensor, seg: Tensor, num_segments: int) -> Tensor:
    """Softmax of ``scores (N,)`` within each segment ``seg (N,)``; ``(N,)``."""
    # Subtracting each segment's max (a constant per segment, so detached) keeps exp in range.
    seg_max = torch.full((num_segments,), float("-inf"), dtype=scores.dtype, device=scores.device)
    seg_max = seg_max.scatter_reduce(0, seg, scores.detach(), reduce="amax")
    e = torch.exp(scores - seg_max[seg])
    denom = torch.zeros_like(seg_max).index_add(0, seg, e)
    return e / denom[seg]


class InfluencerLoss(nn.Module):
    """Embedding-form Influencer loss (see the module docstring for the math).

    Args:
        attr_weight, rep_weight, beta_weight, bg_weight: term weights of ``loss``.
        rep_margin: hinge margin between influencer embeddings (default 1).
        temperature: ``T > 0`` of the soft influencer selection.
    """

    def __init__(self, *, attr_weight: float = 1.0, rep_weight: float = 1.0, beta_weight: float = 1.0,
                 bg_weight: float = 0.1, rep_margin: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not rep_margin >= 0:
            raise ValueError(f"rep_margin must be >= 0, got {rep_margin}")
        self.weights = {"attractive": attr_weight, "repulsive": rep_weight, "beta": beta_weight,
                        "background": bg_weight}
        self.rep_margin = rep_margin
        self.temperature = temperature

    def forward(self, embeddings: Tensor, beta_logits: Tensor, instance_ids: Tensor,
                batch: Tensor | None = None) -> dict[str, Tensor]:
        """Loss terms for points of one or several items.

        Args:
            embeddings: ``(N, D)`` float; beta_logits: ``(N,)`` float;
            instance_ids: ``(N,)`` long, -1 = background (ids are per item);
            batch: ``(N,)`` long item index of each point, or None for a single item.
        Returns:
            ``{"attractive", "repulsive", "beta", "background", "loss"}`` scalars; ``loss`` is the
            weighted sum of the (undetached) terms.
        """
        _check_inputs(embeddings, beta_logits, instance_ids, batch)
        fg, seg, seg_item = _segments(instance_ids, batch)
        x, b = embeddings[fg], beta_logits[fg]
        w = _segment_softmax(b / self.temperature, seg, seg_item.numel())
        terms = self._instance_terms(x, b, w, seg, seg_item)
        bg_beta = beta_logits[~fg]
        terms["background"] = -F.logsigmoid(-bg_beta).sum() / max(bg_beta.numel(), 1)
        terms["loss"] = sum(self.weights[k] * terms[k] for k in self.weights)
        return terms

    def _instance_terms(self, x: Tensor, b: Tensor, w: Tensor, seg: Tensor, seg_item: Tensor) -> dict[str, Tensor]:
        """Attractive, repulsive and beta terms from foreground points ``x (N_fg, D)``, ``b (N_fg,)``."""
        s = seg_item.numel()
        infl = torch.zeros(s, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, seg, w.unsqueeze(1) * x)
        soft_beta = torch.zeros(s, dtype=b.dtype, device=b.device).index_add(0, seg, w * b)
        count = torch.zeros(s, dtype=x.dtype, device=x.device).index_add(0, seg, torch.ones_like(b))
        sq = ((x - infl[seg]) ** 2).sum(1)
        per_inst = torch.zeros_like(count).index_add(0, seg, sq) / count.clamp_min(1)
        # Only pairs of instances of the same item repel; cdist's gradient at 0 distance is 0.
        dist = torch.cdist(infl.unsqueeze(0), infl.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0]
        pair = (seg_item.unsqueeze(0) == seg_item.unsqueeze(1)) & ~torch.eye(s, dtype=torch.bool, device=x.device)
        hinge = torch.relu(self.rep_margin - dist) * pair
        return {
            "attractive": per_inst.sum() / max(s, 1),
            "repulsive": hinge.sum() / pair.sum().clamp_min(1),
            "beta": -F.logsigmoid(soft_beta).sum() / max(s, 1),
        }
