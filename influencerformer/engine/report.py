"""report.md of a comparison: the table (mean ± sd over seeds), the verdict, the machine load, the setup.

Pure functions of the runs' results (dicts as :func:`~influencerformer.engine.train.train` returns them, with
compare's additions), the config and the split sizes; no training, no data loading, no plotting here.

Verdict rule (several seeds): for each variant against the first one, per metric, the difference of the
means is a **tie** when ``|diff| ≤ pooled sd`` (the pooled standard deviation of both variants' seeds,
``sqrt(((n_a − 1)·sd_a² + (n_b − 1)·sd_b²) / (n_a + n_b − 2))``), else a **win** or a **loss** by the
metric's direction (AP and F1 higher is better, duplicate rate lower). With one seed the spread is unknown:
no verdict is claimed, only the differences, next to a committed multi-seed spread when one is given.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .build import modality
from .config import Config

TABLE = [  # (results key, column title, format); "±" cells are mean ± sd over seeds
    ("AP", "AP", "{:.3f}"), ("AP50", "AP50", "{:.3f}"), ("AP75", "AP75", "{:.3f}"), ("AP25", "AP25", "{:.3f}"),
    ("mIoU", "mIoU", "{:.3f}"), ("F1", "F1", "{:.3f}"),
    ("duplicate_rate", "dup. rate", "{:.3f}"), ("no_object_queries", "no-object queries", "{:.2f}"),
    ("PQ", "PQ", "{:.3f}"), ("final_loss", "final loss", "{:.3f}"),
    ("loss_ms", "loss ms/step", "{:.1f}"), ("assign_ms", "assign. ms/step", "{:.1f}"), ("step_ms", "ms/step", "{:.1f}"),
    ("loss_share", "loss share", "{:.2f}"), ("assign_share", "assign. share", "{:.2f}"),
    ("load_max", "max load", "{:.1f}"),
    ("steps_to_90", "steps to 90% AP", "{:.0f}"), ("assignment_change", "assign. change", "{:.3f}"),
]
TIMING_KEYS = ("loss_ms", "assign_ms", "step_ms")

# metric → (higher is better, title) for the verdict line
VERDICT_METRICS = {"AP": (True, "AP"), "F1": (True, "F1"), "duplicate_rate": (False, "dup. rate")}

COLUMN_DOCS = {  # column key → its line in the "Columns" section (AP's depends on the data: see ap_doc)
    "mIoU": "- mIoU: semantic mIoU of the point model's semantic head on every point of the val scenes (each point's "
            "most likely class; classes absent from prediction and ground truth left out).",
    "F1": "- F1: predictions with score > 0.5 matched one-to-one at IoU ≥ 0.5 (same class); duplicates count as "
          "false positives.",
    "duplicate_rate": "- dup. rate: ground-truth instances claimed by ≥ 2 predictions with score > 0.5.",
    "no_object_queries": "- no-object queries: fraction of queries whose most likely class is \"no object\" (val mean).",
    "PQ": "- PQ: panoptic quality of Mask2Former's panoptic merge (things only).",
    "final_loss": "- final loss: mean training loss over the last 50 steps (each criterion's own scale: not "
                  "comparable across criteria).",
    "loss_ms": "- loss ms/step: the criterion's forward (matching / transport plan included), median over the logged "
               "steps after the first 5 (metrics.jsonl).",
    "assign_ms": "- assign. ms/step: the assignment inside the loss — Hungarian: matching costs + linear assignment; "
                 "transport: the Sinkhorn plan (its pair terms are the loss itself); median as above.",
    "step_ms": "- ms/step: the whole training step (data, forward, loss, backward, optimiser), median as above.",
    "loss_share": "- loss share: loss ms / step ms (medians).",
    "assign_share": "- assign. share: assign. ms / step ms, the part of the step a faster assignment can save.",
    "load_max": "- max load: the highest 1-minute load average of the machine sampled during the run (every 10 s); "
                "above the number of cores the timings are inflated by other work.",
    "steps_to_90": "- steps to 90% AP: first evaluated step reaching 90 % of the run's final AP.",
    "assignment_change": "- assign. change: fraction of instances of a fixed training batch whose owning query "
                         "changed between consecutive evaluations (mean over evaluations; lower = more stable).",
}


@dataclass(frozen=True)
class SeedSpread:
    """A committed multi-seed spread of AP to quote when a comparison has one seed: ``sd`` and where it is from."""

    sd: float
    source: str


def steps_to_fraction(curve: Sequence[dict[str, Any]], fraction: float = 0.9, key: str = "AP") -> int | None:
    """First evaluated step whose ``key`` reaches ``fraction`` × the final value (None without a curve)."""
    final = curve[-1].get(key) if curve else None
    if final is None or not math.isfinite(final) or final <= 0:  # nothing learnt: no step "reaches" it
        return None
    target = fraction * final
    return next(p["step"] for p in curve if p.get(key) is not None and p[key] >= target)


# ------------------------------------------------------------------------------------------ statistics


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def describe(values: Sequence[Any]) -> dict[str, Any]:
    """``{"values", "mean", "sd", "median", "n"}`` of the finite values (sd 0 for one value, None for none);
    ``values`` keeps every seed's value (None where missing), in seed order."""
    finite = _finite(values)
    stats = {"values": [v if v is None or math.isfinite(v) else None for v in values], "n": len(finite)}
    if not finite:
        return {**stats, "mean": None, "sd": None, "median": None}
    return {**stats, "mean": statistics.fmean(finite), "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "median": statistics.median(finite)}


def summarize_runs(runs: list[dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per variant and table key: :func:`describe` over its seeds (runs in seed order)."""
    return {name: {key: describe([r.get(key) for r in runs if r["criterion"] == name]) for key, _, _ in TABLE}
            for name in names}


def pooled_sd(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Pooled standard deviation of two :func:`describe` results (needs n ≥ 2 in total beyond one each)."""
    dof = a["n"] + b["n"] - 2
    return math.sqrt(((a["n"] - 1) * a["sd"] ** 2 + (b["n"] - 1) * b["sd"] ** 2) / dof) if dof > 0 else 0.0


def judge(mine: dict[str, Any], base: dict[str, Any], higher_is_better: bool) -> str:
    """"win" / "tie" / "loss" of ``mine`` against ``base`` (tie: |diff| ≤ pooled sd), "n/a" without values."""
    if mine["mean"] is None or base["mean"] is None:
        return "n/a"
    diff = mine["mean"] - base["mean"]
    if abs(diff) <= pooled_sd(mine, base):
        return "tie"
    return "win" if (diff > 0) == higher_is_better else "loss"


def verdict_lines(summary: dict[str, dict[str, Any]], names: Sequence[str], num_seeds: int,
                  spread: SeedSpread | None = None) -> list[str]:
    """The verdict under the table: every variant against the first, per metric of VERDICT_METRICS."""
    base = names[0]
    metrics = [k for k in VERDICT_METRICS if any(summary[n][k]["mean"] is not None for n in names)]
    if len(names) < 2:
        return ["**Verdict**: one criterion only, nothing to compare."]
    if num_seeds < 2:
        head = ("**Verdict**: one seed, so the seed spread of this comparison is unknown and no win / tie / loss is "
                "claimed. Differences against " + base + ":")
        lines = [head]
        for name in names[1:]:
            parts = []
            for key in metrics:
                a, b = summary[name][key]["mean"], summary[base][key]["mean"]
                if a is not None and b is not None:
                    parts.append(f"{VERDICT_METRICS[key][1]} {a:.3f} vs {b:.3f} ({a - b:+.3f})")
            lines.append(f"- {name}: " + ", ".join(parts or ["no values"]))
        lines.append(_spread_note(summary, names, spread))
        return lines
    lines = [f"**Verdict** ({num_seeds} seeds, each against {base}; rule: |diff of means| ≤ 1 pooled sd of the "
             f"seeds = tie, else win / loss; dup. rate lower is better):"]
    for name in names[1:]:
        parts = []
        for key in metrics:
            higher, title = VERDICT_METRICS[key]
            a, b = summary[name][key], summary[base][key]
            if a["mean"] is None or b["mean"] is None:
                parts.append(f"{title} n/a")
                continue
            parts.append(f"{title} **{judge(a, b, higher)}** ({a['mean']:.3f} ± {a['sd']:.3f} vs {b['mean']:.3f} ± "
                         f"{b['sd']:.3f}; diff {a['mean'] - b['mean']:+.3f}, pooled sd {pooled_sd(a, b):.3f})")
        lines.append(f"- {name}: " + "; ".join(parts))
    return lines


def _spread_note(summary: dict[str, dict[str, Any]], names: Sequence[str], spread: SeedSpread | None) -> str:
    if spread is None:
        return "- seed spread: unknown (rerun with several --seeds to get win / tie / loss)."
    base = summary[names[0]]["AP"]["mean"]
    within = [n for n in names[1:] if base is not None and summary[n]["AP"]["mean"] is not None
              and abs(summary[n]["AP"]["mean"] - base) <= spread.sd]
    beyond = [n for n in names[1:] if n not in within and summary[n]["AP"]["mean"] is not None]
    text = f"- seed spread: unknown here; a committed multi-seed AP sd is {spread.sd:.3f} ({spread.source})."
    if within:
        text += f" AP differences within it: {', '.join(within)}."
    if beyond:
        text += f" Larger than it: {', '.join(beyond)} (still one seed)."
    return text


# ------------------------------------------------------------------------------------------------ table


def present_columns(summary: dict[str, dict[str, Any]], names: Sequence[str]) -> list[tuple[str, str, str]]:
    """The TABLE columns some variant has a value for (images: AP75, PQ; point clouds: AP25, mIoU with a
    semantic head)."""
    return [col for col in TABLE if any(summary[name][col[0]]["mean"] is not None for name in names)]


def _cell(stats: dict[str, Any], fmt: str, num_seeds: int) -> str:
    if stats["mean"] is None:
        return "–"
    return fmt.format(stats["mean"]) + (f" ± {fmt.format(stats['sd'])}" if num_seeds > 1 else "")


def table_lines(summary: dict[str, dict[str, Any]], names: Sequence[str], num_seeds: int,
                cores: int | None) -> list[str]:
    """The markdown table; ``max load`` shows the highest value over seeds and flags a loaded machine."""
    columns = present_columns(summary, names)
    head = "| criterion | " + " | ".join(title for _, title, _ in columns) + " |"
    rows = [head, "|---" * (len(columns) + 1) + "|"]
    for name in names:
        cells = []
        for key, _, fmt in columns:
            stats = summary[name][key]
            if key == "load_max":
                top = max(_finite(stats["values"]), default=None)
                cells.append("–" if top is None else f"{top:.1f} / {cores} cores" +
                             (" **loaded**" if cores is not None and top > cores else ""))
            else:
                cells.append(_cell(stats, fmt, num_seeds))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def load_lines(runs: list[dict[str, Any]], cores: int | None) -> list[str]:
    """One line: which runs' timings were taken on a loaded machine (load average above the core count)."""
    sampled = [r for r in runs if r.get("load_max") is not None]
    if not sampled or cores is None:
        return ["Timings: medians per step; the machine load was not sampled."]
    loaded = [r for r in sampled if r["load_max"] > cores]
    if not loaded:
        top = max(r["load_max"] for r in sampled)
        return [f"Timings: medians per step; the machine was not loaded (1-minute load average ≤ {top:.1f} on "
                f"{cores} cores during every run)."]
    which = ", ".join(f"{r['criterion']} seed {r['seed']} ({r['load_max']:.1f})" for r in loaded)
    return [f"Timings: medians per step. **The machine was loaded** (1-minute load average above its {cores} cores) "
            f"during {which}: those step and loss times include waiting for other work; compare speed only from "
            f"runs on an idle machine."]


# ------------------------------------------------------------------------------------------------ setup


def _count(sizes: dict[str, tuple[int, int]], split: str, unit: str) -> str:
    used, total = sizes[split]
    return f"{split} {used} of {total} {unit}" if used < total else f"{split} {used} {unit}"


def data_line(cfg: Config, sizes: dict[str, tuple[int, int]]) -> str:
    """What data the runs used, with counts (and "val 100 of 5000 images" when data.num_val truncates)."""
    d, t = cfg.data, cfg.train
    where = {"shapes2d": f"preset {d.preset}, data seed {d.seed}", "rooms3d": f"data seed {d.seed}, "
             f"{d.points_per_room[0]}–{d.points_per_room[1]} points per room"}.get(d.name, f"root {d.root}")
    batch = f"batch {d.batch_size} × accumulation {t.grad_accum}"
    data = modality(d)
    return (f"- data: {d.name} ({where}): {_count(sizes, 'train', data.UNIT)}, {_count(sizes, 'val', data.UNIT)}; "
            f"{data.describe_data(d)}; {batch}")


def setup_lines(cfg: Config, variants: Sequence[str], sizes: dict[str, tuple[int, int]], device: Any,
                cores: int) -> list[str]:
    """The report's setup section (and the console's summary at the start); ``variants``: their descriptions."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    shared = ", ".join(f"{k}={v}" for k, v in cfg.criterion.kwargs.items()) or "none"
    return [
        data_line(cfg, sizes),
        f"- model: preset {m.preset}, overrides {m.overrides or 'none'}",
        f"- criteria: {'; '.join(variants)}; config kwargs (each criterion keeps those it "
        f"accepts): {shared}",
        f"- optimiser: AdamW lr {o.lr}, weight decay {o.weight_decay}, {o.warmup_steps} warm-up steps + {o.schedule}, "
        f"clip {o.clip}; {t.steps} steps, eval every {t.eval_every}, amp {t.amp}",
        f"- machine: device {device} (train.device={t.device}), {torch.get_num_threads()} torch CPU threads, "
        f"{cores} cores",
    ]


def curves_title(cfg: Config, sizes: dict[str, tuple[int, int]], seeds: Sequence[int]) -> str:
    d = cfg.data
    what = f"{d.name} preset {d.preset}" if d.name == "shapes2d" else d.name
    unit = modality(d).UNIT
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else \
        f"seeds {', '.join(map(str, seeds))} (mean, band ± 1 sd over seeds)"
    return (f"{what} ({sizes['train'][0]} train / {sizes['val'][0]} val {unit}), {cfg.train.steps} steps, "
            f"{seeds_text}")


# ------------------------------------------------------------------------------------------------ report


def report_markdown(results: dict[str, Any], names: Sequence[str], seeds: Sequence[int], setup: Sequence[str],
                    *, ap_doc: str, cores: int | None, spread: SeedSpread | None = None) -> str:
    """report.md: table, verdict, load, setup (``setup``: lines made by the caller), the columns present."""
    summary = results["summary"]
    columns = present_columns(summary, names)
    docs = [ap_doc if key == "AP" else COLUMN_DOCS.get(key) for key, _, _ in columns]
    return "\n".join([
        "# Criterion comparison", "",
        "Same model, data, data order and seed for every criterion; only the loss differs. "
        f"Seeds: {', '.join(map(str, seeds))}" + (" (mean ± sd over seeds)." if len(seeds) > 1 else "."), "",
        *table_lines(summary, names, len(seeds), cores), "",
        *verdict_lines(summary, names, len(seeds), spread), "",
        *load_lines(results["runs"], cores), "",
        "## Setup", *setup, "",
        "## Columns", *[d for d in dict.fromkeys(docs) if d], "",
    ])
