"""Head-to-head comparison of criteria: same model, data, order and seed — only the loss differs.

``compare(cfg, variants, seeds, out_dir)`` trains one run per (seed, variant) with :func:`train`, then writes
a report folder:

- ``report.md``: one table row per variant (mean ± sd over seeds), a verdict line, the machine load, the setup
  (see :mod:`.report`);
- ``results.json``: ``{"runs": [{"criterion" (the variant's name), "loss" (the registered criterion),
  "kwargs", "seed", "steps", "AP", ..., "step_ms", "loss_ms" (medians), "load_max", "curve", "loss_curve"}],
  "summary": {variant: {key: {"values" (per seed), "mean", "sd", "median", "n"}}}, "machine": {...}}``;
- ``curves.png`` and ``masks.png`` (see :mod:`.plots`);
- ``runs/<variant>_seed<seed>/``: each run's own folder: config.yaml, metrics.jsonl, checkpoints/, load.json
  (the machine's load during the run) and console.log (everything the run printed, its config dump included).

A variant is a registered criterion plus keyword arguments on top of the config's ``criterion.*``: a plain
name (``"transport"``) or ``Variant("eps05", "transport", {"epsilon": 0.05})``, on the command line
``--variant eps05=transport,epsilon=0.05``; so Hungarian and several transport settings go side by side.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import threading
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from .checkpoint import list_checkpoints
from .build import build_criterion, build_dataset, load_trained, modality
from .config import Config, ConfigError, copy_config, criterion_kwargs, validate
from .distributed import pick_device
from .evaluate import SCORE_THRESHOLD
from .plots import plot_curves, plot_masks
from .report import SeedSpread, curves_title, report_markdown, setup_lines, steps_to_fraction, summarize_runs
from .train import TIMING_WARMUP, check_run_dir, train

__all__ = ["SeedSpread", "Variant", "compare", "parse_variant", "run_config", "steps_to_fraction", "summarize_runs"]

LOAD_INTERVAL = 10.0  # seconds between samples of the machine's load average during a run
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


# --------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One compared loss: registered ``criterion`` with ``kwargs`` on top of the config's criterion kwargs."""

    name: str
    criterion: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        if self.name == self.criterion and not args:
            return self.name
        return f"{self.name} = {self.criterion}" + (f" with {args}" if args else "")


def parse_variant(text: str) -> Variant:
    """``NAME=criterion[,key=value...]`` → Variant; values are YAML scalars, as in ``--set``
    (``eps05=transport,epsilon=0.05``, ``top3=transport,topk=3,detach_plan=false``)."""
    name, sep, rest = text.partition("=")
    usage = f"variant {text!r} must look like NAME=criterion[,key=value...], e.g. eps05=transport,epsilon=0.05"
    if not sep or not name.strip() or not rest.strip():
        raise ConfigError(usage)
    parts = re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", rest)  # a comma inside a value ([8,16]) does not split
    criterion, kwargs = parts[0].strip(), {}
    if "," in criterion or "=" in criterion:
        raise ConfigError(usage)
    for part in parts[1:]:
        key, _, raw = part.partition("=")
        try:
            kwargs[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"variant {name.strip()!r}: cannot parse the value of {key.strip()}: {raw!r}") from None
    return Variant(name.strip(), criterion, kwargs)


def as_variants(items: Sequence[str | Variant]) -> list[Variant]:
    """Plain criterion names and Variants as Variants, checked: valid distinct names, known criteria and keys."""
    variants = [item if isinstance(item, Variant) else Variant(item, item) for item in items]
    names = [v.name for v in variants]
    if not variants:
        raise ConfigError("compare needs at least one criterion and one seed")
    if len(set(names)) != len(names):
        raise ConfigError(f"criteria and variants must have distinct names, got {names}")
    for v in variants:
        if not _NAME.fullmatch(v.name):
            raise ConfigError(f"variant name {v.name!r}: use letters, digits and _ . + - (it names a folder)")
        accepted = criterion_kwargs(v.criterion)  # unknown criterion: ConfigError listing the registered ones
        unknown = [k for k in v.kwargs if accepted is not None and k not in accepted]
        if unknown:
            raise ConfigError(f"variant {v.name!r}: {v.criterion} has no keyword {', '.join(unknown)}; "
                              f"valid: {', '.join(accepted)}")
    return variants


def run_config(cfg: Config, variant: str | Variant, seed: int, out_dir: Path) -> Config:
    """``cfg`` for one run. The config's criterion kwargs carry over to each criterion that accepts them
    (e.g. ``num_points`` for all; the others are dropped for that criterion only); the variant's win."""
    variant = variant if isinstance(variant, Variant) else Variant(variant, variant)
    accepted = criterion_kwargs(variant.criterion)
    kwargs = {k: v for k, v in cfg.criterion.kwargs.items() if accepted is None or k in accepted}
    new = copy_config(cfg, criterion={"name": variant.criterion},
                      train={"seed": seed, "out_dir": str(Path(out_dir) / "runs" / f"{variant.name}_seed{seed}")})
    new.criterion.kwargs = {**kwargs, **variant.kwargs}
    return new


# ----------------------------------------------------------------------------------- machine and console


def num_cores() -> int:
    """CPU cores this process may run on (the load average is compared with this)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LoadMonitor:
    """The machine's 1-minute load average, sampled at entry, every ``interval`` s (a daemon thread) and at exit."""

    def __init__(self, interval: float = LOAD_INTERVAL, read: Callable[[], Sequence[float]] = os.getloadavg) -> None:
        self.interval, self.read, self.samples = interval, read, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            self.samples.append(float(self.read()[0]))
        except OSError:  # no load average on this platform
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> LoadMonitor:
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="load-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class _Console:
    """stdout while a run trains: all of it goes to the run's console.log; the console gets all of it but
    train's "resolved config:" dump (in the run folder as config.yaml and in console.log)."""

    def __init__(self, console: Any, log: Any) -> None:
        self.console, self.log, self._dropping = console, log, False

    def write(self, text: str) -> int:
        self.log.write(text)
        dump = text.startswith("resolved config:")
        if dump or (self._dropping and text == "\n"):  # print() writes the text, then "\n"
            self._dropping = dump
            return len(text)
        self._dropping = False
        return self.console.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, ... as the real console
        return getattr(self.console, name)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------- one run


def _train_one(run_cfg: Config, resume: bool, overwrite: bool,
               load_interval: float) -> tuple[dict[str, Any], list[float]]:
    """Train one run with its console output logged and the machine load sampled (kept in load.json)."""
    run_dir = Path(run_cfg.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    load_file = run_dir / "load.json"
    earlier = _load_samples(load_file) if resume else []
    with (run_dir / "console.log").open("a" if resume else "w") as log, LoadMonitor(load_interval) as load:
        with redirect_stdout(_Console(sys.stdout, log)):
            result = train(run_cfg, resume=resume, overwrite=overwrite)
    samples = earlier + load.samples  # a resumed run: its earlier parts count too
    load_file.write_text(json.dumps({"cores": num_cores(), "samples": samples}))
    return result, samples


def _load_samples(path: Path) -> list[float]:
    """The load samples an earlier part of a resumed run kept (none when the file is missing or damaged)."""
    try:
        samples = json.loads(path.read_text())["samples"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [float(v) for v in samples if isinstance(v, (int, float))]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a line cut by a kill is not a record."""
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


def loss_curve(records: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """(step, loss) of every logged training step of a run."""
    return [{"step": r["step"], "loss": r["loss"]} for r in records if r.get("kind") == "train"]


def median_times(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Median ms per step of step / loss / assign / data over the logged training steps after the first
    TIMING_WARMUP (all of them when none is later): a median, so a burst of other work on the machine does
    not move it the way it moves a mean."""
    train_records = [r for r in records if r.get("kind") == "train"]
    late = [r for r in train_records if r["step"] > TIMING_WARMUP] or train_records
    out = {}
    for key in ("step_ms", "loss_ms", "assign_ms", "data_ms"):
        values = [r[key] for r in late if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        out[key] = statistics.median(values) if values else None
    return out


def finish_run(result: dict[str, Any], variant: Variant, load: Sequence[float]) -> dict[str, Any]:
    """compare's fields of one run: variant, median timings (train's means kept as ``*_mean``), shares, load."""
    records = read_metrics(Path(result["run_dir"]) / "metrics.jsonl")
    run = {**result, "criterion": variant.name, "loss": variant.criterion, "kwargs": variant.kwargs}
    for key, median in median_times(records).items():
        run[f"{key}_mean"] = result.get(key)
        run[key] = median
    run["steps_to_90"] = steps_to_fraction(result["curve"])
    for part in ("loss", "assign"):
        if run.get(f"{part}_ms") is not None and run.get("step_ms"):
            run[f"{part}_share"] = run[f"{part}_ms"] / run["step_ms"]
    run["loss_curve"] = loss_curve(records)
    run["load_max"] = max(load) if load else None
    run["load_median"] = statistics.median(load) if load else None
    return run


# ------------------------------------------------------------------------------------- the comparison


def compare(cfg: Config, criteria: Sequence[str | Variant], seeds: Sequence[int], out_dir: str | Path,
            *, num_images: int = 4, resume: bool = False, overwrite: bool = False,
            seed_spread: SeedSpread | None = None, load_interval: float = LOAD_INTERVAL) -> dict[str, Any]:
    """Train every (seed, variant) pair from ``cfg`` and write the report; returns results.json's content.

    criteria: registered criterion names and/or :class:`Variant` s, the first is the verdict's baseline.
    resume: continue each run from its latest checkpoint (finished runs are not retrained), so an
    interrupted comparison picks up where it stopped.
    overwrite: replace the runs already in ``out_dir/runs``; without it (or resume), an earlier run there is an
    error before anything trains.
    seed_spread: with one seed, a committed multi-seed AP spread for the verdict line to quote.
    """
    out = Path(out_dir)
    variants = as_variants(criteria)
    if not seeds:
        raise ConfigError("compare needs at least one criterion and one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {list(seeds)}")
    plan = [(v, seed, run_config(cfg, v, seed, out)) for seed in seeds for v in variants]
    for _, _, run_cfg in plan:  # fail on a bad name, keyword or folder before hours of training, not after
        validate(run_cfg)
        build_criterion(run_cfg, 2)
        check_run_dir(run_cfg.train.out_dir, resume=resume, overwrite=overwrite)
    sizes = split_sizes(cfg)
    device = pick_device(cfg.train.device)
    setup = setup_lines(cfg, [v.describe() for v in variants], sizes, device, num_cores())
    print(f"compare: {len(variants)} criteria × {len(seeds)} seed(s) = {len(plan)} runs of {cfg.train.steps} steps",
          *setup, f"- each run's full config and console output: {out / 'runs'}/<criterion>_seed<seed>/"
          "config.yaml, console.log", sep="\n", flush=True)
    runs = _train_all(plan, resume, overwrite, load_interval)
    names = [v.name for v in variants]
    results = {"runs": runs, "summary": summarize_runs(runs, names),
               "variants": [{"name": v.name, "criterion": v.criterion, "kwargs": v.kwargs} for v in variants],
               "machine": {"cores": num_cores(), "threads": torch.get_num_threads(), "device": str(device)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1))
    data = modality(cfg.data)
    (out / "report.md").write_text(report_markdown(results, names, seeds, setup, ap_doc=data.AP_DOC,
                                                   cores=num_cores(), spread=seed_spread))
    plot_curves(runs, names, out / "curves.png", title=curves_title(cfg, sizes, seeds), ap_label=data.AP_LABEL)
    first_seed = [next(r for r in runs if r["criterion"] == n and r["seed"] == seeds[0]) for n in names]
    draw_masks(first_seed, out / "masks.png", num_images=num_images)
    return results


def _train_all(plan: list[tuple[Variant, int, Config]], resume: bool, overwrite: bool,
               load_interval: float) -> list[dict[str, Any]]:
    """Every run in order, with "run i/n: variant seed s" and an ETA from the seconds per step so far."""
    starts = [max((s for s, _ in list_checkpoints(c.train.out_dir)), default=0) if resume else 0 for _, _, c in plan]
    todo = [max(0, c.train.steps - start) for (_, _, c), start in zip(plan, starts)]
    runs, spent, trained = [], 0.0, 0
    for i, (variant, seed, run_cfg) in enumerate(plan):
        eta = f"ETA {_duration(spent / trained * sum(todo[i:]))}" if trained else "ETA after this run"
        print(f"run {i + 1}/{len(plan)}: {variant.name} seed {seed} ({_duration(spent)} so far, {eta})", flush=True)
        t0 = time.perf_counter()
        result, load = _train_one(run_cfg, resume, overwrite, load_interval)
        spent, trained = spent + time.perf_counter() - t0, trained + todo[i]
        runs.append(finish_run(result, variant, load))
    print(f"{len(plan)} runs done in {_duration(spent)}", flush=True)
    return runs


def _json_safe(obj: Any) -> Any:
    """NaN/Inf → null: results.json stays standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------- setup


def _dataset_size(dataset: Any) -> tuple[int, int]:
    """(items used, items in the split): a split truncated to its first N items is a Subset somewhere inside."""
    inner = dataset
    for _ in range(4):
        if isinstance(inner, torch.utils.data.Subset):
            return len(dataset), len(inner.dataset)
        inner = getattr(inner, "dataset", None) or getattr(inner, "scenes", None)
        if inner is None:
            break
    return len(dataset), len(dataset)


def split_sizes(cfg: Config) -> dict[str, tuple[int, int]]:
    """``{"train": (used, of), "val": (used, of)}``: the item counts the runs will really use."""
    return {split: _dataset_size(build_dataset(cfg.data, split)[0]) for split in ("train", "val")}


# ------------------------------------------------------------------------------------------- masks.png


def draw_masks(runs: list[dict[str, Any]], path: Path, *, num_images: int = 4) -> None:
    """masks.png of one seed's runs: the first val images (scenes), ground truth then each variant's predictions."""
    models = [load_trained(r["checkpoint"]) for r in runs]
    _, cfg, info, step = models[0]
    val_set, _ = build_dataset(cfg.data, "val")
    items = [val_set[i] for i in range(min(num_images, len(val_set)))]
    names = [r["criterion"] for r in runs]
    caption = (f"seed {runs[0]['seed']}, step {step}: ground truth, then each criterion's predictions with score > "
               f"{SCORE_THRESHOLD} (no NMS)")
    data = modality(cfg.data)
    preds = [data.predict(model, items, score_threshold=SCORE_THRESHOLD) for model, _, _, _ in models]
    plot_masks(items, [data.truth(item) for item in items], names, preds, info.class_names, data.draw, path,
               caption=caption + data.MASKS_CAPTION, panel=data.PANEL)
