"""AP against training minutes for finished runs: how a benchmark preset was chosen.

Reads each run's ``metrics.jsonl`` (what ``influencerformer train`` writes) and puts its evaluations on a time axis
of *median* step time x steps, so runs that shared the machine with other work are not penalised for it (a mean
or wall clock would be).  Prints a table and, with ``--plot``, draws AP against minutes.

    python benchmarks/ap_vs_minutes.py runs/a runs/b --labels "96 px" "64 px" --plot ap_vs_minutes.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_run(run_dir: Path) -> tuple[float, list[tuple[int, float]]]:
    """Median step seconds and ``[(step, AP)]`` of one run folder."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (expected a run folder written by influencerformer train)")
    steps, evals = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train" and "step_ms" in record:
            steps.append(record["step_ms"])
        elif record.get("kind") == "eval" and record.get("AP") is not None:
            evals.append((int(record["step"]), float(record["AP"])))
    if not steps:
        raise SystemExit(f"{path}: no logged training step")
    return statistics.median(steps) / 1000.0, evals


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ap_vs_minutes.py", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    parser.add_argument("--labels", nargs="*", default=None, help="one label per run (default: folder names)")
    parser.add_argument("--plot", type=Path, default=None, help="write AP vs minutes to this PNG")
    parser.add_argument("--step-ms", nargs="*", type=float, default=None,
                        help="one step time per run (ms), e.g. measured on an idle thread with profile_step.py; "
                             "default: each run's own median step time")
    args = parser.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels: expected {len(args.runs)} labels, got {len(labels)}")
    if args.step_ms is not None and len(args.step_ms) != len(args.runs):
        raise SystemExit(f"--step-ms: expected {len(args.runs)} values, got {len(args.step_ms)}")
    rows = []
    for i, (run, label) in enumerate(zip(args.runs, labels)):
        seconds, evals = read_run(run)
        if args.step_ms is not None:
            seconds = args.step_ms[i] / 1000.0
        rows.append({"label": label, "median_step_ms": 1000 * seconds,
                     "curve": [(step, step * seconds / 60, ap) for step, ap in evals]})
        print(f"{label}: median step {1000 * seconds:.0f} ms")
        for step, minutes, ap in rows[-1]["curve"]:
            print(f"  step {step:5d}  {minutes:5.1f} min  AP {ap:.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for row in rows:
            ax.plot([m for _, m, _ in row["curve"]], [a for _, _, a in row["curve"]], marker="o", label=row["label"])
        ax.set_xlabel("training minutes (step time x steps, one thread)")
        ax.set_ylabel("val mask AP (COCO, no NMS)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
