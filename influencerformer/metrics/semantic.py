"""Semantic and panoptic segmentation metrics: mIoU (confusion matrix) and PQ (COCO panoptic rules).

Both come as an accumulator (`update` per image, `compute` at the end), because dataset-level
numbers are ratios of summed counts, not means of per-image ratios; the functions `mean_iou` and
`panoptic_quality` wrap the accumulators for one call over a list.

Convention: a per-class value with a zero denominator (class absent from both prediction and
ground truth) is NaN and left out of the mean, so absent classes neither help nor hurt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

VOID = 0  # segment id of unlabelled pixels in panoptic maps (COCO panoptic convention)


def _check_int_tensor(x: torch.Tensor, name: str, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(x.shape)}")


class MeanIoU:
    """Confusion-matrix accumulator for mean IoU over many images.

    `confusion[g, p]` counts pixels of ground-truth class g predicted as p; pixels whose ground
    truth is `ignore_index` are not counted. IoU_c = TP / (TP + FP + FN).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add labels of any shape, e.g. (N, H, W): pred in [0, C), gt in [0, C) or ignore_index."""
        _check_int_tensor(pred, "pred")
        _check_int_tensor(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"pred: expected the shape of gt {tuple(gt.shape)}, got {tuple(pred.shape)}")
        c = self.num_classes
        valid = gt != self.ignore_index
        g, p = gt[valid].long(), pred[valid].long()
        for name, v in (("gt", g), ("pred", p)):
            if v.numel() and (v.min() < 0 or v.max() >= c):
                raise ValueError(
                    f"{name}: expected class ids in [0, {c}) (or ignore_index {self.ignore_index} in gt), "
                    f"got range [{int(v.min())}, {int(v.max())}]"
                )
        # one bincount over flattened (gt, pred) pairs builds the whole confusion matrix, on the
        # labels' device; only the C×C result moves to the host
        self.confusion += torch.bincount(g * c + p, minlength=c * c).reshape(c, c).cpu()

    def compute(self) -> dict:
        """{"mIoU": float (mean over classes present in gt or pred), "IoU": float tensor (C,), NaN = absent}."""
        tp = self.confusion.diagonal().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        return {"mIoU": float(iou.nanmean()), "IoU": iou}


def mean_iou(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int = 255) -> dict:
    """mIoU of predicted labels pred (N, H, W) long against gt (N, H, W) long (see `MeanIoU`)."""
    acc = MeanIoU(num_classes, ignore_index)
    acc.update(pred, gt)
    return acc.compute()


def _segment_table(segments: Sequence[dict], category_ids: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
    """Sorted segment ids (S,), their category indices (S,) into category_ids, and crowd flags (S,)."""
    for i, seg in enumerate(segments):
        if "id" not in seg or "category_id" not in seg:
            raise ValueError(f"{name}[{i}]: expected keys 'id' and 'category_id', got {sorted(seg)}")
    ids = torch.tensor([int(s["id"]) for s in segments], dtype=torch.int64)
    cats = torch.tensor([int(s["category_id"]) for s in segments], dtype=torch.int64)
    crowd = torch.tensor([bool(s.get("iscrowd", 0)) for s in segments], dtype=torch.bool)
    if (ids == VOID).any() or ids.unique().numel() != ids.numel():
        raise ValueError(f"{name}: expected unique segment ids != {VOID} (void), got {ids.tolist()}")
    cat_idx = torch.searchsorted(category_ids, cats).clamp(max=len(category_ids) - 1)
    unknown = category_ids[cat_idx] != cats
    if unknown.any():
        raise ValueError(
            f"{name}: expected category_id in {category_ids.tolist()}, got {cats[unknown].unique().tolist()}"
        )
    order = ids.argsort()
    return ids[order], cat_idx[order], crowd[order]


def _segment_index(seg_map: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
    """Flattened map (H*W,) of 1 + position of each pixel's segment in sorted `ids`; 0 for void."""
    flat = seg_map.reshape(-1).long().cpu()
    pos = torch.searchsorted(ids, flat).clamp(max=max(len(ids) - 1, 0))
    known = ids[pos] == flat if len(ids) else torch.zeros_like(flat, dtype=torch.bool)
    stray = ~known & (flat != VOID)
    if stray.any():
        raise ValueError(f"{name}: segment ids {flat[stray].unique().tolist()} are in the map but not in the list")
    return torch.where(known, pos + 1, 0)


def _image_counts(
    inter: torch.Tensor, g_cat: torch.Tensor, p_cat: torch.Tensor, g_crowd: torch.Tensor, num_cats: int
) -> tuple[torch.Tensor, ...]:
    """Per-category TP, FP, FN (C,) and summed TP IoU (C,) of one image.

    inter: (1 + Kg, 1 + Kp) pixel counts, row / column 0 = void; g_cat (Kg,), p_cat (Kp,) category
    indices; g_crowd (Kg,) crowd flags.
    """
    pair, p_void = inter[1:, 1:], inter[0, 1:]
    g_area, p_area = inter[1:].sum(1), inter[:, 1:].sum(0)
    # panopticapi's union leaves out predicted pixels that are void in the ground truth
    union = g_area[:, None] + p_area[None, :] - pair - p_void[None, :]
    iou = pair / union.clamp(min=1)
    same_cat = g_cat[:, None] == p_cat[None, :]
    match = (iou > 0.5) & same_cat & ~g_crowd[:, None]
    g_matched, p_matched = match.any(1), match.any(0)
    tp = torch.bincount(g_cat[g_matched], minlength=num_cats)
    iou_sum = torch.zeros(num_cats, dtype=torch.float64).index_add_(0, g_cat, (iou * match).sum(1))
    fn = torch.bincount(g_cat[~g_matched & ~g_crowd], minlength=num_cats)
    # a prediction mostly on void or on same-category crowd is not a false positive
    ignored = p_void + (pair * (same_cat & g_crowd[:, None])).sum(0)
    fp = torch.bincount(p_cat[~p_matched & (p_area > 0) & (ignored <= 0.5 * p_area)], minlength=num_cats)
    return tp, fp, fn, iou_sum


class PanopticQuality:
    """PQ / SQ / RQ accumulator with the COCO panoptic rules (panopticapi `pq_compute`).

    Per image: a predicted and a ground-truth segment of the same category match when
    IoU > 0.5 (unique, since segments do not overlap), where the union leaves out the predicted
    pixels that are void in the ground truth. Void = id 0 in a map. Unmatched ground-truth
    segments are false negatives unless crowd ("iscrowd": 1; crowd segments are never matched).
    An unmatched prediction is a false positive unless more than half of it lies on void or on
    crowd regions of its own category (panopticapi uses the last crowd segment per category; here
    all of them count). A listed ground-truth segment with no pixel is a false negative (as in
    panopticapi, which trusts the json); a listed predicted segment with no pixel is ignored.
    Per class: PQ = ΣIoU / (TP + FP/2 + FN/2), SQ = ΣIoU / TP, RQ = TP / (TP + FP/2 + FN/2);
    the overall values are means over classes with TP + FP + FN > 0.
    """

    def __init__(self, category_ids: Sequence[int], thing_ids: Iterable[int] | None = None) -> None:
        self.category_ids = torch.tensor(sorted(set(int(c) for c in category_ids)), dtype=torch.int64)
        if self.category_ids.numel() == 0:
            raise ValueError("category_ids: expected at least one category, got none")
        self.thing_ids = None if thing_ids is None else {int(t) for t in thing_ids}
        c = len(self.category_ids)
        self.iou_sum = torch.zeros(c, dtype=torch.float64)
        self.tp, self.fp, self.fn = (torch.zeros(c, dtype=torch.int64) for _ in range(3))

    def update(
        self, pred_map: torch.Tensor, pred_segments: Sequence[dict], gt_map: torch.Tensor, gt_segments: Sequence[dict]
    ) -> None:
        """Add one image: segment-id maps (H, W) and segment lists [{"id", "category_id", "iscrowd"?}]."""
        _check_int_tensor(pred_map, "pred_map", 2)
        _check_int_tensor(gt_map, "gt_map", 2)
        if pred_map.shape != gt_map.shape:
            raise ValueError(
                f"pred_map: expected the shape of gt_map {tuple(gt_map.shape)}, got {tuple(pred_map.shape)}"
            )
        p_ids, p_cat, _ = _segment_table(pred_segments, self.category_ids, "pred_segments")
        g_ids, g_cat, g_crowd = _segment_table(gt_segments, self.category_ids, "gt_segments")
        p_idx = _segment_index(pred_map, p_ids, "pred_map")
        g_idx = _segment_index(gt_map, g_ids, "gt_map")
        n_p, n_g = len(p_ids) + 1, len(g_ids) + 1
        # (void + gt, void + pred) intersection counts of every segment pair in one bincount
        inter = torch.bincount(g_idx * n_p + p_idx, minlength=n_g * n_p).reshape(n_g, n_p)
        tp, fp, fn, iou_sum = _image_counts(inter.double(), g_cat, p_cat, g_crowd, len(self.category_ids))
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.iou_sum += iou_sum

    def _summary(self, keep: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Means over the kept classes that occur, and per-class PQ, SQ, RQ (C,) (NaN if absent)."""
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        denom = tp + 0.5 * fp + 0.5 * fn
        pq = torch.where(denom > 0, self.iou_sum / denom.clamp(min=1e-12), float("nan"))
        sq = torch.where(tp > 0, self.iou_sum / tp.clamp(min=1), 0.0)
        rq = torch.where(denom > 0, tp / denom.clamp(min=1e-12), float("nan"))
        sq = torch.where(denom > 0, sq, float("nan"))
        keep = keep & (denom > 0)
        per_class = {"PQ": pq, "SQ": sq, "RQ": rq}
        means = {name: float(v[keep].mean()) if keep.any() else float("nan") for name, v in per_class.items()}
        return means, pq, sq, rq

    def compute(self) -> dict:
        """{"PQ", "SQ", "RQ", "per_class": {category_id: {"PQ", "SQ", "RQ"}}}, plus "PQ_th", "SQ_th",
        "RQ_th", "PQ_st", "SQ_st", "RQ_st" when thing_ids was given. NaN where no class counts."""
        everything = torch.ones(len(self.category_ids), dtype=torch.bool)
        result, pq, sq, rq = self._summary(everything)
        result["per_class"] = {
            int(c): {"PQ": float(a), "SQ": float(b), "RQ": float(d)}
            for c, a, b, d in zip(self.category_ids, pq, sq, rq)
        }
        if self.thing_ids is not None:
            is_thing = torch.tensor([int(c) in self.thing_ids for c in self.category_ids])
            for suffix, keep in (("_th", is_thing), ("_st", ~is_thing)):
                result.update({k + suffix: v for k, v in self._summary(keep)[0].items()})
        return result


def panoptic_quality(
    predictions: Sequence[tuple[torch.Tensor, Sequence[dict]]],
    ground_truths: Sequence[tuple[torch.Tensor, Sequence[dict]]],
    category_ids: Sequence[int],
    *,
    thing_ids: Iterable[int] | None = None,
) -> dict:
    """PQ over images. predictions / ground_truths: per image (segment-id map (H, W), segments
    [{"id", "category_id", "iscrowd"?}]); category_ids: every category that may occur.
    Returns `PanopticQuality.compute()`."""
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions: expected {len(ground_truths)} images (one per ground truth), got {len(predictions)}"
        )
    acc = PanopticQuality(category_ids, thing_ids)
    for (p_map, p_segs), (g_map, g_segs) in zip(predictions, ground_truths):
        acc.update(p_map, p_segs, g_map, g_segs)
    return acc.compute()
