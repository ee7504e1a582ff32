"""Loss speed: forward + backward time and peak memory of HF ``Mask2FormerLoss``, our ``HungarianCriterion``
and every form of ``MaskInfluencerCriterion`` on identical inputs.

    python benchmarks/loss_speed.py                  # B=2, 12544 points, Q {100,200,400} x K {10,50,100}, both cases
    python benchmarks/loss_speed.py --layers 9       # + 9 aux layers (deep supervision)
    python benchmarks/loss_speed.py --case peaked    # trained-like inputs only
    python benchmarks/loss_speed.py --quick          # tiny grid, a smoke test
    # disjoint instances: the pair terms' sparse path vs the dense one, and the floor (one thread)
    OMP_NUM_THREADS=1 python benchmarks/loss_speed.py --case disjoint --queries 200 400 \
        --criteria HF hungarian transport transport-dense --floor

Three cases of inputs: ``random`` (random logits and random target masks, as at initialisation), ``peaked``
(trained-like: the first K queries predict the K rectangle instances confidently, with the right class, the others
predict nothing and "no object") and ``disjoint`` (random logits, instances that never overlap and are binary at
the prediction's pixels, as point clouds and label maps: the pair terms take their sparse path; the random and
peaked targets overlap, so there they take the dense one).  Only the peaked case has the sharply peaked costs of a
trained model, whose transport plan used to underflow to subnormal floats (slow on CPUs): for it the table is
followed by the number of subnormal mask-logit gradients per criterion.  ``transport-dense`` is the transport
criterion with the sparse path switched off (``dense_pair_terms``).

``--floor`` adds a table of CPU times against a floor: the bytes a loss must move per call (the mask and class
logits of every layer read once and their gradients written once, the bool target masks read once) divided by the
memory bandwidth measured in the same run (a large ``torch.add``), and the transport time per (B Q P).

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
from influencerformer.losses.pair_kernel import dense_pair_terms

Inputs = tuple[dict, list]  # (outputs, targets) in our criterion contract


CASES = ("random", "peaked", "disjoint")
DEFAULT_CRITERIA = ("HF", "hungarian", "transport", "ownership", "seed")
CRITERIA = DEFAULT_CRITERIA + ("transport-dense",)
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
    elif case == "disjoint":
        masks = [_cells(instances, size, target_size, g) for _ in range(batch)]
    else:
        masks = [_rectangles(instances, target_size, g) for _ in range(batch)]
    labels = [torch.randint(0, num_classes, (instances,), generator=g) for _ in range(batch)]
    if case != "peaked":
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


def _cells(num: int, size: int, side: int, g: torch.Generator) -> torch.Tensor:
    """``num`` disjoint instances ``(num, side, side)`` bool: the Voronoi cells of ``num`` random seeds among
    ``num + num // 2`` (the other cells are background) on the ``size x size`` prediction grid, upsampled by
    nearest neighbour.  With ``side`` a multiple of ``size`` every target read at a prediction pixel is 0 or 1
    (the case of point clouds and of label maps at the prediction's resolution)."""
    seeds = torch.rand(num + num // 2, 2, generator=g) * size
    centres = torch.stack(torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij"), -1)
    owner = torch.cdist(centres.reshape(-1, 2), seeds).argmin(-1).reshape(size, size)
    owner = torch.nn.functional.interpolate(owner[None, None].float(), size=(side, side), mode="nearest")[0, 0]
    return owner.long() == torch.arange(num)[:, None, None]


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
    """HungarianCriterion, every form of MaskInfluencerCriterion (when importable) and ``transport-dense``."""
    fns = {"hungarian": _total(HungarianCriterion(num_classes, num_points=num_points).to(device))}
    try:
        from influencerformer.losses import influencer_criterion as ic
    except ImportError as err:  # another engineer's module; the benchmark still runs without it
        print(f"(MaskInfluencerCriterion not importable: {err})")
        return fns
    for form in getattr(ic, "FORMS", ("transport",)):
        fns[form] = _total(ic.MaskInfluencerCriterion(num_classes, form=form, num_points=num_points).to(device))
    fns["transport-dense"] = _total(fns["transport"].criterion, dense=True)
    return fns


def _total(criterion: torch.nn.Module, dense: bool = False) -> Callable[[dict, list], torch.Tensor]:
    def run(outputs: dict, targets: list) -> torch.Tensor:
        if not dense:
            return criterion(outputs, targets)["loss"]
        with dense_pair_terms():  # the backward needs no switch: each node remembers its path
            return criterion(outputs, targets)["loss"]

    run.criterion = criterion
    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable, inputs: Inputs, device: str) -> tuple[float, float | None, float]:
    """One forward + backward: (milliseconds, peak MiB above the current allocation or None on CPU, CPU ms).

    CPU ms: processor time of this process (all its threads): on a shared machine it leaves out the time the
    process waited for a core, which wall-clock time includes."""
    outputs, targets = inputs
    for t in _leaves(outputs):
        t.grad = None
    base = None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn(outputs, targets).backward()
    _sync(device)
    ms, cpu_ms = 1e3 * (time.perf_counter() - start), 1e3 * (time.process_time() - cpu)
    peak = None if base is None else (torch.cuda.max_memory_allocated() - base) / 2**20
    return ms, peak, cpu_ms


def _leaves(outputs: dict) -> list[torch.Tensor]:
    layers = [outputs] + list(outputs["aux_outputs"])
    return [layer[k] for layer in layers for k in ("pred_logits", "pred_masks")]


def measure(fns: dict[str, Callable], inputs: Inputs, device: str, repeats: int,
            warmup: int) -> tuple[dict, dict]:
    """Per criterion (median ms, max peak MiB or None) and median CPU ms, interleaving the criteria in every repeat."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            ms, peak, cpu_ms = time_once(fn, inputs, device)
            if r >= warmup:
                times[name].append(ms)
                cpu[name].append(cpu_ms)
                if peak is not None:
                    peaks[name].append(peak)
    results = {name: (statistics.median(times[name]), max(peaks[name]) if peaks[name] else None) for name in fns}
    return results, {name: statistics.median(cpu[name]) for name in fns}


def bandwidth_gb_s(device: str, mib: int = 64, repeats: int = 5) -> float:
    """Memory bandwidth of ``torch.add(a, b, out=c)`` on three ``mib`` MiB float32 arrays (GB/s, best of
    ``repeats``; bytes counted as STREAM does: two reads and one write)."""
    n = mib * 2**20 // 4
    a, b, c = (torch.ones(n, device=device) for _ in range(3))  # touched: no page faults in the timed adds
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.add(a, b, out=c)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 3 * n * 4 / best / 1e9


def floor_bytes(batch: int, queries: int, instances: int, layers: int, size: int, target_size: int,
                num_classes: int) -> int:
    """Bytes any loss must move per forward + backward: every layer's mask and class logits (float32) read once
    and their gradients written once, and the bool target masks read once."""
    logits = (layers + 1) * batch * queries * (size * size + num_classes + 1) * 4
    return 2 * logits + batch * instances * target_size * target_size


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


def format_floor_table(rows: list[dict], names: Sequence[str], gb_s: float, points: int) -> str:
    """Markdown table: per (Q, K) the floor (``floor_bytes`` / ``gb_s``) and each criterion's CPU ms with its
    ratio to HF's CPU ms and to the floor; the last column: transport CPU ns per (B Q P) (one layer)."""
    header = ["Q", "K", "MB moved", "floor ms"] + [f"{n} CPU ms (×HF, ×floor)" for n in names]
    with_ns = "transport" in names
    header += ["transport ns per B·Q·P"] if with_ns else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        floor_ms = row["floor_bytes"] / gb_s / 1e6
        cpu, hf = row["cpu"], row["cpu"][names[0]]
        cells = [str(row["Q"]), str(row["K"]), f"{row['floor_bytes'] / 1e6:.1f}", f"{floor_ms:.1f}"]
        cells += [f"{cpu[n]:.1f} ({cpu[n] / hf:.2f}, {cpu[n] / floor_ms:.1f})" for n in names]
        if with_ns:
            cells.append(f"{1e6 * cpu['transport'] / (row['B'] * row['Q'] * points):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    p.add_argument("--case", nargs="+", choices=CASES, default=["random", "peaked"],
                   help="inputs: random (as at initialisation), peaked (trained-like costs), disjoint "
                        "(non-overlapping binary instances: the sparse pair terms)")
    p.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(DEFAULT_CRITERIA),
                   help="criteria to time (HF is always timed, first: the ratios are to it); transport-dense is "
                        "transport with the sparse pair terms switched off")
    p.add_argument("--floor", action="store_true",
                   help="also measure the memory bandwidth and print CPU times against the floor "
                        "(bytes moved per call / bandwidth)")
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

    Rows: ``{"case", "B", "Q", "K", "results": {name: (ms, MiB or None)}, "cpu": {name: CPU ms}, "subnormal":
    {name: (subnormal, non-zero)}, "floor_bytes"}`` (``subnormal``: mask-logit gradients of one extra call).
    """
    args = parse_args(argv)
    ours = our_loss_fns(args.classes, args.points, args.device)
    fns = {"HF": hf_loss_fn(args.classes, args.points, args.device),
           **{name: ours[name] for name in args.criteria if name in ours}}
    print(f"device {args.device}, B {args.batch}, {args.layers} aux layers, {args.points} points, masks "
          f"{args.size}² (targets {args.target_size}²), median of {args.repeats} fwd+bwd, "
          f"{torch.get_num_threads()} CPU thread(s)")
    gb_s = bandwidth_gb_s(args.device) if args.floor else None
    rows = []
    for case in args.case:
        case_rows = []
        for q, k in itertools.product(args.queries, args.instances):
            inputs = make_inputs(args.batch, q, k, args.layers, args.size, args.target_size, args.classes,
                                 args.device, case=case)
            results, cpu = measure(fns, inputs, args.device, args.repeats, args.warmup)
            case_rows.append({"case": case, "B": args.batch, "Q": q, "K": k, "results": results, "cpu": cpu,
                              "subnormal": subnormal_gradients(fns, inputs),
                              "floor_bytes": floor_bytes(args.batch, q, k, args.layers, args.size,
                                                         args.target_size, args.classes)})
        print(f"\n{case} inputs:\n")
        print(format_table(case_rows, list(fns)))
        if gb_s is not None:
            print(f"\n{case} inputs, CPU time against the floor (bandwidth {gb_s:.1f} GB/s, torch.add of 3 x 64 "
                  "MiB):\n")
            print(format_floor_table(case_rows, list(fns), gb_s, args.points))
        if case == "peaked":
            print("\nsubnormal mask-logit gradients (of non-zero), per (Q, K): " + "; ".join(
                f"Q {r['Q']} K {r['K']}: " + ", ".join(f"{n} {a}/{b}" for n, (a, b) in r["subnormal"].items())
                for r in case_rows))
        rows += case_rows
    return rows


if __name__ == "__main__":
    main()
