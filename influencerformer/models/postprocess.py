"""Instance / semantic / panoptic outputs from per-query (class, mask) pairs, per image.

Mask2Former's inference semantics (``MaskFormer.{instance,semantic,panoptic}_inference``), vectorised
over queries. Each function takes one image's ``pred_logits (Q, C+1)`` (last column = no object) and
``pred_masks (Q, h, w)`` logits; masks are upsampled bilinearly to ``image_size`` *before* any
thresholding, as Mask2Former does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F


def _check_pair(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> None:
    if pred_logits.dim() != 2 or pred_logits.shape[1] < 2:
        raise ValueError(f"pred_logits must be (Q, C+1) with C >= 1, got {tuple(pred_logits.shape)}")
    if pred_masks.dim() != 3:
        raise ValueError(f"pred_masks must be (Q, h, w), got {tuple(pred_masks.shape)}")
    if pred_masks.shape[0] != pred_logits.shape[0]:
        raise ValueError(f"pred_masks has {pred_masks.shape[0]} queries, pred_logits has {pred_logits.shape[0]}")


def upsample_masks(pred_masks: torch.Tensor, image_size: Sequence[int] | None) -> torch.Tensor:
    """Mask logits ``(Q, h, w)`` -> float ``(Q, H, W)`` (bilinear, align_corners=False); None keeps (h, w)."""
    masks = pred_masks.float()
    if image_size is None:
        return masks
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(f"image_size must be (H, W) with positive ints, got {tuple(image_size)}")
    if tuple(image_size) == tuple(masks.shape[-2:]):
        return masks
    return F.interpolate(masks[None], size=tuple(int(s) for s in image_size), mode="bilinear",
                         align_corners=False)[0]


def instance_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor,
                       image_size: Sequence[int] | None = None, *, topk: int = 100) -> dict[str, torch.Tensor]:
    """Top-k (query, class) pairs as instances.

    Class scores = softmax without the no-object column, ``(Q, C)``; the ``min(topk, Q*C)`` best
    entries of that table are kept (one query may yield several classes). Mask score = mean sigmoid
    inside the binarised mask (logit > 0); final score = class score x mask score.
    Returns (sorted by final score, descending): ``scores (N,)``, ``labels (N,) long``,
    ``masks (N, H, W) bool``, ``query_indices (N,) long`` (the query each instance came from).
    """
    _check_pair(pred_logits, pred_masks)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    num_classes = pred_logits.shape[1] - 1
    class_scores = pred_logits.float().softmax(-1)[:, :-1]
    k = min(topk, class_scores.numel())
    cls_scores, flat = class_scores.flatten().topk(k)
    queries, labels = flat // num_classes, flat % num_classes
    logits = upsample_masks(pred_masks, image_size)[queries]  # (k, H, W); upsample first, then binarise
    binary = logits > 0
    mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = cls_scores * mask_scores
    order = scores.argsort(descending=True, stable=True)
    return {"scores": scores[order], "labels": labels[order], "masks": binary[order],
            "query_indices": queries[order]}


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor,
                       image_size: Sequence[int] | None = None) -> torch.Tensor:
    """Per-class scores ``(C, H, W)`` = sum over queries of P(class) x sigmoid(mask); argmax(0) is the label map."""
    _check_pair(pred_logits, pred_masks)
    probs = pred_logits.float().softmax(-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", probs, upsample_masks(pred_masks, image_size).sigmoid())


def _thing_flags(labels: torch.Tensor, num_classes: int, thing_ids: Iterable[int] | None) -> torch.Tensor:
    if thing_ids is None:  # no stuff classes declared: every class is a countable thing
        return torch.ones_like(labels, dtype=torch.bool)
    ids = torch.as_tensor(list(thing_ids), dtype=torch.long, device=labels.device)
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"thing_ids must lie in [0, {num_classes}), got {ids.tolist()}")
    return torch.isin(labels, ids)


def panoptic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor,
                       image_size: Sequence[int] | None = None, *, object_mask_threshold: float = 0.8,
                       overlap_threshold: float = 0.8, thing_ids: Iterable[int] | None = None
                       ) -> tuple[torch.Tensor, list[dict]]:
    """Mask2Former panoptic merge.

    Keep queries whose best class is not "no object" with probability > ``object_mask_threshold``;
    each pixel goes to the kept query maximising ``score x sigmoid(mask)``. A query becomes a
    segment when its won area / its own (sigmoid >= 0.5) area >= ``overlap_threshold`` and it wins
    some pixel of its own mask; queries of one stuff class (not in ``thing_ids``; None = all
    things) merge into the first such segment.
    Returns ``segments (H, W) long`` (0 = void, segment ids 1..S) and ``segments_info``: list of
    ``{"id", "category_id", "isthing"}`` in id order.
    """
    _check_pair(pred_logits, pred_masks)
    num_classes = pred_logits.shape[1] - 1
    scores, labels = pred_logits.float().softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    masks = upsample_masks(pred_masks, image_size)[keep].sigmoid()  # (K, H, W)
    scores, labels = scores[keep], labels[keep]
    segments = torch.zeros(masks.shape[-2:], dtype=torch.long, device=masks.device)
    if masks.shape[0] == 0:
        return segments, []
    winner = (scores[:, None, None] * masks).argmax(0)  # (H, W)
    k = torch.arange(masks.shape[0], device=masks.device)
    won = winner[None] == k[:, None, None]
    own = masks >= 0.5
    won_area, own_area = won.flatten(1).sum(1), own.flatten(1).sum(1)
    valid = ((won & own).flatten(1).sum(1) > 0) & (won_area >= overlap_threshold * own_area)
    isthing = _thing_flags(labels, num_classes, thing_ids)
    # First valid query of each stuff class opens that class's segment; later ones reuse its id.
    candidate = torch.where(valid & ~isthing, k, masks.shape[0])
    first = torch.full((num_classes,), masks.shape[0], device=k.device).scatter_reduce(0, labels, candidate, "amin")
    opens = valid & (isthing | (first[labels] == k))
    open_id = torch.cumsum(opens.long(), 0)
    seg_id = torch.where(isthing, open_id, open_id[first[labels].clamp(max=masks.shape[0] - 1)])
    seg_id = torch.where(valid, seg_id, 0)
    segments = torch.where(own.gather(0, winner[None])[0], seg_id[winner], 0)
    info = [{"id": int(i), "category_id": int(c), "isthing": bool(t)}
            for i, c, t in zip(open_id[opens].tolist(), labels[opens].tolist(), isthing[opens].tolist())]
    return segments, info
