"""The training loop: one explicit, readable function, ``train(cfg) -> dict``.

Top to bottom: DDP setup, seeding, data, model, criterion, AdamW + warm-up/cosine schedule, optional
resume, then the loop (micro-batches with AMP and accumulation, non-finite guard, clipping, step,
logging, periodic evaluation and checkpoints). Everything a comparison needs is measured here:
per-term losses (weighted and unweighted, aux layers included), the time of the criterion (matching
included) against the whole step, and evaluation curves.
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm
from torch.nn.parallel import DistributedDataParallel as DDP

from influencerformer.losses.criterion import base_name

from . import checkpoint as ckpt
from . import distributed
from .build import build_criterion, build_dataset, build_model, modality
from .config import Config, ConfigError, validate
from .evaluate import AssignmentProbe, model_inputs
from .run_dir import RunExistsError, RunLogger, check_run_dir, set_aside_run  # noqa: F401  (RunExistsError: API)
from .run_state import NonFiniteLossError, Run, TrainStream, all_finite, check_weights, latest_intact, restore, save

# Optimiser steps skipped for non-finite gradients in a row before the run stops. fp16's grad scaler starts at
# 2**16 and halves on every overflow, so its first steps may overflow many times in a row by design.
MAX_NONFINITE_STEPS = 5
MAX_NONFINITE_STEPS_FP16 = 25


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
    """Names of model outputs holding NaN/Inf (``pred_masks``, ``aux_outputs[2].pred_logits``, ...); one host sync."""
    layers = [("", outputs)] + [(f"aux_outputs[{i}].", a) for i, a in enumerate(outputs.get("aux_outputs") or [])]
    named = [(f"{prefix}{k}", layer[k]) for prefix, layer in layers for k in ("pred_logits", "pred_masks")
             if isinstance(layer.get(k), torch.Tensor)]
    ok = torch.stack([all_finite(t.detach()) for _, t in named]).tolist() if named else []
    return [name for (name, _), good in zip(named, ok) if not good]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so host timers measure the work itself (a CPU-GPU sync point)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    data = modality(cfg.data)
    if info.is_main:
        val_set, _ = build_dataset(cfg.data, "val")
        evaluator = data.make_evaluator(val_set, ds_info, cfg)
    if cfg.train.probe_images > 0:  # every rank: the criterion may all-reduce inside its forward
        n = min(cfg.train.probe_images, len(train_set))
        # a fixed draw (point clouds: one sample of each probe scene; a fresh one would move the owners by itself)
        probe_collate = data.make_collate(train_set, cfg.data, torch.Generator().manual_seed(0))
        probe = AssignmentProbe(probe_collate([train_set[i] for i in range(n)]))
    if info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = DDP(model, device_ids=ids)
    stream = TrainStream(train_set, cfg, info, data.make_collate(train_set, cfg.data))
    return Run(cfg, info, ds_info, model, criterion, optimizer, scheduler, scaler, stream, evaluator, probe)


# ------------------------------------------------------------------------------------------- one step


def _losses(run: Run, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The criterion's terms; a NaN model output (which criteria reject) is reported as non-finite.

    On CUDA the criteria check values with device-side asserts (no host sync), which would end the process
    with a CUDA error: the outputs are checked here first, at the step's existing sync point."""
    if run.device.type == "cuda":
        bad = nonfinite_outputs(outputs)
        if bad:
            raise NonFiniteLossError(f"non-finite model output at step {run.step + 1}: {', '.join(bad)}")
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


def _optimizer_step(run: Run) -> torch.Tensor:
    """Unscale (fp16), clip, step, schedule; returns the pre-clip gradient norm.

    Non-finite gradients are never applied: the step is skipped (as AMP's grad scaler does), counted and
    named on stderr, and after MAX_NONFINITE_STEPS in a row the run stops. The schedule advances either way,
    so the lr stays a function of the step."""
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the loss-scaled ones
    params = [p for p in run.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = bool(torch.isfinite(norm))  # a CPU-GPU sync point, once per step (DDP: same grads on every rank)
    if finite and run.cfg.optim.clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, run.cfg.optim.clip, norm)
    if finite or run.scaler.is_enabled():
        run.scaler.step(run.optimizer)  # fp16: the scaler itself skips a non-finite step and lowers its scale
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    _count_nonfinite(run, finite, norm)
    return norm


def _count_nonfinite(run: Run, finite: bool, norm: torch.Tensor) -> None:
    if finite:
        run.nonfinite_in_a_row = 0
        return
    run.skipped_steps += 1
    run.nonfinite_in_a_row += 1
    limit = MAX_NONFINITE_STEPS_FP16 if run.scaler.is_enabled() else MAX_NONFINITE_STEPS
    step = run.step + 1
    if run.dist.is_main and not run.scaler.is_enabled():
        tqdm.write(f"warning: step {step}: non-finite gradients (norm {float(norm)}); optimiser step skipped "
                   f"({run.nonfinite_in_a_row} in a row, {run.skipped_steps} in all)", file=sys.stderr)
    if run.nonfinite_in_a_row >= limit:
        kept = f"the latest checkpoint, {run.checkpoint}, is intact" if run.checkpoint else "no checkpoint was written"
        raise NonFiniteLossError(f"non-finite gradients in {run.nonfinite_in_a_row} steps in a row (steps "
                                 f"{step - run.nonfinite_in_a_row + 1}-{step}), none applied; {kept}. Lower "
                                 "optim.lr or set optim.clip")


def _record(run: Run, losses: dict[str, torch.Tensor], norm: torch.Tensor, times: dict[str, float]) -> float:
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
                  "grad_norm": float(norm) if math.isfinite(float(norm)) else None,
                  "skipped_steps": run.skipped_steps,
                  **{f"{k}_ms": 1000 * v for k, v in times.items()}, **terms, **weighted}
        run.logger.write(record)
    return loss


def _evaluate(run: Run) -> None:
    """Val metrics on rank 0 + the assignment probe on every rank, without touching the training RNG."""
    check_weights(run, "evaluated")
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


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, stop_at: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` and return its summary (final metrics, curve, timings; see :func:`summarize`).

    resume: continue from the newest intact checkpoint in ``cfg.train.out_dir`` (from scratch if none).
    overwrite: replace an earlier run in ``cfg.train.out_dir``; its files are kept aside until this run's
    first checkpoint exists. Without resume or overwrite, a folder holding a run raises RunExistsError.
    stop_at: stop after this step with a checkpoint, as if killed there; the schedule is unchanged.
    Launched by torchrun, every rank calls this; rank 0 alone logs, evaluates and saves.
    """
    validate(cfg)
    check_run_dir(cfg.train.out_dir, resume=resume, overwrite=overwrite)  # every rank, before any work
    owns_group = not torch.distributed.is_initialized()  # leave a caller's process group alone
    info = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, info, resume, overwrite, stop_at)
    finally:
        if owns_group:
            distributed.cleanup()


def _train(cfg: Config, info: distributed.DistInfo, resume: bool, overwrite: bool,
           stop_at: int | None) -> dict[str, Any]:
    autocast_context(cfg.train.amp, info.device)  # an impossible AMP mode fails now, not after the set-up
    if info.is_main:
        print(f"resolved config:\n{cfg.to_yaml()}", flush=True)
    run = _build(cfg, info)
    if info.is_main:
        removed = ckpt.remove_orphan_temps(cfg.train.out_dir)
        if removed:
            print(f"removed {len(removed)} temp file(s) of an interrupted checkpoint write", flush=True)
    found = latest_intact(run) if resume else None
    if found is not None:
        restore(run, *found)
        if info.is_main:
            print(f"resumed from {found[0]} at step {run.step}", flush=True)
    elif resume and info.is_main:
        print(f"no checkpoint in {cfg.train.out_dir}; starting from scratch", flush=True)
    if overwrite and info.is_main:
        run.replaced = set_aside_run(cfg.train.out_dir)
    distributed.barrier()
    run.logger = RunLogger(cfg, info.is_main, run.step)
    stop = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    batches = run.stream.batches(run.step * cfg.train.grad_accum)
    bar = tqdm(total=stop, initial=run.step, disable=not (info.is_main and cfg.train.progress),
               dynamic_ncols=True, desc=cfg.criterion.name)
    try:
        while run.step < stop:
            t0 = time.perf_counter()
            if hasattr(run.criterion, "set_progress"):  # schedules inside the loss (e.g. transport's epsilon)
                run.criterion.set_progress(run.step / cfg.train.steps)
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
                save(run)
    finally:
        bar.close()
        run.logger.close()
    return summarize(run)


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
        "data_ms": mean_ms("data"), "skipped_steps": run.skipped_steps,
        "assignment_change": sum(changes) / len(changes) if changes else None,
        "curve": run.curve,
    }
