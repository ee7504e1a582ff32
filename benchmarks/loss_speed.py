"""Loss speed: forward + backward time and peak memory of HF ``Mask2FormerLoss``, our ``HungarianCriterion``
and every form of ``MaskInfluencerCriterion`` on identical inputs.

    python benchmarks/loss_speed.py                  # B=2, 12544 points, Q {100,200,400} x K {10,50,100}, both cases
    python benchmarks/loss_speed.py --layers 9       # + 9 aux layers (deep supervision)
    python benchmarks/loss_speed.py --case peaked    # trained-like inputs only
    python benchmarks/loss_speed.py --quick          # tiny grid, a smoke test

Two cases of inputs: ``random`` (random logits and random target masks, as at initialisation) and ``peaked``
(trained-like: the first K queries predict the K rectangle instances confidently, with the right class, the others
predict nothing and "no object").  Only the peaked case has the sharply peaked costs of a trained model, whose
transport plan used to underflow to subnormal floats (slow on CPUs): for it the table is followed by the number of
subnormal mask-logit gradients per criterion.

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


CASES = ("random", "peaked")
PROG = None  # program name in --help; ``influencerformer bench`` sets it


def make_inputs(batch: int, queries: int, instances: int, layers: int, size: int, target_size: int,
                num_classes: int, device: str, seed: int = 0, case: str = "random") -> Inputs:
    """Leaf logits for the final layer and ``layers`` aux layers; targets with ``instances`` masks each.

    ``case="random"``: random logits, targets random pixels (30 % on).  ``case="peaked"``: trained-like (module
    docstring); targets are random rectangles (``_rectangles``), and query ``k < K`` predicts instance ``k`` at
    logit +-8 (+ unit noise, per layer) from the target downsampled to the prediction grid.
    """
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    if case == "random":
        masks = [torch.rand(instances, target_size, target_size, generator=g) > 0.7 for _ in range(batch)]
    else:
        masks = [_rectangles(instances, target_size, g) for _ in range(batch)]
    labels = [torch.randint(0, num_classes, (instances,), generator=g) for _ in range(batch)]
    if case == "random":
        logit_mean = [torch.zeros(batch, queries, num_classes + 1), torch.zeros(batch, queries, size, size)]
        scale = (1.0, 3.0)
    else:
        logit_mean, scale = _confident_logits(masks, labels, queries, size, num_classes), (1.0, 1.0)

    def leaf(mean, s):
        return (mean + s * torch.randn(mean.shape, generator=g)).to(device).requires_grad_()

    stack = [(leaf(logit_mean[0], scale[0]), leaf(logit_mean[1], scale[1])) for _ in range(layers + 1)]
    outputs = {"pred_logits": stack[-1][0], "pred_masks": stack[-1][1],
               "aux_outputs": [{"pred_logits": lg, "pred_masks": m} for lg, m in stack[:-1]]}
    targets = [{"labels": lab.to(device), "masks": m.to(device)} for lab, m in zip(labels, masks)]
    return outputs, targets


def _rectangles(num: int, side: int, g: torch.Generator) -> torch.Tensor:
    """``num`` random axis-aligned rectangles ``(num, side, side)`` bool, 20-30 % of ``side`` per axis.

    With logits +-8 an idle query's cheapest instance then costs ~9-10 more than its match (class 2 + dice 5 +
    BCE 40 x area): the regime of a trained model in which ``exp(-cost / 0.1)`` is a float32 subnormal.
    """
    masks = torch.zeros(num, side, side, dtype=torch.bool)
    lo, hi = max(1, side // 5), max(2, (3 * side) // 10)
    for k in range(num):
        h, w = torch.randint(lo, hi + 1, (2,), generator=g).tolist()
        y = torch.randint(0, side - h + 1, (1,), generator=g).item()
        x = torch.randint(0, side - w + 1, (1,), generator=g).item()
        masks[k, y:y + h, x:x + w] = True
    return masks


def _confident_logits(masks: list[torch.Tensor], labels: list[torch.Tensor], queries: int, size: int,
                      num_classes: int, logit: float = 8.0) -> list[torch.Tensor]:
    """Means of trained-like logits: query k < K predicts instance k and its class, the others "no object"."""
    batch = len(masks)
    class_mean = torch.zeros(batch, queries, num_classes + 1)
    class_mean[..., num_classes] = logit
    mask_mean = torch.full((batch, queries, size, size), -logit)
    for b, (m, lab) in enumerate(zip(masks, labels)):
        k = min(len(lab), queries)
        small = torch.nn.functional.adaptive_avg_pool2d(m[:k].float().unsqueeze(1), size).squeeze(1)
        mask_mean[b, :k] = logit * (2 * small - 1)
        class_mean[b, :k, num_classes] = 0
        class_mean[b, torch.arange(k), lab[:k]] = logit
    return [class_mean, mask_mean]


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


def subnormal_gradients(fns: dict[str, Callable], inputs: Inputs) -> dict[str, tuple[int, int]]:
    """Per criterion, one more forward + backward: (subnormal, non-zero) entries of all mask-logit gradients."""
    counts = {}
    outputs, targets = inputs
    for name, fn in fns.items():
        for t in _leaves(outputs):
            t.grad = None
        fn(outputs, targets).backward()
        grads = [t.grad for t in _leaves(outputs)[1::2] if t.grad is not None]
        tiny = torch.finfo(torch.float32).tiny
        counts[name] = (sum(int(((g != 0) & (g.abs() < tiny)).sum()) for g in grads),
                        sum(int((g != 0).sum()) for g in grads))
    return counts


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


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; the program name is ``PROG`` (set by ``influencerformer bench``)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device the inputs and criteria live on (cpu, cuda, cuda:1, ...)")
    p.add_argument("--quick", action="store_true",
                   help="tiny grid (Q 16, K 4, 256 points, 32x32 masks, 2 repeats): a smoke test")
    p.add_argument("--layers", type=int, default=0, help="aux decoder layers supervised besides the final one")
    p.add_argument("--batch", type=int, default=2, help="images per batch (B)")
    p.add_argument("--points", type=int, default=12544, help="sampled points per mask (num_points of every criterion)")
    p.add_argument("--queries", type=int, nargs="+", default=[100, 200, 400], help="numbers of queries Q to time")
    p.add_argument("--instances", type=int, nargs="+", default=[10, 50, 100],
                   help="numbers of target instances K per image to time")
    p.add_argument("--case", nargs="+", choices=CASES, default=list(CASES),
                   help="inputs: random (as at initialisation) and/or peaked (trained-like costs)")
    p.add_argument("--size", type=int, default=128, help="prediction mask side (pixels)")
    p.add_argument("--target-size", type=int, default=256, help="target mask side (pixels)")
    p.add_argument("--classes", type=int, default=80, help="foreground classes C (logits have C + 1 columns)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward + backward calls per criterion (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per criterion before the timed ones")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options of ``build_parser``; ``--quick`` replaces the grid and sizes by a tiny one."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.queries, args.instances, args.points, args.size, args.target_size = [16], [4], 256, 32, 64
        args.repeats, args.warmup, args.classes = 2, 1, 5
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the grid, print one markdown table per case, return the rows.

    Rows: ``{"case", "Q", "K", "results": {name: (ms, MiB or None)}, "subnormal": {name: (subnormal, non-zero)}}``
    (``subnormal``: mask-logit gradients of one extra call).
    """
    args = parse_args(argv)
    fns = {"HF": hf_loss_fn(args.classes, args.points, args.device),
           **our_loss_fns(args.classes, args.points, args.device)}
    print(f"device {args.device}, B {args.batch}, {args.layers} aux layers, {args.points} points, masks "
          f"{args.size}² (targets {args.target_size}²), median of {args.repeats} fwd+bwd, "
          f"{torch.get_num_threads()} CPU thread(s)")
    rows = []
    for case in args.case:
        case_rows = []
        for q, k in itertools.product(args.queries, args.instances):
            inputs = make_inputs(args.batch, q, k, args.layers, args.size, args.target_size, args.classes,
                                 args.device, case=case)
            case_rows.append({"case": case, "Q": q, "K": k,
                              "results": measure(fns, inputs, args.device, args.repeats, args.warmup),
                              "subnormal": subnormal_gradients(fns, inputs)})
        print(f"\n{case} inputs:\n")
        print(format_table(case_rows, list(fns)))
        if case == "peaked":
            print("\nsubnormal mask-logit gradients (of non-zero), per (Q, K): " + "; ".join(
                f"Q {r['Q']} K {r['K']}: " + ", ".join(f"{n} {a}/{b}" for n, (a, b) in r["subnormal"].items())
                for r in case_rows))
        rows += case_rows
    return rows


if __name__ == "__main__":
    main()
