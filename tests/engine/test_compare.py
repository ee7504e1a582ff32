"""compare: a tiny budget produces every file of the report with sane values."""
import json
import math

import pytest
from matplotlib.image import imread

from influencerformer.engine.compare import compare, steps_to_fraction, summarize_runs
from influencerformer.engine.config import ConfigError, load_config

TINY = ["data.num_train=4", "data.num_val=2", "data.batch_size=2", "train.progress=false", "train.steps=2",
        "train.eval_every=1", "model.num_queries=6", "model.hidden_dim=32", "model.dim_feedforward=64",
        "model.mask_dim=32", "model.num_decoder_layers=2", "model.backbone_widths=[8,16,32,32]",
        "model.stem_width=8", "criterion.num_points=64", "optim.warmup_steps=1", "train.device=cpu",
        "train.probe_images=2"]
UNIT = ("AP", "AP50", "AP75", "F1", "duplicate_rate", "PQ", "precision", "recall", "no_object_queries")


def test_compare_writes_a_complete_sane_report(tmp_path):
    cfg = load_config(None, TINY)
    results = compare(cfg, ["hungarian", "influencer"], [0, 1], tmp_path, num_images=2)
    for name in ("report.md", "results.json", "curves.png", "masks.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    runs = saved["runs"]
    assert [(r["criterion"], r["seed"]) for r in runs] == [("hungarian", 0), ("influencer", 0),
                                                          ("hungarian", 1), ("influencer", 1)]
    for run in runs:
        assert run["steps"] == 2 and [p["step"] for p in run["curve"]] == [1, 2]
        for key in UNIT:
            assert 0.0 <= run[key] <= 1.0, (key, run[key])
        for key in ("step_ms", "loss_ms", "final_loss"):
            assert math.isfinite(run[key]) and run[key] > 0, key
        assert run["loss_ms"] < run["step_ms"]
        assert all(0.0 <= p["AP"] <= 1.0 for p in run["curve"])
    # same model init and data for both criteria: the per-run configs differ only in the criterion name
    runs_dir = tmp_path / "runs"
    h = (runs_dir / "hungarian_seed0" / "config.yaml").read_text().splitlines()
    i = (runs_dir / "influencer_seed0" / "config.yaml").read_text().splitlines()
    assert [(a, b) for a, b in zip(h, i) if a != b] == [
        ("  name: hungarian", "  name: influencer"),
        (f"  out_dir: {runs_dir / 'hungarian_seed0'}", f"  out_dir: {runs_dir / 'influencer_seed0'}"),
    ]
    report = (tmp_path / "report.md").read_text()
    assert "| hungarian |" in report and "| influencer |" in report and "±" in report
    assert imread(tmp_path / "curves.png").ndim == 3 and imread(tmp_path / "masks.png").shape[0] > 100
    assert results["summary"]["hungarian"]["AP"]["n"] == 2
    # an interrupted comparison resumes: finished runs are reused, not retrained
    again = compare(cfg, ["hungarian", "influencer"], [0, 1], tmp_path, num_images=2, resume=True)
    assert [r["AP"] for r in again["runs"]] == [r["AP"] for r in results["runs"]]
    assert [r["curve"] for r in again["runs"]] == [r["curve"] for r in results["runs"]]


def test_compare_rejects_bad_criteria_before_training(tmp_path):
    cfg = load_config(None, TINY)
    with pytest.raises(ConfigError, match="unknown criterion 'nope'"):
        compare(cfg, ["hungarian", "nope"], [0], tmp_path)
    with pytest.raises(ConfigError, match="distinct"):
        compare(cfg, ["hungarian", "hungarian"], [0], tmp_path)
    assert not (tmp_path / "runs").exists()


def test_steps_to_90_percent_and_summary():
    curve = [{"step": 10, "AP": 0.1}, {"step": 20, "AP": 0.45}, {"step": 30, "AP": 0.5}]
    assert steps_to_fraction(curve) == 20
    assert steps_to_fraction([]) is None and steps_to_fraction([{"step": 5, "AP": 0.0}]) is None
    runs = [{"criterion": "a", "AP": 0.2}, {"criterion": "a", "AP": 0.4}, {"criterion": "b", "AP": float("nan")}]
    summary = summarize_runs(runs, ["a", "b"])
    assert summary["a"]["AP"]["mean"] == pytest.approx(0.3) and summary["a"]["AP"]["sd"] == pytest.approx(0.1414, 1e-3)
    assert summary["b"]["AP"]["mean"] is None
