"""Evaluation: instance inference on the val split → COCO mask AP, F1, duplicates, query usage, PQ;
and the assignment-stability probe (which query owns each instance of a fixed batch, over time).

Inference is Mask2Former's instance inference *without NMS*, so duplicate predictions cost AP and F1
exactly as they would in deployment — the thing a matching-free loss must get right.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from influencerformer.data import collate_batch
from influencerformer.metrics import (
    PanopticQuality,
    assignment_stability,
    build_coco_gt,
    coco_mask_ap,
    count_duplicates,
    f1_at_iou,
    f1_from_counts,
    masks_to_coco_results,
    query_usage,
)
from influencerformer.models import instance_inference, panoptic_inference

from .checkpoint import MODEL_KEYS, load_latest
from .config import (Config, ConfigError, DatasetInfo, apply_override, build_dataset, build_model, from_dict,
                     is_point_data)
from .distributed import pick_device

SIZE_DIVISIBILITY = 32  # the backbone's coarsest stride: inputs are padded to a multiple of it
SCORE_THRESHOLD = 0.5  # a prediction is "confident" (counts for F1 and duplicates) above this score


def make_collate() -> Any:
    return functools.partial(collate_batch, size_divisibility=SIZE_DIVISIBILITY)


def model_inputs(batch: dict[str, Any], device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs of a batch: ``(images,)`` or, for point clouds, ``(coords, colors)``
    and ``super_points`` when the batch has them."""
    if "images" in batch:
        inputs = (batch["images"],)
    else:
        inputs = (batch["coords"], batch["colors"]) + ((batch["super_points"],) if "super_points" in batch else ())
    return inputs if device is None else tuple(x.to(device, non_blocking=True) for x in inputs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (evaluation runs on rank 0 only, without DDP)."""
    return getattr(model, "module", model)


class InstanceCounts:
    """Running sums over images: F1 counts, duplicates, query usage and (optionally) PQ."""

    def __init__(self, info: DatasetInfo, with_pq: bool) -> None:
        self.tp = self.fp = self.fn = self.dup = self.gt = 0
        self.no_object: list[float] = []
        self.pq = PanopticQuality(list(range(info.num_classes))) if with_pq else None

    def add(self, res: dict[str, torch.Tensor], gt_masks: torch.Tensor, gt_labels: torch.Tensor) -> None:
        kw = dict(score_threshold=SCORE_THRESHOLD, iou_threshold=0.5, pred_labels=res["labels"], gt_labels=gt_labels)
        f1 = f1_at_iou(res["masks"], res["scores"], gt_masks, **kw)
        self.tp, self.fp, self.fn = self.tp + f1["tp"], self.fp + f1["fp"], self.fn + f1["fn"]
        dup, total = count_duplicates(res["masks"], res["scores"], gt_masks, **kw)
        self.dup, self.gt = self.dup + dup, self.gt + total

    def add_panoptic(self, logits: torch.Tensor, masks: torch.Tensor, size: Sequence[int],
                     gt_masks: torch.Tensor, gt_labels: torch.Tensor) -> None:
        pred_map, pred_segments = panoptic_inference(logits, masks, size)
        gt_map = torch.zeros(gt_masks.shape[-2:], dtype=torch.long)
        for k in range(gt_masks.shape[0]):  # disjoint synthetic masks; with overlap the later one wins
            gt_map[gt_masks[k]] = k + 1
        gt_segments = [{"id": k + 1, "category_id": int(c)} for k, c in enumerate(gt_labels.tolist())]
        self.pq.update(pred_map.cpu(), pred_segments, gt_map, gt_segments)

    def summary(self) -> dict[str, float]:
        f1 = f1_from_counts(self.tp, self.fp, self.fn)
        out = {"F1": f1["f1"], "precision": f1["precision"], "recall": f1["recall"],
               "duplicate_rate": self.dup / self.gt if self.gt else 0.0,
               "no_object_queries": sum(self.no_object) / max(1, len(self.no_object))}
        if self.pq is not None:
            out["PQ"] = self.pq.compute()["PQ"]
        return out


class Evaluator:
    """Evaluates a model on a fixed val set; the COCO ground truth is built once and reused.

    The ground truth is the val items as the data pipeline gives them: with ``data.image_size`` set,
    COCO images are evaluated at that (resized) resolution, cropped to their valid (unpadded) extent.
    """

    def __init__(self, dataset: Any, info: DatasetInfo, *, batch_size: int = 8, topk: int = 100,
                 workers: int = 0, with_pq: bool | None = None) -> None:
        self.info, self.topk = info, topk
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                 collate_fn=make_collate())
        first = dataset[0]
        self.with_pq = ("sem_seg" in first) if with_pq is None else with_pq
        self.coco_gt: dict | None = None  # built on the first call from the batches themselves

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        model = unwrap(model)
        was_training = model.training
        model.eval()
        counts, predictions, gt_items = InstanceCounts(self.info, self.with_pq), [], []
        for batch in self.loader:
            outputs = model(batch["images"].to(device))
            for i, image_id in enumerate(batch["image_ids"]):
                h, w = batch["image_sizes"][i]
                gt = batch["targets"][i]
                gt_masks, gt_labels = gt["masks"][:, :h, :w], gt["labels"]
                gt_items.append({"image_id": image_id, "masks": gt_masks, "labels": gt_labels})
                predictions += self._image(outputs, i, (h, w), image_id, gt_masks, gt_labels, counts)
        model.train(was_training)
        if self.coco_gt is None:
            self.coco_gt = build_coco_gt(gt_items, self.info.category_ids, self.info.class_names)
        ap = coco_mask_ap(self.coco_gt, predictions)
        metrics = {k: ap[k] for k in ("AP", "AP50", "AP75")}
        return {**metrics, **counts.summary()}

    def _image(self, outputs: dict[str, torch.Tensor], i: int, size: tuple[int, int], image_id: int,
               gt_masks: torch.Tensor, gt_labels: torch.Tensor, counts: InstanceCounts) -> list[dict]:
        """One image: predictions as COCO results, with its F1/duplicate/PQ counts added to ``counts``."""
        ph, pw = _prediction_extent(outputs["pred_masks"].shape[-2:], size, gt_masks.shape[-2:])
        logits = outputs["pred_logits"][i].float().cpu()
        masks = outputs["pred_masks"][i, :, :ph, :pw].float().cpu()  # drop the padding before upsampling
        res = instance_inference(logits, masks, size, topk=self.topk)
        counts.add(res, gt_masks, gt_labels)
        counts.no_object.append(query_usage(logits))
        if counts.pq is not None:
            counts.add_panoptic(logits, masks, size, gt_masks, gt_labels)
        return masks_to_coco_results(image_id, res["masks"], res["labels"], res["scores"], self.info.category_ids)


def _prediction_extent(pred_hw: Sequence[int], size: Sequence[int], padded_hw: Sequence[int]) -> tuple[int, int]:
    """Rows/cols of the (H/4, W/4) prediction grid that cover the valid (unpadded) image extent."""
    return tuple(max(1, round(p * s / max(1, full)))
                 for p, s, full in zip(pred_hw, size, padded_hw))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ assignment probe


def owners(criterion: Any) -> list[torch.Tensor]:
    """Per image, the query that owns each target instance ``(K_i,)`` in the criterion's last call (-1: none):
    every criterion's ``last_assignment`` (Hungarian: the matched query; matching-free: the query of largest
    plan / ownership weight). AttributeError when the criterion has none."""
    assignment = getattr(criterion, "last_assignment", None)
    if assignment is None:
        raise AttributeError(f"{type(criterion).__name__} exposes no last_assignment")
    return [torch.as_tensor(a).long().cpu() for a in assignment]


class AssignmentProbe:
    """Runs the criterion on a fixed training batch at every evaluation and reports the fraction of
    instances whose owning query changed since the previous evaluation (0 = stable assignment)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch
        self.previous: list[torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, criterion: Any, device: torch.device | str) -> float | None:
        model = unwrap(model)
        was_training = model.training
        model.eval()
        targets = [{k: v.to(device) for k, v in t.items()} for t in self.batch["targets"]]
        outputs = model(*model_inputs(self.batch, device))
        model.train(was_training)
        # fork_rng: the criterion's point sampling must not shift the training run's random stream
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            criterion(outputs, targets)
        try:
            current = owners(criterion)
        except AttributeError:
            return None
        change = None if self.previous is None else assignment_stability(self.previous, current)
        self.previous = current
        return change


# ------------------------------------------------------------------------------- trained models, pictures


def load_trained(path: str | Path, device: str | torch.device = "cpu",
                 overrides: Sequence[str] = ()) -> tuple[torch.nn.Module, Config, DatasetInfo, int]:
    """(model in eval mode, its config with ``overrides`` applied, class info, step) from a checkpoint
    file or the newest intact checkpoint of a run directory."""
    model, cfg, info, step, _ = _load_trained(path, device, overrides)
    return model, cfg, info, step


def _load_trained(path: str | Path, device: str | torch.device,
                  overrides: Sequence[str]) -> tuple[torch.nn.Module, Config, DatasetInfo, int, Path]:
    warn = lambda line: print(line, file=sys.stderr)  # noqa: E731
    file, state = load_latest(path, map_location="cpu", require=MODEL_KEYS, warn=warn)
    cfg = from_dict(state["config"])
    for item in overrides:
        apply_override(cfg, item)
    info = DatasetInfo(**state["dataset"])
    model = build_model(cfg, info.num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(_mismatch(file, state["config"], cfg, exc)) from None
    return model.to(device).eval(), cfg, info, int(state["step"]), file


def _mismatch(file: Path, stored: dict[str, Any], cfg: Config, exc: RuntimeError) -> str:
    """One line: the checkpoint's weights do not fit the model its (overridden) config builds, and why."""
    def fields(section: dict[str, Any]) -> dict[str, Any]:
        return {"preset": section.get("preset"), **section.get("overrides", {})}

    old, new = fields(stored["model"]), fields(cfg.to_dict()["model"])
    changed = [f"model.{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        return (f"the weights in {file} do not fit the model of the changed config ({'; '.join(changed)}): the "
                "model is the checkpoint's, drop those --set overrides")
    detail = " ".join(str(exc).split())[:200]
    return f"the weights in {file} do not fit its own config (damaged checkpoint?): {detail}"


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), device: str = "auto") -> dict[str, Any]:
    """Val metrics of a trained checkpoint (``overrides`` may change ``data.*``, e.g. the root or num_val)."""
    dev = pick_device(device)
    model, cfg, info, step, file = _load_trained(path, dev, overrides)
    val_set, val_info = build_dataset(cfg.data, "val")
    if val_info.class_names != info.class_names:
        raise ConfigError(f"the val data's classes {val_info.class_names} differ from the model's {info.class_names}")
    if is_point_data(cfg.data):
        from .points import PointEvaluator  # imports this module

        evaluator = PointEvaluator(val_set, info, topk=cfg.train.eval_topk)
    else:
        evaluator = Evaluator(val_set, info, batch_size=cfg.data.batch_size, topk=cfg.train.eval_topk)
    return json_safe({"checkpoint": str(file), "step": step, **evaluator(model, dev)})


UNDEFINED = "no ground-truth instance in the evaluated split (or in any IoU range): undefined, not 0"


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` valid as strict JSON: a NaN metric (AP with no ground truth) becomes null, and
    ``"undefined": {name: reason}`` says why (json.dumps would write ``NaN``, which JSON does not have)."""
    out, undefined = {}, {}
    for key, value in metrics.items():
        if isinstance(value, float) and not np.isfinite(value):
            out[key], undefined[key] = None, UNDEFINED
        else:
            out[key] = value
    if undefined:
        out["undefined"] = {**out.get("undefined", {}), **undefined}
    return out


@torch.no_grad()
def predict_instances(model: torch.nn.Module, images: Sequence[torch.Tensor], *, topk: int = 100,
                      score_threshold: float = SCORE_THRESHOLD) -> list[dict[str, torch.Tensor]]:
    """Instances with score > ``score_threshold`` for each image (3, H, W) in [0, 1] (no NMS)."""
    device = next(model.parameters()).device
    results = []
    for image in images:
        h, w = image.shape[-2:]
        ph, pw = -(-h // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY, -(-w // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
        padded = torch.nn.functional.pad(image, (0, pw - w, 0, ph - h))  # zero padding, as collate does
        outputs = model(padded[None].to(device))
        gh, gw = _prediction_extent(outputs["pred_masks"].shape[-2:], (h, w), (ph, pw))
        res = instance_inference(outputs["pred_logits"][0].float().cpu(),
                                 outputs["pred_masks"][0, :, :gh, :gw].float().cpu(), (h, w), topk=topk)
        keep = res["scores"] > score_threshold
        results.append({k: v[keep] for k, v in res.items()})
    return results


def load_images(folder: str | Path, size: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """(file name, float (3, H, W) in [0, 1]) of every image in ``folder``; the longer side resized to
    ``size`` (the training size: the model never saw other scales)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise ConfigError(f"no .png/.jpg/.jpeg/.bmp/.webp images in {folder}")
    images = []
    for file in files:
        img = Image.open(file).convert("RGB")
        if size is not None:
            scale = size / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        array = torch.tensor(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        images.append((file.name, array))
    return images


def draw_instances(ax: Any, image: torch.Tensor, instances: dict[str, Any], class_names: Sequence[str],
                   title: str | None = None) -> None:
    """Image with each instance's mask in its own colour and "class score" at the mask's centre."""
    from matplotlib import colormaps

    canvas = image.permute(1, 2, 0).float().numpy().copy()
    masks, labels, scores = instances["masks"], instances["labels"], instances.get("scores")
    colours = colormaps["tab20"]
    outlines, labels_at = [], []
    for k in range(len(labels)):
        mask = masks[k].numpy()
        if not mask.any():
            continue
        colour = np.array(colours(k % 20)[:3])
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
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
