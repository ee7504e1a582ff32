"""Smoke test of benchmarks/loss_speed.py: the quick grid runs and reports every criterion with a ratio to HF."""
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_speed.py"


def _load():
    spec = importlib.util.spec_from_file_location("loss_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_runs_and_prints_table(capsys):
    rows = _load().main(["--quick", "--device", "cpu", "--layers", "1"])
    out = capsys.readouterr().out
    assert [row["case"] for row in rows] == ["random", "peaked"]  # random and trained-like inputs by default
    for row in rows:
        assert {"HF", "hungarian"} <= set(row["results"]) and set(row["subnormal"]) == set(row["results"])
        for ms, peak in row["results"].values():
            assert ms > 0 and peak is None  # no peak memory on CPU
    assert "| Q | K | HF ms (×HF) | hungarian ms (×HF)" in out
    assert "| 16 | 4 | " in out and "(1.00)" in out


def test_quick_grid_overrides_sizes():
    args = _load().parse_args(["--quick"])
    assert (args.queries, args.instances, args.points) == ([16], [4], 256)
    with pytest.raises(SystemExit):
        _load().parse_args(["--layers", "x"])


def test_peaked_case_is_trained_like():
    """Query k < K predicts instance k: its mask logits agree in sign with the target, idle queries say no object."""
    module = _load()
    outputs, targets = module.make_inputs(2, 8, 3, 1, 16, 32, 5, "cpu", case="peaked")
    small = torch.nn.functional.adaptive_avg_pool2d(targets[0]["masks"][:1].float(), 16)[0]
    agree = (outputs["pred_masks"][0, 0] > 0) == (small > 0.5)
    assert agree[(small - 0.5).abs() > 0.25].float().mean() > 0.99
    assert (outputs["pred_logits"][:, 3:].argmax(-1) == 5).float().mean() > 0.9  # idle queries: no object
    assert (outputs["pred_logits"][0, :3].argmax(-1) == targets[0]["labels"]).all()
    with pytest.raises(ValueError, match="case must be one of"):
        module.make_inputs(1, 2, 1, 0, 8, 8, 2, "cpu", case="nope")
