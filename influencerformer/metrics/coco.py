"""COCO mask AP through the real COCO evaluators.

`coco_mask_ap` runs faster-coco-eval (C++ matching, same numbers as pycocotools) and can run
pycocotools instead as a cross-check. Synthetic datasets go through the same path: `build_coco_gt`
turns dataset items into a COCO ground-truth dict and `masks_to_coco_results` turns predicted masks
into COCO result dicts, so every benchmark number is a genuine COCO number.

Convention: a metric COCO leaves undefined (it reports -1, e.g. APl when no ground-truth instance
is large) is returned as NaN, as detectron2 does, so it can never be mistaken for a score.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

# Order of COCOeval.stats for bbox/segm with maxDets = [1, 10, 100] (identical in both backends).
_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# COCO's own limits; 100 covers crowded images (≤ ~40 instances, 100 queries → 100 predictions).
_MAX_DETS = [1, 10, 100]
_RESULT_KEYS = ("image_id", "category_id", "segmentation", "score")


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, (np.ndarray, list, tuple)):
        return np.asarray(x)
    raise ValueError(f"{name}: expected a torch.Tensor, numpy array or list, got {type(x).__name__}")


def encode_masks(masks: Any) -> list[dict]:
    """Encode binary masks as COCO RLEs with `str` counts (json-serialisable).

    masks: bool/uint8 (N, H, W) tensor or array. Returns N dicts {"size": [H, W], "counts": str}.
    """
    arr = _to_numpy(masks, "masks")
    if arr.ndim != 3:
        raise ValueError(f"masks: expected shape (N, H, W), got {tuple(arr.shape)}")
    # pycocotools wants (H, W, N) uint8 in Fortran order; one call encodes all N masks.
    rles = mask_utils.encode(np.asfortranarray(arr.astype(np.uint8).transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def masks_to_coco_results(
    image_id: int, masks: Any, labels: Any, scores: Any, category_ids: Sequence[int]
) -> list[dict]:
    """Convert one image's predicted masks to COCO result dicts.

    masks: bool (N, H, W); labels: int (N,) contiguous class indices; scores: float (N,) (tensors,
    arrays or lists); category_ids: list mapping contiguous label → COCO category id.
    Returns N dicts {"image_id", "category_id", "segmentation" (RLE, str counts), "score"}.
    """
    masks_np = _to_numpy(masks, "masks")
    labels_np = _to_numpy(labels, "labels").astype(np.int64).reshape(-1)
    scores_np = _to_numpy(scores, "scores").astype(np.float64).reshape(-1)
    if masks_np.ndim != 3:
        raise ValueError(f"masks: expected shape (N, H, W), got {tuple(masks_np.shape)}")
    n = masks_np.shape[0]
    if labels_np.shape[0] != n or scores_np.shape[0] != n:
        raise ValueError(
            f"labels/scores: expected {n} entries to match masks, got {labels_np.shape[0]} and {scores_np.shape[0]}"
        )
    if n and (labels_np.min() < 0 or labels_np.max() >= len(category_ids)):
        raise ValueError(
            f"labels: expected values in [0, {len(category_ids)}) (len(category_ids)), "
            f"got range [{labels_np.min()}, {labels_np.max()}]"
        )
    if n == 0:
        return []
    cat_ids = np.asarray(category_ids, dtype=np.int64)[labels_np]
    return [
        {"image_id": int(image_id), "category_id": int(c), "segmentation": rle, "score": float(s)}
        for c, rle, s in zip(cat_ids, encode_masks(masks_np), scores_np)
    ]


def build_coco_gt(items: Iterable[dict], category_ids: Sequence[int], class_names: Sequence[str]) -> dict:
    """Build a COCO instance ground-truth dict from dataset items.

    items: iterable of {"masks": bool (K, H, W), "labels": long (K,), "image_id": int} (K may be 0;
    then H, W are read from masks of shape (0, H, W)); category_ids[label] is the COCO id of a
    contiguous label and class_names[label] its name. Annotations get RLE segmentations, area, bbox,
    iscrowd = 0 and ids from 1 (COCOeval treats id 0 as "unmatched").
    """
    if len(category_ids) != len(class_names):
        raise ValueError(
            f"class_names: expected {len(category_ids)} names (one per category id), got {len(class_names)}"
        )
    images, annotations = [], []
    for item in items:
        image_id = int(item["image_id"])
        masks = _to_numpy(item["masks"], "masks")
        if masks.ndim != 3:
            raise ValueError(f"masks of image {image_id}: expected shape (K, H, W), got {tuple(masks.shape)}")
        images.append({"id": image_id, "height": int(masks.shape[1]), "width": int(masks.shape[2])})
        results = masks_to_coco_results(image_id, masks, item["labels"], np.ones(len(masks)), category_ids)
        if not results:
            continue
        rles = [r["segmentation"] for r in results]
        # area and bbox of all K masks in one call each
        areas, boxes = mask_utils.area(rles), mask_utils.toBbox(rles)
        for r, area, box in zip(results, areas, boxes):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": r["category_id"],
                    "segmentation": r["segmentation"],
                    "area": float(area),
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": int(c), "name": str(n)} for c, n in zip(category_ids, class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _gt_dataset(coco_gt: Any) -> dict:
    """The COCO json dict behind `coco_gt` (a COCO object of either backend, a path, or a dict)."""
    if isinstance(coco_gt, (str, os.PathLike)):
        with open(coco_gt) as f:
            dataset = json.load(f)
    elif isinstance(coco_gt, dict):
        dataset = coco_gt
    elif isinstance(getattr(coco_gt, "dataset", None), dict):
        dataset = coco_gt.dataset
    else:
        raise ValueError(f"coco_gt: expected a COCO object, a json path or a dict, got {type(coco_gt).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
    if missing:
        raise ValueError(f"coco_gt: expected keys images, annotations, categories; missing {missing}")
    return dataset


def _check_predictions(predictions: Sequence[dict], dataset: dict) -> None:
    if not isinstance(predictions, (list, tuple)):
        raise ValueError(f"predictions: expected a list of COCO result dicts, got {type(predictions).__name__}")
    image_ids = {img["id"] for img in dataset["images"]}
    for i, pred in enumerate(predictions):
        missing = [k for k in _RESULT_KEYS if k not in pred]
        if missing:
            raise ValueError(f"predictions[{i}]: expected keys {list(_RESULT_KEYS)}, missing {missing}")
        if pred["image_id"] not in image_ids:
            raise ValueError(f"predictions[{i}]: image_id {pred['image_id']} is not an image of coco_gt")


def _make_coco(cls: type, dataset: dict, quiet_kwargs: dict) -> Any:
    # Both backends accept an index built from a dict this way; pycocotools' constructor takes only paths.
    coco = cls(**quiet_kwargs)
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _backend(backend: str) -> tuple[type, type, dict, dict]:
    """(COCO class, COCOeval class, COCO kwargs, COCOeval kwargs) that print nothing."""
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        def quiet(*args: Any, **kwargs: Any) -> None:
            return None

        return COCO, COCOeval_faster, {"print_function": quiet}, {"print_function": quiet}
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval, {}, {}
    raise ValueError(f"backend: expected 'faster' or 'pycocotools', got {backend!r}")


def _per_class_ap(precision: np.ndarray, cat_ids: Sequence[int]) -> dict[int, float]:
    # precision: (T iou thresholds, R recall points, K categories, A area ranges, M maxDets);
    # area "all" and the largest maxDets, -1 entries mean "no ground truth" (as detectron2 reads it).
    p = precision[:, :, :, 0, -1]
    valid = p > -1
    sums = np.where(valid, p, 0.0).sum(axis=(0, 1))
    counts = valid.sum(axis=(0, 1))
    return {int(c): float(s / n) if n else float("nan") for c, s, n in zip(cat_ids, sums, counts)}


def coco_mask_ap(coco_gt: Any, predictions: Sequence[dict], *, backend: str = "faster") -> dict[str, Any]:
    """COCO instance-segmentation (mask) AP.

    coco_gt: a COCO object (pycocotools or faster-coco-eval), a path to a COCO instances json, or such
    a dict (e.g. from `build_coco_gt`). predictions: list of COCO result dicts {"image_id",
    "category_id", "segmentation" (RLE, str counts, image size), "score"}; they are not modified.
    backend: "faster" (faster-coco-eval) or "pycocotools" (reference, slower).
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
    as floats in [0, 1] (NaN where COCO reports -1: no ground truth in that range) and
    "per_class": {category_id: AP}. maxDets = [1, 10, 100] as in COCO. Empty predictions give 0 for
    every defined metric.
    """
    dataset = _gt_dataset(coco_gt)
    _check_predictions(predictions, dataset)
    coco_cls, eval_cls, coco_kwargs, eval_kwargs = _backend(backend)
    # COCOeval prints progress to stdout (pycocotools unconditionally); keep evaluation silent.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_gt if isinstance(coco_gt, coco_cls) else _make_coco(coco_cls, dataset, coco_kwargs)
        # loadRes writes id/area/bbox into the dicts it gets: hand it copies. It also fails on an
        # empty list, so an empty result set is built directly (same images and categories).
        empty = {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
        dt = gt.loadRes([dict(p) for p in predictions]) if predictions else _make_coco(coco_cls, empty, coco_kwargs)
        evaluator = eval_cls(gt, dt, iouType="segm", **eval_kwargs)
        evaluator.params.maxDets = list(_MAX_DETS)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) if v > -1 else float("nan") for v in evaluator.stats[: len(_STAT_NAMES)]]
    results: dict[str, Any] = dict(zip(_STAT_NAMES, stats))
    results["per_class"] = _per_class_ap(np.asarray(evaluator.eval["precision"]), evaluator.params.catIds)
    return results
