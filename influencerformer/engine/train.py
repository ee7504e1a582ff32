"""The training loop: one explicit, readable function, ``train(cfg) -> dict``.

Top to bottom: DDP setup, seeding, data, model, criterion, AdamW + warm-up/cosine schedule, optional
resume, then the loop (micro-batches with AMP and accumulation, non-finite guard, clipping, step,
logging, periodic evaluation and checkpoints). Everything a comparison needs is measured here:
per-term losses (weighted and unweighted, aux layers included), the time of the criterion (matching
included) against the whole step, and evaluation curves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from influencerformer.losses.criterion import base_name

from . import checkpoint as ckpt
from . import distributed
from .config import (Config, ConfigError, DatasetInfo, build_criterion, build_dataset, build_model, is_point_data,
                     validate)
from .evaluate import AssignmentProbe, Evaluator, make_collate, model_inputs, unwrap
from .points import PointEvaluator, make_point_collate

FINAL_LOSS_WINDOW = 50  # "final loss" = mean over the last steps, less noisy than one batch


class NonFiniteLossError(RuntimeError):
    """The loss (or the model output it is computed from) became NaN/Inf; training stops at once."""


# ----------------------------------------------------------------------------------------------- pieces


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up, then cosine/poly."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    if o.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # poly, as Mask2Former's semantic configs
        shape = (1.0 - progress) ** o.poly_power
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices/kernels — decaying norms and biases only hurts (nanoGPT rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), **fused)


class TrainStream:
    """Endless micro-batches whose order is a pure function of (seed, epoch, position).

    The epoch order comes from DistributedSampler (seed + epoch, also with one process), so every
    criterion sees the same images in the same order, and a resumed run restarts at micro-batch
    ``start`` of its epoch without replaying the data before it. The loader's generator (worker seeds)
    is saved as it was at the epoch start, so a resumed epoch draws the same worker seeds.
    """

    def __init__(self, dataset: Any, cfg: Config, info: distributed.DistInfo, collate: Any) -> None:
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.workers = cfg.data.batch_size, cfg.data.workers
        self.sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=cfg.train.seed, drop_last=True)
        self.per_epoch = len(self.sampler) // self.batch_size
        if self.per_epoch == 0:
            raise ConfigError(f"{len(dataset)} training items cannot fill one batch of {self.batch_size} "
                              f"on each of {info.world_size} process(es)")
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.epoch_state = self.generator.get_state()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.epoch_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def batches(self, start: int) -> Iterator[dict[str, Any]]:
        epoch, skip = divmod(start, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)[skip * self.batch_size:]
            self.epoch_state = self.generator.get_state()
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, drop_last=True,
                                num_workers=self.workers, collate_fn=self.collate, generator=self.generator)
            yield from loader
            epoch, skip = epoch + 1, 0


def to_device(batch: dict[str, Any], device: torch.device) -> tuple[tuple[torch.Tensor, ...], list[dict[str, torch.Tensor]]]:
    """(model inputs, targets) of a batch on ``device``."""
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
    return model_inputs(batch, device), targets


def float32_outputs(outputs: Any) -> Any:
    """Model outputs cast to fp32: losses and matching run in full precision whatever the AMP mode."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: float32_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(float32_outputs(v) for v in outputs)
    return outputs


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def nonfinite_outputs(outputs: dict[str, Any]) -> list[str]:
    """Names of model outputs holding NaN/Inf (``pred_masks``, ``aux_outputs[2].pred_logits``, ...)."""
    layers = [("", outputs)] + [(f"aux_outputs[{i}].", a) for i, a in enumerate(outputs.get("aux_outputs") or [])]
    return [f"{prefix}{k}" for prefix, layer in layers for k in ("pred_logits", "pred_masks")
            if k in layer and not torch.isfinite(layer[k]).all()]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so host timers measure the work itself (a CPU-GPU sync point)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunLogger:
    """``config.yaml`` + ``metrics.jsonl`` (+ TensorBoard) in the run dir; rank 0 only."""

    def __init__(self, cfg: Config, enabled: bool, start_step: int) -> None:
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.dir = Path(cfg.train.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(cfg.to_yaml())
        self.path = self.dir / "metrics.jsonl"
        # A resumed run drops what was logged after its checkpoint: the replay logs those steps again.
        kept = [line for line in self._lines() if json.loads(line)["step"] <= start_step] if start_step else []
        self.path.write_text("".join(kept))
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)")
            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines(keepends=True) if self.path.exists() else []

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class Run:
    """Everything one training run holds. The loop in :func:`train` reads top to bottom over it."""

    cfg: Config
    dist: distributed.DistInfo
    data_info: DatasetInfo
    model: torch.nn.Module  # DDP-wrapped when world_size > 1
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    stream: TrainStream
    evaluator: Evaluator | None  # rank 0 only
    probe: AssignmentProbe | None
    step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    recent: deque = field(default_factory=lambda: deque(maxlen=FINAL_LOSS_WINDOW))
    times: dict[str, list[float]] = field(default_factory=lambda: {"step": [], "loss": [], "assign": [], "data": []})
    logger: RunLogger | None = None
    checkpoint: str | None = None  # the latest checkpoint written (rank 0)

    @property
    def device(self) -> torch.device:
        return self.dist.device


def _build(cfg: Config, info: distributed.DistInfo) -> Run:
    """Data, model, criterion, optimiser and schedule, in a fixed order so the seed fixes every init."""
    seed_everything(cfg.train.seed)
    train_set, ds_info = build_dataset(cfg.data, "train")
    model = build_model(cfg, ds_info.num_classes).to(info.device)  # built first: same init for every criterion
    criterion = build_criterion(cfg, ds_info.num_classes).to(info.device)
    if hasattr(criterion, "assign_timer"):
        criterion.assign_timer.enabled = True  # events / perf_counter only: no extra host sync
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.amp == "fp16")
    evaluator = probe = None
    points = is_point_data(cfg.data)
    if info.is_main:
        val_set, _ = build_dataset(cfg.data, "val")
        evaluator = (PointEvaluator(val_set, ds_info, topk=cfg.train.eval_topk) if points else
                     Evaluator(val_set, ds_info, batch_size=cfg.data.batch_size, topk=cfg.train.eval_topk))
    if cfg.train.probe_images > 0:  # every rank: the criterion may all-reduce inside its forward
        n = min(cfg.train.probe_images, len(train_set))
        # point clouds: one fixed sample of each probe scene (a fresh sample would move the owners by itself)
        probe_collate = (make_point_collate(train_set, cfg.data.num_points, torch.Generator().manual_seed(0))
                         if points else make_collate())
        probe = AssignmentProbe(probe_collate([train_set[i] for i in range(n)]))
    if info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = DDP(model, device_ids=ids)
    collate = make_point_collate(train_set, cfg.data.num_points) if points else make_collate()
    stream = TrainStream(train_set, cfg, info, collate)
    return Run(cfg, info, ds_info, model, criterion, optimizer, scheduler, scaler, stream, evaluator, probe)


# ------------------------------------------------------------------------------------ checkpoint state


def _gather_rng(run: Run) -> list[dict[str, Any]]:
    """RNG states of every rank (ranks draw different numbers: their batches differ), rank order."""
    states = ckpt.rng_states()
    if not run.dist.enabled:
        return [states]
    gathered: list[Any] = [None] * run.dist.world_size
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def _save(run: Run) -> None:
    rng = _gather_rng(run)  # collective: every rank takes part, rank 0 writes
    if run.dist.is_main:
        state = {
            "model": unwrap(run.model).state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "stream": run.stream.state_dict(),
            "rng": rng,
            "config": run.cfg.to_dict(),
            "dataset": dataclasses.asdict(run.data_info),  # class names/ids: evaluate and predict need no data
            "history": {"curve": run.curve, "recent": list(run.recent), "times": run.times,
                        "probe": run.probe.previous if run.probe else None},
        }
        path = ckpt.save_checkpoint(run.cfg.train.out_dir, run.step, state, keep=run.cfg.train.keep_checkpoints)
        run.checkpoint = str(path)
    distributed.barrier()


def _restore(run: Run, path: Path) -> None:
    """Continue exactly where the checkpoint left off: weights, optimiser, schedule, data position, RNG."""
    state = ckpt.load_checkpoint(path, map_location=run.device)
    changed = _config_changes(state["config"], run.cfg.to_dict())
    if changed and run.dist.is_main:
        print(f"warning: resuming {path} with a changed config: {', '.join(changed)}", file=sys.stderr)
    unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.stream.load_state_dict(state["stream"])
    rng = state["rng"]
    ckpt.set_rng_states(rng[run.dist.rank] if run.dist.rank < len(rng) else rng[0])
    history = state["history"]
    run.step, run.curve, run.times = state["step"], history["curve"], history["times"]
    run.checkpoint = str(path)
    run.recent.extend(history["recent"])
    if run.probe is not None:
        run.probe.previous = history["probe"]


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    ignored = {("train", "progress"), ("train", "device"), ("train", "out_dir"), ("data", "workers")}
    return [f"{s}.{k}: {old[s].get(k)!r} -> {v!r}" for s in new for k, v in new[s].items()
            if (s, k) not in ignored and old.get(s, {}).get(k) != v]


# ------------------------------------------------------------------------------------------- one step


def _losses(run: Run, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The criterion's terms; a NaN model output (which criteria reject) is reported as non-finite."""
    try:
        return run.criterion(outputs, targets)
    except ValueError:
        bad = nonfinite_outputs(outputs)
        if bad:
            raise NonFiniteLossError(f"non-finite model output at step {run.step + 1}: {', '.join(bad)}") from None
        raise


def _guard(run: Run, losses: dict[str, torch.Tensor]) -> None:
    """Stop at the first non-finite loss, naming the step and the terms (every rank stops together)."""
    bad = not bool(torch.isfinite(losses["loss"]))  # a CPU-GPU sync point, once per micro-batch
    if distributed.any_true(bad, run.device):
        terms = [f"{k}={float(v.detach()):g}" for k, v in losses.items() if not torch.isfinite(v).all()]
        where = ", ".join(terms) if terms else "on another rank"
        raise NonFiniteLossError(f"non-finite loss at step {run.step + 1}: {where}")


def _accumulate(run: Run, batches: Iterator[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Forward + backward over ``grad_accum`` micro-batches; returns (mean terms, seconds of loss / assign / data)."""
    accum, amp = run.cfg.train.grad_accum, run.cfg.train.amp
    totals: dict[str, torch.Tensor] = {}
    loss_s = data_s = assign_s = 0.0
    timer = getattr(run.criterion, "assign_timer", None)
    for micro in range(accum):
        t = time.perf_counter()
        inputs, targets = to_device(next(batches), run.device)
        data_s += time.perf_counter() - t
        # DDP all-reduces gradients in backward; only the last micro-batch of a step needs it
        last = micro == accum - 1
        no_sync = run.model.no_sync() if run.dist.enabled and not last else contextlib.nullcontext()
        with no_sync:
            with autocast_context(amp, run.device):
                outputs = run.model(*inputs)
            outputs = float32_outputs(outputs)  # criteria (and matching) always run in fp32
            sync(run.device)
            t = time.perf_counter()
            losses = _losses(run, outputs, targets)
            sync(run.device)
            loss_s += time.perf_counter() - t
            assign_s += timer.pop_ms() / 1000 if timer is not None else 0.0
            _guard(run, losses)
            run.scaler.scale(losses["loss"] / accum).backward()
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value.detach() / accum
    seconds = {"loss": loss_s, "data": data_s}
    if timer is not None:
        seconds["assign"] = assign_s
    return totals, seconds


def _optimizer_step(run: Run) -> torch.Tensor | None:
    """Unscale (fp16), clip, step, schedule; returns the pre-clip gradient norm."""
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the loss-scaled ones
    norm = None
    if run.cfg.optim.clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return norm


def _record(run: Run, losses: dict[str, torch.Tensor], norm: torch.Tensor | None, times: dict[str, float]) -> float:
    """Keep timings and the recent losses; every ``log_every`` steps write all terms to metrics.jsonl."""
    loss = float(losses["loss"])
    run.recent.append(loss)
    for key, value in times.items():
        run.times.setdefault(key, []).append(value)
    if run.step % run.cfg.train.log_every == 0 or run.step == run.cfg.train.steps:
        weights = run.criterion.weight_dict
        terms = {k: float(v) for k, v in losses.items() if k != "loss"}
        weighted = {f"weighted/{k}": weights.get(k, weights.get(base_name(k), 0.0)) * v for k, v in terms.items()}
        record = {"kind": "train", "step": run.step, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
                  "grad_norm": None if norm is None else float(norm),
                  **{f"{k}_ms": 1000 * v for k, v in times.items()}, **terms, **weighted}
        run.logger.write(record)
    return loss


def _evaluate(run: Run) -> None:
    """Val metrics on rank 0 + the assignment probe on every rank, without touching the training RNG."""
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        change = run.probe(run.model, run.criterion, run.device) if run.probe is not None else None
        if hasattr(run.criterion, "assign_timer"):
            run.criterion.assign_timer.pop_ms()  # the probe's assignment is not a training step's
        metrics = run.evaluator(run.model, run.device) if run.evaluator is not None else None
    if metrics is not None:
        point = {"step": run.step, **metrics, "assignment_change": change,
                 "loss": sum(run.recent) / max(1, len(run.recent))}
        run.curve.append(point)
        run.logger.write({"kind": "eval", **point})
        shown = " ".join(f"{k}={v:.3f}" for k, v in point.items() if isinstance(v, float))
        tqdm.write(f"[eval] step {run.step}: {shown}")
    distributed.barrier()


# ------------------------------------------------------------------------------------------- the loop


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def train(cfg: Config, *, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` and return its summary (final metrics, curve, timings; see :func:`summarize`).

    resume: continue from the latest checkpoint in ``cfg.train.out_dir`` (from scratch if none).
    stop_at: stop after this step with a checkpoint, as if killed there; the schedule is unchanged.
    Launched by torchrun, every rank calls this; rank 0 alone logs, evaluates and saves.
    """
    validate(cfg)
    owns_group = not torch.distributed.is_initialized()  # leave a caller's process group alone
    info = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, info, resume, stop_at)
    finally:
        if owns_group:
            distributed.cleanup()


def _train(cfg: Config, info: distributed.DistInfo, resume: bool, stop_at: int | None) -> dict[str, Any]:
    autocast_context(cfg.train.amp, info.device)  # an impossible AMP mode fails now, not after the set-up
    if info.is_main:
        print(f"resolved config:\n{cfg.to_yaml()}", flush=True)
    run = _build(cfg, info)
    latest = ckpt.latest_checkpoint(cfg.train.out_dir) if resume else None
    if latest is not None:
        _restore(run, latest)
        if info.is_main:
            print(f"resumed from {latest} at step {run.step}", flush=True)
    elif resume and info.is_main:
        print(f"no checkpoint in {cfg.train.out_dir}; starting from scratch", flush=True)
    if latest is None and info.is_main:
        _remove_stale_checkpoints(cfg.train.out_dir)
    run.logger = RunLogger(cfg, info.is_main, run.step)
    stop = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    batches = run.stream.batches(run.step * cfg.train.grad_accum)
    bar = tqdm(total=stop, initial=run.step, disable=not (info.is_main and cfg.train.progress),
               dynamic_ncols=True, desc=cfg.criterion.name)
    try:
        while run.step < stop:
            t0 = time.perf_counter()
            losses, seconds = _accumulate(run, batches)
            norm = _optimizer_step(run)
            sync(run.device)
            run.step += 1
            loss = _record(run, losses, norm, {"step": time.perf_counter() - t0, **seconds})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if _due(run.step, cfg.train.eval_every, cfg.train.steps):
                _evaluate(run)
            if _due(run.step, cfg.train.checkpoint_every, cfg.train.steps) or run.step == stop:
                _save(run)
    finally:
        bar.close()
        run.logger.close()
    return summarize(run)


def _remove_stale_checkpoints(run_dir: str) -> None:
    """A fresh run owns its directory: checkpoints of an earlier run there would pass for "latest"."""
    stale = ckpt.list_checkpoints(run_dir)
    for _, path in stale:
        path.unlink()
    if stale:
        print(f"removed {len(stale)} checkpoint(s) of an earlier run from {run_dir}", flush=True)


TIMING_WARMUP = 5  # first steps are slower (allocator, lazy init): left out of the mean step time


def summarize(run: Run) -> dict[str, Any]:
    """Final metrics (last evaluation), curve and mean timings of a run, all JSON-serialisable."""
    def mean_ms(key: str) -> float | None:
        values = run.times.get(key, [])
        values = values[TIMING_WARMUP:] if len(values) > 2 * TIMING_WARMUP else values
        return 1000 * sum(values) / len(values) if values else None

    last = run.curve[-1] if run.curve else {}
    changes = [p["assignment_change"] for p in run.curve if p.get("assignment_change") is not None]
    return {
        "criterion": run.cfg.criterion.name, "seed": run.cfg.train.seed, "steps": run.step,
        "run_dir": str(run.cfg.train.out_dir), "checkpoint": run.checkpoint,
        **{k: v for k, v in last.items() if k not in ("step", "loss", "assignment_change")},
        "final_loss": sum(run.recent) / len(run.recent) if run.recent else None,
        "step_ms": mean_ms("step"), "loss_ms": mean_ms("loss"), "assign_ms": mean_ms("assign"),
        "data_ms": mean_ms("data"),
        "assignment_change": sum(changes) / len(changes) if changes else None,
        "curve": run.curve,
    }
