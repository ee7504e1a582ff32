"""S3DIS in its raw release layout: ``Area_N/<room>/Annotations/<class>_<i>.txt``.

Each annotation file is one instance; its rows are ``x y z r g b`` (metres, 8-bit colour). The
class is the file-name prefix (13 classes; the release's few ``stairs`` files count as clutter, as
in mmdet3d's converter). The release has malformed rows: a stray non-numeric byte inside a row,
rows with fewer than six values, CRLF line endings, trailing whitespace. By default the reader
fails at the first one with ``file:line`` and what is wrong. With ``strict=False`` rows that
cannot be read are skipped, rows whose only fault is whitespace (CRLF, trailing or leading
blanks) are repaired and kept, and one ``S3DISFormatWarning`` per file gives the counts.

Parsing is vectorised: one regular-expression pass finds the malformed lines (only those are
looked at one by one), then numpy parses the rest in one call. A parsed room can be cached as
``.npy`` (keyed on the annotation files' names, sizes and modification times).
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from influencerformer.data.errors import DataError

# S3DIS's 13 classes in the release's order (rooms3d generates the same ones)
S3DIS_CLASSES = (
    "ceiling",
    "floor",
    "wall",
    "beam",
    "column",
    "window",
    "door",
    "table",
    "chair",
    "sofa",
    "bookcase",
    "board",
    "clutter",
)
# NYU40 id of each S3DIS class (beam, column → otherstructure; board → whiteboard; clutter → otherprop)
S3DIS_TO_NYU40 = (22, 2, 1, 38, 38, 9, 8, 7, 5, 6, 10, 30, 40)
S3DIS_SPLITS = {"train": (1, 2, 3, 4, 6), "val": (5,), "test": (5,), "all": (1, 2, 3, 4, 5, 6)}
_CLASS_ALIASES = {"stairs": "clutter"}
_FILE_NAME = re.compile(r"^([A-Za-z]+)_(\d+)\.txt$")
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ROW = rf"{_NUM}(?:[ \t]+{_NUM}){{5}}"
# a non-blank line that is not exactly six numbers separated by blanks (\r is part of a line here)
_BAD_LINE = re.compile(rf"^(?!{_ROW}$)(?=[^\n]*\S)[^\n]*$", re.MULTILINE)
_GOOD_ROW = re.compile(rf"{_ROW}")
_NUMERIC_CHARS = set("0123456789+-.eE \t\r")


def rgb8_to_unit(rgb: np.ndarray) -> np.ndarray:
    """8-bit colour values (N, 3) → float32 in [0, 1]; every reader and writer uses this one
    expression, so colours survive a round trip through any format bit for bit."""
    return np.asarray(rgb).astype(np.float32) / np.float32(255)


class S3DISFormatWarning(UserWarning):
    """Rows of an S3DIS annotation file were skipped or repaired (strict=False)."""


def _describe(line: str) -> tuple[str, str | None]:
    """What is wrong with one malformed row, and the repaired row if only whitespace is wrong."""
    stripped = line.strip(" \t\r")
    if _GOOD_ROW.fullmatch(stripped):
        kind = "CRLF line ending" if line.endswith("\r") else "leading or trailing whitespace"
        return kind, stripped
    for column, char in enumerate(line, 1):
        if char not in _NUMERIC_CHARS:
            return f"non-numeric byte {char!r} at column {column}", None
    count = len(stripped.split())
    if count != 6:
        return f"expected 6 values (x y z r g b), got {count}", None
    return "malformed number", None


def _parse_rows(path: Path, strict: bool) -> tuple[np.ndarray, str | None]:
    """Rows of one annotation file as float64 (N, 6), and the warning text when rows were
    skipped or repaired (strict=False); strict=True raises at the first malformed row."""
    raw = path.read_bytes()
    text = raw.decode("latin-1")  # one char per byte: a stray byte stays visible and locatable
    bad = list(_BAD_LINE.finditer(text))
    message = None
    if bad:
        newlines = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == ord("\n"))
        lines = np.searchsorted(newlines, [m.start() for m in bad]) + 1  # 1-based line numbers
        faults = [_describe(m.group()) for m in bad]
        if strict:
            raise DataError(
                f"{path}:{int(lines[0])}: {faults[0][0]}: {bad[0].group()[:80]!r} ({len(bad)} malformed row(s) "
                "in this file; --set data.strict=false (Python: S3DISRawDataset(..., strict=False)) skips "
                "unreadable rows and repairs whitespace)"
            )
        text = _repair(text, bad, faults)
        message = _fault_counts(path, faults, lines)
    rows = np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2) if text.strip() else np.zeros((0, 6))
    finite = np.isfinite(rows).all(1)
    if not finite.all():  # "1e999" is a number to the parser and inf to numpy; NaN points poison a whole scene
        row = int(np.flatnonzero(~finite)[0])
        line = [n for n, text_line in enumerate(text.split("\n"), 1) if text_line.strip()][row]
        raise DataError(f"{path}:{line}: non-finite value in {' '.join(f'{v:g}' for v in rows[row])} "
                        f"({int((~finite).sum())} such row(s) in this file)")
    rgb = rows[:, 3:]
    if rgb.size and (rgb.min() < 0 or rgb.max() > 255):
        raise DataError(f"{path}: expected r g b in [0, 255], got values in [{rgb.min()}, {rgb.max()}]")
    return rows, message


def parse_annotation(path: str | os.PathLike, *, strict: bool = True) -> np.ndarray:
    """Rows of one annotation file as float64 (N, 6): x y z r g b.

    strict: raise ValueError "<path>:<line>: <what>: <row>" at the first malformed row; else skip
    rows that cannot be read, repair whitespace-only faults, and warn (S3DISFormatWarning) with counts.
    """
    rows, message = _parse_rows(Path(path), strict)
    if message:
        warnings.warn(message, S3DISFormatWarning, stacklevel=2)
    return rows


def _repair(text: str, bad: list[re.Match], faults: list[tuple[str, str | None]]) -> str:
    """text with each malformed line replaced by its repair, or emptied when it has none."""
    pieces, last = [], 0
    for match, (_, fixed) in zip(bad, faults):  # only the malformed lines: a handful per file
        pieces += [text[last : match.start()], fixed or ""]
        last = match.end()
    pieces.append(text[last:])
    return "".join(pieces)


def _fault_counts(path: Path, faults: list[tuple[str, str | None]], lines: np.ndarray) -> str:
    skipped = [i for i, (_, fixed) in enumerate(faults) if fixed is None]
    first = f" (first: line {int(lines[skipped[0]])}, {faults[skipped[0]][0]})" if skipped else ""
    return (
        f"{path}: skipped {len(skipped)} malformed row(s){first}, "
        f"repaired {len(faults) - len(skipped)} row(s) with whitespace faults"
    )


def _natural_key(name: str) -> list:
    """Sort key putting office_2 before office_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _annotation_files(room_dir: Path, strict: bool) -> tuple[list[Path], list[int], list[str]]:
    """Annotation files of a room in natural order, their class ids, and warnings for skipped files."""
    ann = room_dir / "Annotations"
    if not ann.is_dir():
        raise FileNotFoundError(f"{ann}: no such directory (expected <room>/Annotations/<class>_<i>.txt)")
    files, classes, skipped = [], [], []
    for path in sorted(ann.glob("*.txt"), key=lambda p: _natural_key(p.name)):
        match = _FILE_NAME.match(path.name)
        name = _CLASS_ALIASES.get(match.group(1).lower(), match.group(1).lower()) if match else None
        if name not in S3DIS_CLASSES:
            what = f"{path}: expected <class>_<i>.txt with class in {list(S3DIS_CLASSES)}, got {path.name!r}"
            if strict:
                raise ValueError(what)
            skipped.append(what + "; file skipped")
            continue
        files.append(path)
        classes.append(S3DIS_CLASSES.index(name))
    return files, classes, skipped


def _parse_room(room_dir: Path, strict: bool) -> tuple[np.ndarray, list[str]]:
    """All annotation rows of a room as float64 (N, 8): x y z r g b class file-index, plus warnings."""
    files, classes, messages = _annotation_files(room_dir, strict)
    parts = []
    for index, (path, cls) in enumerate(zip(files, classes)):  # one file per instance
        rows, message = _parse_rows(path, strict)
        parts.append(np.concatenate([rows, np.tile([[cls, index]], (len(rows), 1))], 1))
        messages += [message] if message else []
    return (np.concatenate(parts) if parts else np.zeros((0, 8))), messages


def _read_cached(room_dir: Path, strict: bool, cache: Path | None) -> tuple[np.ndarray, list[str]]:
    """_parse_room through a .npy cache keyed on file names, sizes, mtimes and strictness; the
    warnings of the first parse are stored with it and repeated on every load."""
    if cache is None:
        return _parse_room(room_dir, strict)
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted((room_dir / "Annotations").glob("*.txt"))]
    key = {"version": 1, "strict": strict, "files": [list(s) for s in stats]}
    meta = cache.with_suffix(".json")
    if cache.exists() and meta.exists():
        stored = json.loads(meta.read_text())
        if stored.get("key") == key:
            return np.load(cache), stored["warnings"]
    rows, messages = _parse_room(room_dir, strict)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # write-then-rename, so concurrent DataLoader workers never read a half-written cache
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, rows)
    os.replace(tmp, cache)
    meta.write_text(json.dumps({"key": key, "warnings": messages}))
    return rows, messages


def read_s3dis_room(
    room_dir: str | os.PathLike,
    *,
    strict: bool = True,
    stuff_classes: Sequence[str] = (),
    cache_file: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """One raw S3DIS room as numpy arrays: coords float32 (N, 3), colors float32 (N, 3) in [0, 1],
    sem_labels int64 (N,), instance_labels int64 (N,): one instance per annotation file, numbered
    0..K-1 in natural file order; files of `stuff_classes` get -1. Rows concatenate in that order."""
    rows, messages = _read_cached(Path(room_dir), strict, None if cache_file is None else Path(cache_file))
    for message in messages:
        warnings.warn(message, S3DISFormatWarning, stacklevel=2)
    sem = rows[:, 6].astype(np.int64)
    file_index = rows[:, 7].astype(np.int64)
    thing = ~np.isin(sem, [S3DIS_CLASSES.index(c) for c in stuff_classes])
    inst = np.full(len(rows), -1, dtype=np.int64)
    inst[thing] = np.unique(file_index[thing], return_inverse=True)[1]
    return {
        "coords": rows[:, :3].astype(np.float32),
        "colors": rgb8_to_unit(rows[:, 3:6]),
        "sem_labels": sem,
        "instance_labels": inst,
    }


def _areas(areas: str | int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(areas, str):
        if areas not in S3DIS_SPLITS:
            raise ValueError(
                f"S3DISRawDataset areas: expected a split in {sorted(S3DIS_SPLITS)} or area numbers, got {areas!r}"
            )
        return S3DIS_SPLITS[areas]
    result = (int(areas),) if isinstance(areas, (int, np.integer)) else tuple(int(a) for a in areas)
    if not result or min(result) < 1:
        raise ValueError(f"S3DISRawDataset areas: expected area numbers >= 1, got {areas!r}")
    return result


class S3DISRawDataset(Dataset):
    """Rooms of the raw S3DIS release under `root` (`root/Area_N/<room>/Annotations/*.txt`).

    Args:
        root: the directory holding Area_1 ... Area_6 (Stanford3dDataset_v1.2_Aligned_Version).
        areas: area numbers, or a split name: "train" = 1-4 and 6, "test" / "val" = 5, "all".
        strict: fail at the first malformed row with file:line (default); False skips / repairs
            and warns with counts (see the module docstring).
        cache_dir: where parsed rooms are kept as .npy (`<cache_dir>/Area_N/<room>.npy`).
        stuff_classes: classes whose points get instance -1 (default none: every annotation file is
            an instance, as in S3DIS instance benchmarks; Rooms3D uses ("ceiling", "floor", "wall")).

    Item: coords float32 (N, 3), colors float32 (N, 3) in [0, 1], sem_labels int64 (N,) into
    `class_names`, instance_labels int64 (N,) (-1 = none), scene_id "Area_N/<room>".
    """

    class_names = list(S3DIS_CLASSES)
    num_classes = len(S3DIS_CLASSES)

    def __init__(
        self,
        root: str | os.PathLike,
        areas: str | int | Sequence[int] = "train",
        *,
        strict: bool = True,
        cache_dir: str | os.PathLike | None = None,
        stuff_classes: Sequence[str] = (),
    ) -> None:
        unknown = sorted(set(stuff_classes) - set(S3DIS_CLASSES))
        if unknown:
            raise ValueError(f"S3DISRawDataset stuff_classes: expected names in {list(S3DIS_CLASSES)}, got {unknown}")
        self.root, self.strict, self.stuff_classes = Path(root), strict, tuple(stuff_classes)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.rooms: list[tuple[int, str]] = []
        for area in _areas(areas):
            area_dir = self.root / f"Area_{area}"
            if not area_dir.is_dir():
                raise FileNotFoundError(
                    f"{area_dir}: no such directory (expected the S3DIS raw layout <root>/Area_N/<room>/Annotations/)"
                )
            names = sorted((d.name for d in area_dir.iterdir() if (d / "Annotations").is_dir()), key=_natural_key)
            self.rooms += [(area, name) for name in names]

    def __len__(self) -> int:
        return len(self.rooms)

    def __getitem__(self, index: int) -> dict:
        area, room = self.rooms[index]
        cache = None if self.cache_dir is None else self.cache_dir / f"Area_{area}" / f"{room}.npy"
        scene = read_s3dis_room(
            self.root / f"Area_{area}" / room, strict=self.strict, stuff_classes=self.stuff_classes, cache_file=cache
        )
        item = {k: torch.from_numpy(v) for k, v in scene.items()}
        item["scene_id"] = f"Area_{area}/{room}"
        return item

    def __repr__(self) -> str:
        return f"S3DISRawDataset(root={str(self.root)!r}, rooms={len(self)}, strict={self.strict})"


def check_s3dis_raw(root: str | os.PathLike, areas: str | int | Sequence[int] = "all") -> tuple[int, list[str]]:
    """(rooms checked, one line per problem) of the raw release: every annotation file parsed strictly (its
    first malformed row with file:line, non-finite values, colour range, names). Used by check-data."""
    try:
        dataset = S3DISRawDataset(root, areas)
    except (FileNotFoundError, ValueError) as err:
        return 0, [str(err)]
    problems = []
    for area, room in dataset.rooms:
        room_dir = dataset.root / f"Area_{area}" / room
        ann = room_dir / "Annotations"
        files = sorted(ann.glob("*.txt"), key=lambda p: _natural_key(p.name))
        if not files:
            problems.append(f"{ann}: no <class>_<i>.txt annotation files")
        for path in files:
            match = _FILE_NAME.match(path.name)
            name = _CLASS_ALIASES.get(match.group(1).lower(), match.group(1).lower()) if match else None
            if name not in S3DIS_CLASSES:
                problems.append(f"{path}: expected <class>_<i>.txt with class in {list(S3DIS_CLASSES)}")
                continue
            try:
                _parse_rows(path, strict=True)
            except (ValueError, OSError) as err:
                problems.append(str(err))
    return len(dataset.rooms), problems


def _scene_arrays(scene: dict) -> tuple[np.ndarray, ...]:
    """coords (N, 3), 8-bit rgb (N, 3), sem (N,), inst (N,) of a scene item, lengths checked."""
    arrays = [
        np.asarray(scene[k].numpy() if torch.is_tensor(scene[k]) else scene[k])
        for k in ("coords", "colors", "sem_labels", "instance_labels")
    ]
    coords, colors, sem, inst = arrays
    n = len(coords)
    if coords.shape != (n, 3) or colors.shape != (n, 3) or sem.shape != (n,) or inst.shape != (n,):
        raise ValueError(
            f"scene: expected coords (N, 3), colors (N, 3), sem_labels (N,), instance_labels (N,), got "
            f"{coords.shape}, {colors.shape}, {sem.shape}, {inst.shape}"
        )
    return coords, np.clip(np.round(colors * 255), 0, 255), sem.astype(np.int64), inst.astype(np.int64)


def write_s3dis_raw(scene: dict, root: str | os.PathLike, area: int, room: str) -> Path:
    """Write a scene item as `root/Area_<area>/<room>/Annotations/<class>_<i>.txt` (rows
    "x y z r g b", 3 decimals as in the release), one file per instance and one per class for points
    with instance -1, plus `<room>/<room>.txt` with every point. Returns the room directory.

    Every point needs a class in 0..12 and each instance a single class (S3DIS cannot store others).
    """
    coords, rgb, sem, inst = _scene_arrays(scene)
    if len(sem) and (sem.min() < 0 or sem.max() >= len(S3DIS_CLASSES)):
        raise ValueError(f"write_s3dis_raw: expected sem_labels in [0, 13), got [{sem.min()}, {sem.max()}]")
    pairs = np.unique(np.stack([inst, sem], 1)[inst >= 0], axis=0)
    if len(np.unique(pairs[:, 0])) != len(pairs):
        raise ValueError("write_s3dis_raw: expected one class per instance, got instances with several classes")
    # stuff points are grouped per class (key -1 - class), thing points per instance (key = id)
    key = np.where(inst >= 0, inst, -1 - sem)
    order = np.argsort(key, kind="stable")
    groups, starts = np.unique(key[order], return_index=True)
    group_class = sem[order][starts]
    rows = np.concatenate([coords, rgb], 1)[order]
    room_dir = Path(root) / f"Area_{area}" / room
    (room_dir / "Annotations").mkdir(parents=True, exist_ok=True)
    per_class = np.zeros(len(S3DIS_CLASSES), dtype=np.int64)
    fmt = "%.3f %.3f %.3f %d %d %d"
    for cls, part in zip(group_class.tolist(), np.split(rows, starts[1:])):  # one file per instance
        per_class[cls] += 1
        np.savetxt(room_dir / "Annotations" / f"{S3DIS_CLASSES[cls]}_{per_class[cls]}.txt", part, fmt=fmt)
    np.savetxt(room_dir / f"{room}.txt", np.concatenate([coords, rgb], 1), fmt=fmt)
    return room_dir
