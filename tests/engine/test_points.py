"""Point clouds in the engine: sampling collate, every dataset layout, 3D evaluation (oracle = 1),
train → evaluate agreement, kill-and-resume, compare's 3D report and CLI errors."""
import json

import pytest
import torch
import torch.nn.functional as F

from influencerformer.cli import main
from influencerformer.data.rooms3d import Rooms3D
from influencerformer.engine.checkpoint import load_checkpoint
from influencerformer.engine.compare import compare
from influencerformer.engine.build import build_dataset, evaluate_checkpoint
from influencerformer.engine.config import ConfigError, DataConfig, load_config
from influencerformer.engine.evaluate import model_inputs
from influencerformer.engine.points import PointEvaluator, PointScenes, collate_points, point_owner
from influencerformer.engine.train import train

TINY_3D = ["data.name=rooms3d", "data.points_per_room=[1500,2500]", "data.num_points=512", "data.num_train=4",
           "data.num_val=2", "data.batch_size=2", "model.num_queries=8", "model.hidden_dim=16", "model.nheads=2",
           "model.dim_feedforward=32", "model.num_decoder_layers=1", "model.num_levels=2",
           "criterion.num_points=null", "optim.warmup_steps=2", "train.log_every=1", "train.device=cpu",
           "train.progress=false", "train.probe_images=2"]


def tiny_3d(tmp_path, *extra):
    return load_config(None, TINY_3D + [f"train.out_dir={tmp_path}", *extra])


def _scene(instance_labels, sem_labels):
    n = len(instance_labels)
    index = torch.arange(n, dtype=torch.float32)
    return {"coords": torch.stack([index, -index, torch.zeros(n)], 1) + 5.0,
            "colors": torch.stack([index / 100, torch.zeros(n), torch.zeros(n)], 1),  # colour red = point index
            "instance_labels": torch.tensor(instance_labels), "sem_labels": torch.tensor(sem_labels),
            "scene_id": f"s{n}"}


def test_collate_samples_distinct_points_and_their_targets():
    inst = [0, 0, 0, 1, 1, -1, 2, 2, 2, 2]
    sem = [3, 3, 3, 5, 5, 0, 7, 7, 7, 7]
    items = [_scene(inst, sem), _scene(inst[::-1], sem[::-1])]
    batch = collate_points(items, num_points=6, class_map=list(range(8)), generator=torch.Generator().manual_seed(1))
    assert batch["coords"].shape == batch["colors"].shape == (2, 6, 3)
    assert batch["scene_ids"] == ["s10", "s10"]
    for b, item in enumerate(items):
        index = (batch["colors"][b, :, 0] * 100).round().long()
        assert len(set(index.tolist())) == 6  # without replacement
        assert torch.equal(batch["coords"][b], item["coords"][index] - item["coords"][index].amin(0))
        target = batch["targets"][b]
        picked = item["instance_labels"][index]
        ids = sorted(set(picked.tolist()) - {-1})
        assert torch.equal(target["masks"], torch.stack([picked == i for i in ids]))
        assert target["labels"].tolist() == [int(item["sem_labels"][index][picked == i][0]) for i in ids]


def test_collate_fills_small_scenes_and_requires_equal_sizes_without_sampling():
    small, large = _scene([0, 0, 1], [1, 1, 2]), _scene([0] * 5, [1] * 5)
    batch = collate_points([small], num_points=8, class_map=[0, 1, 2])
    index = (batch["colors"][0, :, 0] * 100).round().long()
    assert sorted(set(index.tolist())) == [0, 1, 2] and len(index) == 8  # every point, then repeats
    assert collate_points([small], num_points=None, class_map=[0, 1, 2])["coords"].shape == (1, 3, 3)
    with pytest.raises(ValueError, match=r"different point counts \[3, 5\]: set data.num_points"):
        collate_points([small, large], num_points=None, class_map=[0, 1, 2])


def test_point_owner_prefers_the_best_score():
    masks = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert point_owner(masks, torch.tensor([0.2, 0.9])).tolist() == [0, 1, 1, -1]
    assert point_owner(masks[:0]).tolist() == [-1, -1, -1, -1]


class _Oracle(torch.nn.Module):
    """Returns each scene's ground truth as confident queries (scenes told apart by their point count)."""

    def __init__(self, scenes, num_classes, num_queries=40):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.answers = {}
        for item in scenes:
            inst, sem = item["instance_labels"], item["sem_labels"]
            ids = sorted(set(inst.tolist()) - {-1})
            logits = torch.full((num_queries, num_classes + 1), -10.0)
            logits[:, -1] = 10.0  # "no object" by default
            masks = torch.full((num_queries, len(inst)), -10.0)
            for q, i in enumerate(ids):
                logits[q, -1], logits[q, int(sem[inst == i][0])] = -10.0, 10.0
                masks[q, inst == i] = 10.0
            self.answers[len(inst)] = (logits, masks)

    def forward(self, coords, colors):
        logits, masks = self.answers[coords.shape[1]]
        return {"pred_logits": logits[None], "pred_masks": masks[None]}


def test_evaluator_gives_one_to_a_perfect_model():
    rooms = Rooms3D("val", num_scenes=2, points_per_room=(3000, 4000), seed=3)
    dataset = PointScenes(rooms, Rooms3D.class_names, range(13), cache=True)
    info = build_dataset(DataConfig(name="rooms3d", num_val=2, points_per_room=[3000, 4000], seed=3), "val")[1]
    metrics = PointEvaluator(dataset, info)(_Oracle([dataset[0], dataset[1]], 13))
    assert metrics["AP"] == metrics["AP50"] == metrics["AP25"] == 1.0
    assert metrics["F1"] == 1.0 and metrics["duplicate_rate"] == 0.0
    assert 0.0 < metrics["no_object_queries"] < 1.0


def test_every_point_layout_builds_with_its_classes(tmp_path):
    rooms = Rooms3D("train", num_scenes=2, points_per_room=(800, 900))
    for area in (1, 2, 3, 4, 5, 6):  # the raw split needs every one of its areas (train 1-4, 6; val 5)
        rooms.write_s3dis_raw(str(tmp_path / "raw"), area=area)
    rooms.write_preprocessed(str(tmp_path / "pre"), "s3dis", area=2)
    rooms.write_preprocessed(str(tmp_path / "pre"), "s3dis", area=5)
    rooms.write_preprocessed(str(tmp_path / "scannet"), "scannet")
    cases = [("s3dis", tmp_path / "raw", 13, 10), ("s3dis", tmp_path / "pre", 13, 2),
             ("scannet", tmp_path / "scannet", 18, 2)]
    for name, root, num_classes, num_train in cases:
        for split, size in (("train", num_train), ("val", 2)):
            ds, info = build_dataset(DataConfig(name=name, root=str(root)), split)
            assert len(ds) == size and info.num_classes == num_classes == len(ds.class_names), (name, root, split)
    raw = build_dataset(DataConfig(name="s3dis", root=str(tmp_path / "raw")), "val")[0]
    assert len(raw[1]["coords"]) == len(rooms[1]["coords"])  # rooms in order, every point read back
    with pytest.raises(ConfigError, match="s3dis train split: .*Area_1: no such directory"):
        build_dataset(DataConfig(name="s3dis", root=str(tmp_path / "scannet" / "points")), "train")


@pytest.mark.parametrize("criterion", ["hungarian", "influencer"])
def test_train_then_evaluate_agree_and_resume_is_exact(tmp_path, criterion):
    extra = ["train.steps=4", "train.eval_every=4", "train.checkpoint_every=2", f"criterion.name={criterion}"]
    result = train(tiny_3d(tmp_path / "full", *extra))
    assert {"AP", "AP50", "AP25", "F1", "duplicate_rate"} <= set(result) and "AP75" not in result
    again = evaluate_checkpoint(tmp_path / "full", device="cpu")
    assert {k: again[k] for k in ("AP", "AP25", "F1")} == {k: result[k] for k in ("AP", "AP25", "F1")}
    train(tiny_3d(tmp_path / "killed", *extra), stop_at=2)
    train(tiny_3d(tmp_path / "killed", *extra), resume=True)  # the sampled points continue exactly
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "killed")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_compare_writes_a_3d_report(tmp_path):
    cfg = tiny_3d(tmp_path, "train.steps=2", "train.eval_every=2")
    results = compare(cfg, ["hungarian", "influencer"], [0], tmp_path / "cmp", num_images=1)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| AP25 |" in report and "AP75" not in report and "PQ |" not in report and "loss share" in report
    assert "mIoU" not in report  # no semantic head: no column
    assert (tmp_path / "cmp" / "masks.png").stat().st_size > 0
    runs = json.loads((tmp_path / "cmp" / "results.json").read_text())["runs"]
    assert [r["criterion"] for r in runs] == ["hungarian", "influencer"] == [r["criterion"] for r in results["runs"]]
    assert all(0 < r["assign_share"] < r["loss_share"] < 1 for r in runs)  # the assignment is part of the loss
    assert "assign. share" in report


def test_point_config_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown key model.backbone_widths; valid keys: .*voxel_size"):
        load_config(None, ["data.name=rooms3d", "model.backbone_widths=[8,16]"])
    with pytest.raises(ConfigError, match="data.name=scannet needs a data root"):
        load_config(None, ["data.name=scannet"])
    with pytest.raises(ConfigError, match=r"data.points_per_room must be \[low, high\]"):
        load_config(None, ["data.name=rooms3d", "data.points_per_room=[5,2]"])
    train(tiny_3d(tmp_path, "train.steps=1", "train.eval_every=0", "train.probe_images=0"))
    assert main(["predict", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "pred")]) == 0  # top-down views
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["rooms3d_val_00000.png", "rooms3d_val_00001.png"]
    assert main(["predict", str(tmp_path), "--device", "cpu", "--images", str(tmp_path)]) == 2
    assert "--images reads image files; rooms3d is a point-cloud run" in capsys.readouterr().err


def test_point_data_without_a_config_file_gets_the_cpu_3d_budget():
    from pathlib import Path

    shipped = load_config(Path(__file__).parents[2] / "configs" / "rooms3d_cpu.yaml")
    assert load_config(None, ["data.name=rooms3d"]).to_dict() == shipped.to_dict()
    assert load_config(None, ["data.name=shapes2d"]).train.steps == 3000  # images keep their own defaults


def test_collate_keeps_the_super_points_of_the_sampled_points():
    item = {**_scene([0, 0, 1, 1, -1], [1, 1, 2, 2, 0]), "super_points": torch.tensor([7, 7, 8, 9, 9])}
    batch = collate_points([item], num_points=3, class_map=None, generator=torch.Generator().manual_seed(0))
    index = (batch["colors"][0, :, 0] * 100).round().long()
    assert torch.equal(batch["super_points"][0], item["super_points"][index])
    assert model_inputs(batch)[2] is batch["super_points"]  # the model receives them
    assert "super_points" not in collate_points([_scene([0], [1])], num_points=None, class_map=None)


def test_scannet_with_super_points_trains_and_evaluates(tmp_path):
    from influencerformer.data.pointcloud import write_preprocessed
    from influencerformer.data.s3dis import S3DIS_TO_NYU40

    rooms = Rooms3D("train", num_scenes=2, points_per_room=(1500, 2000))
    for i in range(2):
        scene = dict(rooms[i])
        scene["sem_labels"] = torch.as_tensor(S3DIS_TO_NYU40)[scene["sem_labels"]]
        scene["super_points"] = (scene["coords"][:, 0] // 0.3).long() * 1000 + (scene["coords"][:, 1] // 0.3).long()
        write_preprocessed(scene, tmp_path / "scannet", f"scene{i:04d}_00")
    cfg = tiny_3d(tmp_path / "run", "data.name=scannet", f"data.root={tmp_path / 'scannet'}", "train.steps=2")
    result = train(cfg)
    assert result["steps"] == 2 and result["AP25"] >= 0.0
    assert evaluate_checkpoint(tmp_path / "run", device="cpu")["AP"] == result["AP"]


# ------------------------------------------------------------- semantic head, seeded criterion, real layouts


def test_collate_targets_carry_the_sampled_points_semantic_labels():
    item = _scene([0, 0, 1, 1, -1], [1, 1, 2, 2, -1])
    batch = collate_points([item], num_points=3, class_map=None, generator=torch.Generator().manual_seed(0))
    index = (batch["colors"][0, :, 0] * 100).round().long()
    assert torch.equal(batch["targets"][0]["sem_labels"], item["sem_labels"][index])


class _SemanticOracle(_Oracle):
    """The oracle plus semantic logits: the true class of every labelled point (class 0 where unlabelled)."""

    def __init__(self, scenes, num_classes):
        super().__init__(scenes, num_classes)
        self.semantics = {len(s["sem_labels"]): F.one_hot(s["sem_labels"].clamp(min=0), num_classes).float() * 10
                          for s in scenes}

    def forward(self, coords, colors):
        return {**super().forward(coords, colors), "sem_logits": self.semantics[coords.shape[1]][None]}


def test_evaluator_reports_miou_only_for_a_model_with_a_semantic_head():
    rooms = Rooms3D("val", num_scenes=2, points_per_room=(3000, 4000), seed=3)
    dataset = PointScenes(rooms, Rooms3D.class_names, range(13), cache=True)
    info = build_dataset(DataConfig(name="rooms3d", num_val=2, points_per_room=[3000, 4000], seed=3), "val")[1]
    scenes = [dataset[0], dataset[1]]
    assert "mIoU" not in PointEvaluator(dataset, info)(_Oracle(scenes, 13))
    metrics = PointEvaluator(dataset, info)(_SemanticOracle(scenes, 13))
    assert metrics["mIoU"] == 1.0 and metrics["AP"] == 1.0
    wrong = _SemanticOracle(scenes, 13)
    for logits in wrong.semantics.values():
        logits[:, [0, 1]] = logits[:, [1, 0]]  # ceiling and floor swapped: their IoU is 0, the other classes 1
    present = len(set(torch.cat([s["sem_labels"] for s in scenes]).tolist()) - {-1})
    assert PointEvaluator(dataset, info)(wrong)["mIoU"] == pytest.approx((present - 2) / present)


def _cli_run(tmp_path, name, *argv, capsys=None):
    """train (CLI) a tiny model on ``name``; returns the exit status and the run folder."""
    tiny = [item for item in TINY_3D if not item.startswith("data.name")]
    args = ["train", "--data", name, "--steps", "2", "--out", str(tmp_path / "run"), *argv]
    for item in tiny + ["train.eval_every=2"]:
        args += ["--set", item]
    return main(args), tmp_path / "run"


def test_seeded_criterion_and_semantic_head_train_and_evaluate_from_the_cli(tmp_path, capsys):
    code, run = _cli_run(tmp_path, "rooms3d", "--criterion", "seeded", "--set", "model.query_init=sampled",
                         "--set", "model.semantic_head=true")
    assert code == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert all("loss_sem" in r and "loss_mask_0" in r for r in train_lines)
    final = [r for r in lines if r["kind"] == "eval"][-1]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu", "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert {k: again[k] for k in ("AP", "AP25", "mIoU")} == {k: final[k] for k in ("AP", "AP25", "mIoU")}
    code, _ = _cli_run(tmp_path / "learned", "rooms3d", "--criterion", "seeded")
    assert code == 2 and "set model.query_init=sampled" in capsys.readouterr().err


def _raw_s3dis(tmp_path):
    rooms = Rooms3D("train", num_scenes=1, points_per_room=(400, 500))
    for area in (1, 2, 3, 4, 5, 6):  # the raw split needs every one of its areas (train 1-4, 6; val 5)
        rooms.write_s3dis_raw(str(tmp_path / "raw"), area=area)
    return tmp_path / "raw", []


def _prepared_s3dis(tmp_path):
    """The release zip layout (Areas 1 and 5), through `influencerformer prepare s3dis`."""
    import zipfile

    from influencerformer.data import prepare

    top = tmp_path / "Stanford3dDataset_v1.2_Aligned_Version"
    Rooms3D("train", num_scenes=2, points_per_room=(400, 500)).write_s3dis_raw(str(top), area=1)
    Rooms3D("val", num_scenes=1, points_per_room=(400, 500)).write_s3dis_raw(str(top), area=5)
    zip_path = tmp_path / prepare.S3DIS_ZIP_NAME
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(top.rglob("*.txt")):
            zf.write(path, path.relative_to(tmp_path).as_posix())
    assert main(["prepare", "s3dis", "--zip", str(zip_path), "--root", str(tmp_path / "pre")]) == 0
    return tmp_path / "pre", []


def _scannet(tmp_path):
    from influencerformer.data.pointcloud import write_preprocessed
    from influencerformer.data.s3dis import S3DIS_TO_NYU40

    rooms = Rooms3D("train", num_scenes=2, points_per_room=(800, 900))
    for i in range(2):
        scene = dict(rooms[i])
        scene["sem_labels"] = torch.as_tensor(S3DIS_TO_NYU40)[scene["sem_labels"]]
        scene["super_points"] = (scene["coords"][:, 0] // 0.3).long() * 1000 + (scene["coords"][:, 1] // 0.3).long()
        write_preprocessed(scene, tmp_path / "scannet", f"scene{i:04d}_00")
    return tmp_path / "scannet", ["--set", "model.num_semantic_classes=20"]  # 20 semantic, 18 instance classes


@pytest.mark.parametrize("layout", [_raw_s3dis, _prepared_s3dis, _scannet], ids=["s3dis-raw", "s3dis-prepared",
                                                                                 "scannet"])
def test_real_layouts_go_through_train_and_evaluate_on_the_cli(tmp_path, layout, capsys):
    root, extra = layout(tmp_path)
    name = "scannet" if layout is _scannet else "s3dis"
    code, run = _cli_run(tmp_path, name, "--data-root", str(root), "--set", "model.semantic_head=true", *extra)
    assert code == 0, capsys.readouterr().err
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert main(["evaluate", str(run), "--device", "cpu", "--output", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert {"AP", "AP50", "AP25", "mIoU", "F1"} <= set(metrics) and 0.0 <= metrics["mIoU"] <= 1.0
    assert {k: metrics[k] for k in ("AP", "mIoU")} == {k: final[k] for k in ("AP", "mIoU")}


def test_compare_report_gets_an_miou_column_with_a_semantic_head(tmp_path):
    cfg = tiny_3d(tmp_path, "train.steps=2", "train.eval_every=2", "model.query_init=sampled",
                  "model.semantic_head=true")
    compare(cfg, ["hungarian", "seeded"], [0], tmp_path / "cmp", num_images=1)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| AP25 | mIoU |" in report and "- mIoU: semantic mIoU" in report


def test_seeded_config_is_the_cpu_budget_with_sampled_queries_and_checked_kwargs():
    from pathlib import Path

    configs = Path(__file__).parents[2] / "configs"
    seeded = load_config(configs / "rooms3d_seeded.yaml", criteria=["hungarian", "seeded"]).to_dict()
    cpu = load_config(configs / "rooms3d_cpu.yaml").to_dict()
    assert seeded["model"]["overrides"] == {"query_init": "sampled", "semantic_head": True}
    assert seeded["criterion"] == {"name": "seeded", "kwargs": {"num_points": None, "per_instance": 1}}
    assert seeded["data"] == cpu["data"] and seeded["optim"] == cpu["optim"]
    with pytest.raises(ConfigError, match="unknown key criterion.epsilon; valid keys: .*per_instance"):
        load_config(None, ["data.name=rooms3d", "criterion.name=seeded", "criterion.epsilon=0.1"])
    with pytest.raises(ConfigError, match="criterion 'seeded': per_instance must be None or an int >= 1"):
        from influencerformer.engine.build import build_criterion

        cfg = load_config(None, ["data.name=rooms3d", "criterion.name=seeded", "criterion.per_instance=0",
                                 "model.query_init=sampled"])
        build_criterion(cfg, 13)


def test_bench_config_is_the_cpu_budget_trained_longer():
    from pathlib import Path

    configs = Path(__file__).parents[2] / "configs"
    bench = load_config(configs / "rooms3d_bench.yaml").to_dict()
    cpu = load_config(configs / "rooms3d_cpu.yaml").to_dict()
    assert bench["data"] == cpu["data"] and bench["model"] == cpu["model"] and bench["criterion"] == cpu["criterion"]
    assert (bench["optim"]["lr"], bench["train"]["steps"], bench["train"]["eval_every"]) == (2e-3, 1500, 250)
    assert {k: v for k, v in bench["optim"].items() if k != "lr"} == {k: v for k, v in cpu["optim"].items() if k != "lr"}
