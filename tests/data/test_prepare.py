"""prepare s3dis (from a zip in the release layout, with malformed rows) and prepare scannet (tree
check naming missing files, PLY reader, conversion): arrays read back by PreprocessedPointDataset,
warning counts, resumption after a kill without redoing finished scenes, CLI errors."""

import json
import warnings
import zipfile

import numpy as np
import pytest

from influencerformer.cli import main
from influencerformer.data import prepare
from influencerformer.data.pointcloud import PreprocessedPointDataset
from influencerformer.data.rooms3d import Rooms3D
from influencerformer.data.s3dis import read_s3dis_room

TOP = "Stanford3dDataset_v1.2_Aligned_Version"
SCENES = ["Area_1_room_1", "Area_1_room_2", "Area_2_room_1"]
BAD_ROW = "1.000 2.000 x3.000 10 20 30\n"  # a stray byte inside a row: skipped with strict=False
CRLF_ROW = "1.000 2.000 3.000 10 20 30\r\n"  # whitespace only: repaired and kept


def _cli(argv):
    return main(argv)


# ------------------------------------------------------------------------------------------ S3DIS


@pytest.fixture(scope="module")
def s3dis_zip(tmp_path_factory):
    """A small zip in the release layout (3 rooms over 2 areas, one bad and one CRLF row in
    Area_1/room_1/wall_1.txt, macOS debris) and the raw tree it was made from."""
    base = tmp_path_factory.mktemp("s3dis")
    tree = base / TOP
    Rooms3D("train", num_scenes=2, points_per_room=(300, 400), seed=0).write_s3dis_raw(str(tree), area=1)
    Rooms3D("val", num_scenes=1, points_per_room=(300, 400), seed=0).write_s3dis_raw(str(tree), area=2)
    with open(tree / "Area_1" / "room_1" / "Annotations" / "wall_1.txt", "a", newline="") as f:
        f.write(BAD_ROW + CRLF_ROW)
    wall = tree / "Area_2" / "room_1" / "Annotations" / "wall_1.txt"  # the release's duplicate "wall_3 (1).txt"
    wall.with_name("wall_1 (1).txt").write_bytes(wall.read_bytes())
    zip_path = base / prepare.S3DIS_ZIP_NAME
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(tree.rglob("*.txt")):
            zf.write(path, path.relative_to(base).as_posix())
        zf.writestr(f"__MACOSX/{TOP}/Area_1/room_1/Annotations/._wall_1.txt", b"\x00\x05junk")
        zf.writestr(f"{TOP}/Area_1/room_1/Annotations/.DS_Store", b"\x00junk")
    return zip_path, tree


def _expected(tree, scene):
    area, room = scene.split("_", 2)[1], scene.split("_", 2)[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_s3dis_room(tree / f"Area_{area}" / room, strict=False)


def test_prepare_s3dis_writes_the_arrays_and_reports_malformed_rows(tmp_path, s3dis_zip):
    zip_path, tree = s3dis_zip
    summary = prepare.prepare_s3dis(zip_path, tmp_path, progress=True)
    counts = [summary[k] for k in ("scenes", "skipped_rows", "repaired_rows", "skipped_files")]
    assert counts == [3, 1, 1, 1]
    assert len(summary["warnings"]) == 2
    assert f"{zip_path.name}:{TOP}/Area_1/room_1/Annotations/wall_1.txt: skipped 1 malformed" in summary["warnings"][0]
    assert "wall_1 (1).txt" in summary["warnings"][1]
    assert json.loads((tmp_path / "prepare_s3dis.json").read_text()) == summary
    data = PreprocessedPointDataset(tmp_path, "s3dis", split="all")
    assert data.scenes == SCENES
    for i, scene in enumerate(SCENES):
        want, got = _expected(tree, scene), data[i]
        assert summary["points"] >= len(want["coords"]) > 0
        np.testing.assert_array_equal(got["coords"].numpy(), want["coords"])
        np.testing.assert_array_equal(got["colors"].numpy(), want["colors"])
        np.testing.assert_array_equal(got["sem_labels"].numpy(), want["sem_labels"])
        np.testing.assert_array_equal(got["instance_labels"].numpy(), want["instance_labels"])
    assert summary["points"] == sum(len(_expected(tree, s)["coords"]) for s in SCENES)
    assert not (tmp_path / ".prepare_tmp").exists()
    assert (tmp_path / "points" / "Area_1_room_1.bin").stat().st_size == 24 * len(data[0]["coords"])


def test_a_killed_prepare_resumes_at_the_next_unfinished_room(tmp_path, s3dis_zip, monkeypatch):
    zip_path, _ = s3dis_zip
    calls = []
    real_read = prepare.read_s3dis_room

    def read(room_dir, **kwargs):
        calls.append(room_dir.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second room
        return real_read(room_dir, **kwargs)

    monkeypatch.setattr(prepare, "read_s3dis_room", read)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_s3dis(zip_path, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == ["Area_1_room_1.bin"]
    assert sorted(p.name for p in (tmp_path / ".prepare_s3dis").iterdir()) == ["Area_1_room_1.json"]
    first = (tmp_path / "points" / "Area_1_room_1.bin").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(prepare, "read_s3dis_room", lambda room_dir, **kw: calls.append(room_dir.name) or
                        real_read(room_dir, **kw))
    summary = prepare.prepare_s3dis(zip_path, tmp_path, progress=False)
    assert calls == ["room_2", "room_1"]  # Area_1/room_2 and Area_2/room_1; Area_1/room_1 was done
    assert (tmp_path / "points" / "Area_1_room_1.bin").stat().st_mtime_ns == first
    assert summary["scenes"] == 3 and summary["skipped_rows"] == 1  # the finished room's counts are kept

    calls.clear()  # a damaged output file makes its room count as unfinished again
    (tmp_path / "semantic_mask" / "Area_1_room_2.bin").write_bytes(b"short")
    prepare.prepare_s3dis(zip_path, tmp_path, progress=False)
    assert calls == ["room_2"]


def test_cli_prepare_s3dis_prints_counts_and_rejects_bad_input(tmp_path, s3dis_zip, capsys):
    zip_path, _ = s3dis_zip
    assert _cli(["prepare", "s3dis", "--zip", str(zip_path), "--root", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prepared 3 s3dis scenes" in out and "1 skipped, 1 repaired" in out and "wall_1.txt" in out

    assert _cli(["prepare", "s3dis", "--zip", str(tmp_path / "nope.zip"), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope.zip: no such file" in err and prepare.S3DIS_ZIP_NAME in err and "Traceback" not in err
    (tmp_path / "not_a.zip").write_text("hello")
    assert _cli(["prepare", "s3dis", "--zip", str(tmp_path / "not_a.zip"), "--root", str(tmp_path)]) == 1
    assert "not_a.zip: expected a zip archive" in capsys.readouterr().err
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "x")
    assert _cli(["prepare", "s3dis", "--zip", str(empty), "--root", str(tmp_path)]) == 1
    assert "Area_N/<room>/Annotations" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- PLY


def write_ply(path, columns, *, fmt="binary_little_endian", faces=None):
    """columns: {name: array} (one dtype each); faces (F, 3) written after the vertices."""
    types = {np.dtype("f4"): "float", np.dtype("u1"): "uchar", np.dtype("u2"): "ushort", np.dtype("i4"): "int"}
    n = len(next(iter(columns.values())))
    header = ["ply", f"format {fmt} 1.0", "comment test", f"element vertex {n}"]
    header += [f"property {types[np.asarray(v).dtype]} {k}" for k, v in columns.items()]
    if faces is not None:
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    body = b""
    if fmt == "ascii":
        rows = [" ".join(str(np.asarray(v)[i]) for v in columns.values()) for i in range(n)]
        rows += [f"3 {a} {b} {c}" for a, b, c in (faces if faces is not None else [])]
        body = ("\n".join(rows) + "\n").encode()
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        rec = np.zeros(n, dtype=[(k, order + np.asarray(v).dtype.str[1:]) for k, v in columns.items()])
        for k, v in columns.items():
            rec[k] = v
        body = rec.tobytes()
        for face in faces if faces is not None else []:
            body += np.uint8(3).tobytes() + np.asarray(face, dtype=order + "i4").tobytes()
    path.write_bytes(("\n".join(header) + "\nend_header\n").encode() + body)


@pytest.mark.parametrize("fmt", ["binary_little_endian", "binary_big_endian", "ascii"])
def test_ply_vertex_reader_round_trips(tmp_path, fmt):
    rng = np.random.default_rng(0)
    cols = {"x": rng.normal(size=7).astype("f4"), "y": rng.normal(size=7).astype("f4"),
            "red": rng.integers(0, 256, 7).astype("u1"), "label": rng.integers(0, 41, 7).astype("u2")}
    if fmt == "ascii":
        cols["x"] = cols["y"] = np.round(cols["x"], 3).astype("f4")  # exact in decimal text
    write_ply(tmp_path / "m.ply", cols, fmt=fmt, faces=[(0, 1, 2), (2, 3, 4)])
    got = prepare.read_ply_vertices(tmp_path / "m.ply")
    assert list(got) == list(cols)
    for key in cols:
        np.testing.assert_array_equal(got[key], cols[key])
        assert got[key].dtype == cols[key].dtype


def test_ply_reader_errors_name_the_file(tmp_path):
    (tmp_path / "a.ply").write_bytes(b"not a ply\n")
    with pytest.raises(ValueError, match=r"a\.ply: expected a PLY file"):
        prepare.read_ply_vertices(tmp_path / "a.ply")
    write_ply(tmp_path / "b.ply", {"x": np.zeros(10, "f4")})
    (tmp_path / "b.ply").write_bytes((tmp_path / "b.ply").read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"b\.ply: expected 10 vertices"):
        prepare.read_ply_vertices(tmp_path / "b.ply")


# ------------------------------------------------------------------------------------------ ScanNet


def _scannet_scene(scans, name, seed):
    """A scene with 12 vertices, 4 segments of 3, two objects: objectId 0 = segments 10 and 11
    (chair, NYU40 5), objectId 1 = segment 13 (table, NYU40 7); segment 12 is wall (NYU40 1)."""
    rng = np.random.default_rng(seed)
    d = scans / name
    d.mkdir(parents=True)
    xyz = rng.normal(size=(12, 3)).astype("f4")
    rgb = rng.integers(0, 256, (12, 3)).astype("u1")
    segs = np.repeat([10, 11, 12, 13], 3)
    nyu = np.repeat([5, 5, 1, 7], 3).astype("u2")
    mesh = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2],
            "alpha": np.full(12, 255, "u1")}
    write_ply(d / f"{name}_vh_clean_2.ply", mesh, faces=[(0, 1, 2)])
    write_ply(d / f"{name}_vh_clean_2.labels.ply", {**mesh, "label": nyu}, fmt="ascii")
    (d / f"{name}_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"sceneId": name, "segIndices": segs.tolist()}))
    groups = [{"id": 0, "objectId": 0, "segments": [10, 11], "label": "chair"},
              {"id": 1, "objectId": 1, "segments": [13], "label": "table"}]
    (d / f"{name}.aggregation.json").write_text(json.dumps({"sceneId": name, "segGroups": groups}))
    return xyz, rgb, segs


def test_prepare_scannet_names_each_missing_file_then_converts(tmp_path, capsys):
    scans = tmp_path / "scans"
    made = {n: _scannet_scene(scans, n, i) for i, n in enumerate(["scene0000_00", "scene0001_00"])}
    missing = scans / "scene0001_00" / "scene0001_00_vh_clean_2.0.010000.segs.json"
    hidden = missing.with_name("elsewhere.json")
    missing.rename(hidden)
    with pytest.raises(prepare.MissingFilesError) as err:
        prepare.prepare_scannet(tmp_path, progress=False)
    assert err.value.missing == [missing] and "1 of 2 scenes incomplete" in str(err.value)
    assert _cli(["prepare", "scannet", "--root", str(tmp_path), "--check-only"]) == 1
    printed = capsys.readouterr().err
    assert str(missing) in printed and "Traceback" not in printed
    assert not (tmp_path / "preprocessed").exists()

    hidden.rename(missing)
    (tmp_path / "scannetv2_val.txt").write_text("scene0001_00\n")
    assert _cli(["prepare", "scannet", "--root", str(tmp_path), "--check-only"]) == 0
    assert "ScanNet tree complete: 2 scenes" in capsys.readouterr().out
    summary = prepare.prepare_scannet(tmp_path, progress=False)
    assert (summary["scenes"], summary["points"]) == (2, 24)
    data = PreprocessedPointDataset(tmp_path / "preprocessed", "scannet", split="val")
    assert data.scenes == ["scene0001_00"]  # the split list was copied next to the arrays
    item = data[0]
    xyz, rgb, segs = made["scene0001_00"]
    np.testing.assert_array_equal(item["coords"].numpy(), xyz)
    np.testing.assert_array_equal(np.round(item["colors"].numpy() * 255), rgb)
    np.testing.assert_array_equal(item["super_points"].numpy(), segs)
    # benchmark classes: NYU40 5 → chair (4), 1 → wall (0), 7 → table (6); the wall has no instance
    np.testing.assert_array_equal(item["sem_labels"].numpy(), np.repeat([4, 4, 0, 6], 3))
    np.testing.assert_array_equal(item["instance_labels"].numpy(), np.repeat([0, 0, -1, 1], 3))



def test_prepare_scannet_skips_finished_scenes(tmp_path, monkeypatch):
    for i, name in enumerate(["scene0000_00", "scene0000_01"]):
        _scannet_scene(tmp_path / "scans", name, i)
    out = tmp_path / "converted"
    prepare.prepare_scannet(tmp_path, out, progress=False)
    read = []
    real = prepare.read_scannet_scene
    monkeypatch.setattr(prepare, "read_scannet_scene", lambda d: read.append(d.name) or real(d))
    (out / "super_points" / "scene0000_01.bin").unlink()
    summary = prepare.prepare_scannet(tmp_path, out, progress=False)
    assert read == ["scene0000_01"] and summary["points"] == 24
    assert sorted(p.name for p in (out / "super_points").iterdir()) == ["scene0000_00.bin", "scene0000_01.bin"]


def test_prepare_scannet_without_a_scans_folder_is_a_user_error(tmp_path, capsys):
    assert _cli(["prepare", "scannet", "--root", str(tmp_path)]) == 2
    assert "scans: no such directory" in capsys.readouterr().err
