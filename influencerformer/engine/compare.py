"""Head-to-head comparison of criteria: same model, data, order and seed — only the loss differs.

``compare(cfg, criteria, seeds, out_dir)`` trains one run per (seed, criterion) with :func:`train`,
then writes a report folder:

- ``results.json``: ``{"runs": [{"criterion", "seed", "steps", "AP", "AP50", "AP75", "F1",
  "duplicate_rate", "step_ms", "loss_ms", "curve": [{"step", "AP", ...}], ...}], "summary": {...}}``
- ``report.md``: one table row per criterion, mean ± sd over seeds
- ``curves.png``: AP and training loss against step, every criterion
- ``masks.png``: the same val images: ground truth, then each criterion's predictions
- ``runs/<criterion>_seed<seed>/``: each run's own directory (config, metrics.jsonl, checkpoints)
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from .config import Config, ConfigError, build_dataset, copy_config, criterion_kwargs, is_point_data, validate
from .evaluate import draw_instances, load_trained, predict_instances
from .train import train

TABLE = [  # (results key, column title, format); "±" columns are mean ± sd over seeds
    ("AP", "AP", "{:.3f}"), ("AP50", "AP50", "{:.3f}"), ("AP75", "AP75", "{:.3f}"), ("AP25", "AP25", "{:.3f}"),
    ("F1", "F1", "{:.3f}"),
    ("duplicate_rate", "dup. rate", "{:.3f}"), ("no_object_queries", "no-object queries", "{:.2f}"),
    ("PQ", "PQ", "{:.3f}"), ("final_loss", "final loss", "{:.3f}"),
    ("loss_ms", "loss ms/step", "{:.1f}"), ("assign_ms", "assign. ms/step", "{:.1f}"), ("step_ms", "ms/step", "{:.1f}"),
    ("loss_share", "loss share", "{:.2f}"), ("assign_share", "assign. share", "{:.2f}"),
    ("steps_to_90", "steps to 90% AP", "{:.0f}"), ("assignment_change", "assign. change", "{:.3f}"),
]


def steps_to_fraction(curve: Sequence[dict[str, Any]], fraction: float = 0.9, key: str = "AP") -> int | None:
    """First evaluated step whose ``key`` reaches ``fraction`` × the final value (None without a curve)."""
    final = curve[-1].get(key) if curve else None
    if final is None or not math.isfinite(final) or final <= 0:  # nothing learnt: no step "reaches" it
        return None
    target = fraction * final
    return next(p["step"] for p in curve if p.get(key) is not None and p[key] >= target)


def run_config(cfg: Config, criterion: str, seed: int, out_dir: Path) -> Config:
    """``cfg`` for one run. Criterion kwargs carry over to each criterion that accepts them
    (e.g. ``num_points`` for all); the others are dropped for that criterion only."""
    accepted = criterion_kwargs(criterion)
    kwargs = {k: v for k, v in cfg.criterion.kwargs.items() if accepted is None or k in accepted}
    new = copy_config(cfg, criterion={"name": criterion},
                      train={"seed": seed, "out_dir": str(out_dir / "runs" / f"{criterion}_seed{seed}")})
    new.criterion.kwargs = kwargs
    return new


def compare(cfg: Config, criteria: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
            *, num_images: int = 4, resume: bool = False) -> dict[str, Any]:
    """Train every (seed, criterion) pair from ``cfg`` and write the report; returns results.json's content.

    resume: continue each run from its latest checkpoint (finished runs are not retrained), so an
    interrupted comparison picks up where it stopped.
    """
    out = Path(out_dir)
    if not criteria or not seeds:
        raise ConfigError("compare needs at least one criterion and one seed")
    if len(set(criteria)) != len(criteria):
        raise ConfigError(f"criteria must be distinct, got {list(criteria)}")
    configs = [run_config(cfg, name, seed, out) for seed in seeds for name in criteria]
    for run_cfg in configs:
        validate(run_cfg)  # fail on a bad name before hours of training, not after
    runs = []
    for run_cfg in configs:
        result = train(run_cfg, resume=resume)
        result["steps_to_90"] = steps_to_fraction(result["curve"])
        for part in ("loss", "assign"):
            if result.get(f"{part}_ms") is not None and result.get("step_ms"):
                result[f"{part}_share"] = result[f"{part}_ms"] / result["step_ms"]
        result["loss_curve"] = read_loss_curve(Path(run_cfg.train.out_dir) / "metrics.jsonl")
        runs.append(result)
    results = {"runs": runs, "summary": summarize_runs(runs, criteria)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1))
    (out / "report.md").write_text(report_markdown(results, cfg, criteria, seeds))
    plot_curves(runs, criteria, out / "curves.png")
    first_seed = [next(r for r in runs if r["criterion"] == c and r["seed"] == seeds[0]) for c in criteria]
    plot_masks(first_seed, out / "masks.png", num_images=num_images)
    return results


def read_loss_curve(path: Path) -> list[dict[str, float]]:
    """(step, loss) of every logged training step of a run."""
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines]
    return [{"step": r["step"], "loss": r["loss"]} for r in records if r.get("kind") == "train"]


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_runs(runs: list[dict[str, Any]], criteria: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per criterion and table key: ``{"mean", "sd", "n"}`` over seeds."""
    summary = {}
    for name in criteria:
        mine = [r for r in runs if r["criterion"] == name]
        summary[name] = {}
        for key, _, _ in TABLE:
            mean, sd = _mean_sd([r.get(key) for r in mine])
            summary[name][key] = {"mean": mean, "sd": sd, "n": len(mine)}
    return summary


def report_markdown(results: dict[str, Any], cfg: Config, criteria: Sequence[str], seeds: Sequence[int]) -> str:
    """The table of report.md (mean ± sd over seeds) and how the numbers were made."""
    summary = results["summary"]
    # columns the data has (images: AP75 and PQ; point clouds: AP25)
    table = [col for col in TABLE if any(summary[name][col[0]]["mean"] is not None for name in criteria)]
    head = "| criterion | " + " | ".join(title for _, title, _ in table) + " |"
    rule = "|---" * (len(table) + 1) + "|"
    rows = []
    for name in criteria:
        cells = []
        for key, _, fmt in table:
            s = summary[name][key]
            if s["mean"] is None:
                cells.append("–")
            else:
                cells.append(fmt.format(s["mean"]) + (f" ± {fmt.format(s['sd'])}" if len(seeds) > 1 else ""))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    d, m, t = cfg.data, cfg.model, cfg.train
    points = is_point_data(d)
    data_line = (f"- data: {d.name}, {d.num_train or 'default'} train / {d.num_val or 'default'} val scenes, "
                 f"{d.num_points or 'all'} points sampled per training scene, batch {d.batch_size} × accumulation "
                 f"{t.grad_accum}" if points else
                 f"- data: {d.name} (preset {d.preset}), {d.num_train or 'default'} train / {d.num_val or 'default'} "
                 f"val images, batch {d.batch_size} × accumulation {t.grad_accum}")
    ap_line = ("- AP / AP50 / AP25: ScanNet-protocol 3D instance AP on every point of the val scenes (AP over IoU "
               "0.50:0.05:0.90; regions under 100 points not evaluated), Mask2Former instance inference without "
               "NMS, top-100 per scene." if points else
               "- AP / AP50 / AP75: COCO mask AP on the val split, Mask2Former instance inference without NMS, "
               "top-100 per image.")
    return "\n".join([
        "# Criterion comparison", "",
        f"Same model, data, data order and seed for every criterion; only the loss differs. "
        f"Seeds: {', '.join(map(str, seeds))} (mean ± sd over seeds when more than one).", "",
        head, rule, *rows, "",
        "## Setup",
        data_line,
        f"- model: preset {m.preset}, overrides {m.overrides or 'none'}",
        f"- optimiser: AdamW lr {cfg.optim.lr}, weight decay {cfg.optim.weight_decay}, "
        f"{cfg.optim.warmup_steps} warm-up steps + {cfg.optim.schedule}, clip {cfg.optim.clip}; {t.steps} steps, "
        f"eval every {t.eval_every}, amp {t.amp}, device {t.device}",
        "",
        "## Columns",
        ap_line,
        "- F1: predictions with score > 0.5 matched one-to-one at IoU ≥ 0.5 (same class); duplicates count as "
        "false positives. dup. rate: ground-truth instances claimed by ≥ 2 such predictions.",
        "- no-object queries: fraction of queries whose most likely class is \"no object\" (val mean).",
        "- PQ: panoptic quality of Mask2Former's panoptic merge (things only), when the data has sem_seg.",
        "- final loss: mean training loss over the last 50 steps (each criterion's own scale: not comparable "
        "across criteria).",
        "- loss ms/step: the criterion's forward (matching / transport plan included); ms/step: the whole "
        "training step (data, forward, loss, backward, optimiser), mean after the first 5 steps; loss share: "
        "loss ms / step ms. assign. ms/step: the assignment inside the loss — Hungarian: matching costs + "
        "linear assignment; transport: the Sinkhorn plan (its pair terms are the loss itself); assign. share: "
        "assign. ms / step ms, the part of the step a faster assignment can save.",
        "- steps to 90% AP: first evaluated step reaching 90 % of the run's final AP.",
        "- assign. change: fraction of instances of a fixed training batch whose owning query changed between "
        "consecutive evaluations (mean over evaluations; lower = more stable).",
        "",
    ])


def _json_safe(obj: Any) -> Any:
    """NaN/Inf → null: results.json stays standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------- figures


def _mean_series(runs: list[dict[str, Any]], curve_key: str, value_key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of ``value_key`` at each step present in the runs' ``curve_key`` series."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for point in run.get(curve_key) or []:
            value = point.get(value_key)
            if value is not None and math.isfinite(value):
                by_step.setdefault(point["step"], []).append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot_curves(runs: list[dict[str, Any]], criteria: Sequence[str], path: Path) -> None:
    """curves.png: val AP and training loss against step, one line per criterion (mean over seeds)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_ap, ax_loss = fig.subplots(1, 2)
    for name in criteria:
        mine = [r for r in runs if r["criterion"] == name]
        ax_ap.plot(*_mean_series(mine, "curve", "AP"), marker="o", label=name)
        ax_loss.plot(*_mean_series(mine, "loss_curve", "loss"), label=name)
    ax_ap.set(xlabel="step", ylabel="val mask AP", title="AP vs step")
    ax_loss.set(xlabel="step", ylabel="training loss (own scale per criterion)", title="loss vs step")
    losses = [p["loss"] for r in runs for p in r.get("loss_curve") or []]
    if losses and min(losses) > 0:  # the seed form's loss can be negative: log scale only when it fits
        ax_loss.set_yscale("log")
    for ax in (ax_ap, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)


def plot_masks(runs: list[dict[str, Any]], path: Path, *, num_images: int = 4) -> None:
    """masks.png: rows = the first val images; columns = ground truth, then each run's predictions."""
    from matplotlib.figure import Figure

    models = [load_trained(r["checkpoint"]) for r in runs]
    _, cfg, info, _ = models[0]
    val_set, _ = build_dataset(cfg.data, "val")
    items = [val_set[i] for i in range(min(num_images, len(val_set)))]
    if is_point_data(cfg.data):
        _plot_point_masks([m for m, _, _, _ in models], [r["criterion"] for r in runs], items, path)
        return
    preds = [predict_instances(model, [it["image"] for it in items]) for model, _, _, _ in models]
    fig = Figure(figsize=(2.6 * (1 + len(runs)), 2.6 * len(items)), layout="constrained")
    axes = fig.subplots(len(items), 1 + len(runs), squeeze=False)
    for row, item in enumerate(items):
        gt = {"masks": item["masks"], "labels": item["labels"], "scores": None}
        draw_instances(axes[row][0], item["image"], gt, info.class_names, title="ground truth" if row == 0 else None)
        for col, run in enumerate(runs):
            title = run["criterion"] if row == 0 else None
            draw_instances(axes[row][col + 1], item["image"], preds[col][row], info.class_names, title=title)
    fig.savefig(path, dpi=110)


def _plot_point_masks(models: list[Any], names: list[str], items: list[dict], path: Path) -> None:
    """masks.png for point clouds: top-down views; ground-truth instances, then each run's predictions."""
    from matplotlib.figure import Figure

    from .points import draw_point_instances, point_owner, predict_scene

    fig = Figure(figsize=(3.2 * (1 + len(models)), 3.2 * len(items)), layout="constrained")
    axes = fig.subplots(len(items), 1 + len(models), squeeze=False)
    for row, item in enumerate(items):
        draw_point_instances(axes[row][0], item["coords"], item["instance_labels"].long().clamp(min=-1),
                             title="ground truth" if row == 0 else None)
        for col, (model, name) in enumerate(zip(models, names)):
            pred = predict_scene(model, item)
            draw_point_instances(axes[row][col + 1], item["coords"], point_owner(pred["masks"], pred["scores"]),
                                 title=name if row == 0 else None)
    fig.savefig(path, dpi=110)
