"""Smoke test of benchmarks/loss_speed.py: the quick grid runs and reports every criterion with a ratio to HF."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_speed.py"


def _load():
    spec = importlib.util.spec_from_file_location("loss_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_runs_and_prints_table(capsys):
    rows = _load().main(["--quick", "--device", "cpu", "--layers", "1"])
    out = capsys.readouterr().out
    assert len(rows) == 1 and {"HF", "hungarian"} <= set(rows[0]["results"])
    for ms, peak in rows[0]["results"].values():
        assert ms > 0 and peak is None  # no peak memory on CPU
    assert "| Q | K | HF ms (×HF) | hungarian ms (×HF)" in out
    assert "| 16 | 4 | " in out and "(1.00)" in out


def test_quick_grid_overrides_sizes():
    args = _load().parse_args(["--quick"])
    assert (args.queries, args.instances, args.points) == ([16], [4], 256)
    with pytest.raises(SystemExit):
        _load().parse_args(["--layers", "x"])
