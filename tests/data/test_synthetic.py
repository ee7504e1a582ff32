import math

import numpy as np
import pytest
import torch

from influencerformer.data import SHAPES_PRESETS, Shapes2D
from influencerformer.data.synthetic import VOID, make_config, rasterize_shape


def _check_item(item, cfg, num_things=4, num_stuff=0):
    size = cfg.image_size
    image, masks, labels, sem = item["image"], item["masks"], item["labels"], item["sem_seg"]
    assert image.dtype == torch.float32 and image.shape == (3, size, size)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert masks.dtype == torch.bool and masks.shape[1:] == (size, size)
    assert labels.dtype == torch.int64 and labels.shape == (masks.shape[0],)
    assert ((labels >= 0) & (labels < num_things)).all()
    assert masks.sum(0).max() <= 1, "masks must be disjoint"
    assert (masks.flatten(1).sum(1) >= cfg.min_area).all()
    # sem_seg agrees with the instance masks; elsewhere only stuff ids or void
    owner_label = (masks * (labels[:, None, None] + 1)).sum(0) - 1
    thing = masks.any(0)
    assert torch.equal(sem[thing], owner_label[thing])
    rest = sem[~thing]
    assert ((rest == VOID) | ((rest >= num_things) & (rest < num_things + num_stuff))).all()


@pytest.mark.parametrize("preset", ["default", "crowded", "medium"])
def test_items_are_well_formed(preset):
    ds = Shapes2D("train", preset=preset, num_images=12, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image_id"] == i
        _check_item(item, ds.config, num_stuff=len(ds.stuff_classes))


def test_attributes_and_lengths():
    ds = Shapes2D("val")
    assert len(ds) == 200 and len(Shapes2D("train")) == 2000
    assert ds.thing_classes == ["rectangle", "ellipse", "triangle", "ring"]
    assert ds.num_classes == 4 and ds.category_ids == [1, 2, 3, 4]
    assert ds.stuff_classes == ["sky", "grass"]
    assert Shapes2D(preset="crowded").stuff_classes == []
    with pytest.raises(IndexError, match="out of range for 200"):
        ds[200]


def test_default_preset_has_stuff_regions():
    ds = Shapes2D("train", num_images=10)
    present = set()
    for i in range(len(ds)):
        stuff = ds[i]["sem_seg"].unique()
        n_stuff = int(((stuff >= 4) & (stuff < 6)).sum())
        assert 1 <= n_stuff <= 2  # 1-2 stuff regions per image
        present |= set(stuff.tolist())
    assert {4, 5} <= present


def test_deterministic_per_seed_split_index():
    a, b = Shapes2D("train", preset="crowded", seed=7), Shapes2D("train", preset="crowded", seed=7)
    for i in (0, 5):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["masks"], y["masks"])
        assert torch.equal(x["labels"], y["labels"])
    other = Shapes2D("train", preset="crowded", seed=8)[0]
    assert not torch.equal(other["image"], a[0]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])


def test_val_never_repeats_train():
    train = torch.stack([Shapes2D("train", preset="medium", num_images=50)[i]["image"] for i in range(50)])
    val = torch.stack([Shapes2D("val", preset="medium", num_images=50)[i]["image"] for i in range(50)])
    distance = (train[:, None] - val[None]).abs().flatten(2).amax(2)  # (50, 50)
    assert distance.min() > 0.1


def test_crowded_counts_in_documented_range():
    ds = Shapes2D("train", preset="crowded", num_images=200)
    counts = np.array([len(ds[i]["labels"]) for i in range(len(ds))])
    # docstring: mean 24.5, min 9, max 39 over these 200 images; docs/background.md: about 23 (8-37)
    assert 21.0 <= counts.mean() <= 27.0
    assert counts.min() >= 5 and counts.max() <= 40
    labels = torch.cat([ds[i]["labels"] for i in range(20)])
    assert set(labels.tolist()) == {0, 1, 2, 3}


def test_medium_preset_matches_spec():
    ds = Shapes2D("train", preset="medium", num_images=100)
    cfg = ds.config
    assert (cfg.image_size, cfg.min_instances, cfg.max_instances) == (64, 4, 15)
    assert (cfg.radius_min, cfg.radius_max, cfg.min_area) == (4.0, 10.0, 15)
    counts = np.array([len(ds[i]["labels"]) for i in range(len(ds))])
    assert counts.max() <= 15 and 5.0 <= counts.mean() <= 13.0


def test_overrides_and_errors():
    ds = Shapes2D(preset="crowded", image_size=64, max_instances=12, num_images=3)
    assert ds[0]["image"].shape == (3, 64, 64) and len(ds[0]["labels"]) <= 12
    assert SHAPES_PRESETS["crowded"].image_size == 128  # the preset itself is untouched
    with pytest.raises(ValueError, match=r"unknown shapes2d option\(s\) \['radius'\]; valid keys: .*radius_min"):
        Shapes2D(radius=3)
    with pytest.raises(ValueError, match="unknown shapes2d preset 'huge'.*crowded"):
        Shapes2D(preset="huge")
    with pytest.raises(ValueError, match=r"min_instances must be in \[0, 3\], got 5"):
        make_config(min_instances=5, max_instances=3)
    with pytest.raises(ValueError, match="split must be one of"):
        Shapes2D("test")


def _area(kind, rx, ry, angle=0.0):
    window, inside, _ = rasterize_shape(kind, 64.0, 64.0, rx, ry, angle, 128)
    return int(inside.sum()), inside


def test_rasterized_shapes_have_known_areas():
    # pixel centres sit at half-integers, so an axis-aligned 20 x 12 rectangle covers exactly 240
    assert _area(0, 10.0, 6.0)[0] == 240
    assert _area(0, 10.0, 6.0, math.pi / 2)[1].sum(0).max() == 20  # rotated: 20 rows tall
    # continuous areas (pi rx ry; equilateral triangle of circumradius 1.25; ring inner ratio 0.6)
    assert _area(1, 40.0, 24.0)[0] == pytest.approx(math.pi * 960, rel=0.02)
    assert _area(2, 40.0, 24.0)[0] == pytest.approx(3 * math.sqrt(3) / 4 * 1.25**2 * 960, rel=0.02)
    ring_area, ring = _area(3, 30.0, 30.0)
    assert ring_area == pytest.approx(math.pi * 900 * (1 - 0.36), rel=0.02)
    assert not ring[ring.shape[0] // 2, ring.shape[1] // 2]  # the hole
    assert rasterize_shape(0, -50.0, -50.0, 5.0, 5.0, 0.0, 128) is None


def test_generation_is_fast_enough_for_training():
    import time

    ds = Shapes2D("train", preset="crowded", num_images=50)
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    per_image = (time.perf_counter() - start) / len(ds)
    assert per_image < 0.05  # measured ~2 ms; generous bound for a loaded 2-core machine
