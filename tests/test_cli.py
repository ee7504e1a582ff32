"""The command line: --help documents every option, bad input is one line + exit 2, and the commands
work end to end on a tiny run (train → evaluate → predict)."""
import argparse
import json
import subprocess
import sys

import pytest

from influencerformer import cli

TINY = ["data.num_train=4", "data.num_val=2", "data.batch_size=2", "train.progress=false",
        "model.num_queries=6", "model.hidden_dim=32", "model.dim_feedforward=64", "model.mask_dim=32",
        "model.num_decoder_layers=2", "model.backbone_widths=[8,16,32,32]", "model.stem_width=8",
        "criterion.num_points=64", "optim.warmup_steps=1", "train.probe_images=1"]
SETS = [arg for item in TINY for arg in ("--set", item)]


def _subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "compare", "bench", "check-data"])
def test_help_mentions_every_option_with_its_default(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    sub = _subcommands()[command]
    for action in sub._actions:
        if action.help == argparse.SUPPRESS:
            continue
        for option in action.option_strings:
            assert option in text, option
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest  # explained, not just named
    assert text.count("(default:") >= len([a for a in sub._actions if a.option_strings]) - 1  # all but -h


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "predict", "compare", "bench"):
        assert command in out


@pytest.mark.parametrize("argv, words", [
    (["train", "--criterion", "nope"], ["unknown criterion 'nope'", "hungarian"]),
    (["train", "--data", "coco"], ["data root"]),
    (["train", "--data", "coco", "--data-root", "/no/such/dir"], ["data root not found"]),
    (["train", "--set", "train.stepz=3"], ["train.stepz", "valid keys", "steps"]),
    (["train", "--set", "model.bogus=1"], ["model.bogus"]),
    (["train", "--config", "/no/such.yaml"], ["config file not found"]),
    (["evaluate", "/no/such/checkpoint.pt"], ["checkpoint not found"]),
    (["compare", "--criteria", "hungarian", "nope"], ["unknown criterion 'nope'"]),
    (["predict", "/no/such/run"], ["not found"]),
    (["train", "--device", "tpu9"], ["unknown device 'tpu9'"]),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # compare must not create anything before failing
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "error" in err
    for word in words:
        assert word in err
    assert list(tmp_path.iterdir()) == []


def test_argparse_usage_errors_exit_2(capsys):
    assert cli.main(["train", "--data", "imagenet"]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["train", "--steps", "many"]) == 2


def test_module_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "influencerformer", "train", "--criterion", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown criterion" in proc.stderr


def test_train_evaluate_predict_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--steps", "2", "--out", str(run), "--device", "cpu", *SETS]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{\n"):])  # the summary is the last thing printed
    assert summary["steps"] == 2 and 0 <= summary["AP"] <= 1
    # --resume with the saved config (no --config) continues to a longer schedule
    assert cli.main(["train", "--resume", "--out", str(run), "--steps", "3", "--device", "cpu"]) == 0
    assert "resumed from" in capsys.readouterr().out
    out_json = tmp_path / "eval.json"
    assert cli.main(["evaluate", str(run), "--output", str(out_json), "--device", "cpu"]) == 0
    metrics = json.loads(out_json.read_text())
    assert metrics["step"] == 3 and all(0 <= metrics[k] <= 1 for k in ("AP", "AP50", "AP75", "F1"))
    assert cli.main(["predict", str(run), "--num-images", "2", "--out", str(tmp_path / "pred"),
                     "--score-threshold", "0.0", "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["val_0.png", "val_1.png"]
    from matplotlib.image import imsave, imread

    folder = tmp_path / "imgs"
    folder.mkdir()
    imsave(folder / "mine.png", imread(tmp_path / "pred" / "val_0.png")[:50, :70, :3])  # odd size
    assert cli.main(["predict", str(run), "--images", str(folder), "--out", str(tmp_path / "pred2")]) == 0
    assert (tmp_path / "pred2" / "mine.png").is_file()
    assert cli.main(["predict", str(run), "--images", str(tmp_path / "empty_missing")]) == 2


def test_bench_passes_arguments_to_the_benchmark(tmp_path, monkeypatch):
    script = tmp_path / "loss_speed.py"
    script.write_text("import json, sys\n"
                      "def main(argv):\n"
                      f"    open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(argv))\n"
                      "    return 0\n")
    monkeypatch.setattr(cli, "BENCH_SCRIPT", script)
    assert cli.main(["bench", "--", "--queries", "100", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "argv.json").read_text()) == ["--queries", "100", "--device", "cpu"]
    monkeypatch.setattr(cli, "BENCH_SCRIPT", tmp_path / "missing.py")
    assert cli.main(["bench"]) == 2


def test_train_and_evaluate_on_coco_files(tmp_path, capsys):
    from influencerformer.data import Shapes2D, export_coco

    root = tmp_path / "coco"
    for split, n in (("train", 4), ("val", 2)):  # the per-split layout: {split}/annotations.json + images/
        export_coco(Shapes2D(split, preset="medium", num_images=n), root / split)
    run = tmp_path / "run"
    argv = ["train", "--data", "coco", "--data-root", str(root), "--steps", "2", "--out", str(run), *SETS]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{\n"):])
    assert summary["steps"] == 2 and 0 <= summary["AP"] <= 1 and "PQ" not in summary  # no sem_seg in COCO
    assert cli.main(["evaluate", str(run), "--output", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["step"] == 2


def test_download_and_prepare_are_wired_into_the_cli(tmp_path, capsys):
    from influencerformer.cli import main

    # Nothing listens on port 9 of loopback: the command must fail cleanly (no traceback), not hang.
    code = main(["download", "coco", "--root", str(tmp_path), "--annotations-only", "--mirror",
                 "http://127.0.0.1:9", "--retries", "0", "--timeout", "2"])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and err.strip()
    assert main(["prepare", "scannet", "--root", str(tmp_path / "missing")]) != 0


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_train_refuses_an_earlier_run_resumes_without_config_yaml_and_overwrites(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--out", str(run), "--device", "cpu", *SETS, "--set", "train.progress=false"]
    assert cli.main([*base, "--steps", "2"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--steps", "2"]) == 2
    line = _one_error_line(capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    (run / "config.yaml").unlink()  # lost: the checkpoint's own config continues the run
    assert cli.main(["train", "--resume", "--out", str(run), "--steps", "3"]) == 0
    captured = capsys.readouterr()
    assert "config stored in" in captured.err and "resumed from" in captured.out
    summary = json.loads(captured.out[captured.out.rindex("\n{\n"):])
    assert summary["steps"] == 3
    from influencerformer.engine.checkpoint import load_checkpoint

    assert load_checkpoint(run)["config"]["model"]["overrides"]["num_queries"] == 6  # not the defaults' 100
    assert cli.main([*base, "--steps", "1", "--overwrite"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1


def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--device", "cpu", "--steps", "1", *SETS]) == 0
    (run / "checkpoints" / "step_0000001.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    for argv in (["evaluate", str(run)], ["train", "--resume", "--out", str(run), "--steps", "2"],
                 ["predict", str(run)]):
        assert cli.main(argv) == 2, argv
        line = _one_error_line(capsys)
        assert "step_0000001.pt" in line and "damaged" in line, line


def test_output_paths_are_checked_before_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert cli.main(["train", "--out", str(out), "--steps", "1", *SETS]) == 2
        assert "is not a folder" in _one_error_line(capsys)


def test_evaluate_checks_its_arguments_before_work_and_names_changed_model_fields(tmp_path, capsys, monkeypatch):
    from influencerformer.engine import build as build_module
    from influencerformer.engine import images as images_module

    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--device", "cpu", "--steps", "1", *SETS]) == 0
    capsys.readouterr()
    monkeypatch.setattr(build_module, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated anyway"))
    (tmp_path / "file").write_text("x")
    cases = [(["--output", str(tmp_path)], "is a folder"), (["--output", str(tmp_path / "file" / "m.json")],
                                                             "is a file, not a folder"),
             (["--num-images", "-1"], "--num-images must be ≥ 1, got -1")]
    for extra, words in cases:
        assert cli.main(["evaluate", str(run), *extra]) == 2
        assert words in _one_error_line(capsys)
    monkeypatch.undo()
    assert cli.main(["evaluate", str(run), "--set", "model.num_queries=7", "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "model.num_queries: 6 in the checkpoint, 7 now" in line and "step_0000001.pt" in line
    assert cli.main(["predict", str(run), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)


def test_evaluate_writes_null_with_a_reason_for_undefined_ap(tmp_path, capsys, monkeypatch):
    from influencerformer.engine import build as build_module
    from influencerformer.engine import images as images_module

    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--device", "cpu", "--steps", "1", *SETS]) == 0
    real = images_module.Evaluator.__call__

    def no_ground_truth(self, model, device="cpu"):  # what COCOeval gives for a split without instances
        return {**real(self, model, device), "AP": float("nan"), "AP50": float("nan")}

    monkeypatch.setattr(images_module.Evaluator, "__call__", no_ground_truth)
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", str(run), "--output", str(out), "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())  # strict JSON: NaN would not parse in most readers
    assert metrics["AP"] is None and metrics["AP50"] is None and 0 <= metrics["AP75"] <= 1
    assert "no ground-truth instance" in metrics["undefined"]["AP"]
    assert "NaN" not in out.read_text()


def test_check_data_lists_every_problem_with_its_file(tmp_path, capsys):
    from PIL import Image

    from influencerformer.data import Shapes2D, export_coco

    root = tmp_path / "coco"
    for split, n in (("train", 3), ("val", 2)):
        export_coco(Shapes2D(split, preset="medium", num_images=n), root / split)
    assert cli.main(["check-data", "--data", "coco", "--data-root", str(root)]) == 0
    assert "train: 3 images, 0 problem(s); val: 2 images, 0 problem(s)" in capsys.readouterr().err
    ann_file = root / "train" / "annotations.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][-1]["segmentation"] = [[1, 2, 3, 4]]  # a bad polygon in the last image
    ann_file.write_text(json.dumps(data))
    images = sorted((root / "val" / "images").iterdir())
    images[1].write_bytes(b"garbage")  # a corrupt image
    assert cli.main(["check-data", "--data", "coco", "--data-root", str(root)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2
    assert str(ann_file) in out[0] and f"annotation id {data['annotations'][-1]['id']}" in out[0]
    assert str(images[1]) in out[1] and "cannot be decoded" in out[1]
    # training on it fails before the first step: one line naming the file, exit 2
    run = tmp_path / "run"
    assert cli.main(["train", "--data", "coco", "--data-root", str(root), "--steps", "1", "--out", str(run),
                     *SETS]) == 2
    line = _one_error_line(capsys)
    assert str(ann_file) in line and "bad segmentation" in line
    assert Image  # noqa


def test_check_data_on_point_files_and_built_in_data(tmp_path, capsys):
    import numpy as np

    from influencerformer.data.pointcloud import write_preprocessed
    from influencerformer.data.rooms3d import Rooms3D

    scene = Rooms3D("train", num_scenes=1, points_per_room=(300, 400))[0]
    write_preprocessed(scene, tmp_path, "Area_1_office_1")
    write_preprocessed(scene, tmp_path, "Area_5_office_1")
    assert cli.main(["check-data", "--data", "s3dis", "--data-root", str(tmp_path)]) == 0
    points = np.fromfile(tmp_path / "points" / "Area_5_office_1.bin", dtype=np.float32).reshape(-1, 6)
    points[3, 2] = np.nan
    points.tofile(tmp_path / "points" / "Area_5_office_1.bin")
    capsys.readouterr()
    assert cli.main(["check-data", "--data", "s3dis", "--data-root", str(tmp_path)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "points/Area_5_office_1.bin: point 3 has a non-finite value" in out[0]
    assert cli.main(["check-data", "--data", "rooms3d"]) == 0
    assert cli.main(["check-data", "--data", "scannet", "--data-root", str(tmp_path / "nope")]) == 2


def test_a_data_error_from_a_loader_worker_is_still_one_line():
    from influencerformer.data.errors import DataError

    worker = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                       '  File "x.py", line 1, in f\ninfluencerformer.data.errors.DataError: image file /d/a.png '
                       "(image id 3) cannot be decoded: UnidentifiedImageError: bad")
    assert cli._one_line(worker) == "image file /d/a.png (image id 3) cannot be decoded: UnidentifiedImageError: bad"
    assert cli._one_line(FileNotFoundError(2, "No such file or directory", "/x/y")) == "/x/y: No such file or directory"


def test_read_only_output_folders_are_one_line_before_work(tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real(path, mode))
    argvs = [["train", "--out", str(locked / "run"), "--steps", "1", *SETS],
             ["compare", "--out", str(locked), "--steps", "1", *SETS]]
    for argv in argvs:
        assert cli.main(argv) == 2, argv
        assert f"{locked} is not writable" in _one_error_line(capsys)
    assert list(locked.iterdir()) == []
