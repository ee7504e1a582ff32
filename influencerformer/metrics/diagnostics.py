"""Diagnostics of query behaviour that AP alone hides.

- `assignment_stability`: how often the query owning a ground-truth instance changes between two
  evaluations (Hungarian: the matched query; matching-free: the argmax of the plan / coverage).
- `duplicate_rate`: how many ground-truth instances are claimed by more than one confident query,
  the known weak point of matching-free losses.
- `f1_at_iou`: precision / recall / F1 of confident predictions under a greedy one-to-one match
  without NMS (duplicates count as false positives).
- `query_usage`: fraction of queries that predict "no object".

Convention: a ratio with a zero denominator (no instance, no prediction) is 0.0, so these can be
logged every step without NaN guards. Counts are returned where values are accumulated over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of binary masks a (N, *spatial) and b (K, *spatial) → (N, K), by one matmul.

    Counts are exact in float32 below 2**24 locations; larger masks use float64.
    """
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"masks: expected equal spatial shapes, got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    dtype = torch.float32 if math.prod(a.shape[1:]) < 2**24 else torch.float64
    fa, fb = a.flatten(1).to(dtype), b.flatten(1).to(dtype)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def _confident_iou(
    pred_masks: torch.Tensor,
    scores: torch.Tensor,
    gt_masks: torch.Tensor,
    score_threshold: float,
    pred_labels: torch.Tensor | None,
    gt_labels: torch.Tensor | None,
) -> torch.Tensor:
    """IoU (N', K) of the predictions with score > threshold, sorted by score (highest first).

    With labels given, pairs of different classes get IoU 0 so they can never match.
    """
    if pred_masks.dim() < 2 or gt_masks.dim() < 2:
        raise ValueError(
            f"pred_masks/gt_masks: expected shapes (N, *spatial), (K, *spatial), "
            f"got {tuple(pred_masks.shape)} and {tuple(gt_masks.shape)}"
        )
    if scores.shape != pred_masks.shape[:1]:
        raise ValueError(
            f"scores: expected shape ({pred_masks.shape[0]},) to match pred_masks, got {tuple(scores.shape)}"
        )
    if (pred_labels is None) != (gt_labels is None):
        raise ValueError("pred_labels/gt_labels: expected both or neither, got only one")
    keep = scores > score_threshold
    order = scores[keep].argsort(descending=True, stable=True)
    iou = mask_iou(pred_masks[keep][order], gt_masks)
    if pred_labels is not None:
        same = pred_labels[keep][order][:, None] == gt_labels[None, :]
        iou = iou * same
    return iou


def count_duplicates(
    pred_masks: torch.Tensor,
    scores: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    pred_labels: torch.Tensor | None = None,
    gt_labels: torch.Tensor | None = None,
) -> tuple[int, int]:
    """(number of gt instances claimed by ≥ 2 confident predictions, number of gt instances).

    pred_masks bool (N, *spatial), scores (N,), gt_masks bool (K, *spatial); a prediction is
    confident when score > score_threshold and claims a gt instance when IoU ≥ iou_threshold.
    Optional labels (N,), (K,) restrict claims to the same class.
    """
    iou = _confident_iou(pred_masks, scores, gt_masks, score_threshold, pred_labels, gt_labels)
    claims = (iou >= iou_threshold).sum(0)
    return int((claims > 1).sum()), int(gt_masks.shape[0])


def duplicate_rate(pred_masks: torch.Tensor, scores: torch.Tensor, gt_masks: torch.Tensor, **kwargs) -> float:
    """Fraction of gt instances claimed by more than one confident prediction (see `count_duplicates`
    for shapes and keywords score_threshold=0.5, iou_threshold=0.5, pred_labels, gt_labels)."""
    duplicated, total = count_duplicates(pred_masks, scores, gt_masks, **kwargs)
    return duplicated / total if total else 0.0


def _greedy_true_positives(iou: np.ndarray, iou_threshold: float) -> int:
    """Matches of a greedy one-to-one assignment; iou (N, K) with rows sorted by score, best first."""
    taken = np.zeros(iou.shape[1], dtype=bool)
    # Sequential on purpose: each match removes a gt instance from every lower-scored prediction
    # (COCO's rule). N ≤ number of queries and each step is one vectorised row operation.
    for row in iou if iou.shape[1] else ():
        candidates = np.where(taken, -1.0, row)
        best = int(candidates.argmax())
        if candidates[best] >= iou_threshold:
            taken[best] = True
    return int(taken.sum())


def f1_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """{"precision", "recall", "f1"} from counts (summed over images); 0.0 for a zero denominator."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def f1_at_iou(
    pred_masks: torch.Tensor,
    scores: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    pred_labels: torch.Tensor | None = None,
    gt_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Precision, recall and F1 of confident predictions, without NMS.

    pred_masks bool (N, *spatial), scores (N,), gt_masks bool (K, *spatial). Predictions with
    score > score_threshold are matched greedily (highest score first) one-to-one to the unmatched
    gt instance of highest IoU, if that IoU ≥ iou_threshold; optional labels (N,), (K,) allow only
    same-class matches. Returns {"tp", "fp", "fn", "precision", "recall", "f1"}; sum tp/fp/fn
    over images and call `f1_from_counts` for a dataset value.
    """
    iou = _confident_iou(pred_masks, scores, gt_masks, score_threshold, pred_labels, gt_labels)
    tp = _greedy_true_positives(iou.cpu().numpy(), iou_threshold)
    counts = {"tp": tp, "fp": int(iou.shape[0]) - tp, "fn": int(gt_masks.shape[0]) - tp}
    return {**counts, **f1_from_counts(**counts)}


def assignment_stability(prev: Sequence[torch.Tensor], curr: Sequence[torch.Tensor]) -> float:
    """Fraction of gt instances whose owning query changed between two evaluations.

    prev, curr: per image a LongTensor (K_i,) giving the query index that owns each gt instance
    (-1 may mark "no owner"; equal values count as unchanged). 0.0 when there is no instance.
    """
    if len(prev) != len(curr):
        raise ValueError(f"curr: expected {len(prev)} images (as prev), got {len(curr)}")
    for i, (p, c) in enumerate(zip(prev, curr)):
        if p.shape != c.shape or p.dim() != 1:
            raise ValueError(
                f"curr[{i}]: expected shape {tuple(p.shape)} of 1 dim (as prev[{i}]), got {tuple(c.shape)}"
            )
    if not prev:
        return 0.0
    p_all, c_all = torch.cat(list(prev)), torch.cat([c.to(prev[0].device) for c in curr])
    return float((p_all != c_all).float().mean()) if p_all.numel() else 0.0


def query_usage(pred_logits: torch.Tensor) -> float:
    """Fraction of queries whose argmax class is "no object" (the last column).

    pred_logits: (Q, C+1), or (B, Q, C+1) pooled over the batch. 1 − value = queries in use.
    """
    if pred_logits.dim() not in (2, 3) or pred_logits.shape[-1] < 2:
        raise ValueError(
            f"pred_logits: expected shape (Q, C+1) or (B, Q, C+1) with C ≥ 1, got {tuple(pred_logits.shape)}"
        )
    if pred_logits.shape[-2] == 0:
        return 0.0
    no_object = pred_logits.shape[-1] - 1
    return float((pred_logits.argmax(-1) == no_object).float().mean())
