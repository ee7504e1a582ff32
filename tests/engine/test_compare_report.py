"""compare's report and figures without training: verdict rule, load lines, setup lines, curves, labels, console."""
import io
import math

import pytest
import torch

from influencerformer import cli
from influencerformer.engine.compare import LoadMonitor, _Console, split_sizes
from influencerformer.engine.config import load_config
from influencerformer.engine.plots import band, ema, plot_curves, spread_labels
from influencerformer.engine.report import (SeedSpread, data_line, describe, judge, load_lines, pooled_sd, report_markdown,
                                            summarize_runs, verdict_lines)


def _runs(values):
    """runs of {name: [AP per seed]} with F1 = AP and no duplicates."""
    return [{"criterion": name, "seed": seed, "AP": ap, "F1": ap, "duplicate_rate": 0.1}
            for name, aps in values.items() for seed, ap in enumerate(aps)]


def test_describe_and_pooled_sd():
    stats = describe([0.1, None, 0.3, float("nan")])
    assert stats["n"] == 2 and stats["values"] == [0.1, None, 0.3, None]
    assert stats["mean"] == pytest.approx(0.2) and stats["median"] == pytest.approx(0.2)
    assert stats["sd"] == pytest.approx(math.sqrt(0.02))
    a, b = describe([1.0, 3.0]), describe([2.0, 2.0, 2.0])  # sd² 2 on 1 dof, 0 on 2 dof → pooled √(2/3)
    assert pooled_sd(a, b) == pytest.approx(math.sqrt(2 / 3))
    assert describe([None])["mean"] is None


@pytest.mark.parametrize("mine, base, higher, expected", [
    ([0.30, 0.32], [0.20, 0.22], True, "win"),
    ([0.20, 0.22], [0.30, 0.32], True, "loss"),
    ([0.21, 0.25], [0.20, 0.24], True, "tie"),  # diff 0.01 ≤ pooled sd 0.028
    ([0.05, 0.06], [0.20, 0.22], False, "win"),  # duplicate rate: lower is better
    ([None, None], [0.2, 0.3], True, "n/a"),
])
def test_win_tie_loss_rule(mine, base, higher, expected):
    assert judge(describe(mine), describe(base), higher) == expected


def test_verdict_several_seeds_states_the_rule_and_each_metric():
    runs = _runs({"hungarian": [0.20, 0.22, 0.21], "transport": [0.30, 0.31, 0.32], "eps": [0.2, 0.23, 0.21]})
    summary = summarize_runs(runs, ["hungarian", "transport", "eps"])
    lines = verdict_lines(summary, ["hungarian", "transport", "eps"], 3)
    assert "rule: |diff of means| ≤ 1 pooled sd of the seeds = tie" in lines[0]
    assert lines[1].startswith("- transport: AP **win** (0.310 ± 0.010 vs 0.210 ± 0.010; diff +0.100")
    assert "dup. rate **tie**" in lines[1]
    assert lines[2].startswith("- eps: AP **tie**")


def test_verdict_one_seed_claims_nothing():
    runs = _runs({"hungarian": [0.063], "transport": [0.038], "eps": [0.060]})
    summary = summarize_runs(runs, ["hungarian", "transport", "eps"])
    unknown = "\n".join(verdict_lines(summary, ["hungarian", "transport", "eps"], 1))
    assert "one seed, so the seed spread of this comparison is unknown and no win / tie / loss is claimed" in unknown
    assert "- transport: AP 0.038 vs 0.063 (-0.025)" in unknown and "seed spread: unknown" in unknown
    assert "win" not in unknown.replace("win / tie / loss", "")
    quoted = "\n".join(verdict_lines(summary, ["hungarian", "transport", "eps"], 1, SeedSpread(0.011, "3 seeds")))
    assert "committed multi-seed AP sd is 0.011 (3 seeds). AP differences within it: eps." in quoted
    assert "Larger than it: transport (still one seed)." in quoted


def test_load_lines_say_when_the_machine_was_loaded():
    runs = [{"criterion": "a", "seed": 0, "load_max": 1.2}, {"criterion": "b", "seed": 0, "load_max": 3.4}]
    assert "**The machine was loaded** (1-minute load average above its 2 cores) during b seed 0 (3.4)" in \
        load_lines(runs, 2)[0]
    assert "not loaded (1-minute load average ≤ 3.4 on 4 cores" in load_lines(runs, 4)[0]
    assert "not sampled" in load_lines([{"criterion": "a", "seed": 0}], 2)[0]


def test_report_table_flags_load_and_documents_only_present_columns():
    runs = [{**r, "step_ms": 60.0 + r["seed"], "load_max": 3.0} for r in _runs({"a": [0.1, 0.2], "b": [0.2, 0.3]})]
    results = {"runs": runs, "summary": summarize_runs(runs, ["a", "b"])}
    text = report_markdown(results, ["a", "b"], [0, 1], ["- data: x"], ap_doc="- AP: mask AP", cores=2)
    header = text.splitlines()[4]
    assert header == "| criterion | AP | F1 | dup. rate | ms/step | max load |"
    assert "| a | 0.150 ± 0.071 | 0.150 ± 0.071 | 0.100 ± 0.000 | 60.5 ± 0.7 | 3.0 / 2 cores **loaded** |" in text
    columns = text.split("## Columns")[1]
    assert "- ms/step:" in columns and "median" in columns and "loss ms/step" not in columns
    assert "PQ" not in columns and "AP25" not in text and "- AP: mask AP" in columns


def test_setup_lines_give_counts_and_say_when_val_is_truncated(tmp_path):
    coco = load_config(None, ["data.num_val=100"])
    coco.data.name, coco.data.root = "coco", "/data/coco"  # no files needed: the line only reads the sizes
    line = data_line(coco, {"train": (118287, 118287), "val": (100, 5000)})
    assert "train 118287 images, val 100 of 5000 images" in line and "preset" not in line and "points" not in line
    rooms = load_config(None, ["data.name=rooms3d", "data.num_train=3", "data.num_val=2"])
    assert split_sizes(rooms) == {"train": (3, 3), "val": (2, 2)}
    line = data_line(rooms, split_sizes(rooms))
    assert "rooms3d" in line and "train 3 scenes, val 2 scenes" in line and "4096 points sampled" in line
    shapes = load_config(None, ["data.num_train=7", "data.num_val=3"])
    assert "shapes2d (preset medium, data seed 0): train 7 images, val 3 images" in data_line(shapes, split_sizes(shapes))


def test_curves_start_at_zero_smooth_the_loss_and_name_the_run(tmp_path):
    runs = [{"criterion": "a", "seed": s, "curve": [{"step": 10, "AP": 0.01 + s * 0.04}, {"step": 20, "AP": 0.02}],
             "loss_curve": [{"step": t, "loss": 5.0 / t + s} for t in range(1, 21)]} for s in (0, 1)]
    fig = plot_curves(runs, ["a"], tmp_path / "curves.png", title="shapes2d, 20 steps, seeds 0, 1",
                      ap_label="val 3D AP")
    ax_ap, ax_loss = fig.axes
    assert ax_ap.get_ylim()[0] == 0 and ax_ap.get_ylim()[1] > 0 and ax_ap.get_ylabel() == "val 3D AP"
    assert len(ax_ap.collections) >= 1 and len(ax_loss.collections) >= 1  # ± sd bands with two seeds
    assert fig._suptitle.get_text() == "shapes2d, 20 steps, seeds 0, 1"
    assert ax_loss.get_yscale() == "log" and (tmp_path / "curves.png").stat().st_size > 0
    assert ema([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # bias-corrected: no pull towards 0
    steps, mean, sd = band([([1, 2, 3], [1.0, 2.0, 3.0]), ([2, 3], [4.0, 5.0])])
    assert steps == [2, 3] and mean == [3.0, 4.0] and sd[0] == pytest.approx(math.sqrt(2))


def test_labels_of_overlapping_instances_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 3))
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(torch.zeros(64, 64).numpy())
    for i in range(5):  # duplicates: five labels at (almost) the same centre
        ax.text(32 + i * 0.2, 32, f"rectangle 0.{i}", fontsize=6, ha="center", va="center")
    renderer = canvas.get_renderer()
    assert spread_labels(ax, renderer) == 4
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_load_monitor_samples_during_the_run():
    values = iter([1.0, 2.5, 4.0] + [4.0] * 100)
    with LoadMonitor(interval=0.01, read=lambda: (next(values), 0.0, 0.0)) as monitor:
        import time
        time.sleep(0.05)
    assert monitor.samples[:3] == [1.0, 2.5, 4.0] and len(monitor.samples) >= 3


def test_console_hides_the_config_dump_but_logs_everything():
    console, log = io.StringIO(), io.StringIO()
    stream = _Console(console, log)
    print("resolved config:\ndata:\n  name: shapes2d", file=stream)
    print("[eval] step 2: AP=0.1", file=stream)
    assert console.getvalue() == "[eval] step 2: AP=0.1\n"
    assert log.getvalue().startswith("resolved config:\ndata:") and "[eval]" in log.getvalue()


@pytest.mark.parametrize("argv, words", [
    (["compare", "--variant", "transport"], ["must look like NAME=criterion"]),
    (["compare", "--variant", "e=transport,epsilonn=0.1"], ["transport has no keyword epsilonn"]),
    (["compare", "--seed-spread", "wide"], ["--seed-spread must be SD[:SOURCE]"]),
])
def test_compare_cli_rejects_bad_variants_in_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words)
    assert list(tmp_path.iterdir()) == []


def test_compare_help_documents_variants(capsys):
    assert cli.main(["compare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--variant NAME=CRITERION[,KEY=VALUE...]" in text and "--variant eps05=transport,epsilon=0.05" in text


def test_compare_cli_refuses_an_earlier_run_before_training(tmp_path, capsys):
    earlier = tmp_path / "cmp" / "runs" / "hungarian_seed0"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("data: {}\n")
    assert cli.main(["compare", "--criteria", "hungarian", "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "run 1/" not in err
    assert sorted(p.name for p in earlier.iterdir()) == ["config.yaml"]


def test_metrics_reader_skips_a_line_cut_by_a_kill(tmp_path):
    from influencerformer.engine.compare import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "st')
    assert read_metrics(path) == [{"kind": "train", "step": 1, "loss": 2.0}]
    assert read_metrics(tmp_path / "missing.jsonl") == []
