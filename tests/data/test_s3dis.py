"""S3DIS raw layout: rooms3d → write → read back equal, the release's row defects (fail with
file:line, or skip / repair with counted warnings), class aliases, areas, the .npy cache."""

import os
import re
import warnings

import numpy as np
import pytest
import torch

from influencerformer.data.rooms3d import Rooms3D
from influencerformer.data.s3dis import S3DIS_CLASSES
from influencerformer.data.s3dis import S3DISFormatWarning, S3DISRawDataset, parse_annotation, write_s3dis_raw

SMALL = (2000, 2500)


def canonical(item):
    """Points sorted by (x, y, z, colour, class), and instance ids renamed by first appearance in that
    order, so two readings of one room compare equal whatever their file / point order."""
    cols = [item["coords"][:, i] for i in range(3)] + [item["colors"][:, i] for i in range(3)] + [item["sem_labels"]]
    order = np.lexsort([c.numpy() for c in reversed(cols)])
    inst = item["instance_labels"].numpy()[order]
    _, first = np.unique(inst, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    renamed = np.where(inst >= 0, rank[np.unique(inst, return_inverse=True)[1]], -1)
    return item["coords"].numpy()[order], item["colors"].numpy()[order], item["sem_labels"].numpy()[order], renamed


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3dis")
    data = Rooms3D("train", num_scenes=2, points_per_room=SMALL, seed=1)
    rooms = data.write_s3dis_raw(str(root), area=5)
    return root, data, rooms


def test_rooms3d_write_read_round_trip_is_exact(written):
    root, data, rooms = written
    read = S3DISRawDataset(root, "test", stuff_classes=Rooms3D.stuff_classes)
    assert [read[i]["scene_id"] for i in range(len(read))] == [f"Area_5/{r}" for r in rooms]
    for i in range(len(data)):
        for want, got in zip(canonical(data[i]), canonical(read[i])):
            np.testing.assert_array_equal(got, want)
        assert read[i]["coords"].dtype == torch.float32 and read[i]["instance_labels"].dtype == torch.int64


def test_without_stuff_classes_every_annotation_file_is_an_instance(written):
    root, data, _ = written
    item = S3DISRawDataset(root, [5])[0]
    things = int(data[0]["instance_labels"].max()) + 1
    assert int(item["instance_labels"].max()) + 1 == things + 3  # + ceiling_1, floor_1, wall_1
    assert (item["instance_labels"] >= 0).all()


def _room(tmp_path, rows_by_file, area=1, room="office_1"):
    ann = tmp_path / f"Area_{area}" / room / "Annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for name, body in rows_by_file.items():
        (ann / name).write_bytes(body)
    return tmp_path


GOOD = b"1.000 2.000 3.000 10 20 30\n4.500 5.500 6.500 40 50 60\n7.000 8.000 9.000 70 80 90\n"
DEFECTS = {  # kind: (file body, bad line, message, rows kept under strict=False)
    "stray byte": (GOOD.replace(b"5.500", b"5.5\x1000"), 2, r"non-numeric byte '\\x10' at column 10", 2),
    "short row": (GOOD.replace(b" 70 80 90", b" 70"), 3, r"expected 6 values \(x y z r g b\), got 4", 2),
    "CRLF": (GOOD.replace(b"\n", b"\r\n"), 1, r"CRLF line ending", 3),
    "trailing spaces": (GOOD.replace(b"50 60", b"50 60  "), 2, r"leading or trailing whitespace", 3),
}


@pytest.mark.parametrize("kind", DEFECTS)
def test_defect_fails_with_file_and_line_by_default(tmp_path, kind):
    body, line, message, _ = DEFECTS[kind]
    root = _room(tmp_path, {"chair_1.txt": body})
    path = os.path.join(root, "Area_1", "office_1", "Annotations", "chair_1.txt")
    with pytest.raises(ValueError, match=rf"{re.escape(path)}:{line}: {message}"):
        S3DISRawDataset(root, [1])[0]


@pytest.mark.parametrize("kind", DEFECTS)
def test_defect_is_skipped_or_repaired_with_a_counted_warning(tmp_path, kind):
    body, line, _, kept = DEFECTS[kind]
    root = _room(tmp_path, {"chair_1.txt": body, "table_1.txt": GOOD})
    with pytest.warns(S3DISFormatWarning) as record:
        item = S3DISRawDataset(root, [1], strict=False)[0]
    assert len(record) == 1
    skipped, repaired = 3 - kept, (3 if kind == "CRLF" else 1) if kept == 3 else 0
    assert f"skipped {skipped} malformed row(s)" in str(record[0].message)
    assert f"repaired {repaired} row(s)" in str(record[0].message)
    assert "chair_1.txt" in str(record[0].message)
    assert len(item["coords"]) == kept + 3
    good = np.loadtxt(GOOD.decode().splitlines())
    chair = item["sem_labels"] == S3DIS_CLASSES.index("chair")
    want = good if kept == 3 else np.delete(good, line - 1, axis=0)
    np.testing.assert_allclose(item["coords"][chair].numpy(), want[:, :3], rtol=0, atol=1e-6)
    np.testing.assert_allclose(item["colors"][chair].numpy() * 255, want[:, 3:], atol=1e-3)


def test_parse_annotation_counts_every_bad_row(tmp_path):
    body = GOOD + b"1 2 3\n" + b"1 2 3 4 5 x\n\n" + b"1 2 3 4 5 6 \r\n"
    path = tmp_path / "clutter_1.txt"
    path.write_bytes(body)
    with pytest.raises(ValueError, match=r"clutter_1\.txt:4: expected 6 values .*\(3 malformed row\(s\)"):
        parse_annotation(path)
    with pytest.warns(S3DISFormatWarning, match=r"skipped 2 malformed row\(s\) \(first: line 4, .*repaired 1 row"):
        rows = parse_annotation(path, strict=False)
    assert rows.shape == (4, 6) and rows[-1].tolist() == [1, 2, 3, 4, 5, 6]


def test_class_aliases_unknown_classes_and_colour_range(tmp_path):
    root = _room(tmp_path, {"stairs_1.txt": GOOD, "chair_1.txt": GOOD})
    item = S3DISRawDataset(root, [1])[0]
    assert sorted(item["sem_labels"].unique().tolist()) == [
        S3DIS_CLASSES.index("chair"),
        S3DIS_CLASSES.index("clutter"),
    ]
    _room(tmp_path, {"sofa-bed_1.txt": GOOD})
    with pytest.raises(ValueError, match=r"sofa-bed_1\.txt: expected <class>_<i>\.txt with class in"):
        S3DISRawDataset(root, [1])[0]
    with pytest.warns(S3DISFormatWarning, match="file skipped"):
        assert len(S3DISRawDataset(root, [1], strict=False)[0]["coords"]) == 6
    bad = _room(tmp_path / "b", {"chair_1.txt": b"1 2 3 300 0 0\n"})
    with pytest.raises(ValueError, match=r"chair_1\.txt: expected r g b in \[0, 255\], got values in \[0.0, 300.0\]"):
        S3DISRawDataset(bad, [1])[0]


def test_areas_and_splits(tmp_path):
    for area in (1, 2, 3, 4, 5, 6):
        _room(tmp_path, {"chair_1.txt": GOOD}, area=area, room="office_1")
    _room(tmp_path, {"chair_1.txt": GOOD}, area=1, room="office_10")
    _room(tmp_path, {"chair_1.txt": GOOD}, area=1, room="office_2")
    train = S3DISRawDataset(tmp_path, "train")
    assert [f"Area_{a}/{r}" for a, r in train.rooms][:4] == [
        "Area_1/office_1",
        "Area_1/office_2",
        "Area_1/office_10",
        "Area_2/office_1",
    ]
    assert {a for a, _ in train.rooms} == {1, 2, 3, 4, 6}
    assert [a for a, _ in S3DISRawDataset(tmp_path, "test").rooms] == [5]
    with pytest.raises(FileNotFoundError, match=r"Area_7: no such directory"):
        S3DISRawDataset(tmp_path, [7])
    with pytest.raises(ValueError, match=r"expected a split in .*got 'dev'"):
        S3DISRawDataset(tmp_path, "dev")


def test_cache_is_used_refreshed_on_change_and_repeats_warnings(tmp_path):
    root = _room(tmp_path / "data", {"chair_1.txt": GOOD + b"1 2\n"})
    cache = tmp_path / "cache"
    with pytest.warns(S3DISFormatWarning):
        first = S3DISRawDataset(root, [1], strict=False, cache_dir=cache)[0]
    stored = cache / "Area_1" / "office_1.npy"
    assert stored.exists()
    # a cache hit does not read the text: prove it by corrupting the cached array
    np.save(stored, np.load(stored) + [100, 0, 0, 0, 0, 0, 0, 0])
    with pytest.warns(S3DISFormatWarning, match="skipped 1 malformed"):
        hit = S3DISRawDataset(root, [1], strict=False, cache_dir=cache)[0]
    assert torch.allclose(hit["coords"][:, 0], first["coords"][:, 0] + 100)
    # a changed annotation file invalidates the entry
    path = root / "Area_1" / "office_1" / "Annotations" / "chair_1.txt"
    path.write_bytes(GOOD + GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = S3DISRawDataset(root, [1], strict=False, cache_dir=cache)[0]
    assert len(fresh["coords"]) == 6 and fresh["coords"][0, 0] == 1.0


def test_writer_rejects_unstorable_scenes(tmp_path):
    scene = {
        "coords": torch.zeros(2, 3),
        "colors": torch.zeros(2, 3),
        "sem_labels": torch.tensor([0, 13]),
        "instance_labels": torch.tensor([-1, 0]),
    }
    with pytest.raises(ValueError, match=r"expected sem_labels in \[0, 13\), got \[0, 13\]"):
        write_s3dis_raw(scene, tmp_path, 1, "r")
    scene["sem_labels"] = torch.tensor([7, 8])
    scene["instance_labels"] = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="expected one class per instance"):
        write_s3dis_raw(scene, tmp_path, 1, "r")
    scene["colors"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"expected coords \(N, 3\), colors \(N, 3\).*\(2, 3\), \(3, 3\)"):
        write_s3dis_raw(scene, tmp_path, 1, "r")


@pytest.mark.parametrize("row", ["1e999 0 0 1 2 3", "0 -1e999 0 1 2 3"])
def test_infinite_coordinates_fail_with_file_and_line(tmp_path, row):
    from influencerformer.data.errors import DataError

    path = tmp_path / "chair_1.txt"
    path.write_text("0 0 0 1 2 3\n\n1 1 1 1 2 3\n" + row + "\n")
    with pytest.raises(DataError, match=rf"chair_1\.txt:4: non-finite value in .*inf"):
        parse_annotation(path)


def test_strict_hint_names_the_cli_option(tmp_path):
    path = tmp_path / "chair_1.txt"
    path.write_text("0 0 0 1 2 3\n0 0 x 1 2 3\n")
    with pytest.raises(ValueError, match=r"--set data.strict=false"):
        parse_annotation(path)
