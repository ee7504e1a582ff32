"""Typed run configuration: dataclasses with documented defaults, loaded from YAML, overridden by ``--set``.

A run is fully described by one :class:`Config`; it is printed at start, saved as ``config.yaml`` in the
run directory and stored inside every checkpoint, so a run can always be reproduced or resumed.

Overrides use ``section.key=value`` with the value parsed as a YAML scalar (``train.steps=200``,
``train.amp=bf16``, ``data.num_train=null``). Two sections hold open-ended keyword arguments:
``model.<field>`` sets a field of the model preset (``MaskFormerConfig``) and ``criterion.<kwarg>``
a keyword argument of the criterion's constructor; both are checked against what the target accepts.
"""
from __future__ import annotations

import copy
import inspect
import math
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from .schema import (CHOICES, MODALITY, MODALITY_DEFAULTS, MODEL_CONFIGS, Config, ConfigError,  # noqa: F401
                     CriterionConfig, DataConfig, DatasetInfo, ModelConfig, OptimConfig, TrainConfig)


def _section_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` converted to ``hint`` (int → float allowed), or raise a ConfigError naming ``key``."""
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is int and isinstance(value, bool):  # YAML "true" is not a step count
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(origin, type) and not isinstance(value, origin):
        raise ConfigError(f"{key} must be {getattr(origin, '__name__', origin)}, got {value!r}")
    return value


def _set_field(cfg: Config, section: str, key: str, value: Any) -> None:
    sec = getattr(cfg, section)
    name = f"{section}.{key}"
    value = _check_type(value, _section_types(sec)[key], name)
    allowed = CHOICES.get((section, key))
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    setattr(sec, key, value)


def model_config_class(data_name: str) -> type:
    """The model config of ``data_name``'s modality (MaskFormerConfig for images, PointModelConfig for points)."""
    return MODEL_CONFIGS[MODALITY[data_name]]


def model_fields(data_name: str = "shapes2d") -> list[str]:
    """Fields of the model config for ``data_name``: the valid ``model.<field>`` keys."""
    return [f.name for f in fields(model_config_class(data_name))]


def criterion_kwargs(name: str) -> list[str] | None:
    """Keyword arguments accepted by criterion ``name`` (None = not known here: anything goes)."""
    from influencerformer.losses.registry import CRITERIA

    if name not in CRITERIA:
        raise ConfigError(f"unknown criterion {name!r}; registered criteria: {', '.join(sorted(CRITERIA))}")
    params = _criterion_parameters(name)
    if params is None:
        return None
    params = params.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("self", "num_classes")]


def _criterion_class(name: str) -> type | None:
    """The class behind a built-in registry name (the registry builds lazily, so resolve it here)."""
    if name == "hungarian":
        from influencerformer.losses.criterion import HungarianCriterion

        return HungarianCriterion
    if name in ("influencer", "transport", "ownership", "seed"):
        from influencerformer.losses.influencer_criterion import MaskInfluencerCriterion

        return MaskInfluencerCriterion
    if name == "seeded":
        from influencerformer.losses.seeded import SeededCriterion

        return SeededCriterion
    return None  # registered by someone else: its constructor decides


def _set_open_key(cfg: Config, section: str, key: str, value: Any, criteria: Sequence[str] | None = None) -> None:
    """``model.<field>`` → model.overrides, ``criterion.<kwarg>`` → criterion.kwargs, both checked
    (criterion keys against ``criteria`` when given — any of them may accept it — else the config's criterion)."""
    if section == "model":
        valid = model_fields(cfg.data.name)
        target = cfg.model.overrides
        own = ["preset", "overrides"]
    else:
        accepted = [criterion_kwargs(name) for name in (criteria or [cfg.criterion.name])]
        valid = None if any(a is None for a in accepted) else sorted({k for a in accepted for k in a})
        target = cfg.criterion.kwargs
        own = ["name", "kwargs"]
    if valid is not None and key not in valid:
        raise ConfigError(f"unknown key {section}.{key}; valid keys: {', '.join(own + sorted(valid))}")
    target[key] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` → (``section.key``, value parsed as a YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    path, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value of {path}: {raw!r} ({exc.__class__.__name__})") from None
    return path.strip(), value


def apply_override(cfg: Config, item: str, criteria: Sequence[str] | None = None) -> None:
    """Apply one ``section.key=value`` override in place (value parsed as a YAML scalar); ``criteria``: see
    :func:`load_config`."""
    path, value = parse_override(item)
    parts = path.split(".")
    sections = [f.name for f in fields(Config)]
    if parts[0] not in sections or len(parts) < 2:
        raise ConfigError(f"unknown key {path!r}; sections: {', '.join(sections)} (use section.key=value)")
    section, rest = parts[0], parts[1:]
    sec = getattr(cfg, section)
    own = [f.name for f in fields(sec)]
    if section in ("model", "criterion") and rest[0] in ("overrides", "kwargs") and len(rest) == 2:
        rest = rest[1:]  # model.overrides.x is the long form of model.x
    elif len(rest) == 1 and rest[0] in own:
        _set_field(cfg, section, rest[0], value)
        return
    if section in ("model", "criterion") and len(rest) == 1:
        _set_open_key(cfg, section, rest[0], value, criteria)
        return
    raise ConfigError(f"unknown key {path!r}; valid keys of {section}: {', '.join(own)}")


def from_dict(data: dict[str, Any] | None, criteria: Sequence[str] | None = None) -> Config:
    """Build a Config from a nested dict (as in YAML); every key is checked like an override."""
    cfg = Config()
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of sections (data, model, criterion, optim, train)")
    sections = [f.name for f in fields(Config)]
    # data first (the model keys depend on the dataset), then the rest in file order
    for section, values in sorted(data.items(), key=lambda kv: kv[0] != "data"):
        if section not in sections:
            raise ConfigError(f"unknown section {section!r}; sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping, got {values!r}")
        # name/preset first: which keys are valid for criterion.* depends on the criterion's name
        ordered = sorted(values.items(), key=lambda kv: kv[0] not in ("name", "preset"))
        for key, value in ordered:
            if key in ("overrides", "kwargs") and isinstance(value, dict):
                for sub, subvalue in value.items():
                    _set_open_key(cfg, section, sub, subvalue, criteria)
            elif key in [f.name for f in fields(getattr(cfg, section))]:
                _set_field(cfg, section, key, value)
            elif section in ("model", "criterion"):
                _set_open_key(cfg, section, key, value, criteria)
            else:
                valid = ", ".join(f.name for f in fields(getattr(cfg, section)))
                raise ConfigError(f"unknown key {section}.{key}; valid keys: {valid}")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                criteria: Sequence[str] | None = None, *, stored: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides.

    criteria: the criteria a comparison will train; a ``criterion.<kwarg>`` is valid when any of them
    accepts it (each run keeps the kwargs its criterion accepts). None: the config's criterion decides.
    stored: a config as a dict (a checkpoint's ``config``) to start from instead of a file."""
    data = copy.deepcopy(stored)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse {path}: {exc}") from None
    name = _overridden_data_name(overrides)
    if path is None and stored is None and name in MODALITY:
        data = copy.deepcopy(MODALITY_DEFAULTS[MODALITY[name]])  # the config must not share lists with the defaults
    cfg = from_dict(data, criteria)
    for item in overrides:
        apply_override(cfg, item, criteria)
    validate(cfg)
    return cfg


def _overridden_data_name(overrides: Sequence[str]) -> str | None:
    """The last ``data.name=...`` among the overrides (the dataset decides the defaults), else None."""
    names = [value for path, value in map(parse_override, overrides) if path == "data.name"]
    return names[-1] if names else None


def validate(cfg: Config) -> None:
    """Checks that need several fields at once, before any expensive work starts."""
    from influencerformer.losses.registry import CRITERIA

    if cfg.criterion.name not in CRITERIA:
        names = ", ".join(sorted(CRITERIA))
        raise ConfigError(f"unknown criterion {cfg.criterion.name!r}; registered criteria: {names}")
    if cfg.data.name in ("coco", "s3dis", "scannet"):
        if not cfg.data.root:
            raise ConfigError(f"data.name={cfg.data.name} needs a data root (--data-root PATH or data.root=PATH)")
        if not Path(cfg.data.root).is_dir():
            raise ConfigError(f"data root not found: {cfg.data.root}")
    if cfg.data.num_points is not None and cfg.data.num_points < 1:
        raise ConfigError(f"data.num_points must be ≥ 1 or null, got {cfg.data.num_points}")
    low_high = cfg.data.points_per_room
    if len(low_high) != 2 or not all(isinstance(v, int) for v in low_high) or not 1 <= low_high[0] <= low_high[1]:
        raise ConfigError(f"data.points_per_room must be [low, high] with 1 ≤ low ≤ high, got {low_high}")
    for key, (low, high, low_open, high_open) in RANGES.items():
        section, name = key.split(".")
        _check_range(key, getattr(getattr(cfg, section), name), low, high, low_open, high_open)
    for key, value in cfg.criterion.kwargs.items():
        _check_criterion_kwarg(cfg.criterion.name, key, value)
    _check_model(cfg)


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
# every numeric field: (low, high, low excluded, high excluded); None = unbounded. Optional fields may be null.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "data.num_train": (1, None, False, False), "data.num_val": (1, None, False, False),
    "data.num_points": (1, None, False, False), "data.image_size": (1, None, False, False),
    "data.batch_size": (1, None, False, False), "data.workers": (0, None, False, False),
    "data.seed": (0, SEED_MAX, False, False),
    "optim.lr": (0, None, True, False), "optim.weight_decay": (0, None, False, False),
    "optim.beta1": (0, 1, False, True), "optim.beta2": (0, 1, False, True),
    "optim.warmup_steps": (0, None, False, False), "optim.poly_power": (0, None, True, False),
    "optim.min_lr_ratio": (0, 1, False, False), "optim.clip": (0, None, False, False),
    "train.steps": (1, None, False, False), "train.eval_every": (0, None, False, False),
    "train.checkpoint_every": (0, None, False, False), "train.keep_checkpoints": (0, None, False, False),
    "train.grad_accum": (1, None, False, False), "train.seed": (0, SEED_MAX, False, False),
    "train.log_every": (1, None, False, False), "train.eval_topk": (1, None, False, False),
    "train.probe_images": (0, None, False, False),
}


def _check_range(key: str, value: Any, low: float | None, high: float | None, low_open: bool = False,
                 high_open: bool = False) -> None:
    """ConfigError naming ``key`` unless ``value`` is None or a finite number in the range."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{low} {'<' if low_open else '≤'} "
        hi = "" if high is None else f" {'<' if high_open else '≤'} {high}"
        raise ConfigError(f"{key} must be {lo}{key.split('.')[1]}{hi}, got {value}")


def _check_criterion_kwarg(name: str, key: str, value: Any) -> None:
    """Numbers among the criterion's keyword arguments: finite, and weights / temperatures not negative.
    A string where the constructor's default is a number ("nan" is a string in YAML) must parse as one."""
    default = _criterion_default(name, key)
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        raise ConfigError(f"criterion.{key} must be a number, got {value!r} (YAML spells NaN .nan, and it is "
                          "rejected anyway)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"criterion.{key} must be finite, got {value}")
    if value < 0 and any(word in key for word in ("weight", "epsilon", "temperature", "margin", "ratio",
                                                  "num_", "iterations", "threshold")):
        raise ConfigError(f"criterion.{key} must be ≥ 0, got {value}")


def _criterion_parameters(name: str) -> Any:
    """``inspect`` parameters of the criterion class behind ``name``; None when the class is not known here."""
    try:
        cls = _criterion_class(name)
    except ImportError:
        return None
    return None if cls is None else inspect.signature(cls.__init__).parameters


def _criterion_default(name: str, key: str) -> Any:
    param = (_criterion_parameters(name) or {}).get(key)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _check_model(cfg: Config) -> None:
    """The model preset + overrides form a valid model config (checked now, not after the data is built)."""
    for key, value in cfg.model.overrides.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"model.{key} must be finite, got {value}")
    try:
        model_config_class(cfg.data.name).preset(cfg.model.preset, **{**cfg.model.overrides, "num_classes": 1})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {exc}") from None


def copy_config(cfg: Config, **section_updates: dict[str, Any]) -> Config:
    """A deep copy of ``cfg`` with ``section={key: value}`` replacements (used by ``compare``)."""
    data = cfg.to_dict()
    kwargs = data["criterion"].pop("kwargs")  # checked when cfg was built (maybe against several criteria)
    new = from_dict(data)
    new.criterion.kwargs = copy.deepcopy(kwargs)
    for section, updates in section_updates.items():
        for key, value in updates.items():
            _set_field(new, section, key, value)
    return new
