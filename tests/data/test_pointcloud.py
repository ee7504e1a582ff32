"""Preprocessed (mmdet3d layout) point clouds: exact round trips, ScanNet's NYU40 mapping on
hand-written masks, splits, length checks, and criterion targets from per-point labels."""

import numpy as np
import pytest
import torch

from influencerformer.data.errors import DataError
from influencerformer.data.pointcloud import (
    SCANNET_INST_CLASSES,
    SCANNET_SEM_CLASSES,
    PreprocessedPointDataset,
    instance_targets,
    write_preprocessed,
)
from influencerformer.data.rooms3d import Rooms3D
from influencerformer.data.s3dis import S3DIS_CLASSES, S3DIS_TO_NYU40

SMALL = (2000, 2500)
KEYS = ("coords", "colors", "sem_labels", "instance_labels")


@pytest.fixture(scope="module")
def rooms():
    return Rooms3D("val", num_scenes=2, points_per_room=SMALL, seed=2)


def test_s3dis_round_trip_is_exact(rooms, tmp_path):
    names = rooms.write_preprocessed(str(tmp_path), "s3dis", area=5)
    assert names == ["Area_5_room_1", "Area_5_room_2"]
    read = PreprocessedPointDataset(tmp_path, "s3dis", split="test")
    assert read.scenes == names and read.class_names == list(S3DIS_CLASSES)
    for i in range(2):
        for key in KEYS:
            assert torch.equal(read[i][key], rooms[i][key]), key
        assert read[i]["scene_id"] == names[i]
    assert len(PreprocessedPointDataset(tmp_path, "s3dis", split="train")) == 0  # Area 5 is the test area


def test_scannet_round_trip_maps_nyu40_to_benchmark_classes(rooms, tmp_path):
    rooms.write_preprocessed(str(tmp_path), "scannet")
    read = PreprocessedPointDataset(tmp_path, "scannet", split="val")  # no split list: every scene
    assert read.scenes == ["scene0000_00", "scene0001_00"]
    item, source = read[0], rooms[0]
    assert torch.equal(item["coords"], source["coords"]) and torch.equal(item["colors"], source["colors"])
    # S3DIS class → NYU40 id → ScanNet's 20 semantic classes (ceiling, beam, column, board, clutter: none)
    nyu = torch.as_tensor(S3DIS_TO_NYU40)[source["sem_labels"]]
    names = {1: "wall", 2: "floor", 5: "chair", 6: "sofa", 7: "table", 8: "door", 9: "window", 10: "bookshelf"}
    want = torch.tensor([SCANNET_SEM_CLASSES.index(names[int(v)]) if int(v) in names else -1 for v in range(41)])[nyu]
    assert torch.equal(item["sem_labels"], want)
    # instances survive only for the 18 instance classes (not wall / floor / unmapped)
    kept = want >= 2
    assert torch.equal(item["instance_labels"] >= 0, kept & (source["instance_labels"] >= 0))
    a, b = item["instance_labels"][kept], source["instance_labels"][kept]
    assert len(torch.unique(torch.stack([a, b]), dim=1).T) == len(a.unique()) == len(b.unique())  # same partition


def _write(root, name, points, inst, sem, super_points=None):
    for key, values in (
        ("points", points),
        ("instance_mask", inst),
        ("semantic_mask", sem),
        ("super_points", super_points),
    ):
        if values is not None:
            (root / key).mkdir(exist_ok=True)
            np.asarray(values).tofile(root / key / f"{name}.bin")


def test_scannet_nyu40_mapping_on_hand_written_masks(tmp_path):
    sem = np.array([1, 2, 3, 39, 40, 0, 22, 14, 14, 5, 5], dtype=np.int64)
    inst = np.array([4, 6, 9, 2, 3, 0, 8, 7, 7, 0, 5], dtype=np.int64)
    points = np.arange(11 * 6, dtype=np.float32).reshape(11, 6) % 256
    _write(tmp_path, "scene0707_00", points, inst, sem, super_points=np.arange(11, dtype=np.int64) // 3)
    item = PreprocessedPointDataset(tmp_path, "scannet", split="all")[0]
    # wall 0, floor 1, cabinet 2, otherfurniture 19, otherprop / unannotated / ceiling -1, desk 12, chair 4
    assert item["sem_labels"].tolist() == [0, 1, 2, 19, -1, -1, -1, 12, 12, 4, 4]
    # instance ids kept for the 18 classes with stored id > 0, renumbered by stored id: 2→0, 5→1, 7→2, 9→3
    assert item["instance_labels"].tolist() == [-1, -1, 3, 0, -1, -1, -1, 2, 2, -1, 1]
    assert item["super_points"].tolist() == (np.arange(11) // 3).tolist()
    assert torch.allclose(item["colors"] * 255, torch.from_numpy(points[:, 3:]))
    targets = instance_targets(
        item["instance_labels"], item["sem_labels"], PreprocessedPointDataset(tmp_path, "scannet").instance_class_map
    )
    # cabinet(2)→0, otherfurniture(19)→17, desk(12)→10, chair(4)→2 in the 18 instance classes
    assert targets["labels"].tolist() == [17, 2, 10, 0]
    assert SCANNET_INST_CLASSES[17] == "otherfurniture" and targets["masks"].sum(1).tolist() == [1, 1, 2, 1]


def test_length_mismatches_name_the_file_and_both_lengths(tmp_path):
    points = np.zeros((10, 6), dtype=np.float32)
    _write(tmp_path, "s", points, np.zeros(9, dtype=np.int64), np.zeros(10, dtype=np.int64))
    with pytest.raises(
        ValueError, match=r"instance_mask/s\.bin: expected 10 values \(one per point of .*points/s\.bin\), got 9"
    ):
        PreprocessedPointDataset(tmp_path, "s3dis", scenes=["s"])[0]
    _write(
        tmp_path, "s", points, np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64), np.zeros(12, dtype=np.int64)
    )
    with pytest.raises(ValueError, match=r"super_points/s\.bin: expected 10 values .* got 12"):
        PreprocessedPointDataset(tmp_path, "scannet", scenes=["s"])[0]
    (tmp_path / "points" / "s.bin").write_bytes(b"\0" * 30)
    with pytest.raises(ValueError, match=r"points/s\.bin: expected a multiple of 24 bytes \(float32 × 6\), got 30"):
        PreprocessedPointDataset(tmp_path, "s3dis", scenes=["s"])[0]
    with pytest.raises(DataError, match=r"points/missing\.bin: no such file \(scene missing\)"):
        PreprocessedPointDataset(tmp_path, "s3dis", scenes=["missing"])  # when built, not at the item
    with pytest.raises(ValueError, match=r"expected 's3dis' or 'scannet', got 'kitti'"):
        PreprocessedPointDataset(tmp_path, "kitti")


def test_scannet_split_lists(tmp_path):
    for name in ("scene0000_00", "scene0001_00", "scene0002_00"):
        _write(
            tmp_path, name, np.zeros((1, 6), dtype=np.float32), np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64)
        )
    (tmp_path / "meta_data").mkdir()
    (tmp_path / "meta_data" / "scannetv2_val.txt").write_text("scene0002_00\nscene0000_00\n")
    assert PreprocessedPointDataset(tmp_path, "scannet", split="val").scenes == ["scene0002_00", "scene0000_00"]
    assert len(PreprocessedPointDataset(tmp_path, "scannet", split="train")) == 3  # no list: every scene


def test_writer_checks_lengths(tmp_path):
    scene = {
        "coords": torch.zeros(3, 3),
        "colors": torch.zeros(3, 3),
        "sem_labels": torch.zeros(2, dtype=torch.long),
        "instance_labels": torch.zeros(3, dtype=torch.long),
    }
    with pytest.raises(ValueError, match=r"write_preprocessed x: expected sem_labels of length 3 .*got 2"):
        write_preprocessed(scene, tmp_path, "x")


def test_instance_targets_known_answer():
    inst = torch.tensor([-1, 3, 3, 0, -1, 0, 7])
    sem = torch.tensor([2, 8, 8, 7, 1, 7, 12])
    t = instance_targets(inst, sem)
    assert t["labels"].tolist() == [7, 8, 12]  # instances in id order 0, 3, 7
    assert t["masks"].dtype == torch.bool and t["masks"].int().tolist() == [
        [0, 0, 0, 1, 0, 1, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ]
    dropped = instance_targets(inst, sem, class_map=[0] * 8 + [-1] * 5)  # class 8 and 12 not evaluated
    assert dropped["labels"].tolist() == [0] and dropped["masks"].shape == (1, 7)
    empty = instance_targets(torch.full((4,), -1), torch.zeros(4, dtype=torch.long))
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 4)
    with pytest.raises(
        ValueError, match=r"expected instance_labels and sem_labels of one shape \(N,\), got \(7,\) and \(6,\)"
    ):
        instance_targets(inst, sem[:6])


# ------------------------------------------------------------------- bad data found early (issue 16)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_coordinates_name_the_file_and_point(tmp_path, value):
    points = np.zeros((10, 6), dtype=np.float32)
    points[7, 1] = value
    _write(tmp_path, "s", points, np.ones(10, dtype=np.int64), np.zeros(10, dtype=np.int64))
    ds = PreprocessedPointDataset(tmp_path, "s3dis", scenes=["s"])
    with pytest.raises(DataError, match=rf"points/s\.bin: point 7 has a non-finite value \(x y z r g b = 0 {value:g} 0"):
        ds[0]


def test_file_lengths_are_checked_when_built_and_check_lists_every_problem(tmp_path):
    from influencerformer.data.pointcloud import check_preprocessed

    points = np.zeros((10, 6), dtype=np.float32)
    _write(tmp_path, "Area_1_a", points, np.zeros(9, dtype=np.int64), np.zeros(10, dtype=np.int64))
    bad = points.copy()
    bad[2, 0] = np.nan
    _write(tmp_path, "Area_1_b", bad, np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64))
    _write(tmp_path, "Area_1_c", points, np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64))
    (tmp_path / "semantic_mask" / "Area_1_c.bin").unlink()
    with pytest.raises(DataError, match=r"instance_mask/Area_1_a\.bin: expected 10 values .* got 9 \(and 1 more"):
        PreprocessedPointDataset(tmp_path, "s3dis", split="train")
    count, problems = check_preprocessed(tmp_path, "s3dis", "train")
    assert count == 3 and len(problems) == 3
    assert "Area_1_a.bin: expected 10 values" in problems[0] and "semantic_mask/Area_1_c.bin: no such file" in problems[1]
    assert "points/Area_1_b.bin: point 2 has a non-finite value" in problems[2]
