"""compare: a tiny budget produces every file of the report with sane values; variants; median timings,
machine load, verdict and setup lines of the report."""
import json
import math
import statistics

import pytest
from matplotlib.image import imread

from influencerformer.engine.compare import (SeedSpread, Variant, compare, median_times, parse_variant, run_config,
                                             steps_to_fraction, summarize_runs)
from influencerformer.engine.config import ConfigError, load_config

TINY = ["data.num_train=4", "data.num_val=2", "data.batch_size=2", "train.progress=false", "train.steps=2",
        "train.eval_every=1", "model.num_queries=6", "model.hidden_dim=32", "model.dim_feedforward=64",
        "model.mask_dim=32", "model.num_decoder_layers=2", "model.backbone_widths=[8,16,32,32]",
        "model.stem_width=8", "criterion.num_points=64", "optim.warmup_steps=1", "train.device=cpu",
        "train.probe_images=2"]
UNIT = ("AP", "AP50", "AP75", "F1", "duplicate_rate", "PQ", "precision", "recall", "no_object_queries")


def test_compare_writes_a_complete_sane_report(tmp_path, capsys):
    cfg = load_config(None, TINY)
    results = compare(cfg, ["hungarian", "influencer"], [0, 1], tmp_path, num_images=2)
    console = capsys.readouterr().out
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
    # timings are medians of what train logged in metrics.jsonl (train's means kept aside)
    for run in runs:
        logged = [json.loads(line) for line in (tmp_path / "runs" / f"{run['criterion']}_seed{run['seed']}" /
                                                "metrics.jsonl").read_text().splitlines()]
        steps = [r["step_ms"] for r in logged if r["kind"] == "train"]
        assert run["step_ms"] == pytest.approx(statistics.median(steps)) and "step_ms_mean" in run
        assert run["load_max"] is not None
    # results.json keeps every seed's value and mean / sd / median
    ap = saved["summary"]["influencer"]["AP"]
    assert ap["values"] == [r["AP"] for r in runs if r["criterion"] == "influencer"]
    assert ap["median"] == pytest.approx(statistics.median(ap["values"]))
    # progress with an ETA; the config dump goes to the run folder, not the console
    assert "run 1/4: hungarian seed 0" in console and "run 4/4: influencer seed 1" in console and "ETA" in console
    assert "resolved config" not in console and "points_per_room" not in console and "points sampled" not in console
    assert "resolved config" in (runs_dir / "influencer_seed1" / "console.log").read_text()
    # verdict under the table, setup with the counts used, only present columns documented
    assert "**Verdict** (2 seeds, each against hungarian; rule: |diff of means| ≤ 1 pooled sd" in report
    assert "- influencer: AP **" in report
    assert "train 4 images, val 2 images" in report and "preset medium" in report
    header, columns = report.split("\n")[4], report.split("## Columns")[1]
    assert "AP25" not in report
    for title in ("steps to 90% AP", "PQ", "assign. ms/step", "max load"):
        assert (f"| {title} |" in header) == (f"- {title}:" in columns), title
    assert ("Timings: medians per step" in report) and ("max load" in report)
    # an earlier comparison in the folder is never replaced silently: an error before anything trains
    with pytest.raises(ConfigError, match="already holds a run.*--overwrite"):
        compare(cfg, ["hungarian", "influencer"], [0, 1], tmp_path, num_images=2)
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


def test_variants_run_one_criterion_with_different_options_side_by_side(tmp_path):
    cfg = load_config(None, TINY + ["train.eval_every=0", "train.probe_images=0"], criteria=["transport"])
    variants = ["transport", parse_variant("eps05=transport,epsilon=0.05,sinkhorn_iters=5")]
    results = compare(cfg, variants, [0], tmp_path, num_images=1,
                      seed_spread=SeedSpread(0.011, "docs/results.md §1, 3 seeds"))
    assert [(r["criterion"], r["loss"], r["kwargs"]) for r in results["runs"]] == [
        ("transport", "transport", {}), ("eps05", "transport", {"epsilon": 0.05, "sinkhorn_iters": 5})]
    runs_dir = tmp_path / "runs"
    a = (runs_dir / "transport_seed0" / "config.yaml").read_text().splitlines()
    b = (runs_dir / "eps05_seed0" / "config.yaml").read_text().splitlines()
    assert sorted(set(b) - set(a)) == [
        "    epsilon: 0.05", "    sinkhorn_iters: 5", f"  out_dir: {runs_dir / 'eps05_seed0'}"]
    assert sorted(set(a) - set(b)) == [f"  out_dir: {runs_dir / 'transport_seed0'}"]
    report = (tmp_path / "report.md").read_text()
    assert "| eps05 |" in report and "eps05 = transport with epsilon=0.05, sinkhorn_iters=5" in report
    assert "one seed, so the seed spread of this comparison is unknown" in report
    assert "committed multi-seed AP sd is 0.011 (docs/results.md §1, 3 seeds)" in report
    again = compare(cfg, variants, [0], tmp_path, num_images=1, overwrite=True)  # replaces the earlier runs
    assert [r["steps"] for r in again["runs"]] == [2, 2]
    assert not list(runs_dir.glob("*/.replaced-*"))  # set aside, then deleted at the first new checkpoint


def test_parse_variant():
    assert parse_variant("eps05=transport,epsilon=0.05") == Variant("eps05", "transport", {"epsilon": 0.05})
    assert parse_variant(" top3 = transport, topk=3, detach_plan=false") == \
        Variant("top3", "transport", {"topk": 3, "detach_plan": False})
    assert parse_variant("w=hungarian,class_weight=[1,2],mask_weight=5") == \
        Variant("w", "hungarian", {"class_weight": [1, 2], "mask_weight": 5})  # a comma inside a value stays
    for bad in ("transport", "=transport", "eps=", "eps=transport,0.05", "eps=transport=x"):
        with pytest.raises(ConfigError, match="must look like NAME=criterion"):
            parse_variant(bad)


@pytest.mark.parametrize("variants, message", [
    (["hungarian", Variant("x", "transport", {"epsilonn": 1})], "variant 'x': transport has no keyword epsilonn"),
    (["hungarian", Variant("x", "nope")], "unknown criterion 'nope'"),
    (["hungarian", Variant("a/b", "transport")], "variant name 'a/b'"),
    (["transport", Variant("transport", "transport", {"epsilon": 1})], "distinct names"),
    (["hungarian", Variant("x", "transport", {"epsilon": "big"})], "epsilon"),  # a bad value, before training
])
def test_bad_variants_fail_before_training(tmp_path, variants, message):
    cfg = load_config(None, TINY)
    with pytest.raises(ConfigError, match=message):
        compare(cfg, variants, [0], tmp_path)
    assert not (tmp_path / "runs").exists()


def test_run_config_applies_variant_kwargs_over_the_config(tmp_path):
    cfg = load_config(None, ["criterion.epsilon=0.1", "criterion.num_points=64"], criteria=["hungarian", "transport"])
    run = run_config(cfg, Variant("e", "transport", {"epsilon": 0.05}), 3, tmp_path)
    assert (run.criterion.name, run.criterion.kwargs) == ("transport", {"num_points": 64, "epsilon": 0.05})
    assert run.train.seed == 3 and run.train.out_dir == str(tmp_path / "runs" / "e_seed3")


def test_median_times_skip_the_warm_up_and_ignore_a_burst():
    records = [{"kind": "train", "step": s, "step_ms": ms, "loss_ms": 1.0} for s, ms in
               [(1, 900.0), (10, 60.0), (20, 61.0), (30, 5000.0), (40, 62.0)]] + [{"kind": "eval", "step": 40}]
    times = median_times(records)
    assert times["step_ms"] == pytest.approx(61.5) and times["loss_ms"] == 1.0 and times["assign_ms"] is None
