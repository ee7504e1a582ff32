"""Training-step times of finished runs, from their ``metrics.jsonl`` (train logged with ``train.log_every=1``).

    python benchmarks/step_times.py RUN_DIR [RUN_DIR ...]             # markdown table, one row per run
    python benchmarks/step_times.py RUN_DIR ... --fit 240             # steps of every run that fit in 240 s

Per run: the median over steps (the first ``--skip`` steps left out: allocator and lazy initialisation) of the
whole step, of the criterion's forward (``loss``), of its assignment section (``assign``: Hungarian costs +
matching, transport's Sinkhorn) and of data loading, and the assignment share = median assign / median step.
Medians, not means: on a shared machine a few stalled steps would dominate a mean.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Sequence

KEYS = ("step_ms", "loss_ms", "assign_ms", "data_ms")


def step_times(run_dir: str | Path, skip: int = 10) -> dict:
    """``{"run", "criterion", "steps", "step_ms", "loss_ms", "assign_ms", "data_ms", "assign_share"}`` (medians).

    ``criterion`` is read from the run's ``config.yaml`` when present, else the folder name is used.
    """
    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no train records")
    kept = train[skip:] if len(train) > 2 * skip else train
    row = {"run": run_dir.name, "criterion": _criterion(run_dir), "steps": train[-1]["step"]}
    for key in KEYS:
        values = [r[key] for r in kept if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["assign_share"] = row["assign_ms"] / row["step_ms"] if row["assign_ms"] is not None else None
    return row


def _criterion(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        return (yaml.safe_load(config.read_text()) or {}).get("criterion", {}).get("name", run_dir.name)
    return run_dir.name


def format_table(rows: list[dict]) -> str:
    """Markdown table of ``step_times`` rows; the last column compares each run's step with the first run's."""
    lines = ["| run | criterion | steps | step ms | loss fwd ms | assign. ms | assign. share | data ms | step vs first |",
             "|---|---|---|---|---|---|---|---|---|"]
    first = rows[0]["step_ms"] if rows else None

    def ms(v):
        return "–" if v is None else f"{v:.1f}"

    for r in rows:
        share = "–" if r["assign_share"] is None else f"{100 * r['assign_share']:.0f} %"
        lines.append(f"| {r['run']} | {r['criterion']} | {r['steps']} | {ms(r['step_ms'])} | {ms(r['loss_ms'])} | "
                     f"{ms(r['assign_ms'])} | {share} | {ms(r['data_ms'])} | {first / r['step_ms']:.2f}× |")
    return "\n".join(lines)


def steps_that_fit(rows: list[dict], seconds: float, multiple: int = 50, minimum: int = 50) -> int:
    """Training steps per run so that one run of each measured criterion fits in ``seconds`` together."""
    per_step = sum(r["step_ms"] for r in rows) / 1000
    steps = int(seconds / per_step) // multiple * multiple if per_step > 0 else minimum
    return max(minimum, steps)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, each with metrics.jsonl (and config.yaml)")
    p.add_argument("--skip", type=int, default=10, help="first logged steps left out of the medians (warm-up)")
    p.add_argument("--fit", type=float, metavar="SECONDS", default=None,
                   help="print only the steps per run that fit in SECONDS for one run of each criterion")
    p.add_argument("--multiple", type=int, default=50, help="--fit: round the steps down to a multiple of this")
    p.add_argument("--minimum", type=int, default=50, help="--fit: never fewer steps than this")
    args = p.parse_args(argv)
    rows = [step_times(run, args.skip) for run in args.runs]
    if args.fit is not None:
        print(steps_that_fit(rows, args.fit, args.multiple, args.minimum))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
