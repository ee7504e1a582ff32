"""What a training run holds (:class:`Run`), its data stream, and its checkpoint state: save, find the newest
intact checkpoint, restore exactly (weights, optimiser, schedule, data position, RNG of every rank)."""
from __future__ import annotations

import dataclasses
import shutil
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from . import checkpoint as ckpt
from . import distributed
from .config import Config, ConfigError, DatasetInfo
from .evaluate import AssignmentProbe, InstanceEvaluator, unwrap
from .run_dir import RunLogger

FINAL_LOSS_WINDOW = 50  # "final loss" = mean over the last steps, less noisy than one batch


class NonFiniteLossError(RuntimeError):
    """The loss, the model output, the gradients or the weights became NaN/Inf; training stops."""


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
    evaluator: InstanceEvaluator | None  # rank 0 only
    probe: AssignmentProbe | None
    step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    recent: deque = field(default_factory=lambda: deque(maxlen=FINAL_LOSS_WINDOW))
    times: dict[str, list[float]] = field(default_factory=lambda: {"step": [], "loss": [], "assign": [], "data": []})
    logger: RunLogger | None = None
    checkpoint: str | None = None  # the latest checkpoint written (rank 0)
    skipped_steps: int = 0  # optimiser steps skipped for non-finite gradients, in all
    nonfinite_in_a_row: int = 0  # ... and how many of the latest steps in a row
    replaced: list[Path] = field(default_factory=list)  # an overwritten run's files, deleted at the first save

    @property
    def device(self) -> torch.device:
        return self.dist.device



def _gather_rng(run: Run) -> list[dict[str, Any]]:
    """RNG states of every rank (ranks draw different numbers: their batches differ), rank order."""
    states = ckpt.rng_states()
    if not run.dist.enabled:
        return [states]
    gathered: list[Any] = [None] * run.dist.world_size
    torch.distributed.all_gather_object(gathered, states)
    return gathered


@torch.no_grad()
def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool: no NaN/Inf in ``t`` (min/max propagate both: one reduction, no full-size mask)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def check_weights(run: Run, before: str) -> None:
    """Stop (NonFiniteLossError) if a weight is NaN/Inf: such a state must never be evaluated or saved.
    One host sync for all tensors; every rank holds the same weights, so every rank stops together."""
    state = unwrap(run.model).state_dict()
    floats = [(name, t) for name, t in state.items() if t.is_floating_point()]
    ok = torch.stack([all_finite(t) for _, t in floats]).tolist() if floats else []
    bad = [name for (name, _), good in zip(floats, ok) if not good]
    if bad:
        kept = f"the latest checkpoint, {run.checkpoint}, holds the last finite weights" if run.checkpoint else \
            "no checkpoint was written"
        raise NonFiniteLossError(f"non-finite weights after step {run.step} ({', '.join(bad[:3])}"
                                 f"{', ...' if len(bad) > 3 else ''}); not {before}: {kept}. Lower optim.lr "
                                 "or set optim.clip")


def save(run: Run) -> None:
    check_weights(run, "saved")
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
                        "probe": run.probe.previous if run.probe else None,
                        "skipped_steps": run.skipped_steps, "nonfinite_in_a_row": run.nonfinite_in_a_row},
        }
        path = ckpt.save_checkpoint(run.cfg.train.out_dir, run.step, state, keep=run.cfg.train.keep_checkpoints)
        run.checkpoint = str(path)
        for folder in run.replaced:  # the new run has a checkpoint now: the overwritten run may go
            shutil.rmtree(folder, ignore_errors=True)
        run.replaced = []
    distributed.barrier()


def latest_intact(run: Run) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest intact checkpoint of the run dir, None when it has none.

    Damaged newer files are named on stderr and renamed ``*.damaged`` (kept, but no longer "latest": the
    resumed run's own checkpoints would otherwise be rotated away behind them)."""
    run_dir = run.cfg.train.out_dir
    if not ckpt.list_checkpoints(run_dir):
        return None
    warn = (lambda line: print(line, file=sys.stderr, flush=True)) if run.dist.is_main else None
    path, state = ckpt.load_latest(run_dir, map_location=run.device, require=ckpt.TRAINING_KEYS, warn=warn)
    distributed.barrier()  # every rank has read its state before rank 0 renames anything
    if run.dist.is_main:
        for step, file in ckpt.list_checkpoints(run_dir):
            if step > state["step"]:
                file.rename(file.with_name(file.name + ".damaged"))
                print(f"renamed the damaged {file.name} to {file.name}.damaged", file=sys.stderr, flush=True)
    distributed.barrier()
    return path, state


def restore(run: Run, path: Path, state: dict[str, Any]) -> None:
    """Continue exactly where the checkpoint left off: weights, optimiser, schedule, data position, RNG."""
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
    run.skipped_steps = history.get("skipped_steps", 0)
    run.nonfinite_in_a_row = history.get("nonfinite_in_a_row", 0)
    if run.probe is not None:
        run.probe.previous = history["probe"]


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    ignored = {("train", "progress"), ("train", "device"), ("train", "out_dir"), ("data", "workers")}
    return [f"{s}.{k}: {old[s].get(k)!r} -> {v!r}" for s in new for k, v in new[s].items()
            if (s, k) not in ignored and old.get(s, {}).get(k) != v]
