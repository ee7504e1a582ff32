import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from influencerformer.data import COCOInstanceDataset, Shapes2D, export_coco, find_coco_files
from influencerformer.data.coco import rle_string_counts

H, W = 20, 30


def _uncompressed(mask):
    """Column-major run lengths starting with zeros: COCO's uncompressed RLE, written by hand."""
    flat = mask.T.ravel().astype(np.int64)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0] + runs


def _compressed(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _masks():
    poly = np.zeros((H, W), bool)
    poly[3:9, 2:12] = True  # what the polygon below rasterises to (x in [2, 12), y in [3, 9))
    comp = np.zeros((H, W), bool)
    comp[12:18, 20:28] = True
    unc = np.zeros((H, W), bool)
    unc[10:14, 3:6] = True
    unc[15, 8] = True
    crowd = np.zeros((H, W), bool)
    crowd[0:2, 14:30] = True
    return poly, comp, unc, crowd


def _write_dataset(root, annotations=None, images=None, categories=None):
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "img" / "a.png")
    Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(root / "img" / "b.png")  # grey
    poly, comp, unc, crowd = _masks()
    data = {
        "images": images or [
            {"id": 10, "file_name": "a.png", "height": H, "width": W},
            {"id": 11, "file_name": "b.png", "height": H, "width": W},  # no annotations
        ],
        "categories": categories or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": annotations or [
            {"id": 1, "image_id": 10, "category_id": 7, "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]]},
            {"id": 2, "image_id": 10, "category_id": 3, "iscrowd": 0, "segmentation": _compressed(comp)},
            {"id": 3, "image_id": 10, "category_id": 7,
             "segmentation": {"size": [H, W], "counts": _uncompressed(unc)}},
            {"id": 4, "image_id": 10, "category_id": 3, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": _uncompressed(crowd)}},
        ],
    }
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return root / "img", ann_file


def test_reader_on_hand_written_json(tmp_path):
    ds = COCOInstanceDataset(*_write_dataset(tmp_path))
    poly, comp, unc, crowd = _masks()
    assert ds.category_ids == [3, 7] and ds.class_names == ["dog", "cat"] and ds.num_classes == 2
    assert len(ds) == 2
    item = ds[0]
    assert item["image_id"] == 10 and item["image"].shape == (3, H, W)
    expected = torch.from_numpy(np.stack([poly, comp, unc]))
    assert torch.equal(item["masks"], expected)  # crowd annotation dropped from targets
    assert item["labels"].tolist() == [1, 0, 1]
    pixels = np.asarray(Image.open(tmp_path / "img" / "a.png"), dtype=np.float32) / 255
    assert torch.allclose(item["image"], torch.from_numpy(pixels).permute(2, 0, 1))
    # the crowd annotation stays in the evaluation ground truth, with area / bbox filled in
    assert ds.coco.anns[4]["iscrowd"] == 1 and ds.coco.anns[4]["area"] == crowd.sum()
    assert ds.coco.anns[1]["area"] == 60 and ds.coco.anns[1]["bbox"] == [2, 3, 10, 6]
    empty = ds[1]
    assert empty["masks"].shape == (0, H, W) and empty["labels"].shape == (0,)
    assert empty["image"].shape == (3, H, W)  # grey image converted to RGB


def test_rle_string_parser_matches_pycocotools():
    rng = np.random.default_rng(1)
    for _ in range(50):
        mask = rng.random((H, W)) < rng.random()
        counts = _compressed(mask)["counts"]
        assert rle_string_counts(counts).tolist() == _uncompressed(mask)


def test_round_trip_shapes2d(tmp_path):
    source = Shapes2D("val", preset="crowded", num_images=4, seed=2)
    ann_file = export_coco(source, tmp_path / "export")
    assert ann_file == tmp_path / "export" / "annotations.json"
    data = json.loads(ann_file.read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
    assert all(isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0 for a in data["annotations"])
    reader = COCOInstanceDataset(tmp_path / "export" / "images", ann_file)
    assert reader.category_ids == source.category_ids and len(reader) == 4
    for i in range(4):
        a, b = source[i], reader[i]
        assert a["image_id"] == b["image_id"]
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])
        assert (a["image"] - b["image"]).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG rounding
    areas = {a["id"]: a["area"] for a in data["annotations"]}
    assert areas[1] == source[0]["masks"][0].sum().item()


def test_export_max_images(tmp_path):
    ann_file = export_coco(Shapes2D("val", preset="medium", num_images=5), tmp_path, max_images=2)
    assert len(json.loads(ann_file.read_text())["images"]) == 2
    assert len(list((tmp_path / "images").glob("*.png"))) == 2


def test_resize_and_pad_keep_masks_aligned(tmp_path):
    # the image's red / green channels draw the two masks, so alignment can be read off the image
    yy, xx = np.mgrid[0:H, 0:W]
    m0 = (yy - 8) ** 2 + (xx - 9) ** 2 <= 36
    m1 = (np.abs(yy - 12) <= 4) & (xx >= 17) & (xx <= 27)
    pixels = np.stack([m0, m1, np.zeros_like(m0)], -1).astype(np.uint8) * 255
    (tmp_path / "img").mkdir()
    Image.fromarray(pixels).save(tmp_path / "img" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": _compressed(m)}
                            for k, m in enumerate([m0, m1])]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    for longest, pad in [(15, (12, 16)), (45, 48)]:  # shrink (antialiased) and enlarge
        item = COCOInstanceDataset(tmp_path / "img", tmp_path / "a.json", image_size=longest, pad_to=pad)[0]
        h, w = item["image_size"]
        assert max(h, w) == longest and abs(h / w - H / W) < 0.05
        padded = (pad, pad) if isinstance(pad, int) else pad
        assert item["image"].shape == (3, *padded) and item["masks"].shape == (2, *padded)
        assert torch.equal(item["masks"][0], item["image"][0] > 0.5)
        assert torch.equal(item["masks"][1], item["image"][1] > 0.5)
        assert item["masks"].sum(0).max() <= 1
        assert not item["masks"][:, h:].any() and not item["masks"][:, :, w:].any()
        assert item["orig_size"] == (H, W)


@pytest.mark.parametrize(
    "ann, match",
    [
        ({"segmentation": [[1, 2, 3, 4]]}, r"annotation id 1: bad segmentation: polygon 0 has 4 coordinates"),
        ({"segmentation": []}, r"annotation id 1: bad segmentation: empty polygon list"),
        ({"segmentation": {"size": [5, 5], "counts": "0"}}, r"annotation id 1: bad segmentation: RLE size \[5, 5\]"),
        ({"segmentation": {"size": [H, W], "counts": [3, 4]}}, r"annotation id 1: bad segmentation: RLE runs sum to 7"),
        ({"segmentation": {"size": [H, W], "counts": [300, 2.5, 297.5]}}, r"a flat list of integers"),
        ({"segmentation": {"size": [H, W], "counts": [300, -2, 302]}}, r"negative runs: True"),
        ({"segmentation": {"size": [H, W], "counts": "0;5"}}, r"annotation id 1: bad segmentation: RLE runs sum"),
        ({"segmentation": {"size": [H, W], "counts": "0\x7f"}}, r"annotation id 1: bad segmentation: compressed"),
        ({"segmentation": "oops"}, r"annotation id 1: bad segmentation: expected polygons"),
        ({"category_id": 99}, r"annotation id 1: unknown category id 99 \(known: \[3, 7\]\)"),
        ({"image_id": 55}, r"annotation id 1: unknown image id 55"),
    ],
)
def test_bad_annotations_raise(tmp_path, ann, match):
    base = {"id": 1, "image_id": 10, "category_id": 7, "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]]}
    image_dir, ann_file = _write_dataset(tmp_path, annotations=[{**base, **ann}])
    with pytest.raises(ValueError, match=match):
        COCOInstanceDataset(image_dir, ann_file)[0]


def test_malformed_json_and_missing_fields(tmp_path):
    (tmp_path / "img").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(ValueError, match=r"bad\.json: malformed json: .*line 1"):
        COCOInstanceDataset(tmp_path / "img", bad)
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match=r"bad\.json: 'annotations' must be a list, got NoneType"):
        COCOInstanceDataset(tmp_path / "img", bad)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"image id 1 is missing \['height', 'width'\]"):
        COCOInstanceDataset(tmp_path / "img", bad)
    image = {"id": 1, "file_name": "a.png", "height": 0, "width": 4.5}
    bad.write_text(json.dumps({"images": [image], "categories": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"image id 1: height and width must be positive integers, got \(0, 4.5\)"):
        COCOInstanceDataset(tmp_path / "img", bad)
    with pytest.raises(FileNotFoundError, match="annotation file .*nope.json not found"):
        COCOInstanceDataset(tmp_path / "img", tmp_path / "nope.json")


def test_missing_image_file_and_size_mismatch(tmp_path):
    images = [{"id": 10, "file_name": "a.png", "height": H, "width": W},
              {"id": 12, "file_name": "gone.png", "height": H, "width": W},
              {"id": 13, "file_name": "b.png", "height": H + 1, "width": W}]
    with pytest.raises(FileNotFoundError, match=r"img/gone\.png listed in .*instances\.json not found"):
        COCOInstanceDataset(*_write_dataset(tmp_path, images=images))  # when built, not when its turn comes
    (tmp_path / "img" / "gone.png").write_bytes((tmp_path / "img" / "a.png").read_bytes())
    ds = COCOInstanceDataset(tmp_path / "img", tmp_path / "instances.json")
    with pytest.raises(ValueError, match=r"b\.png \(image id 13\) is 20x30 .* says 21x30"):
        ds[2]


def test_find_coco_files_layouts(tmp_path):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    (coco / "annotations" / "instances_val2017.json").write_text("{}")
    assert find_coco_files(coco, "val") == (coco / "val2017", coco / "annotations" / "instances_val2017.json")
    export = tmp_path / "export"
    (export / "train" / "images").mkdir(parents=True)
    (export / "train" / "annotations.json").write_text("{}")
    assert find_coco_files(export, "train") == (export / "train" / "images", export / "train" / "annotations.json")
    single = tmp_path / "single"
    single.mkdir()
    (single / "mine.json").write_text("{}")
    assert find_coco_files(single, "val") == (single, single / "mine.json")
    with pytest.raises(FileNotFoundError, match=r"no COCO files for split 'test' .*tried: .*instances_test"):
        find_coco_files(tmp_path / "empty", "test")


def test_ground_truth_is_ready_for_cocoeval(tmp_path):
    """Perfect predictions score AP 1 against ``dataset.coco``; a prediction on the crowd region
    is ignored (the COCO way), not counted as a false positive."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    ds = COCOInstanceDataset(*_write_dataset(tmp_path))
    item, crowd = ds[0], _masks()[3]
    results = []
    # the crowd-region prediction ranks first: were it a false positive, AP would fall below 1
    masks = list(item["masks"].numpy()) + [crowd]
    for mask, label, score in zip(masks, item["labels"].tolist() + [0], [0.9, 0.9, 0.9, 0.99]):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        cat = ds.category_ids[label]
        results.append({"image_id": 10, "category_id": cat, "segmentation": rle, "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(ds.coco, ds.coco.loadRes(results), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


# ------------------------------------------------------------------- bad data found when built (issue 16)


def test_a_bad_annotation_of_a_later_image_fails_when_built_naming_the_file(tmp_path):
    from influencerformer.data.errors import DataError

    good = {"image_id": 10, "category_id": 7, "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]]}
    anns = [{"id": 1, **good}, {"id": 2, **good, "image_id": 11, "segmentation": [[1, 2, 3]]},
            {"id": 3, **good, "image_id": 11, "segmentation": "oops"}]
    image_dir, ann_file = _write_dataset(tmp_path, annotations=anns)
    with pytest.raises(DataError) as err:
        COCOInstanceDataset(image_dir, ann_file)  # not at item 1, mid-run
    message = str(err.value)
    assert message.startswith(f"{ann_file}: annotation id 2: bad segmentation: polygon 0 has 3 coordinates")
    assert "and 1 more" in message and "check-data" in message and "\n" not in message


def test_a_corrupt_image_is_a_data_error_naming_the_file(tmp_path):
    from influencerformer.data.coco import check_coco
    from influencerformer.data.errors import DataError

    image_dir, ann_file = _write_dataset(tmp_path)
    (image_dir / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # truncated
    (image_dir / "b.png").write_bytes(b"not an image at all")
    ds = COCOInstanceDataset(image_dir, ann_file)
    with pytest.raises(DataError, match=r"image file .*b\.png \(image id 11\) cannot be decoded: UnidentifiedImageError"):
        ds[1]
    count, problems = check_coco(image_dir, ann_file)
    assert count == 2 and len(problems) == 2
    assert "a.png (image id 10) cannot be decoded" in problems[0] and "b.png (image id 11)" in problems[1]
