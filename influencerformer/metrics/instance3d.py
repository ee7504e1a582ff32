"""3D instance segmentation AP with the ScanNet protocol, and 3D semantic mIoU.

`instance_ap_3d` reproduces ScanNet's `evaluate_semantic_instance.py` (the code mmdet3d and
OneFormer3D report with): per class and IoU threshold, predictions are matched greedily to ground
truth, precision/recall are computed over all scenes, and AP is the area under that curve.
AP averages thresholds 0.50:0.05:0.90 and classes; AP50 / AP25 are single thresholds.

Rules carried over from the reference (they change numbers, so they are kept exactly):
- predicted masks with fewer than `min_region_size` points are dropped before anything else;
- ground-truth instances with fewer than `min_region_size` points are not evaluated, and a
  prediction overlapping them does not count as a false positive: an unmatched prediction is a
  false positive only when at most `threshold` of its points lie on void (points of no evaluated
  instance) or on small instances of its own class;
- matching: for each ground-truth instance (in order), the not-yet-taken predictions of its class
  with IoU > threshold all match it; the first (in prediction order) is taken, the best score
  becomes the true positive's score and every other one is a false positive;
- a class with ground truth but no prediction has AP 0; a class absent from the ground truth is
  NaN and left out of the means.

Masks may be any location set (points, voxels, superpoints): only counts matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from influencerformer.metrics.semantic import MeanIoU

# the reference's exact thresholds (np.arange accumulates 0.05 in float, kept for identical ties)
IOU_THRESHOLDS = np.append(np.arange(0.5, 0.95, 0.05), 0.25)


def _tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise ValueError(f"{name}: expected a torch.Tensor, numpy array or list, got {type(x).__name__}")


def _require(item: Any, keys: Sequence[str], name: str) -> None:
    if not isinstance(item, dict) or not all(k in item for k in keys):
        got = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise ValueError(f"{name}: expected a dict with keys {list(keys)}, got {got}")


def _gt_from_labels(gt: dict, name: str, class_map: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance masks (K, P) bool and class indices (K,) from per-point instance_labels (P,) (-1 = none)
    and sem_labels (P,). An instance's class is the most frequent semantic label among its points,
    mapped through `class_map` (semantic id → class index, -1 = not evaluated) when given."""
    inst, sem = (
        _tensor(gt["instance_labels"], f"{name}['instance_labels']"),
        _tensor(gt["sem_labels"], f"{name}['sem_labels']"),
    )
    if inst.dim() != 1 or sem.shape != inst.shape:
        raise ValueError(
            f"{name}: expected instance_labels and sem_labels of one shape (P,), "
            f"got {tuple(inst.shape)} and {tuple(sem.shape)}"
        )
    annotated = inst >= 0
    ids, inverse = torch.unique(inst[annotated].long(), return_inverse=True)
    masks = torch.zeros(len(ids), inst.numel(), dtype=torch.bool)
    masks[inverse, annotated.nonzero().squeeze(1)] = True
    sem_in = sem[annotated].long()
    # mode of the semantic label per instance in one bincount over (instance, label + 1) pairs;
    # negative labels are folded into bin 0 so they can win only where nothing else is present
    s = int(sem_in.max()) + 2 if sem_in.numel() else 1
    counts = torch.bincount(inverse * s + (sem_in + 1).clamp(min=0), minlength=len(ids) * s).reshape(len(ids), s)
    labels = counts.argmax(1) - 1
    if class_map is not None:
        in_map = (labels >= 0) & (labels < len(class_map))
        labels = torch.where(in_map, class_map[labels.clamp(0, len(class_map) - 1)], -1)
    return masks, labels


def _gt_instances(gt: dict, name: str, class_map: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth of one scene as masks (K, P) bool and class indices (K,) (-1 = not evaluated)."""
    if isinstance(gt, dict) and "masks" in gt and "labels" in gt:
        masks, labels = (
            _tensor(gt["masks"], f"{name}['masks']").bool(),
            _tensor(gt["labels"], f"{name}['labels']").long(),
        )
        if masks.dim() != 2 or labels.shape != masks.shape[:1]:
            raise ValueError(
                f"{name}: expected masks (K, P) and labels (K,), got {tuple(masks.shape)} and {tuple(labels.shape)}"
            )
        return masks, labels
    _require(gt, ("instance_labels", "sem_labels"), name)
    return _gt_from_labels(gt, name, class_map)


def _predictions(pred: dict, num_points: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """masks (N, P) bool, labels (N,) long, scores (N,) float64 of one scene, validated."""
    _require(pred, ("masks", "labels", "scores"), name)
    masks = _tensor(pred["masks"], f"{name}['masks']").bool()
    labels = _tensor(pred["labels"], f"{name}['labels']").long().reshape(-1)
    scores = _tensor(pred["scores"], f"{name}['scores']").double().reshape(-1)
    if masks.numel() == 0 and masks.dim() < 2:
        masks = masks.reshape(0, num_points)
    if masks.dim() != 2 or masks.shape[1] != num_points:
        raise ValueError(
            f"{name}['masks']: expected shape (N, {num_points}) to match the ground truth, got {tuple(masks.shape)}"
        )
    if labels.numel() != len(masks) or scores.numel() != len(masks):
        raise ValueError(
            f"{name}: expected labels and scores of length {len(masks)} (one per mask), "
            f"got {labels.numel()} and {scores.numel()}"
        )
    return masks, labels, scores


@dataclass
class _SceneOverlap:
    """Everything the matching needs from one scene, after the size filters.

    iou (N, K) float64, zero across classes; pred_labels (N,), scores (N,); gt_labels (K,) of the
    evaluated ground truth (K counts small instances too), gt_large (K,) bool; ignored (N,) float64
    = fraction of each prediction on void or on small instances of its own class.
    """

    iou: np.ndarray
    pred_labels: np.ndarray
    scores: np.ndarray
    gt_labels: np.ndarray
    gt_large: np.ndarray
    ignored: np.ndarray


def _scene_overlap(pred: tuple, gt: tuple, min_region_size: int) -> _SceneOverlap:
    """IoU of kept predictions with evaluated ground truth by one matmul, plus the ignore fractions."""
    p_masks, p_labels, scores = pred
    g_masks, g_labels = gt
    keep = p_masks.sum(1) >= min_region_size
    p_masks, p_labels, scores = p_masks[keep], p_labels[keep], scores[keep]
    evaluated = g_labels >= 0
    void = ~g_masks[evaluated].any(0)
    g_masks, g_labels = g_masks[evaluated], g_labels[evaluated]
    # float32 sums of 0/1 are exact below 2**24 points and twice as fast; larger scenes use float64
    dtype = torch.float32 if p_masks.shape[1] < 2**24 else torch.float64
    fp, fg = p_masks.to(dtype), g_masks.to(dtype)
    inter = (fp @ fg.T).double()
    p_size, g_size = fp.sum(1).double(), fg.sum(1).double()
    same = p_labels[:, None] == g_labels[None, :]
    iou = torch.where(same, inter / (p_size[:, None] + g_size[None, :] - inter).clamp(min=1), 0.0)
    large = g_size >= min_region_size
    ignored = (fp @ void.to(dtype)).double() + (inter * (same & ~large[None, :])).sum(1)
    return _SceneOverlap(
        iou.numpy(),
        p_labels.numpy(),
        scores.numpy(),
        g_labels.numpy(),
        large.numpy(),
        (ignored / p_size.clamp(min=1)).numpy(),
    )


def _match_scene(s: _SceneOverlap, threshold: float, num_classes: int) -> tuple[np.ndarray, ...]:
    """Scored detections of one scene at one IoU threshold.

    Returns is_true (D,) float, score (D,), class (D,) of every true / false positive, and the
    hard false negatives per class (C,) (evaluated instances no prediction matched).
    """
    hit = s.iou > threshold
    taken = np.zeros(len(s.scores), dtype=bool)
    true, score, cls = [], [], []
    hard_fn = np.zeros(num_classes, dtype=np.int64)
    # loop over ground-truth instances (tens per scene); each step is vectorised over predictions
    for k in np.flatnonzero(s.gt_large):
        cand = np.flatnonzero(hit[:, k] & ~taken)
        if cand.size == 0:
            hard_fn[s.gt_labels[k]] += 1
            continue
        taken[cand[0]] = True
        sc = s.scores[cand]
        best = int(np.argmax(sc))
        true += [1.0] + [0.0] * (len(sc) - 1)
        score += [sc[best]] + list(np.delete(sc, best))
        cls += [s.gt_labels[k]] * len(sc)
    # predictions that overlap no same-class instance enough and lie mostly on annotated ground
    lone = ~hit.any(1) & (s.ignored <= threshold)
    true += [0.0] * int(lone.sum())
    score += list(s.scores[lone])
    cls += list(s.pred_labels[lone])
    return (
        np.asarray(true, dtype=np.float64),
        np.asarray(score, dtype=np.float64),
        np.asarray(cls, dtype=np.int64),
        hard_fn,
    )


def _average_precision(is_true: np.ndarray, score: np.ndarray, hard_fn: int) -> float:
    """Area under the precision-recall curve exactly as ScanNet computes it (one point per
    distinct score, an artificial (recall 0, precision 1) end, trapezoid-like step widths)."""
    order = np.argsort(score)
    cumsum = np.cumsum(is_true[order])
    _, first = np.unique(score[order], return_index=True)
    n_true = cumsum[-1] if len(cumsum) else 0.0
    before = np.append(cumsum, 0.0)[first - 1]  # true positives scored below each threshold
    tp = n_true - before
    fp = len(score) - first - tp
    fn = before + hard_fn
    precision = np.append(tp / np.maximum(tp + fp, 1e-12), 1.0)
    recall = np.append(tp / np.maximum(tp + fn, 1e-12), 0.0)
    padded = np.concatenate([recall[:1], recall, [0.0]])
    widths = np.convolve(padded, [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, widths))


def _num_classes(class_names: Sequence[str] | None, scenes: list[tuple], gts: list[tuple]) -> int:
    """len(class_names), else 1 + the largest class index in predictions and ground truth."""
    if class_names is not None:
        return len(class_names)
    labels = [p[1] for p in scenes] + [g[1] for g in gts]
    return max((int(x.max()) + 1 for x in labels if x.numel()), default=0)


def _check_labels(labels: torch.Tensor, num_classes: int, name: str) -> None:
    bad = labels >= num_classes
    if bad.any():
        raise ValueError(
            f"{name}: expected class indices in [0, {num_classes}) (len(class_names)), "
            f"got {sorted(set(labels[bad].tolist()))}; map other semantic ids to -1 with class_map"
        )


def instance_ap_3d(
    predictions: Sequence[dict],
    ground_truths: Sequence[dict],
    *,
    class_names: Sequence[str] | None = None,
    min_region_size: int = 100,
    class_map: Sequence[int] | None = None,
) -> dict:
    """ScanNet-protocol instance AP over scenes (rules in the module docstring).

    predictions: per scene {"masks": bool (N, P), "labels": long (N,) in [0, C), "scores": float (N,)}.
    ground_truths: per scene {"instance_labels": long (P,) (-1 = none), "sem_labels": long (P,)} or
        {"masks": bool (K, P), "labels": long (K,)}; a label of -1 (or, via class_map, a semantic id
        mapped to -1) marks an instance that is not evaluated: its points count as void.
    class_names: names of the C classes (default: "0", "1", ... up to the largest label seen).
    class_map: semantic id → class index (-1 = not evaluated), used with per-point labels, e.g.
        ScanNet's 20 semantic classes → 18 instance classes.
    Returns {"AP", "AP50", "AP25": float (NaN when no class has ground truth),
    "per_class": {name: {"AP", "AP50", "AP25"}}}.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions: expected {len(ground_truths)} scenes (one per ground truth), got {len(predictions)}"
        )
    cmap = None if class_map is None else torch.as_tensor(np.asarray(class_map), dtype=torch.long)
    gts = [_gt_instances(g, f"ground_truths[{i}]", cmap) for i, g in enumerate(ground_truths)]
    preds = [_predictions(p, g[0].shape[1], f"predictions[{i}]") for i, (p, g) in enumerate(zip(predictions, gts))]
    c = _num_classes(class_names, preds, gts)
    for i, (p, g) in enumerate(zip(preds, gts)):
        _check_labels(p[1], c, f"predictions[{i}]['labels']")
        _check_labels(g[1], c, f"ground_truths[{i}] instance classes")
        if (p[1] < 0).any():
            raise ValueError(f"predictions[{i}]['labels']: expected class indices >= 0, got {p[1].min().item()}")
    scenes = [_scene_overlap(p, g, min_region_size) for p, g in zip(preds, gts)]
    return _summarise(_ap_table(scenes, c), class_names or [str(k) for k in range(c)])


class InstanceAP3D:
    """`instance_ap_3d` accumulated scene by scene: ``update`` keeps only each scene's overlap counts
    (not its masks), so whole-room evaluation needs memory for one scene's masks at a time.

    ``InstanceAP3D(class_names).update(pred, gt)`` per scene with `instance_ap_3d`'s per-scene dicts,
    then ``compute()`` → the same result as `instance_ap_3d` on all scenes at once."""

    def __init__(self, class_names: Sequence[str], *, min_region_size: int = 100,
                 class_map: Sequence[int] | None = None) -> None:
        self.class_names, self.min_region_size = list(class_names), min_region_size
        self.class_map = None if class_map is None else torch.as_tensor(np.asarray(class_map), dtype=torch.long)
        self.scenes: list[_SceneOverlap] = []

    def update(self, prediction: dict, ground_truth: dict) -> None:
        name = f"scene {len(self.scenes)}"
        gt = _gt_instances(ground_truth, f"{name} ground truth", self.class_map)
        pred = _predictions(prediction, gt[0].shape[1], f"{name} prediction")
        c = len(self.class_names)
        _check_labels(pred[1], c, f"{name} prediction['labels']")
        _check_labels(gt[1], c, f"{name} ground-truth instance classes")
        if (pred[1] < 0).any():
            raise ValueError(f"{name} prediction['labels']: expected class indices >= 0, got {pred[1].min().item()}")
        self.scenes.append(_scene_overlap(pred, gt, self.min_region_size))

    def compute(self) -> dict:
        return _summarise(_ap_table(self.scenes, len(self.class_names)), self.class_names)


def _ap_table(scenes: list[_SceneOverlap], c: int) -> np.ndarray:
    """(C, T) AP per class and IoU threshold over the scenes (NaN: class without ground truth)."""
    has_gt = np.zeros(c, dtype=bool)
    has_pred = np.zeros(c, dtype=bool)
    for s in scenes:
        has_gt[s.gt_labels[s.gt_large]] = True
        has_pred[s.pred_labels] = True
    ap = np.full((c, len(IOU_THRESHOLDS)), np.nan)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        per_scene = [_match_scene(s, threshold, c) for s in scenes]
        is_true, score, cls = (
            np.concatenate([m[j] for m in per_scene]) if per_scene else np.zeros(0) for j in range(3)
        )
        hard_fn = sum((m[3] for m in per_scene), np.zeros(c, dtype=np.int64))
        ap[has_gt & ~has_pred, t] = 0.0
        for k in np.flatnonzero(has_gt & has_pred):
            sel = cls == k
            ap[k, t] = _average_precision(is_true[sel], score[sel], int(hard_fn[k]))
    return ap


def _summarise(ap: np.ndarray, names: Sequence[str]) -> dict:
    """Means over classes (and thresholds 0.50:0.90 for AP) of the (C, T) table, NaN-aware."""
    main = ~np.isclose(IOU_THRESHOLDS, 0.25)
    at50, at25 = np.isclose(IOU_THRESHOLDS, 0.5), np.isclose(IOU_THRESHOLDS, 0.25)

    def mean(x: np.ndarray) -> float:
        return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

    per_class = {
        name: {"AP": mean(row[main]), "AP50": mean(row[at50]), "AP25": mean(row[at25])} for name, row in zip(names, ap)
    }
    return {"AP": mean(ap[:, main]), "AP50": mean(ap[:, at50]), "AP25": mean(ap[:, at25]), "per_class": per_class}


def semantic_miou_3d(
    pred_labels: Sequence[Any], gt_labels: Sequence[Any], num_classes: int, *, ignore_index: int = -1
) -> dict:
    """mIoU over scenes from per-point labels: pred_labels / gt_labels per scene long (P,);
    gt points equal to ignore_index are left out. Counts are summed over scenes before the ratio
    (see `influencerformer.metrics.semantic.MeanIoU`). Returns {"mIoU": float, "IoU": (C,)}."""
    if len(pred_labels) != len(gt_labels):
        raise ValueError(
            f"pred_labels: expected {len(gt_labels)} scenes (one per ground truth), got {len(pred_labels)}"
        )
    acc = MeanIoU(num_classes, ignore_index)
    for i, (p, g) in enumerate(zip(pred_labels, gt_labels)):
        p, g = _tensor(p, f"pred_labels[{i}]"), _tensor(g, f"gt_labels[{i}]")
        if p.shape != g.shape:
            raise ValueError(
                f"pred_labels[{i}]: expected shape {tuple(g.shape)} (as gt_labels[{i}]), got {tuple(p.shape)}"
            )
        acc.update(p.long(), g.long())
    return acc.compute()
