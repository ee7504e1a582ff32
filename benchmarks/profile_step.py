"""Where one training step's time goes: data, each part of the model's forward, the loss forward (and its
assignment), the loss backward, the model backward and the optimiser step.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --config configs/shapes2d_medium.yaml --criterion influencer
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --config configs/rooms3d_cpu.yaml --criterion hungarian
    ... --ops 15      # also the 15 operators with the most self time over one step (torch.profiler)

The step is the training loop's (engine/train.py) taken apart, with the same builders, batch size, collate and
optimiser: ``data`` = reading ``batch_size`` items from the dataset and collating them in the training thread (the
loop's DataLoader with ``data.workers`` = 0); forward parts = the model's direct children, timed by forward hooks
(``other`` = the rest of the model's forward); the backward is split exactly by the chain rule: the loss is
backpropagated to detached copies of the model outputs (``loss bwd``), whose gradients are then backpropagated
through the model (``model bwd``); ``optim`` = gradient clipping + AdamW. Medians over ``--steps`` steps after
``--warmup`` steps; the model keeps training, so later steps see trained-like outputs.  Before timing, every
training item is read once (the time is printed): rooms3d keeps generated rooms in memory after their first read,
so from the second epoch on the loop only collates; ``--cold-data`` skips that pass.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict
from typing import Any, Sequence

import torch

from influencerformer.engine.build import build_criterion, build_dataset, build_model, modality
from influencerformer.engine.config import load_config
from influencerformer.engine.evaluate import model_inputs
from influencerformer.engine.train import build_optimizer, seed_everything


def _detached_leaves(outputs: Any) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
    """Same nested outputs with every float tensor replaced by a detached leaf; (copy, originals, leaves)."""
    originals, leaves = [], []

    def walk(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad:
            leaf = x.detach().requires_grad_()
            originals.append(x), leaves.append(leaf)
            return leaf
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    return walk(outputs), originals, leaves


class ForwardTimer:
    """Forward time of each direct child of a model (pre/post forward hooks, perf_counter)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        for name, child in model.named_children():
            child.register_forward_pre_hook(lambda m, a, name=name: self._start.__setitem__(name, time.perf_counter()))
            child.register_forward_hook(lambda m, a, o, name=name: self._stop(name))

    def _stop(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._start.pop(name)

    def pop(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


class CachedItems:
    """Experiment (``--cache-data``): keep every item after its first read, as the point datasets already do."""

    def __init__(self, dataset) -> None:
        self.dataset, self.items = dataset, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index not in self.items:
            self.items[index] = self.dataset[index]
        return self.items[index]

    def __getattr__(self, name: str):  # class_map etc. of the wrapped dataset
        return getattr(self.dataset, name)


def profile(cfg, steps: int, warmup: int, ops: int = 0, warm_data: bool = True, cache_data: bool = False,
            fused_optim: bool = False) -> tuple[dict[str, float], str | None]:
    """Median milliseconds per phase of ``steps`` training steps (after ``warmup``); optional top-ops table.

    ``warm_data``: read every training item once first (its time is the ``first pass`` entry, not a median).
    ``cache_data``, ``fused_optim``: experiments (item cache; AdamW with ``fused=True`` on the CPU too).
    """
    seed_everything(cfg.train.seed)
    dataset, info = build_dataset(cfg.data, "train")
    if cache_data:
        dataset = CachedItems(dataset)
    first_pass = None
    if warm_data:
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        first_pass = 1000 * (time.perf_counter() - start)
    model = build_model(cfg, info.num_classes)
    criterion = build_criterion(cfg, info.num_classes)
    timer = getattr(criterion, "assign_timer", None)
    if timer is not None:
        timer.enabled = True
    optimizer = build_optimizer(model, cfg)
    if fused_optim:
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=True)
    collate = modality(cfg.data).make_collate(dataset, cfg.data)
    forward_timer = ForwardTimer(model)
    rng = random.Random(cfg.train.seed)
    samples: dict[str, list[float]] = defaultdict(list)
    table = None
    for step in range(warmup + steps):
        profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    if ops and step == warmup + steps - 1 else None)
        if profiler is not None:
            profiler.__enter__()
        times = _one_step(model, criterion, optimizer, dataset, collate, cfg, rng, forward_timer, timer)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=ops)
        if step >= warmup:
            for key, value in times.items():
                samples[key].append(1000 * value)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    if first_pass is not None:
        medians["first pass over the data (once)"] = first_pass
    return medians, table


def _one_step(model, criterion, optimizer, dataset, collate, cfg, rng, forward_timer, timer) -> dict[str, float]:
    t0 = time.perf_counter()
    batch = collate([dataset[rng.randrange(len(dataset))] for _ in range(cfg.data.batch_size)])
    inputs = model_inputs(batch)
    targets = batch["targets"]
    t1 = time.perf_counter()
    outputs = model(*inputs)
    t2 = time.perf_counter()
    parts = forward_timer.pop()
    copy, originals, leaves = _detached_leaves(outputs)
    losses = criterion(copy, targets)
    t3 = time.perf_counter()
    assign = timer.pop_ms() / 1000 if timer is not None else 0.0
    losses["loss"].backward()
    t4 = time.perf_counter()
    pairs = [(o, leaf.grad) for o, leaf in zip(originals, leaves) if leaf.grad is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    t5 = time.perf_counter()
    if cfg.optim.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t6 = time.perf_counter()
    times = {"data": t1 - t0, **{f"fwd {k}": v for k, v in parts.items()}}
    times["fwd other"] = (t2 - t1) - sum(parts.values())
    times.update({"loss fwd": t3 - t2, "  of which assignment": assign, "loss bwd": t4 - t3, "model bwd": t5 - t4,
                  "optim": t6 - t5, "step": t6 - t0})
    return times


def format_table(medians: dict[str, float]) -> str:
    """Markdown table: phase, median ms, share of the median step (the phases' medians need not sum to it)."""
    step = medians["step"]
    lines = ["| phase | ms (median) | share of step |", "|---|---|---|"]
    for key, ms in medians.items():
        if key.startswith("first pass"):
            lines.append(f"| {key} | {ms / 1000:.1f} s | |")
        elif key != "step":
            lines.append(f"| {key} | {ms:.1f} | {100 * ms / step:.0f} % |")
    lines.append(f"| **whole step** | **{step:.1f}** | 100 % |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config, as for `influencerformer train`; none = defaults")
    p.add_argument("--criterion", default=None, help="criterion name (criterion.name); none = the config's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (as `train --set`)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (medians are reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, lazy initialisation)")
    p.add_argument("--ops", type=int, default=0, help="also print the N operators with most self CPU time")
    p.add_argument("--cache-data", action="store_true",
                   help="experiment: keep training items in memory after their first read (shapes2d regenerates them)")
    p.add_argument("--fused-optim", action="store_true", help="experiment: AdamW(fused=True), as on CUDA")
    p.add_argument("--cold-data", action="store_true",
                   help="skip the first pass over the training data (time first reads: rooms3d generation)")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"criterion.name={args.criterion}"] if args.criterion else [])
    cfg = load_config(args.config, overrides)
    medians, table = profile(cfg, args.steps, args.warmup, args.ops, warm_data=not args.cold_data,
                             cache_data=args.cache_data, fused_optim=args.fused_optim)
    print(f"{cfg.data.name} ({cfg.data.preset if cfg.data.name == 'shapes2d' else 'points'}), model "
          f"{cfg.model.preset}, criterion {cfg.criterion.name}, batch {cfg.data.batch_size}, "
          f"{torch.get_num_threads()} thread(s), median of {args.steps} steps after {args.warmup}"
          + "".join(f", {flag}" for flag, on in (("cached items", args.cache_data), ("fused AdamW", args.fused_optim))
                    if on) + "\n")
    print(format_table(medians))
    if table:
        print(f"\ntop {args.ops} operators by self CPU time (one step):\n{table}")
    return medians


if __name__ == "__main__":
    main()
