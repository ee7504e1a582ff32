"""Convert user-downloaded S3DIS and ScanNet into the preprocessed mmdet3d layout (see pointcloud.py):
``points/<scene>.bin`` float32 × 6, ``instance_mask/<scene>.bin`` and ``semantic_mask/<scene>.bin``
int64, and for ScanNet ``super_points/<scene>.bin`` int64.

Both conversions work scene by scene and are resumable: a scene's files are written into a scratch
folder, moved into place, and only then is ``<out>/.prepare_<dataset>/<scene>.json`` written
(atomically). A killed run therefore restarts at the first scene without a marker, and a scene
with a marker is never redone (its counts come from the marker).

S3DIS is read straight from the release zip, one room's annotation files at a time, so the ~16 GB
text tree is never extracted whole; rows are parsed by `read_s3dis_room(strict=False)`, which skips
malformed rows (and repairs whitespace faults) with a warning whose counts end up in the summary.
ScanNet needs no extraction; its PLY meshes are read with the small reader below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from influencerformer.data.download import DataSetupError, VerificationError, write_json_atomic
from influencerformer.data.pointcloud import write_preprocessed
from influencerformer.data.s3dis import S3DISFormatWarning, read_s3dis_room, rgb8_to_unit

S3DIS_ZIP_NAME = "Stanford3dDataset_v1.2_Aligned_Version.zip"
_S3DIS_MEMBER = re.compile(r"^(?:.*/)?Area_(\d+)/([^/]+)/Annotations/([^/]+\.txt)$")
_SKIPPED_ROWS = re.compile(r"skipped (\d+) malformed row")
_REPAIRED_ROWS = re.compile(r"repaired (\d+) row")
_MAX_LISTED = 50  # missing files named in an error message; the exception holds them all


def _natural_key(name: str) -> list:
    """Sort key putting office_2 before office_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# -------------------------------------------------------------------------- resumable scene writing


def _marker_path(out: Path, dataset: str, scene: str) -> Path:
    return out / f".prepare_{dataset}" / f"{scene}.json"


def _scene_done(out: Path, dataset: str, scene: str, keys: Sequence[str]) -> dict | None:
    """The marker of a finished scene, or None when the scene must be (re)done: no marker, or one of
    its files is missing or has the wrong size (deleted or damaged since)."""
    try:
        marker = json.loads(_marker_path(out, dataset, scene).read_text())
        points = int(marker["points"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    sizes = {"points": 24 * points}  # float32 × 6; every other file int64 × 1
    for key in keys:
        path = out / key / f"{scene}.bin"
        if not path.is_file() or path.stat().st_size != sizes.get(key, 8 * points):
            return None
    return marker


def _write_scene(scene: dict, out: Path, name: str) -> list[str]:
    """Write one scene's .bin files into a scratch folder, then move each into place; returns the
    folders written (points, instance_mask, ...)."""
    scratch = out / ".prepare_tmp" / name
    shutil.rmtree(scratch, ignore_errors=True)
    write_preprocessed(scene, scratch, name)
    keys = sorted(p.name for p in scratch.iterdir())
    for key in keys:
        (out / key).mkdir(parents=True, exist_ok=True)
        os.replace(scratch / key / f"{name}.bin", out / key / f"{name}.bin")
    shutil.rmtree(scratch, ignore_errors=True)
    return keys


def _run_scenes(names: Sequence[str], out: Path, dataset: str, keys: Sequence[str],
                convert: Callable[[str], tuple[dict, dict]], progress: bool) -> list[dict]:
    """convert(name) -> (scene arrays, marker fields) for every scene without a valid marker; the
    markers of all scenes, in order."""
    markers = []
    with tqdm(names, desc=f"prepare {dataset}", unit="scene", disable=not progress) as bar:
        for name in bar:
            marker = _scene_done(out, dataset, name, keys)
            if marker is None:
                scene, fields = convert(name)
                _write_scene(scene, out, name)
                marker = {"scene": name, "points": len(scene["coords"]), **fields}
                write_json_atomic(_marker_path(out, dataset, name), marker)
            markers.append(marker)
            if "skipped_rows" in marker:
                bar.set_postfix(skipped_rows=sum(m["skipped_rows"] for m in markers), refresh=False)
    shutil.rmtree(out / ".prepare_tmp", ignore_errors=True)
    return markers


# ---------------------------------------------------------------------------------------- S3DIS


def _s3dis_rooms(zf: zipfile.ZipFile, zip_path: Path) -> dict[str, dict]:
    """{scene name "Area_N_<room>": {"area", "room", "prefix" (room folder in the zip), "members"}}
    in area / natural room order, from the members Area_N/<room>/Annotations/*.txt."""
    rooms: dict[tuple[int, str], dict] = {}
    for info in zf.infolist():
        path = PurePosixPath(info.filename)
        if path.parts[:1] == ("__MACOSX",) or path.name.startswith("."):  # macOS metadata, not data
            continue
        match = _S3DIS_MEMBER.match(info.filename)
        if match:
            area, room = int(match.group(1)), match.group(2)
            entry = rooms.setdefault((area, room), {"area": area, "room": room, "members": [],
                                                    "prefix": str(path.parent.parent)})
            entry["members"].append(info)
    if not rooms:
        raise VerificationError(f"{zip_path}: expected members <...>/Area_N/<room>/Annotations/<class>_<i>.txt "
                                f"(the layout of {S3DIS_ZIP_NAME}), found none")
    ordered = sorted(rooms, key=lambda k: (k[0], _natural_key(k[1])))
    return {f"Area_{a}_{r}": rooms[(a, r)] for a, r in ordered}


def _row_counts(messages: Sequence[str]) -> dict:
    """Skipped / repaired row counts and skipped files from the reader's S3DISFormatWarning texts."""
    skipped = sum(int(m.group(1)) for text in messages for m in _SKIPPED_ROWS.finditer(text))
    repaired = sum(int(m.group(1)) for text in messages for m in _REPAIRED_ROWS.finditer(text))
    files = sum("file skipped" in text for text in messages)
    return {"skipped_rows": skipped, "repaired_rows": repaired, "skipped_files": files}


def _read_room_from_zip(zf: zipfile.ZipFile, zip_path: Path, room: dict, scratch: Path) -> tuple[dict, dict]:
    """Extract one room's annotation files to scratch, parse them leniently, delete them again.
    Warning texts name the file inside the zip, not the scratch copy."""
    room_dir = scratch / f"Area_{room['area']}" / room["room"]
    shutil.rmtree(room_dir, ignore_errors=True)
    (room_dir / "Annotations").mkdir(parents=True)
    for info in room["members"]:
        with zf.open(info) as src, open(room_dir / "Annotations" / PurePosixPath(info.filename).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    in_zip = f"{zip_path.name}:{room['prefix']}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", S3DISFormatWarning)
        try:
            scene = read_s3dis_room(room_dir, strict=False)
        except ValueError as err:  # a fault strict=False does not skip (e.g. colour out of range)
            raise ValueError(str(err).replace(str(room_dir), in_zip)) from None
    messages = []
    for w in caught:
        if issubclass(w.category, S3DISFormatWarning):
            messages.append(str(w.message).replace(str(room_dir), in_zip))
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    shutil.rmtree(room_dir, ignore_errors=True)
    return scene, {**_row_counts(messages), "warnings": messages}


def prepare_s3dis(zip_path: str | os.PathLike, root: str | os.PathLike, *, progress: bool = True) -> dict:
    """Convert Stanford3dDataset_v1.2_Aligned_Version.zip into the preprocessed layout under root
    (scenes "Area_N_<room>"; every annotation file is one instance; S3DIS class ids 0..12).

    Resumable (see the module docstring). Returns the summary, also written to
    root/prepare_s3dis.json: {"dataset", "scenes", "points", "skipped_rows", "repaired_rows",
    "skipped_files", "warnings": [texts naming zip:member and line]}."""
    zip_path, root = Path(zip_path), Path(root)
    if not zip_path.is_file():
        raise FileNotFoundError(f"{zip_path}: no such file (expected {S3DIS_ZIP_NAME}, downloaded after accepting "
                                "the S3DIS terms; see docs/data.md)")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise VerificationError(f"{zip_path}: expected a zip archive ({S3DIS_ZIP_NAME}), got an unreadable file "
                                f"({err})") from None
    with zf:
        rooms = _s3dis_rooms(zf, zip_path)
        root.mkdir(parents=True, exist_ok=True)
        scratch = root / ".prepare_tmp" / "raw"
        markers = _run_scenes(list(rooms), root, "s3dis", ("points", "instance_mask", "semantic_mask"),
                              lambda name: _read_room_from_zip(zf, zip_path, rooms[name], scratch), progress)
    summary = _summary("s3dis", root, markers)
    write_json_atomic(root / "prepare_s3dis.json", summary)
    return summary


def _summary(dataset: str, out: Path, markers: Sequence[dict]) -> dict:
    summary = {"dataset": dataset, "out": str(out), "scenes": len(markers), "points": sum(m["points"] for m in markers)}
    if dataset == "s3dis":
        for key in ("skipped_rows", "repaired_rows", "skipped_files"):
            summary[key] = sum(m[key] for m in markers)
        summary["warnings"] = [w for m in markers for w in m["warnings"]]
    return summary


def describe_summary(summary: dict) -> str:
    """The lines the CLI prints for a prepare summary."""
    if summary.get("check_only"):
        return f"ScanNet tree complete: {summary['scenes']} scenes under {summary['root']}"
    text = (f"prepared {summary['scenes']} {summary['dataset']} scenes ({summary['points']} points) "
            f"into {summary['out']}")
    if summary["dataset"] == "s3dis":
        text += (f"\nmalformed rows: {summary['skipped_rows']} skipped, {summary['repaired_rows']} repaired "
                 f"(whitespace only); {summary['skipped_files']} file(s) skipped")
        text += "".join(f"\n  {w}" for w in summary["warnings"])
    return text


# ------------------------------------------------------------------------------------------ PLY

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


def _ply_header(f, path: Path) -> tuple[str, list[tuple[str, int, list]]]:
    """Format and elements [(name, count, [(property, type) or (property, ("list", ...))])]; f is
    left at the first byte after end_header."""
    if f.readline().strip() != b"ply":
        raise ValueError(f"{path}: expected a PLY file (first line 'ply')")
    fmt, elements = None, []
    for _ in range(10_000):  # a header has a few dozen lines; bounds the loop on a non-PLY file
        line = f.readline()
        words = line.decode("ascii", "replace").split()
        if not line:
            break
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            if fmt is None:
                raise ValueError(f"{path}: PLY header has no 'format' line")
            return fmt, elements
        if words[0] == "format" and len(words) >= 2 and words[1] in _PLY_FORMATS:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 5 and words[1] == "list":
            elements[-1][2].append((words[4], ("list", words[2], words[3])))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in _PLY_TYPES:
            elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
        else:
            raise ValueError(f"{path}: unsupported PLY header line {line.strip()[:80]!r}")
    raise ValueError(f"{path}: PLY header without 'end_header'")


def read_ply_vertices(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The vertex element of a PLY file (ascii or binary, either byte order) as {property: (N,)}.
    Elements before the vertex element may not have list properties (ScanNet's meshes put
    vertices first); the faces after it are not read."""
    path = Path(path)
    with open(path, "rb") as f:
        fmt, elements = _ply_header(f, path)
        before = []
        for name, count, props in elements:
            if name == "vertex":
                if any(isinstance(t, tuple) for _, t in props):
                    raise ValueError(f"{path}: list properties in the vertex element are not supported")
                if fmt == "ascii":
                    return _ply_ascii(f, path, before, count, props)
                return _ply_binary(f, path, _PLY_FORMATS[fmt], before, count, props)
            before.append((count, props))
    raise ValueError(f"{path}: expected a 'vertex' element, the header has {[e[0] for e in elements]}")


def _ply_binary(f, path: Path, order: str, before: list, count: int, props: list) -> dict[str, np.ndarray]:
    for n, element_props in before:  # skip fixed-size elements before the vertices
        if any(isinstance(t, tuple) for _, t in element_props):
            raise ValueError(f"{path}: a list element before 'vertex' is not supported")
        f.seek(n * np.dtype([(p, order + t) for p, t in element_props]).itemsize, os.SEEK_CUR)
    dtype = np.dtype([(p, order + t) for p, t in props])
    data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"{path}: expected {count} vertices ({count * dtype.itemsize} bytes), the file ends "
                         f"after {len(data)} bytes")
    records = np.frombuffer(data, dtype=dtype)
    return {p: records[p].astype(np.dtype(t)) for p, t in props}  # native byte order


def _ply_ascii(f, path: Path, before: list, count: int, props: list) -> dict[str, np.ndarray]:
    for n, _ in before:  # one line per record in ascii PLY
        for _ in range(n):
            f.readline()
    lines = [f.readline() for _ in range(count)]
    if count and not lines[-1]:
        raise ValueError(f"{path}: expected {count} vertex lines, the file ends before")
    try:
        table = np.loadtxt(lines, dtype=np.float64, ndmin=2) if count else np.zeros((0, len(props)))
    except ValueError as err:
        raise ValueError(f"{path}: malformed vertex line ({err})") from None
    if table.shape[1] != len(props):
        raise ValueError(f"{path}: expected {len(props)} values per vertex, got {table.shape[1]}")
    return {p: table[:, i].astype(np.dtype(t)) for i, (p, t) in enumerate(props)}


# -------------------------------------------------------------------------------------- ScanNet

SCANNET_SUFFIXES = ("_vh_clean_2.ply", ".aggregation.json", "_vh_clean_2.0.010000.segs.json", "_vh_clean_2.labels.ply")
_SCENE_NAME = re.compile(r"^scene\d{4}_\d{2}$")


class MissingFilesError(DataSetupError):
    """Files of a user-downloaded dataset are missing; `.missing` lists every one."""

    def __init__(self, root: Path, missing: list[Path], scenes: int) -> None:
        self.missing = missing
        incomplete = len({p.parent for p in missing})
        listed = "".join(f"\n  {p}" for p in missing[:_MAX_LISTED])
        more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        super().__init__(f"{root}: {len(missing)} file(s) missing, {incomplete} of {scenes} scenes incomplete "
                         f"(each scans/<scene>/ needs <scene>{{{', '.join(SCANNET_SUFFIXES)}}}):{listed}{more}")


def check_scannet(root: str | os.PathLike) -> list[str]:
    """Scene names of a ScanNet v2 tree root/scans/<scene>/; raises MissingFilesError naming every
    missing file, FileNotFoundError when there is no scans/ folder or no scene in it."""
    scans = Path(root) / "scans"
    if not scans.is_dir():
        raise FileNotFoundError(f"{scans}: no such directory (expected the ScanNet v2 tree <root>/scans/<scene>/)")
    scenes = sorted(d.name for d in scans.iterdir() if d.is_dir() and _SCENE_NAME.match(d.name))
    if not scenes:
        raise FileNotFoundError(f"{scans}: expected scene folders named sceneNNNN_NN, found none")
    missing = [scans / s / f"{s}{suffix}" for s in scenes for suffix in SCANNET_SUFFIXES
               if not (scans / s / f"{s}{suffix}").is_file()]
    if missing:
        raise MissingFilesError(Path(root), missing, len(scenes))
    return scenes


def _json(path: Path, key: str):
    try:
        return json.loads(path.read_text())[key]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected a json object with {key!r} ({type(err).__name__}: {err})") from None


def read_scannet_scene(scene_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """One raw ScanNet scene as the arrays write_preprocessed takes: coords / colors from
    _vh_clean_2.ply (mesh vertices, not axis-aligned, as mmdet3d stores them), sem_labels = the
    NYU40 id of _vh_clean_2.labels.ply's `label`, instance_labels = the aggregation's objectId
    (-1 = none; later groups win on overlap), super_points = segs.json's segIndices."""
    scene_dir = Path(scene_dir)
    name = scene_dir.name
    mesh = read_ply_vertices(scene_dir / f"{name}_vh_clean_2.ply")
    labels_path = scene_dir / f"{name}_vh_clean_2.labels.ply"
    labels = read_ply_vertices(labels_path)
    segs_path = scene_dir / f"{name}_vh_clean_2.0.010000.segs.json"
    segs = np.asarray(_json(segs_path, "segIndices"), dtype=np.int64)
    groups = _json(scene_dir / f"{name}.aggregation.json", "segGroups")
    n = len(mesh.get("x", ()))
    for key in ("x", "y", "z", "red", "green", "blue"):
        if key not in mesh:
            raise ValueError(f"{scene_dir / f'{name}_vh_clean_2.ply'}: expected vertex property {key!r}")
    if "label" not in labels:
        raise ValueError(f"{labels_path}: expected vertex property 'label'")
    for path, length in ((labels_path, len(labels["label"])), (segs_path, len(segs))):
        if length != n:
            raise ValueError(f"{path}: expected {n} values (one per vertex of {name}_vh_clean_2.ply), got {length}")
    inst = np.full(n, -1, dtype=np.int64)
    for group in groups:
        inst[np.isin(segs, np.asarray(group["segments"], dtype=np.int64))] = int(group["objectId"])
    return {
        "coords": np.stack([mesh["x"], mesh["y"], mesh["z"]], 1).astype(np.float32),
        "colors": rgb8_to_unit(np.stack([mesh["red"], mesh["green"], mesh["blue"]], 1)),
        "sem_labels": labels["label"].astype(np.int64),
        "instance_labels": inst,
        "super_points": segs,
    }


def prepare_scannet(root: str | os.PathLike, out: str | os.PathLike | None = None, *, check_only: bool = False,
                    progress: bool = True) -> dict:
    """Check a user-downloaded ScanNet v2 tree (root/scans/<scene>/ with the four files of
    SCANNET_SUFFIXES; MissingFilesError names each missing one) and, unless check_only, convert
    it into the preprocessed layout under out (default root/preprocessed), resumably. Split lists
    scannetv2_{train,val,test}.txt found in root or root/meta_data are copied to out."""
    root = Path(root)
    scenes = check_scannet(root)
    if check_only:
        return {"dataset": "scannet", "check_only": True, "root": str(root), "scenes": len(scenes)}
    out = Path(out) if out is not None else root / "preprocessed"
    out.mkdir(parents=True, exist_ok=True)
    markers = _run_scenes(scenes, out, "scannet", ("points", "instance_mask", "semantic_mask", "super_points"),
                          lambda name: (read_scannet_scene(root / "scans" / name), {}), progress)
    for split in ("train", "val", "test"):
        for candidate in (root / f"scannetv2_{split}.txt", root / "meta_data" / f"scannetv2_{split}.txt"):
            if candidate.is_file():
                shutil.copyfile(candidate, out / candidate.name)
                break
    return _summary("scannet", out, markers)
