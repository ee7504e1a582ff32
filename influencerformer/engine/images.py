"""Images in the engine: shapes2d / COCO as training batches, COCO mask AP, predictions and overlays.

The image side of the modality interface (engine/build.py): ``build_dataset``, ``make_collate``,
``make_evaluator``, ``predict``, ``draw`` (+ ``truth``, ``load_items``, ``item_name`` and what the report says).
Images of a batch are zero-padded bottom/right to a common size, a multiple of the backbone's coarsest stride;
predictions are read on the valid (unpadded) extent only.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from influencerformer.data import COCOInstanceDataset, Shapes2D, collate_batch, find_coco_files
from influencerformer.metrics import build_coco_gt, coco_mask_ap, masks_to_coco_results
from influencerformer.models import MaskFormer, instance_inference

from .config import Config, ConfigError, DataConfig, DatasetInfo
from .evaluate import SCORE_THRESHOLD, InstanceCounts, InstanceEvaluator, Instances, predict_batches
from .plots import instance_colour, finish_axes

MODEL = MaskFormer
SIZE_DIVISIBILITY = 32  # the backbone's coarsest stride: inputs are padded to a multiple of it
UNIT = "images"
AP_LABEL = "val mask AP"
AP_DOC = ("- AP / AP50 / AP75: COCO mask AP on the val split, Mask2Former instance inference without NMS, "
          "top-100 per image.")
MASKS_CAPTION = "; label: class and score"  # what masks.png shows, after its common caption
PANEL = 2.6  # inches per drawn item in masks.png


# ------------------------------------------------------------------------------------------------- data


def build_dataset(data: DataConfig, split: str) -> tuple[Any, DatasetInfo]:
    """The ``split`` ("train" | "val") of shapes2d or COCO and its class info (ConfigError naming the problem)."""
    num = data.num_train if split == "train" else data.num_val
    if data.name == "shapes2d":
        extra = {} if data.image_size is None else {"image_size": data.image_size}
        try:
            ds = Shapes2D(split, preset=data.preset, num_images=num, seed=data.seed, **extra)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return ds, DatasetInfo(len(ds.thing_classes), list(ds.thing_classes), list(ds.category_ids))
    try:
        image_dir, ann_file = find_coco_files(data.root, split)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    try:  # every annotation is decoded and every image file looked for now, not mid-run
        ds = COCOInstanceDataset(image_dir, ann_file, image_size=data.image_size, pad_to=data.image_size)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"coco {split} split: {exc}") from None
    info = DatasetInfo(len(ds.class_names), list(ds.class_names), list(ds.category_ids))
    if num is not None and num < len(ds):
        ds = Subset(ds, range(num))  # the first images: a fixed, reproducible evaluation subset
    return ds, info


def make_collate(dataset: Any = None, data: DataConfig | None = None, generator: torch.Generator | None = None) -> Any:
    """Items → ``{"images" (B, 3, H, W), "targets", "image_ids", "image_sizes"}``, padded (nothing random)."""
    return functools.partial(collate_batch, size_divisibility=SIZE_DIVISIBILITY)


def describe_data(data: DataConfig) -> str:
    """The report's words for what an image run's inputs were."""
    return f"images resized to {data.image_size}" if data.image_size else "native image size"


def attach_terms(criterion: torch.nn.Module, cfg: Config) -> None:
    """Image models add nothing to their criterion."""


# ------------------------------------------------------------------------------------------- evaluation


def _prediction_extent(pred_hw: Sequence[int], size: Sequence[int], padded_hw: Sequence[int]) -> tuple[int, int]:
    """Rows/cols of the (H/4, W/4) prediction grid that cover the valid (unpadded) image extent."""
    return tuple(max(1, round(p * s / max(1, full)))
                 for p, s, full in zip(pred_hw, size, padded_hw))  # type: ignore[return-value]


def read_instances(outputs: dict[str, Any], batch: dict[str, Any], topk: int = 100) -> Iterator[Instances]:
    """Per image of ``batch``: (logits, instances at its valid size), the padding dropped before upsampling."""
    padded = batch["images"].shape[-2:]
    for i, size in enumerate(batch["image_sizes"]):
        ph, pw = _prediction_extent(outputs["pred_masks"].shape[-2:], size, padded)
        logits = outputs["pred_logits"][i].float().cpu()
        masks = outputs["pred_masks"][i, :, :ph, :pw].float().cpu()
        res = instance_inference(logits, masks, tuple(size), topk=topk)
        res["grid_masks"] = masks  # PQ reads the raw mask logits
        yield logits, res


class Evaluator(InstanceEvaluator):
    """COCO mask AP (+ PQ on data with semantic maps) of a fixed val set; the COCO ground truth is built once.

    The ground truth is the val items as the data pipeline gives them: with ``data.image_size`` set,
    COCO images are evaluated at that (resized) resolution, cropped to their valid (unpadded) extent.
    """

    def __init__(self, dataset: Any, info: DatasetInfo, *, batch_size: int = 8, topk: int = 100,
                 workers: int = 0, with_pq: bool | None = None) -> None:
        super().__init__(info, topk=topk, with_pq=("sem_seg" in dataset[0]) if with_pq is None else with_pq)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                 collate_fn=make_collate())
        self.coco_gt: dict | None = None  # built on the first call from the batches themselves

    def batches(self) -> DataLoader:
        return self.loader

    def instances(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Iterator[tuple[Instances, dict]]:
        for i, found in enumerate(read_instances(outputs, batch, self.topk)):
            h, w = batch["image_sizes"][i]
            gt = batch["targets"][i]
            yield found, {"labels": gt["labels"], "masks": gt["masks"][:, :h, :w], "image_id": batch["image_ids"][i]}

    def start(self) -> None:
        self.predictions: list[dict] = []
        self.gt_items: list[dict] = []

    def add(self, logits: torch.Tensor, res: dict[str, torch.Tensor], gt: dict[str, Any],
            counts: InstanceCounts) -> None:
        if counts.pq is not None:
            counts.add_panoptic(logits, res["grid_masks"], gt["masks"].shape[-2:], gt["masks"], gt["labels"])
        self.gt_items.append(gt)
        self.predictions += masks_to_coco_results(gt["image_id"], res["masks"], res["labels"], res["scores"],
                                                  self.info.category_ids)

    def finish(self) -> dict[str, float]:
        if self.coco_gt is None:
            self.coco_gt = build_coco_gt(self.gt_items, self.info.category_ids, self.info.class_names)
        ap = coco_mask_ap(self.coco_gt, self.predictions)
        return {k: ap[k] for k in ("AP", "AP50", "AP75")}


def make_evaluator(dataset: Any, info: DatasetInfo, cfg: Config) -> Evaluator:
    return Evaluator(dataset, info, batch_size=cfg.data.batch_size, topk=cfg.train.eval_topk)


# ------------------------------------------------------------------------------------ predictions, pictures


def predict_instances(model: torch.nn.Module, images: Sequence[torch.Tensor], *, topk: int = 100,
                      score_threshold: float = SCORE_THRESHOLD) -> list[dict[str, torch.Tensor]]:
    """Instances with score > ``score_threshold`` for each image (3, H, W) in [0, 1] (no NMS)."""
    def one(image: torch.Tensor) -> dict[str, Any]:
        h, w = image.shape[-2:]
        ph, pw = -(-h // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY, -(-w // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
        padded = torch.nn.functional.pad(image, (0, pw - w, 0, ph - h))  # zero padding, as collate does
        return {"images": padded[None], "image_sizes": [(h, w)]}

    read = functools.partial(read_instances, topk=topk)
    return predict_batches(model, map(one, images), read, score_threshold=score_threshold)


def predict(model: torch.nn.Module, items: Sequence[dict], *, topk: int = 100,
            score_threshold: float = SCORE_THRESHOLD) -> list[dict[str, torch.Tensor]]:
    """Confident instances of each item (``item["image"]``)."""
    return predict_instances(model, [item["image"] for item in items], topk=topk, score_threshold=score_threshold)


def truth(item: dict) -> dict[str, Any]:
    """An item's ground-truth instances, drawn like predictions (no scores)."""
    return {"masks": item["masks"], "labels": item["labels"], "scores": None}


def item_name(item: dict) -> str:
    return f"val_{int(item['image_id'])}"


def load_items(folder: str | Path, data: DataConfig, size: int | None = None) -> list[tuple[str, dict]]:
    """(name, item) of every image in ``folder``; the longer side resized to ``size``, else to the training size
    (``data.image_size`` or the val images' size: the model never saw other scales)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise ConfigError(f"no .png/.jpg/.jpeg/.bmp/.webp images in {folder}")
    size = size or data.image_size or int(max(build_dataset(data, "val")[0][0]["image"].shape[-2:]))
    items = []
    for file in files:
        img = Image.open(file).convert("RGB")
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        array = torch.tensor(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        items.append((file.stem, {"image": array}))
    return items


def draw(ax: Any, item: dict, instances: dict[str, Any], class_names: Sequence[str], title: str | None = None) -> None:
    draw_instances(ax, item["image"], instances, class_names, title)


def draw_instances(ax: Any, image: torch.Tensor, instances: dict[str, Any], class_names: Sequence[str],
                   title: str | None = None) -> None:
    """Image with each instance's mask in its own colour and "class score" at the mask's centre."""
    canvas = image.permute(1, 2, 0).float().numpy().copy()
    masks, labels, scores = instances["masks"], instances["labels"], instances.get("scores")
    outlines, labels_at = [], []
    for k in range(len(labels)):
        mask = masks[k].numpy()
        if not mask.any():
            continue
        colour = instance_colour(k)
        canvas[mask] = 0.45 * canvas[mask] + 0.55 * colour  # blend: the shape stays visible under its colour
        ys, xs = np.nonzero(mask)
        text = class_names[int(labels[k])] + ("" if scores is None else f" {float(scores[k]):.2f}")
        outlines.append((mask, colour))
        labels_at.append((xs.mean(), ys.mean(), text))
    ax.imshow(np.clip(canvas, 0, 1), interpolation="nearest")
    for mask, colour in outlines:  # outlines separate touching instances of similar colour
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
    for x, y, text in labels_at:
        ax.text(x, y, text, fontsize=6, ha="center", va="center", color="white",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    finish_axes(ax, title)
