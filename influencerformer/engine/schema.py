"""The typed run configuration: five sections of documented defaults (data, model, criterion, optim, train),
what a modality changes in them, and what the engine reads about a dataset's classes. Loading, overrides and
checks are in ``config.py``, which re-exports every name here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from ..data.synthetic import SHAPES_PRESETS
from ..models import MaskFormerConfig, PointModelConfig


class ConfigError(ValueError):
    """Bad user input in a config file, an override or a CLI option (reported without a traceback)."""


# The defaults are the CPU comparison budget (configs/shapes2d_medium.yaml): shapes2d "medium" (64x64),
# the tiny model, batch 8, 3000 steps — two criteria in about 10 minutes on 2 CPU cores.

# The modality of each dataset. engine/build.py gives each modality its dataset, collate, evaluator, predictor
# and drawer; here is only what a modality changes in the config: the model's config class and the defaults a
# run without a config file starts from (point clouds: = configs/rooms3d_cpu.yaml).
MODALITY = {"shapes2d": "images", "coco": "images", "rooms3d": "points", "s3dis": "points", "scannet": "points"}
MODEL_CONFIGS = {"images": MaskFormerConfig, "points": PointModelConfig}
MODALITY_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "images": {},
    "points": {
        "data": {"points_per_room": [8000, 12000], "num_points": 4096, "num_train": 200, "num_val": 20,
                 "batch_size": 4},
        "model": {"preset": "tiny"},
        "criterion": {"kwargs": {"num_points": None}},
        "optim": {"lr": 1e-3, "warmup_steps": 50},
        "train": {"steps": 500, "eval_every": 125, "checkpoint_every": 500, "out_dir": "runs/rooms3d_cpu"},
    },
}


@dataclass
class DataConfig:
    name: str = "shapes2d"  # images: shapes2d | coco; point clouds: rooms3d | s3dis | scannet
    preset: str = "medium"  # Shapes2D preset: default | medium | crowded | dense (shapes2d only)
    root: str | None = None  # data root, required for coco, s3dis (raw Area_N/ or mmdet3d layout), scannet
    num_train: int | None = None  # training images / scenes (None = the preset's / the dataset's size)
    num_val: int | None = 100  # validation images / scenes used for evaluation (None = all)
    num_points: int | None = 8192  # point clouds: points sampled per training scene (None = all; evaluation: all)
    points_per_room: list[int] = field(default_factory=lambda: [20000, 100000])  # rooms3d: points per room, range
    strict: bool = True  # raw S3DIS: fail on a malformed row with file:line (False: skip it and warn with counts)
    image_size: int | None = None  # square input size; None = the dataset's native size
    batch_size: int = 8  # images per process per micro-batch (effective = batch × grad_accum × world)
    workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    seed: int = 0  # seed of the synthetic data itself (fixed across training seeds: same images)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # MaskFormerConfig preset: tiny | medium | crowded | base; point clouds: tiny | default
    overrides: dict[str, Any] = field(default_factory=dict)  # MaskFormerConfig / PointModelConfig fields to change


@dataclass
class CriterionConfig:
    name: str = "hungarian"  # registered criterion: hungarian | influencer | transport | ownership | seed
    # keyword arguments of the criterion; num_points=None = every location of the prediction grid, exact and
    # cheap on small images (64x64 → 16x16 grid); set 12544 for Mask2Former's point sampling on large ones
    kwargs: dict[str, Any] = field(default_factory=lambda: {"num_points": None})


@dataclass
class OptimConfig:
    lr: float = 1e-3  # AdamW peak lr (tuned for the CPU budget; the crowded recipe uses 5e-4)
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not applied to norms and biases)
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100  # linear warm-up from 0 to lr over this many optimiser steps
    schedule: str = "cosine"  # cosine | poly | constant, after warm-up, down to min_lr_ratio × lr
    poly_power: float = 0.9  # exponent of the poly schedule
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr
    clip: float = 1.0  # max global grad norm (0 = no clipping)


@dataclass
class TrainConfig:
    steps: int = 3000  # optimiser steps of the schedule
    eval_every: int = 500  # evaluate every N steps and at the end (0 = only at the end)
    checkpoint_every: int = 1000  # checkpoint every N steps and at the end (0 = only at the end)
    keep_checkpoints: int = 2  # older step checkpoints are deleted
    amp: str = "none"  # none | bf16 | fp16 (fp16 needs CUDA; bf16 works on CPU and CUDA)
    grad_accum: int = 1  # micro-batches per optimiser step
    seed: int = 0  # model init, data order and loss sampling
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    out_dir: str = "runs/default"  # run directory: config.yaml, metrics.jsonl, checkpoints/
    log_every: int = 10  # write train terms to metrics.jsonl every N steps
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard package)
    progress: bool = True  # show a tqdm bar
    eval_topk: int = 100  # detections kept per image at evaluation
    probe_images: int = 4  # training images of the fixed probe batch for assignment stability


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES = {
    ("data", "name"): tuple(MODALITY),
    ("data", "preset"): tuple(SHAPES_PRESETS),
    ("optim", "schedule"): ("cosine", "poly", "constant"),
    ("train", "amp"): ("none", "bf16", "fp16"),
}


@dataclass(frozen=True)
class DatasetInfo:
    """What the engine needs to know about a dataset's classes (shared by train and val splits)."""

    num_classes: int
    class_names: list[str]
    category_ids: list[int]
