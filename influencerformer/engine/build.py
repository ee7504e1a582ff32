"""The builder: objects from a config, and the one place that chooses between images and point clouds.

``modality(data)`` is engine/images.py (shapes2d, COCO) or engine/points.py (rooms3d, S3DIS, ScanNet). Both
expose the same interface, so the training loop, compare, evaluate and the CLI never ask which one they hold:

- ``build_dataset(data, split) -> (dataset, DatasetInfo)``, ConfigError naming what is wrong;
- ``make_collate(dataset, data, generator=None)``: items → a training batch (``generator``: a fixed draw);
- ``make_evaluator(dataset, info, cfg)``: ``evaluator(model, device) -> metrics`` (one shared loop,
  evaluate.InstanceEvaluator);
- ``predict(model, items, *, topk, score_threshold)``: each item's confident instances, no NMS;
- ``draw(ax, item, instances, class_names, title=None)``; ``truth(item)``: the item's ground-truth instances;

and the small facts around them: ``MODEL`` (the model class; its config class is config.MODEL_CONFIGS'),
``attach_terms(criterion, cfg)`` (what the model adds to its criterion), ``item_name``, ``load_items`` (predict
on a folder), ``UNIT``, ``AP_LABEL``, ``AP_DOC`` and ``describe_data`` (the report's words).
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch

from influencerformer.losses.registry import build_criterion as build_registered

from . import images, points
from .checkpoint import MODEL_KEYS, load_latest
from .config import MODALITY, Config, ConfigError, DataConfig, DatasetInfo, apply_override, from_dict, \
    model_config_class
from .distributed import pick_device
from .evaluate import json_safe

MODALITIES = {"images": images, "points": points}


def modality(data: DataConfig) -> ModuleType:
    """engine/images.py or engine/points.py: everything that differs between the two, for ``data``."""
    return MODALITIES[MODALITY[data.name]]


def build_dataset(data: DataConfig, split: str) -> tuple[Any, DatasetInfo]:
    """The ``split`` ("train" | "val") dataset of ``data`` and its class info."""
    ds, info = modality(data).build_dataset(data, split)
    if len(ds) == 0:
        raise ConfigError(f"the {split} split of {data.name} is empty")
    return ds, info


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """MaskFormer (images) or PointQueryModel (point clouds) from the model preset + overrides,
    sized for ``num_classes``."""
    try:
        model_cfg = model_config_class(cfg.data.name).preset(cfg.model.preset,
                                                             **{**cfg.model.overrides, "num_classes": num_classes})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {exc}") from None
    return modality(cfg.data).MODEL(model_cfg)


def build_criterion(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The configured criterion, plus what the model's options add to it (a point model's semantic head: its
    term); bad keyword arguments become a ConfigError naming the criterion."""
    try:
        criterion = build_registered(cfg.criterion.name, num_classes, **cfg.criterion.kwargs)
        modality(cfg.data).attach_terms(criterion, cfg)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"criterion {cfg.criterion.name!r}: {exc}") from None
    return criterion


# ------------------------------------------------------------------------------------------ trained models


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
    evaluator = modality(cfg.data).make_evaluator(val_set, info, cfg)
    return json_safe({"checkpoint": str(file), "step": step, **evaluator(model, dev)})
