"""rooms3d: determinism, the item contract, plausible content, and things that do not intersect."""

import numpy as np
import pytest
import torch

from influencerformer.data.rooms3d import Rooms3D
from influencerformer.data.s3dis import S3DIS_CLASSES

SMALL = (3000, 4000)


@pytest.fixture(scope="module")
def rooms():
    data = Rooms3D("train", num_scenes=6, points_per_room=SMALL, seed=3)
    return [data[i] for i in range(len(data))]


def test_items_are_a_pure_function_of_seed_split_index():
    a = Rooms3D("train", num_scenes=3, points_per_room=SMALL)
    b = Rooms3D("train", num_scenes=3, points_per_room=SMALL)
    for key in ("coords", "colors", "sem_labels", "instance_labels"):
        assert torch.equal(a[2][key], b[2][key])
    assert not torch.equal(a[0]["coords"][:100], a[1]["coords"][:100])
    val = Rooms3D("val", num_scenes=1, points_per_room=SMALL)[0]
    assert val["scene_id"] == "rooms3d_val_00000" and not torch.equal(val["coords"][:100], a[0]["coords"][:100])


def test_item_contract(rooms):
    stuff = torch.tensor([S3DIS_CLASSES.index(c) for c in Rooms3D.stuff_classes])
    for item in rooms:
        n = len(item["coords"])
        assert SMALL[0] <= n <= SMALL[1]
        assert item["coords"].dtype == torch.float32 and item["coords"].shape == (n, 3)
        assert item["colors"].dtype == torch.float32 and item["colors"].shape == (n, 3)
        assert item["sem_labels"].dtype == torch.int64 and item["instance_labels"].dtype == torch.int64
        assert 0 <= item["colors"].min() and item["colors"].max() <= 1
        # 8-bit colour, like a scanner's: every value is k / 255
        k = item["colors"].double() * 255
        assert torch.allclose(k, k.round(), atol=1e-4)
        sem, inst = item["sem_labels"], item["instance_labels"]
        assert 0 <= sem.min() and sem.max() < 13
        assert torch.equal(inst < 0, torch.isin(sem, stuff))  # stuff ↔ no instance
        ids = inst[inst >= 0].unique()
        assert torch.equal(ids, torch.arange(len(ids)))  # contiguous
        pairs = torch.stack([inst, sem], 1)[inst >= 0].unique(dim=0)
        assert len(pairs) == len(ids)  # one class per instance


def test_rooms_have_several_things_of_varied_classes_sizes_and_colours(rooms):
    counts = [int(item["instance_labels"].max()) + 1 for item in rooms]
    assert min(counts) >= 5 and np.mean(counts) >= 10
    classes = torch.cat([item["sem_labels"][item["instance_labels"] >= 0] for item in rooms]).unique().tolist()
    for name in ("table", "chair", "door", "clutter"):
        assert S3DIS_CLASSES.index(name) in classes
    extents, colours = [], []
    for item in rooms:
        chairs = item["instance_labels"][item["sem_labels"] == S3DIS_CLASSES.index("table")].unique()
        for i in chairs:
            m = item["instance_labels"] == i
            extents.append((item["coords"][m].amax(0) - item["coords"][m].amin(0))[:2].max().item())
            colours.append(item["colors"][m].mean(0))
    assert max(extents) - min(extents) > 0.3  # tables of different sizes
    assert torch.stack(colours).std(0).max() > 0.02  # and colours


def test_things_do_not_intersect(rooms):
    for item in rooms:
        thing = item["instance_labels"] >= 0
        inst, xyz = item["instance_labels"][thing], item["coords"][thing].double()
        index = inst[:, None].expand(-1, 3)
        big = torch.full((int(inst.max()) + 1, 3), float("inf"), dtype=torch.float64)
        lo, hi = big.scatter_reduce(0, index, xyz, "amin"), (-big).scatter_reduce(0, index, xyz, "amax")
        # bounding boxes shrunk by 2 cm (point noise is 5 mm, the placement gap 5 cm) never overlap
        lo, hi = lo + 0.02, hi - 0.02
        overlap = ((lo[:, None] < hi[None]) & (lo[None] < hi[:, None])).all(-1)
        overlap.fill_diagonal_(False)
        assert not overlap.any(), f"{item['scene_id']}: instances {overlap.nonzero()[:2].tolist()} intersect"


def test_points_lie_in_the_room_and_hidden_surfaces_are_dropped(rooms):
    for item in rooms:
        xyz, sem = item["coords"], item["sem_labels"]
        floor = xyz[sem == S3DIS_CLASSES.index("floor")]
        assert floor[:, 2].abs().max() < 0.03  # 5 mm noise, mm rounding
        assert (xyz.amin(0) > -0.05).all()
        # no floor point under a sofa base or a column: they would be inside the thing's box
        for name in ("sofa", "column", "bookcase"):
            for i in item["instance_labels"][sem == S3DIS_CLASSES.index(name)].unique():
                box = xyz[item["instance_labels"] == i]
                lo, hi = box.amin(0)[:2] + 0.05, box.amax(0)[:2] - 0.05
                inside = ((floor[:, :2] > lo) & (floor[:, :2] < hi)).all(1)
                assert not inside.any(), f"floor points under {name}"


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"split: expected one of \['test', 'train', 'val'\], got 'dev'"):
        Rooms3D("dev")
    with pytest.raises(ValueError, match=r"points_per_room: expected 1 <= low <= high, got \(10, 5\)"):
        Rooms3D(points_per_room=(10, 5))
    with pytest.raises(IndexError, match="index 2 out of range for 2 scenes"):
        Rooms3D(num_scenes=2, points_per_room=SMALL)[2]
