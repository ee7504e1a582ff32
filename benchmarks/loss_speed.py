"""Loss speed: forward + backward time and peak memory of HF ``Mask2FormerLoss``, our ``HungarianCriterion``
and every form of ``MaskInfluencerCriterion`` on identical random inputs.

    python benchmarks/loss_speed.py                  # B=2, 12544 points, Q {100,200,400} x K {10,50,100}
    python benchmarks/loss_speed.py --layers 9       # + 9 aux layers (deep supervision)
    python benchmarks/loss_speed.py --quick          # tiny grid, a smoke test

Criteria are timed round-robin inside each repeat (one call of each per repeat), so machine load drifts
onto all of them alike and the ratios vs HF are measured side by side. Time = median over repeats of one
``loss.backward()`` including the forward; peak memory (CUDA only) = peak allocated above the inputs.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Callable, Sequence

import torch

from influencerformer.losses.criterion import HungarianCriterion

Inputs = tuple[dict, list]  # (outputs, targets) in our criterion contract


def make_inputs(batch: int, queries: int, instances: int, layers: int, size: int, target_size: int,
                num_classes: int, device: str, seed: int = 0) -> Inputs:
    """Random leaf logits for the final layer and ``layers`` aux layers; targets with ``instances`` masks each."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device).requires_grad_()

    stack = [(leaf(batch, queries, num_classes + 1), leaf(batch, queries, size, size, scale=3.0))
             for _ in range(layers + 1)]
    outputs = {"pred_logits": stack[-1][0], "pred_masks": stack[-1][1],
               "aux_outputs": [{"pred_logits": lg, "pred_masks": m} for lg, m in stack[:-1]]}
    targets = [{"labels": torch.randint(0, num_classes, (instances,), generator=g).to(device),
                "masks": (torch.rand(instances, target_size, target_size, generator=g) > 0.7).to(device)}
               for _ in range(batch)]
    return outputs, targets


def hf_loss_fn(num_classes: int, num_points: int, device: str) -> Callable[[dict, list], torch.Tensor]:
    """HF ``Mask2FormerLoss`` with its weight_dict applied (as ``Mask2FormerForUniversalSegmentation``)."""
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    config = Mask2FormerConfig(num_labels=num_classes, train_num_points=num_points)
    weights = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight,
               "loss_dice": config.dice_weight}
    loss = Mask2FormerLoss(config, weights).to(device)

    def run(outputs: dict, targets: list) -> torch.Tensor:
        # float masks are HF's input contract; the conversion is part of what a caller pays
        terms = loss(outputs["pred_masks"], outputs["pred_logits"], [t["masks"].float() for t in targets],
                     [t["labels"] for t in targets],
                     [{"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
                      for a in outputs["aux_outputs"]])
        return sum(weights[next(w for w in weights if w in k)] * v for k, v in terms.items())

    return run


def our_loss_fns(num_classes: int, num_points: int, device: str) -> dict[str, Callable]:
    """HungarianCriterion and, when importable, every form of MaskInfluencerCriterion."""
    fns = {"hungarian": HungarianCriterion(num_classes, num_points=num_points).to(device)}
    try:
        from influencerformer.losses import influencer_criterion as ic
    except ImportError as err:  # another engineer's module; the benchmark still runs without it
        print(f"(MaskInfluencerCriterion not importable: {err})")
        return {k: _total(v) for k, v in fns.items()}
    for form in getattr(ic, "FORMS", ("transport",)):
        fns[form] = ic.MaskInfluencerCriterion(num_classes, form=form, num_points=num_points).to(device)
    return {k: _total(v) for k, v in fns.items()}


def _total(criterion: torch.nn.Module) -> Callable[[dict, list], torch.Tensor]:
    return lambda outputs, targets: criterion(outputs, targets)["loss"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable, inputs: Inputs, device: str) -> tuple[float, float | None]:
    """One forward + backward: (milliseconds, peak MiB above the current allocation or None on CPU)."""
    outputs, targets = inputs
    for t in _leaves(outputs):
        t.grad = None
    base = None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _sync(device)
    start = time.perf_counter()
    fn(outputs, targets).backward()
    _sync(device)
    ms = 1e3 * (time.perf_counter() - start)
    peak = None if base is None else (torch.cuda.max_memory_allocated() - base) / 2**20
    return ms, peak


def _leaves(outputs: dict) -> list[torch.Tensor]:
    layers = [outputs] + list(outputs["aux_outputs"])
    return [layer[k] for layer in layers for k in ("pred_logits", "pred_masks")]


def measure(fns: dict[str, Callable], inputs: Inputs, device: str, repeats: int, warmup: int) -> dict:
    """Median time and max peak memory per criterion, interleaving the criteria in every repeat."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            ms, peak = time_once(fn, inputs, device)
            if r >= warmup:
                times[name].append(ms)
                if peak is not None:
                    peaks[name].append(peak)
    return {name: (statistics.median(times[name]), max(peaks[name]) if peaks[name] else None) for name in fns}


def format_table(rows: list[dict], names: Sequence[str]) -> str:
    """Markdown table: one row per (Q, K), time in ms with the ratio to HF, and peak memory when measured."""
    with_mem = any(row["results"][n][1] is not None for row in rows for n in names)
    header = ["Q", "K"] + [f"{n} ms (×HF)" for n in names] + ([f"{n} MiB" for n in names] if with_mem else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        res, hf_ms = row["results"], row["results"][names[0]][0]
        cells = [str(row["Q"]), str(row["K"])]
        cells += [f"{res[n][0]:.1f} ({res[n][0] / hf_ms:.2f})" for n in names]
        if with_mem:
            cells += [f"{res[n][1]:.0f}" if res[n][1] is not None else "–" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny grid (Q 16, K 4, 256 points, 32x32): a smoke test")
    p.add_argument("--layers", type=int, default=0, help="aux decoder layers supervised besides the final one")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--points", type=int, default=12544)
    p.add_argument("--queries", type=int, nargs="+", default=[100, 200, 400])
    p.add_argument("--instances", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--size", type=int, default=128, help="prediction mask side (pixels)")
    p.add_argument("--target-size", type=int, default=256, help="target mask side (pixels)")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.instances, args.points, args.size, args.target_size = [16], [4], 256, 32, 64
        args.repeats, args.warmup, args.classes = 2, 1, 5
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the grid, print the markdown table, return the rows ``{"Q", "K", "results": {name: (ms, MiB)}}``."""
    args = parse_args(argv)
    fns = {"HF": hf_loss_fn(args.classes, args.points, args.device),
           **our_loss_fns(args.classes, args.points, args.device)}
    rows = []
    for q, k in itertools.product(args.queries, args.instances):
        inputs = make_inputs(args.batch, q, k, args.layers, args.size, args.target_size, args.classes, args.device)
        rows.append({"Q": q, "K": k, "results": measure(fns, inputs, args.device, args.repeats, args.warmup)})
    print(f"device {args.device}, B {args.batch}, {args.layers} aux layers, {args.points} points, masks "
          f"{args.size}² (targets {args.target_size}²), median of {args.repeats} fwd+bwd\n")
    print(format_table(rows, list(fns)))
    return rows


if __name__ == "__main__":
    main()
