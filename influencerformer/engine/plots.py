"""Figures of a comparison: ``curves.png`` (AP and smoothed loss against step) and ``masks.png``.

Matplotlib's object API only (``Figure``, no pyplot): no global state, no display backend needed.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

EMA_BETA = 0.9  # loss smoothing over logged steps (logged every train.log_every steps)


def ema(values: Sequence[float], beta: float = EMA_BETA) -> list[float]:
    """Bias-corrected exponential moving average (the first value is not pulled towards 0)."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta ** i))
    return out


def band(series: Sequence[tuple[Sequence[int], Sequence[float]]]) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, sd) over seeds at the steps every seed has; sd 0 with one seed."""
    per_seed = [dict(zip(steps, values)) for steps, values in series]
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    mean = [statistics.fmean(s[t] for s in per_seed) for t in steps]
    sd = [statistics.stdev(s[t] for s in per_seed) if len(per_seed) > 1 else 0.0 for t in steps]
    return steps, mean, sd


def _series(run: dict[str, Any], curve_key: str, value_key: str) -> tuple[list[int], list[float]]:
    points = [(p["step"], p[value_key]) for p in run.get(curve_key) or []
              if p.get(value_key) is not None and math.isfinite(p[value_key])]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(runs: list[dict[str, Any]], names: Sequence[str], path: Path, *, title: str,
                ap_label: str = "val mask AP") -> Any:
    """curves.png: val AP (axis from 0) and EMA-smoothed training loss against step, one line per variant;
    with several seeds the line is the mean and the shaded band ± 1 sd over seeds. Returns the Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax_ap, ax_loss = fig.subplots(1, 2)
    top, positive = 0.0, True
    for i, name in enumerate(names):
        mine = [r for r in runs if r["criterion"] == name]
        colour = f"C{i % 10}"
        steps, mean, sd = band([_series(r, "curve", "AP") for r in mine])
        _draw(ax_ap, steps, mean, sd, colour, name, marker="o")
        top = max([top] + [m + s for m, s in zip(mean, sd)])
        smoothed = []
        for run in mine:
            steps_l, losses = _series(run, "loss_curve", "loss")
            smoothed.append((steps_l, ema(losses)))
            positive = positive and all(v > 0 for v in losses)
        _draw(ax_loss, *band(smoothed), colour, name)
    ax_ap.set_ylim(0, max(0.05, 1.1 * top))  # from 0, never a negative range
    ax_ap.set(xlabel="step", ylabel=ap_label, title=f"{ap_label} vs step")
    ax_loss.set(xlabel="step", ylabel="training loss, EMA-smoothed (own scale per criterion)",
                title=f"loss vs step (EMA, β = {EMA_BETA})")
    if positive and any(r.get("loss_curve") for r in runs):  # the seed form's loss can be negative: log only then
        ax_loss.set_yscale("log")
        ax_loss.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_loss.yaxis.set_minor_formatter(NullFormatter())
    for ax in (ax_ap, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return fig


def _draw(ax: Any, steps: list[int], mean: list[float], sd: list[float], colour: str, label: str,
          marker: str | None = None) -> None:
    if not steps:
        return
    marker = marker or ("o" if len(steps) < 5 else None)  # a line of one or two points needs its dots
    ax.plot(steps, mean, color=colour, label=label, marker=marker, markersize=3)
    if any(sd):
        ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                        color=colour, alpha=0.2, linewidth=0)


# ----------------------------------------------------------------------------------------------- masks


def spread_labels(ax: Any, renderer: Any, max_tries: int = 40) -> int:
    """Move the text labels of ``ax`` so that no two overlap: each label, in drawing order, takes the nearest
    free slot above or below its anchor (steps of its own height). Returns the number of labels moved."""
    placed, moved = [], 0
    for text in ax.texts:
        box = text.get_window_extent(renderer).expanded(1.05, 1.1)
        step = box.height
        for k in range(max_tries + 1):
            dy = (k + 1) // 2 * step * (1 if k % 2 else -1)  # 0, +h, -h, +2h, -2h, ...
            candidate = box.translated(0, dy)
            if not any(candidate.overlaps(other) for other in placed):
                break
        else:  # no free slot nearby (a pile of duplicates): leave it where it was
            dy, candidate = 0.0, box
        if dy:
            x, y = ax.transData.transform(text.get_position())
            text.set_position(ax.transData.inverted().transform((x, y + dy)))
            moved += 1
        placed.append(candidate)
    return moved


def instance_colour(k: int) -> Any:
    """RGB (3,) in [0, 1] of instance ``k``: tab20, cycling (the same colour for the same index everywhere)."""
    import numpy as np
    from matplotlib import colormaps

    return np.array(colormaps["tab20"](k % 20)[:3])


def finish_axes(ax: Any, title: str | None) -> None:
    """What every drawn item ends with: no axes, a small title when given."""
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def plot_masks(items: list[dict[str, Any]], truths: list[dict[str, Any]], names: Sequence[str],
               predictions: list[list[dict[str, Any]]], class_names: Sequence[str], draw: Any, path: Path, *,
               caption: str, panel: float = 2.6) -> None:
    """masks.png: rows = val items (images or scenes); columns = ground truth, then each variant's predictions.

    draw: ``draw(ax, item, instances, class_names, title=...)``, the modality's; ``truths``: each item's
    ground-truth instances. Text labels of overlapping instances are spread apart afterwards."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel * (1 + len(names)), panel * len(items) + 0.5), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(len(items), 1 + len(names), squeeze=False)
    for row, (item, gt) in enumerate(zip(items, truths)):
        draw(axes[row][0], item, gt, class_names, title="ground truth" if row == 0 else None)
        for col, name in enumerate(names):
            draw(axes[row][col + 1], item, predictions[col][row], class_names, title=name if row == 0 else None)
    fig.supxlabel(caption, fontsize=8)
    fig.draw_without_rendering()  # final layout first: label extents depend on it
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        spread_labels(ax, renderer)
    fig.savefig(path, dpi=110)
