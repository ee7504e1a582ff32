"""Preprocessed point clouds in the mmdet3d layout (S3DIS and ScanNet), and point targets.

Layout under ``root`` (one scene = one name):
    points/<scene>.bin         float32 (N, 6): x y z r g b, colour 0-255 (mmdet3d keeps it 8-bit)
    instance_mask/<scene>.bin  int64 (N,): 0 = unannotated, 1..K = instances
    semantic_mask/<scene>.bin  int64 (N,): S3DIS class ids 0..12, ScanNet raw NYU40 ids
    super_points/<scene>.bin   int64 (N,): ScanNet only (superpoint id per point), optional

ScanNet's raw NYU40 ids are mapped to its benchmark classes: 20 semantic classes
(SCANNET_SEM_IDS; other ids → -1) and 18 instance classes (the 20 without wall and floor); points
of other classes get instance -1, as they are not evaluated. ScanNet split lists
(scannetv2_<split>.txt, in root or root/meta_data) choose the scenes when present.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from influencerformer.data.errors import DataError
from influencerformer.data.s3dis import S3DIS_CLASSES, S3DIS_SPLITS, rgb8_to_unit

# ScanNet benchmark (evaluate_semantic_label.py / evaluate_semantic_instance.py VALID_CLASS_IDS)
SCANNET_SEM_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SCANNET_SEM_CLASSES = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "desk",
    "curtain",
    "refrigerator",
    "shower curtain",
    "toilet",
    "sink",
    "bathtub",
    "otherfurniture",
)
SCANNET_INST_IDS = SCANNET_SEM_IDS[2:]
SCANNET_INST_CLASSES = SCANNET_SEM_CLASSES[2:]
_FILES = ("points", "instance_mask", "semantic_mask")


def _nyu40_lookup(ids: Sequence[int]) -> np.ndarray:
    """(41,) table: NYU40 id → index in ids, -1 elsewhere."""
    table = np.full(41, -1, dtype=np.int64)
    table[list(ids)] = np.arange(len(ids))
    return table


_NYU40_TO_SEM = _nyu40_lookup(SCANNET_SEM_IDS)


def _read_bin(path: Path, dtype: type, width: int) -> np.ndarray:
    """A flat binary file as (N, width) (or (N,) when width is 1), size checked."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    item = np.dtype(dtype).itemsize * width
    size = path.stat().st_size
    if size % item:
        raise DataError(f"{path}: expected a multiple of {item} bytes ({np.dtype(dtype).name} × {width}), got {size}")
    data = np.fromfile(path, dtype=dtype)
    return data.reshape(-1, width) if width > 1 else data


def _check_length(path: Path, values: np.ndarray, n: int, points_path: Path) -> None:
    if len(values) != n:
        raise DataError(f"{path}: expected {n} values (one per point of {points_path}), got {len(values)}")


def check_finite(path: Path, values: np.ndarray, what: str = "x y z r g b") -> None:
    """DataError naming the file and the first point with a NaN / Inf value (a NaN point makes every
    prediction of its scene NaN, and the evaluation would report metrics of nothing)."""
    bad = ~np.isfinite(values).reshape(len(values), -1).all(1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: point {first} has a non-finite value ({what} = "
                        f"{' '.join(f'{v:g}' for v in np.atleast_1d(values[first]))}); {int(bad.sum())} such point(s)")


def _relabel(stored: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Stored instance ids → 0..K-1 in stored-id order where valid, -1 elsewhere."""
    inst = np.full(len(stored), -1, dtype=np.int64)
    inst[valid] = np.unique(stored[valid], return_inverse=True)[1]
    return inst


def read_preprocessed(root: str | os.PathLike, name: str, dataset: str = "s3dis") -> dict[str, np.ndarray]:
    """One preprocessed scene as numpy arrays: coords float32 (N, 3), colors float32 (N, 3) in [0, 1],
    sem_labels int64 (N,) (S3DIS 0..12 / ScanNet 0..19; -1 = no class), instance_labels int64 (N,)
    0..K-1 (-1 = none), and super_points int64 (N,) when root/super_points exists."""
    root = Path(root)
    paths = {key: root / key / f"{name}.bin" for key in (*_FILES, "super_points")}
    points = _read_bin(paths["points"], np.float32, 6)
    check_finite(paths["points"], points)
    stored_inst = _read_bin(paths["instance_mask"], np.int64, 1)
    raw_sem = _read_bin(paths["semantic_mask"], np.int64, 1)
    for key, values in (("instance_mask", stored_inst), ("semantic_mask", raw_sem)):
        _check_length(paths[key], values, len(points), paths["points"])
    if dataset == "scannet":
        in_table = (raw_sem >= 0) & (raw_sem <= 40)
        sem = np.where(in_table, _NYU40_TO_SEM[np.clip(raw_sem, 0, 40)], -1)
        evaluated = sem >= 2  # the 18 instance classes are the 20 without wall and floor
    else:
        sem = np.where((raw_sem >= 0) & (raw_sem < len(S3DIS_CLASSES)), raw_sem, -1)
        evaluated = np.ones(len(sem), dtype=bool)
    scene = {
        "coords": np.ascontiguousarray(points[:, :3]),
        "colors": rgb8_to_unit(points[:, 3:]),
        "sem_labels": sem,
        "instance_labels": _relabel(stored_inst, (stored_inst > 0) & evaluated),
    }
    if (root / "super_points").is_dir():
        scene["super_points"] = _read_bin(paths["super_points"], np.int64, 1)
        _check_length(paths["super_points"], scene["super_points"], len(points), paths["points"])
    return scene


def _split_scenes(root: Path, dataset: str, split: str) -> list[str]:
    """Scene names of a split: ScanNet's scannetv2_<split>.txt when present (else every scene),
    S3DIS by area prefix (train = Areas 1-4 and 6, test / val = Area 5)."""
    found = sorted(p.stem for p in (root / "points").glob("*.bin"))
    if split == "all":
        return found
    if dataset == "scannet":
        for candidate in (root / f"scannetv2_{split}.txt", root / "meta_data" / f"scannetv2_{split}.txt"):
            if candidate.exists():
                return candidate.read_text().split()
        return found
    if split not in S3DIS_SPLITS:
        raise ValueError(f"PreprocessedPointDataset split: expected one of {sorted(S3DIS_SPLITS)}, got {split!r}")
    prefixes = tuple(f"Area_{a}_" for a in S3DIS_SPLITS[split])
    return [name for name in found if name.startswith(prefixes)]


class PreprocessedPointDataset(Dataset):
    """Scenes of a preprocessed (mmdet3d layout) S3DIS or ScanNet directory.

    Args:
        root: directory holding points/, instance_mask/, semantic_mask/ (and super_points/).
        dataset: "s3dis" or "scannet" (decides the label mapping, see the module docstring).
        split: "train", "val", "test" or "all" (see `_split_scenes`); ignored when scenes is given.
        scenes: explicit scene names.

    Item: coords float32 (N, 3), colors float32 (N, 3) in [0, 1], sem_labels int64 (N,) into
    `class_names`, instance_labels int64 (N,) (-1 = none), scene_id str, super_points int64 (N,)
    when present. `instance_class_names` and `instance_class_map` (semantic index → instance class
    index or -1) serve `instance_ap_3d(..., class_map=...)` and `instance_targets`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        dataset: str = "s3dis",
        *,
        split: str = "train",
        scenes: Sequence[str] | None = None,
    ) -> None:
        if dataset not in ("s3dis", "scannet"):
            raise ValueError(f"PreprocessedPointDataset dataset: expected 's3dis' or 'scannet', got {dataset!r}")
        self.root, self.dataset = Path(root), dataset
        if not (self.root / "points").is_dir():
            raise FileNotFoundError(f"{self.root / 'points'}: no such directory (expected the mmdet3d layout)")
        self.scenes = list(scenes) if scenes is not None else _split_scenes(self.root, dataset, split)
        if dataset == "scannet":
            self.class_names, self.instance_class_names = list(SCANNET_SEM_CLASSES), list(SCANNET_INST_CLASSES)
            self.instance_class_map = [-1, -1, *range(len(SCANNET_INST_CLASSES))]
        else:
            self.class_names = self.instance_class_names = list(S3DIS_CLASSES)
            self.instance_class_map = list(range(len(S3DIS_CLASSES)))
        self.num_classes = len(self.class_names)
        problems = self.file_problems()
        if problems:  # found when the dataset is built, not when the scene's turn comes mid-run
            more = f" (and {len(problems) - 1} more: `influencerformer check-data` lists them)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)

    def file_problems(self) -> list[str]:
        """One line per missing file or file length that disagrees with the scene's points (sizes only:
        cheap enough for every build; values are checked as each scene is read, and by check-data)."""
        problems = []
        extra = ("super_points",) if (self.root / "super_points").is_dir() else ()
        widths = {"points": (24, "float32 × 6"), "instance_mask": (8, "int64 × 1"), "semantic_mask": (8, "int64 × 1"),
                  "super_points": (8, "int64 × 1")}
        for name in self.scenes:
            counts = {}
            for key in (*_FILES, *extra):
                path = self.root / key / f"{name}.bin"
                if not path.is_file():
                    problems.append(f"{path}: no such file (scene {name})")
                    continue
                size, (width, what) = path.stat().st_size, widths[key]
                if size % width:
                    problems.append(f"{path}: expected a multiple of {width} bytes ({what}), got {size}")
                    continue
                counts[key] = size // width
            n = counts.get("points")
            problems += [f"{self.root / key / f'{name}.bin'}: expected {n} values (one per point of "
                         f"{self.root / 'points' / f'{name}.bin'}), got {count}"
                         for key, count in counts.items() if n is not None and count != n]
        return problems

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        name = self.scenes[index]
        item = {k: torch.from_numpy(v) for k, v in read_preprocessed(self.root, name, self.dataset).items()}
        item["scene_id"] = name
        return item

    def __repr__(self) -> str:
        return f"PreprocessedPointDataset(root={str(self.root)!r}, dataset={self.dataset!r}, scenes={len(self)})"


def check_preprocessed(root: str | os.PathLike, dataset: str, split: str = "all") -> tuple[int, list[str]]:
    """(scenes checked, one line per problem) of a preprocessed (mmdet3d layout) split: every file present,
    lengths consistent, every value finite. Used by ``influencerformer check-data``."""
    try:
        ds = PreprocessedPointDataset.__new__(PreprocessedPointDataset)
        ds.root, ds.dataset = Path(root), dataset
        if not (ds.root / "points").is_dir():
            return 0, [f"{ds.root / 'points'}: no such directory (expected the mmdet3d layout)"]
        ds.scenes = _split_scenes(ds.root, dataset, split)
    except ValueError as err:
        return 0, [str(err)]
    problems = ds.file_problems()
    broken = {line.split(": ", 1)[0] for line in problems}
    for name in ds.scenes:
        if any(f"/{name}.bin" in path for path in broken):
            continue
        try:
            read_preprocessed(ds.root, name, dataset)
        except (DataError, FileNotFoundError) as err:
            problems.append(str(err))
    return len(ds.scenes), problems


def write_preprocessed(scene: dict, root: str | os.PathLike, name: str) -> None:
    """Write a scene item in the mmdet3d layout: points float32 (N, 6) with 8-bit colour,
    instance_mask = instance_labels + 1 (0 = none), semantic_mask = sem_labels as given (raw NYU40
    ids for ScanNet), super_points when the item has them."""
    arrays = {
        k: scene[k].numpy() if torch.is_tensor(scene[k]) else np.asarray(scene[k]) for k in scene if k != "scene_id"
    }
    coords, colors = arrays["coords"], arrays["colors"]
    n = len(coords)
    for key in ("colors", "sem_labels", "instance_labels", "super_points"):
        if key in arrays and len(arrays[key]) != n:
            raise ValueError(
                f"write_preprocessed {name}: expected {key} of length {n} (one per point), got {len(arrays[key])}"
            )
    rgb = np.clip(np.round(colors * 255), 0, 255)
    out = {
        "points": np.concatenate([coords, rgb], 1).astype(np.float32),
        "instance_mask": np.where(arrays["instance_labels"] >= 0, arrays["instance_labels"] + 1, 0).astype(np.int64),
        "semantic_mask": arrays["sem_labels"].astype(np.int64),
    }
    if "super_points" in arrays:
        out["super_points"] = arrays["super_points"].astype(np.int64)
    for key, values in out.items():
        (Path(root) / key).mkdir(parents=True, exist_ok=True)
        values.tofile(Path(root) / key / f"{name}.bin")


def instance_targets(
    instance_labels: torch.Tensor, sem_labels: torch.Tensor, class_map: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Criterion targets of one scene: {"labels": long (K,), "masks": bool (K, N)} from per-point
    instance_labels (N,) (-1 = none) and sem_labels (N,). An instance's class is the semantic label
    of its first point, through class_map (semantic index → class, -1 drops the instance) if given."""
    if instance_labels.shape != sem_labels.shape or instance_labels.dim() != 1:
        raise ValueError(
            f"instance_targets: expected instance_labels and sem_labels of one shape (N,), "
            f"got {tuple(instance_labels.shape)} and {tuple(sem_labels.shape)}"
        )
    annotated = instance_labels >= 0
    ids, inverse = torch.unique(instance_labels[annotated], return_inverse=True)
    first = torch.full((len(ids),), len(sem_labels), dtype=torch.long).scatter_reduce(
        0, inverse, annotated.nonzero().squeeze(1), reduce="amin"
    )
    labels = sem_labels[first].long() if len(ids) else torch.zeros(0, dtype=torch.long)
    if class_map is not None:
        table = torch.as_tensor(class_map, dtype=torch.long)
        if len(labels) and labels.max() >= len(table):
            raise ValueError(
                f"instance_targets: class_map has {len(table)} entries, got semantic label {int(labels.max())}"
            )
        labels = torch.where(labels >= 0, table[labels.clamp(min=0)], -1)
    masks = instance_labels[None, :] == ids[:, None]
    keep = labels >= 0
    return {"labels": labels[keep], "masks": masks[keep]}
