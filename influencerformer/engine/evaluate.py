"""What evaluation and prediction share across modalities: the evaluation loop (instance inference on the val
split → AP, F1, duplicates, query usage), confident predictions, and the assignment-stability probe (which
query owns each instance of a fixed batch, over time).

Inference is Mask2Former's instance inference *without NMS*, so duplicate predictions cost AP and F1
exactly as they would in deployment — the thing a matching-free loss must get right. What differs between
images and point clouds (batches, reading one item's instances, the AP protocol) is in images.py / points.py.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from influencerformer.metrics import (
    PanopticQuality,
    assignment_stability,
    count_duplicates,
    f1_at_iou,
    f1_from_counts,
    query_usage,
)
from influencerformer.models import panoptic_inference

from .config import DatasetInfo

SCORE_THRESHOLD = 0.5  # a prediction is "confident" (counts for F1 and duplicates) above this score

# one item's instance inference: (logits (Q, C+1) on the CPU, {"masks" bool, "labels", "scores"}) per batch item
Instances = tuple[torch.Tensor, dict[str, torch.Tensor]]


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

    def __init__(self, info: DatasetInfo, with_pq: bool = False) -> None:
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


class InstanceEvaluator:
    """The evaluation loop of both modalities: the model in eval mode sees every val batch once; each item's
    instances are counted (F1, duplicates, query usage) and handed to the modality's metric.

    A subclass says how the val split is batched (``batches``), how one batch's outputs become each item's
    instances and ground truth (``instances``), and what its AP is (``start`` / ``add`` / ``finish``)."""

    def __init__(self, info: DatasetInfo, *, topk: int = 100, with_pq: bool = False) -> None:
        self.info, self.topk, self.with_pq = info, topk, with_pq

    def batches(self) -> Iterable[dict[str, Any]]:
        raise NotImplementedError

    def instances(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Iterator[tuple[Instances, dict]]:
        """Per item of ``batch``: ((logits, instances), ground truth ``{"labels", "masks", ...}``)."""
        raise NotImplementedError

    def start(self) -> None:
        """Reset the modality's metric before a pass."""

    def add(self, logits: torch.Tensor, res: dict[str, torch.Tensor], gt: dict[str, Any],
            counts: InstanceCounts) -> None:
        """One item's instances into the modality's metric."""

    def finish(self) -> dict[str, float]:
        """The modality's metrics of the pass (AP, ...)."""
        return {}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        model = unwrap(model)
        was_training = model.training
        model.eval()
        counts = InstanceCounts(self.info, self.with_pq)
        self.start()
        try:
            for batch in self.batches():
                outputs = model(*model_inputs(batch, device))
                for (logits, res), gt in self.instances(outputs, batch):
                    counts.add(res, gt["masks"], gt["labels"])
                    counts.no_object.append(query_usage(logits))
                    self.add(logits, res, gt, counts)
        finally:
            model.train(was_training)
        return {**self.finish(), **counts.summary()}


@torch.no_grad()
def predict_batches(model: torch.nn.Module, batches: Iterable[dict[str, Any]],
                    read: Callable[[dict[str, Any], dict[str, Any]], Iterable[Instances]], *,
                    score_threshold: float = SCORE_THRESHOLD) -> list[dict[str, torch.Tensor]]:
    """The prediction loop of both modalities: instances with score > ``score_threshold`` of every item, no NMS;
    ``read(outputs, batch)``: each item's (logits, instances), as the modality's evaluator reads them."""
    device = next(model.parameters()).device
    results = []
    for batch in batches:
        for _, res in read(model(*model_inputs(batch, device)), batch):
            keep = res["scores"] > score_threshold
            results.append({k: res[k][keep] for k in ("masks", "labels", "scores")})
    return results


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
