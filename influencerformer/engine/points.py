"""Point clouds in the engine: rooms3d / S3DIS / ScanNet scenes as training batches, and 3D evaluation.

Training batches hold ``data.num_points`` points per scene, drawn uniformly at random at every
step (scenes are far larger than a batch can hold, and scenes in a batch must have one size for
:class:`~influencerformer.models.PointQueryModel`). Evaluation runs on **every point** of each val
scene, one scene at a time, with the ScanNet protocol (:class:`~influencerformer.metrics.InstanceAP3D`:
AP over IoU 0.50:0.05:0.90, AP50, AP25, minimum region 100 points) — the numbers papers report.

Instance classes: rooms3d and S3DIS use S3DIS's 13 classes (rooms3d's ceiling, floor and wall
carry no instances); ScanNet uses its 18 instance classes (the 20 benchmark classes without wall
and floor), mapped from the semantic labels by the dataset's ``instance_class_map``.

Semantic segmentation (a model with a semantic head): targets also carry each point's semantic label
(``sem_labels``, -1 = none; S3DIS / rooms3d 13 classes, ScanNet 20), the criterion gains ``loss_sem``
(:func:`attach_point_terms`) and evaluation adds semantic ``mIoU`` over every point of the val scenes.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from influencerformer.data.pointcloud import instance_targets
from influencerformer.losses.semantic import IGNORE, add_semantic_term
from influencerformer.metrics import InstanceAP3D, MeanIoU
from influencerformer.models import PointModelConfig, PointQueryModel, instance_inference

from .config import Config, ConfigError, DataConfig, DatasetInfo
from .evaluate import SCORE_THRESHOLD, InstanceCounts, InstanceEvaluator, Instances, predict_batches
from .plots import finish_axes

MIN_REGION_SIZE = 100  # ScanNet protocol: instances and predictions under 100 points are not evaluated
# the point-cloud side of the modality interface (engine/build.py)
MODEL = PointQueryModel
UNIT = "scenes"
AP_LABEL = "val 3D AP"
AP_DOC = ("- AP / AP50 / AP25: ScanNet-protocol 3D instance AP on every point of the val scenes (AP over IoU "
          "0.50:0.05:0.90; regions under 100 points not evaluated), Mask2Former instance inference without NMS, "
          "top-100 per scene.")
MASKS_CAPTION = "; top-down view, one colour per instance"
PANEL = 3.2  # inches per drawn scene in masks.png


class PointScenes(Dataset):
    """Scenes of a point dataset with the instance-class map its targets need.

    Items are the reader's ``{coords, colors, sem_labels, instance_labels, scene_id}``; ``cache``
    keeps every item in memory after its first read (rooms3d generates scenes on the fly, which
    costs more than a training step on a CPU). ``semantic_class_names``: the classes of ``sem_labels``
    (None = ``class_names``; ScanNet's 20 differ from its 18 instance classes)."""

    def __init__(self, scenes: Dataset, class_names: Sequence[str], class_map: Sequence[int], *,
                 cache: bool = False, semantic_class_names: Sequence[str] | None = None) -> None:
        self.scenes, self.class_names, self.class_map = scenes, list(class_names), list(class_map)
        self.semantic_class_names = list(class_names if semantic_class_names is None else semantic_class_names)
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        item = self.scenes[index]
        if len(item["coords"]) == 0:
            raise ValueError(f"scene {item.get('scene_id', index)!r} has no points")
        if self._cache is not None:
            self._cache[index] = item
        return item


def build_point_dataset(name: str, root: str | None, split: str, *, num_scenes: int | None, seed: int,
                        points_per_room: Sequence[int], strict: bool) -> PointScenes:
    """The ``split`` ("train" | "val") scenes of rooms3d, S3DIS (raw release or mmdet3d layout) or
    ScanNet (mmdet3d layout). Raises ValueError / FileNotFoundError naming what is missing."""
    from torch.utils.data import Subset

    from influencerformer.data.pointcloud import PreprocessedPointDataset
    from influencerformer.data.rooms3d import Rooms3D
    from influencerformer.data.s3dis import S3DISRawDataset

    if name == "rooms3d":
        scenes = Rooms3D(split, num_scenes=num_scenes, seed=seed, points_per_room=tuple(points_per_room))
        return PointScenes(scenes, Rooms3D.class_names, range(Rooms3D.num_classes), cache=True)
    path = Path(root or "")
    if name == "s3dis" and not (path / "points").is_dir():
        # the raw release: Area_N/<room>/Annotations/*.txt (train = Areas 1-4, 6; val = Area 5)
        scenes = S3DISRawDataset(path, "train" if split == "train" else "test", strict=strict,
                                 cache_dir=path / ".influencerformer_cache")
        class_names, class_map = scenes.class_names, range(scenes.num_classes)
    else:
        scenes = PreprocessedPointDataset(path, name, split=split)
        class_names, class_map = scenes.instance_class_names, scenes.instance_class_map
    semantic = scenes.class_names  # the classes of sem_labels (raw S3DIS: the instance classes too)
    if num_scenes is not None and num_scenes < len(scenes):
        scenes = Subset(scenes, range(num_scenes))  # the first scenes: a fixed evaluation subset
    return PointScenes(scenes, class_names, class_map, semantic_class_names=semantic)


def build_dataset(data: DataConfig, split: str) -> tuple[PointScenes, DatasetInfo]:
    """The ``split`` of ``data`` (ConfigError naming what is missing) and its instance classes."""
    num = data.num_train if split == "train" else data.num_val
    try:
        ds = build_point_dataset(data.name, data.root, split, num_scenes=num, seed=data.seed,
                                 points_per_room=data.points_per_room, strict=data.strict)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"{data.name} {split} split: {exc}") from None
    return ds, DatasetInfo(len(ds.class_names), ds.class_names, list(range(len(ds.class_names))))


def describe_data(data: DataConfig) -> str:
    """The report's words for what a point run's inputs were."""
    sampled = f"{data.num_points} points sampled per training scene" if data.num_points else "every point in training"
    return f"{sampled}, every point at evaluation"


def sample_indices(n: int, num_points: int | None, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """``num_points`` distinct point indices of a scene of ``n`` points, uniform (None = all points).
    A scene with fewer points repeats random ones to fill the count."""
    if num_points is None:
        return None
    order = torch.randperm(n, generator=generator)[:num_points]
    if n < num_points:
        order = torch.cat([order, torch.randint(n, (num_points - n,), generator=generator)])
    return order


def collate_points(items: list[dict], *, num_points: int | None, class_map: Sequence[int] | None,
                   generator: torch.Generator | None = None) -> dict[str, Any]:
    """Scenes → ``{"coords" (B, N, 3), "colors" (B, N, 3), "targets": [{"labels" (K,), "masks" bool (K, N),
    "sem_labels" long (N,)}], "scene_ids"}`` (+ ``"super_points" (B, N)`` when every scene has them) with
    N = ``num_points`` sampled per scene (None: every point; scenes must then agree). ``sem_labels`` is each
    point's semantic class (-1 = none), read only by a semantic head's term."""
    if num_points is None and len({len(item["coords"]) for item in items}) > 1:
        sizes = [len(item["coords"]) for item in items]
        raise ValueError(f"scenes of a batch have different point counts {sizes}: set data.num_points "
                         f"(points sampled per scene) or data.batch_size=1")
    with_super_points = all("super_points" in item for item in items)  # masks are then per superpoint
    columns: dict[str, list[torch.Tensor]] = {"coords": [], "colors": [], "super_points": []}
    targets = []
    for item in items:
        index = sample_indices(len(item["coords"]), num_points, generator)
        pick = (lambda x: x) if index is None else (lambda x: x[index])  # noqa: E731
        xyz = pick(item["coords"]).float()
        columns["coords"].append(xyz - xyz.amin(0))  # one origin per scene: coordinates stay small and positive
        columns["colors"].append(pick(item["colors"]).float())
        if with_super_points:
            columns["super_points"].append(pick(item["super_points"]).long())
        sem = pick(item["sem_labels"]).long()
        targets.append({**instance_targets(pick(item["instance_labels"]), sem, class_map), "sem_labels": sem})
    batch = {key: torch.stack(values) for key, values in columns.items() if values}
    return {**batch, "targets": targets, "scene_ids": [item.get("scene_id", "") for item in items]}


def make_point_collate(dataset: PointScenes, num_points: int | None,
                       generator: torch.Generator | None = None) -> Any:
    return functools.partial(collate_points, num_points=num_points, class_map=dataset.class_map, generator=generator)


def make_collate(dataset: PointScenes, data: DataConfig, generator: torch.Generator | None = None) -> Any:
    """Training batches of ``data.num_points`` points per scene (``generator``: a fixed draw, e.g. the probe's)."""
    return make_point_collate(dataset, data.num_points, generator)


class PointEvaluator(InstanceEvaluator):
    """3D instance AP (ScanNet protocol) on whole val scenes, plus F1 / duplicates / query usage, and semantic
    ``mIoU`` when the model has a semantic head (no key otherwise).

    Each scene runs alone (batch 1) on every one of its points; masks are Mask2Former's instance
    inference (top-k (query, class) pairs, no NMS), binarised at logit 0. mIoU: each point's most likely
    semantic class against its label (unlabelled points left out), counts summed over scenes, classes
    absent from both left out of the mean (``MeanIoU``)."""

    def __init__(self, dataset: PointScenes, info: Any, *, topk: int = 100) -> None:
        super().__init__(info, topk=topk)
        self.dataset = dataset
        self.collate = make_point_collate(dataset, None)

    def batches(self) -> Iterator[dict[str, Any]]:
        return (self.collate([self.dataset[index]]) for index in range(len(self.dataset)))

    def instances(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Iterator[tuple[Instances, dict]]:
        return zip(read_instances(outputs, batch, self.topk), batch["targets"])

    def start(self) -> None:
        self.ap = InstanceAP3D(self.info.class_names, min_region_size=MIN_REGION_SIZE)
        self.miou: MeanIoU | None = None

    def add(self, logits: torch.Tensor, res: dict[str, torch.Tensor], gt: dict[str, Any],
            counts: InstanceCounts) -> None:
        self.ap.update({"masks": res["masks"], "labels": res["labels"], "scores": res["scores"]}, gt)
        if "semantic" in res:
            if self.miou is None:  # classes: the head's or the data's, whichever is more (a missing one scores 0)
                self.miou = MeanIoU(max(res["num_semantic"], len(self.dataset.semantic_class_names)), IGNORE)
            self.miou.update(res["semantic"], gt["sem_labels"])

    def finish(self) -> dict[str, float]:
        result = self.ap.compute()
        semantic = {} if self.miou is None else {"mIoU": self.miou.compute()["mIoU"]}
        return {"AP": result["AP"], "AP50": result["AP50"], "AP25": result["AP25"], **semantic}


def make_evaluator(dataset: PointScenes, info: DatasetInfo, cfg: Config) -> PointEvaluator:
    return PointEvaluator(dataset, info, topk=cfg.train.eval_topk)


def read_instances(outputs: dict[str, Any], batch: dict[str, Any], topk: int = 100) -> Iterator[Instances]:
    """Per scene of ``batch``: class logits ``(Q, C+1)`` and Mask2Former instance inference (no NMS; masks bool
    ``(N, P)``) on the CPU; with a semantic head also ``"semantic"`` (P,) long, each point's most likely class,
    and ``"num_semantic"`` (the head's class count)."""
    for b in range(outputs["pred_logits"].shape[0]):
        logits = outputs["pred_logits"][b].float().cpu()
        res = instance_inference(logits, outputs["pred_masks"][b, :, None, :].float().cpu(), None, topk=topk)
        res["masks"] = res["masks"][:, 0]
        if "sem_logits" in outputs:
            res["semantic"] = outputs["sem_logits"][b].argmax(-1).cpu()
            res["num_semantic"] = outputs["sem_logits"].shape[-1]
        yield logits, res


def attach_terms(criterion: torch.nn.Module, cfg: Config) -> None:
    """The modality interface's hook: :func:`attach_point_terms` with the run's model options."""
    attach_point_terms(criterion, cfg.criterion.name, cfg.model.preset, cfg.model.overrides)


def attach_point_terms(criterion: torch.nn.Module, criterion_name: str, preset: str,
                       overrides: dict[str, Any]) -> None:
    """What the point model's options add to its criterion: the semantic head's ``loss_sem`` (weight
    ``model.semantic_weight``). ValueError when the ``seeded`` criterion meets a model without seeds."""
    model_cfg = PointModelConfig.preset(preset, **overrides)
    if criterion_name == "seeded" and model_cfg.query_init != "sampled":
        raise ValueError("the seeded criterion needs each query's seed point: set model.query_init=sampled "
                         f"(the model's query_init is {model_cfg.query_init!r})")
    if model_cfg.semantic_head:
        add_semantic_term(criterion, model_cfg.semantic_weight)


# ----------------------------------------------------------------------------------------- pictures


def predict(model: torch.nn.Module, items: Sequence[dict], *, topk: int = 100,
            score_threshold: float = SCORE_THRESHOLD) -> list[dict[str, torch.Tensor]]:
    """Instances of each whole scene with score > ``score_threshold``: masks bool (N, P), labels, scores."""
    batches = (collate_points([item], num_points=None, class_map=None) for item in items)
    read = functools.partial(read_instances, topk=topk)
    return predict_batches(model, batches, read, score_threshold=score_threshold)


def predict_scene(model: torch.nn.Module, item: dict, *, topk: int = 100,
                  score_threshold: float = SCORE_THRESHOLD) -> dict:
    """:func:`predict` of one scene."""
    return predict(model, [item], topk=topk, score_threshold=score_threshold)[0]


def truth(item: dict) -> dict[str, Any]:
    """A scene's ground-truth instances (semantic labels as classes), drawn like predictions."""
    return {**instance_targets(item["instance_labels"], item["sem_labels"]), "scores": None}


def item_name(item: dict) -> str:
    return str(item.get("scene_id") or "scene")


def load_items(folder: Any, data: DataConfig, size: int | None = None) -> list:
    raise ConfigError(f"--images reads image files; {data.name} is a point-cloud run: predict draws its val scenes")


def draw(ax: Any, item: dict, instances: dict[str, Any], class_names: Sequence[str], title: str | None = None) -> None:
    draw_point_instances(ax, item["coords"], point_owner(instances["masks"], instances.get("scores")), title)


def point_owner(masks: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) index of the instance drawn at each point: the best-scoring mask covering it (-1: none)."""
    if len(masks) == 0:
        return torch.full((masks.shape[-1],), -1, dtype=torch.long)
    rank = torch.arange(len(masks), 0, -1, dtype=torch.float) if scores is None else scores.float()
    value = torch.where(masks, rank[:, None], float("-inf"))
    best, owner = value.max(0)
    return torch.where(torch.isfinite(best), owner, -1)


def draw_point_instances(ax: Any, coords: torch.Tensor, owner: torch.Tensor, title: str | None = None) -> None:
    """Top-down view of a scene: points of no instance in light grey, each instance in its own colour."""
    from matplotlib import colormaps

    xy, owner = coords[:, :2].numpy(), owner.numpy()
    none = owner < 0
    ax.scatter(xy[none, 0], xy[none, 1], s=0.3, c="0.85", linewidths=0)
    colours = colormaps["tab20"]((owner[~none] % 20) / 19.999)
    ax.scatter(xy[~none, 0], xy[~none, 1], s=0.6, c=colours, linewidths=0)
    ax.set_aspect("equal")
    finish_axes(ax, title)
