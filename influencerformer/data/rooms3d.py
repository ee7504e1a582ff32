"""rooms3d: seeded synthetic indoor rooms as point clouds, with S3DIS's 13 classes.

A room is a box (4-10 m × 4-10 m × 2.7-3.5 m). Ceiling, floor and walls are *stuff* (semantic
label, instance -1). Things are built from axis-aligned boxes and placed without intersecting:
doors, windows and boards on the walls; bookcases and columns against them; beams across the
ceiling; tables, chairs, sofas and clutter (some of it on tables) free-standing. Surfaces are
sampled uniformly by area, points hidden inside another element (the floor under a sofa, the wall
behind a board) are dropped, then xyz gets 5 mm Gaussian noise and is rounded to millimetres
(as in the S3DIS release); rgb = per-instance colour × face shading + noise, 8-bit like a scanner.

Item ``index`` of a split is a pure function of ``(seed, split, index)``; nothing is stored.
``Rooms3D.write_s3dis_raw`` / ``write_preprocessed`` write the scenes in the on-disk formats that
``S3DISRawDataset`` and ``PreprocessedPointDataset`` read, so the readers are testable end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from influencerformer.data.pointcloud import write_preprocessed
from influencerformer.data.s3dis import S3DIS_CLASSES, S3DIS_TO_NYU40, rgb8_to_unit, write_s3dis_raw

STUFF_CLASSES = ("ceiling", "floor", "wall")
_CLS = {name: i for i, name in enumerate(S3DIS_CLASSES)}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_DEFAULT_SCENES = {"train": 200, "val": 50, "test": 50}
_COORD_NOISE = 0.005  # metres: the spread of a terrestrial scanner at room range
_COLOR_NOISE = 0.03
_OVERSAMPLE = 1.3  # sample more than asked, drop hidden points, subsample to the exact count
_EPS = 0.01  # a point this close inside another element's box is hidden by it
_GAP = 0.05  # free space kept between placed footprints / wall spans
# base colours; classes missing here get a random colour per instance (chairs, sofas, clutter)
_BASE_COLORS = {
    "ceiling": (0.92, 0.92, 0.90),
    "floor": (0.55, 0.45, 0.35),
    "wall": (0.85, 0.83, 0.78),
    "beam": (0.88, 0.88, 0.86),
    "column": (0.80, 0.80, 0.76),
    "window": (0.60, 0.75, 0.90),
    "door": (0.50, 0.33, 0.20),
    "table": (0.60, 0.45, 0.30),
    "bookcase": (0.55, 0.40, 0.25),
    "board": (0.95, 0.95, 0.95),
}
# how many of each thing a room gets (inclusive ranges; placement may drop some when full)
_COUNTS = {
    "beam": (0, 2),
    "column": (0, 2),
    "door": (1, 2),
    "window": (0, 3),
    "board": (0, 2),
    "bookcase": (0, 3),
    "table": (1, 3),
    "sofa": (0, 2),
    "chair": (2, 8),
    "clutter": (2, 10),
}


@dataclass
class _Element:
    """One semantic element: boxes lo/hi (B, 3), faces to sample (B, 6) bool, colour (3,)."""

    cls: int
    lo: np.ndarray
    hi: np.ndarray
    faces: np.ndarray
    color: np.ndarray


def _boxes(*rows: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes given as rows (a0, a1, b0, b1, z0, z1) → lo, hi (B, 3)."""
    r = np.asarray(rows, dtype=np.float64).reshape(-1, 3, 2)
    return r[:, :, 0], r[:, :, 1]


def _rotate(lo: np.ndarray, hi: np.ndarray, k: int, length: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate boxes of a footprint [0, length] × [0, width] by k·90° about z, footprint kept at the origin."""
    a0, a1, b0, b1 = lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]
    x0, x1, y0, y1 = {
        0: (a0, a1, b0, b1),
        1: (width - b1, width - b0, a0, a1),
        2: (length - a1, length - a0, width - b1, width - b0),
        3: (b0, b1, length - a1, length - a0),
    }[k % 4]
    return np.stack([x0, y0, lo[:, 2]], 1), np.stack([x1, y1, hi[:, 2]], 1)


def _wall_to_world(w: int, lo: np.ndarray, hi: np.ndarray, room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in a wall frame (u along the wall, n into the room, z) → world boxes.

    Walls: 0 is y = 0, 1 is x = W, 2 is y = D, 3 is x = 0; u runs along +x or +y."""
    big_w, big_d = room[0], room[1]
    u0, u1, n0, n1 = lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]
    x0, x1, y0, y1 = {
        0: (u0, u1, n0, n1),
        1: (big_w - n1, big_w - n0, u0, u1),
        2: (u0, u1, big_d - n1, big_d - n0),
        3: (n0, n1, u0, u1),
    }[w]
    return np.stack([x0, y0, lo[:, 2]], 1), np.stack([x1, y1, hi[:, 2]], 1)


# ------------------------------------------------------------------ templates (local frames)


def _table(rng: np.random.Generator) -> tuple:
    length, width, h = rng.uniform(0.8, 2.0), rng.uniform(0.6, 1.0), rng.uniform(0.70, 0.78)
    legs = [(a, a + 0.05, b, b + 0.05, 0, h - 0.04) for a in (0.03, length - 0.08) for b in (0.03, width - 0.08)]
    return length, width, _boxes((0, length, 0, width, h - 0.04, h), *legs)


def _chair(rng: np.random.Generator) -> tuple:
    s, back = rng.uniform(0.42, 0.5), rng.uniform(0.4, 0.5)
    legs = [(a, a + 0.04, b, b + 0.04, 0, 0.42) for a in (0.0, s - 0.04) for b in (0.0, s - 0.04)]
    return s, s, _boxes((0, s, 0, s, 0.42, 0.46), (0, s, 0, 0.04, 0.46, 0.46 + back), *legs)


def _sofa(rng: np.random.Generator) -> tuple:
    length, width = rng.uniform(1.4, 2.2), rng.uniform(0.8, 0.95)
    return (
        length,
        width,
        _boxes(
            (0, length, 0, width, 0, 0.42),
            (0, length, 0, 0.2, 0.42, 0.8),
            (0, 0.2, 0.2, width, 0.42, 0.6),
            (length - 0.2, length, 0.2, width, 0.42, 0.6),
        ),
    )


def _clutter(rng: np.random.Generator) -> tuple:
    a, b, c = rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.6)
    return a, b, _boxes((0, a, 0, b, 0, c))


def _bookcase(rng: np.random.Generator, room: np.ndarray) -> tuple:
    width, depth, h = rng.uniform(0.6, 1.2), rng.uniform(0.3, 0.4), rng.uniform(1.5, 2.2)
    shelves = [(0.02, width - 0.02, 0.02, depth, z, z + 0.02) for z in np.linspace(0, h - 0.02, rng.integers(4, 7))]
    return (
        width,
        depth,
        _boxes((0, 0.02, 0, depth, 0, h), (width - 0.02, width, 0, depth, 0, h), (0, width, 0, 0.02, 0, h), *shelves),
    )


def _column(rng: np.random.Generator, room: np.ndarray) -> tuple:
    width, depth = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)
    return width, depth, _boxes((0, width, 0, depth, 0, room[2]))


def _door(rng: np.random.Generator, room: np.ndarray) -> tuple:
    width = rng.uniform(0.8, 1.0)
    return width, 0.04, _boxes((0, width, 0, 0.04, 0, rng.uniform(2.0, 2.1)))


def _window(rng: np.random.Generator, room: np.ndarray) -> tuple:
    width, bottom = rng.uniform(0.8, 1.6), rng.uniform(0.8, 0.9)
    return width, 0.03, _boxes((0, width, 0, 0.03, bottom, bottom + rng.uniform(1.0, 2.1 - bottom)))


def _board(rng: np.random.Generator, room: np.ndarray) -> tuple:
    width, bottom = rng.uniform(1.0, 2.5), rng.uniform(0.9, 1.0)
    return width, 0.02, _boxes((0, width, 0, 0.02, bottom, bottom + rng.uniform(0.8, 1.1)))


_FLOOR_THINGS = {"table": _table, "chair": _chair, "sofa": _sofa, "clutter": _clutter}
_WALL_THINGS = {"column": _column, "door": _door, "window": _window, "board": _board, "bookcase": _bookcase}


# ------------------------------------------------------------------ layout


def _overlaps(rect: tuple, rects: list, gap: float) -> bool:
    """Whether rect (x0, y0, x1, y1) comes closer than gap to any of rects (also intervals: pass y = 0, 0)."""
    if not rects:
        return False
    r = np.asarray(rects)
    return bool(
        np.any(
            (rect[0] < r[:, 2] + gap)
            & (r[:, 0] < rect[2] + gap)
            & (rect[1] < r[:, 3] + gap)
            & (r[:, 1] < rect[3] + gap)
        )
    )


class _RoomBuilder:
    """Places elements without intersections: footprints on the floor (and on table tops) and
    spans along each wall are kept apart by _GAP; a thing that finds no room is left out."""

    _TRIES = 30

    def __init__(self, rng: np.random.Generator, room: np.ndarray) -> None:
        self.rng, self.room = rng, room
        self.elements: list[_Element] = []
        self.floor: list[tuple] = []  # footprints (x0, y0, x1, y1) of everything on the floor or walls
        self.spans: dict[int, list[tuple]] = {w: [] for w in range(4)}  # (t0, 0, t1, 0) along each wall
        self.tops: list[tuple] = []  # (x0, y0, x1, y1, z, footprints on it) of table tops

    def add(self, name: str, lo: np.ndarray, hi: np.ndarray, faces: np.ndarray | None = None) -> None:
        if faces is None:
            faces = np.ones((len(lo), 6), dtype=bool)
            faces[:, 4] = lo[:, 2] > 1e-6  # nobody sees the underside of a part standing on the floor
        base = _BASE_COLORS.get(name)
        color = (
            self.rng.uniform(0.1, 0.9, 3) if base is None else np.clip(np.add(base, self.rng.normal(0, 0.05, 3)), 0, 1)
        )
        self.elements.append(_Element(_CLS[name], lo, hi, faces, color))

    def add_stuff(self) -> None:
        """Floor, ceiling and the four walls as zero-thickness boxes sampled on their inner face only."""
        w, d, h = self.room
        one = lambda i: np.eye(6, dtype=bool)[[i]]  # noqa: E731 - face mask with only face i
        self.add("floor", *_boxes((0, w, 0, d, 0, 0)), one(5))
        self.add("ceiling", *_boxes((0, w, 0, d, h, h)), one(4))
        lo, hi = _boxes((0, w, 0, 0, 0, h), (w, w, 0, d, 0, h), (0, w, d, d, 0, h), (0, 0, 0, d, 0, h))
        self.add("wall", lo, hi, np.eye(6, dtype=bool)[[3, 0, 2, 1]])

    def place_beam(self) -> None:
        """A beam across the ceiling along x, clear of columns (which stand within 0.6 m of walls)."""
        w, d, h = self.room
        width, depth = self.rng.uniform(0.3, 0.5), self.rng.uniform(0.3, 0.45)
        if d - 1.4 - width <= 0:
            return
        for _ in range(self._TRIES):
            y0 = self.rng.uniform(0.7, d - 0.7 - width)
            span = (y0, 0, y0 + width, 0)
            if not (_overlaps(span, self.spans[1], _GAP) or _overlaps(span, self.spans[3], _GAP)):
                self.spans[1].append(span)
                self.spans[3].append(span)
                self.add("beam", *_boxes((0, w, y0, y0 + width, h - depth, h)))
                return

    def place_on_wall(self, name: str) -> None:
        """A wall thing at a free span of a random wall whose floor footprint is free too."""
        width, _, (lo, hi) = _WALL_THINGS[name](self.rng, self.room)
        lengths = (self.room[0], self.room[1], self.room[0], self.room[1])
        for _ in range(self._TRIES):
            wall = int(self.rng.integers(4))
            free = lengths[wall] - width - 2 * _GAP
            if free <= 0:
                continue
            t0 = self.rng.uniform(_GAP, _GAP + free)
            wlo, whi = _wall_to_world(wall, lo + [t0, 0, 0], hi + [t0, 0, 0], self.room)
            rect = (*wlo.min(0)[:2], *whi.max(0)[:2])
            if _overlaps((t0, 0, t0 + width, 0), self.spans[wall], _GAP) or _overlaps(rect, self.floor, 0.0):
                continue
            self.spans[wall].append((t0, 0, t0 + width, 0))
            self.floor.append(rect)
            self.add(name, wlo, whi)
            return

    def place_on_floor(self, name: str) -> None:
        """A free-standing thing, rotated by k·90°, 0.1 m clear of the walls; clutter may go on a table."""
        length, width, (lo, hi) = _FLOOR_THINGS[name](self.rng)
        k = int(self.rng.integers(4))
        lo, hi = _rotate(lo, hi, k, length, width)
        fx, fy = (length, width) if k % 2 == 0 else (width, length)
        region, taken, z = (0.1, 0.1, self.room[0] - 0.1, self.room[1] - 0.1), self.floor, 0.0
        if name == "clutter" and self.tops and self.rng.random() < 0.5:
            *region, z, taken = self.tops[int(self.rng.integers(len(self.tops)))]
        if region[2] - region[0] < fx or region[3] - region[1] < fy:
            return
        for _ in range(self._TRIES):
            x0, y0 = self.rng.uniform(region[0], region[2] - fx), self.rng.uniform(region[1], region[3] - fy)
            rect = (x0, y0, x0 + fx, y0 + fy)
            if _overlaps(rect, taken, _GAP):
                continue
            taken.append(rect)
            self.add(name, lo + [x0, y0, z], hi + [x0, y0, z])
            if name == "table":
                self.tops.append((*rect, float(hi[:, 2].max()), []))
            return


def _build_room(rng: np.random.Generator) -> list[_Element]:
    """Every element of one random room, stuff first, then things in an order that fills walls first."""
    room = np.array([rng.uniform(4, 10), rng.uniform(4, 10), rng.uniform(2.7, 3.5)])
    builder = _RoomBuilder(rng, room)
    builder.add_stuff()
    for name, (low, high) in _COUNTS.items():
        for _ in range(int(rng.integers(low, high + 1))):
            if name == "beam":
                builder.place_beam()
            elif name in _WALL_THINGS:
                builder.place_on_wall(name)
            else:
                builder.place_on_floor(name)
    return builder.elements


# ------------------------------------------------------------------ sampling

# brightness of the faces -x, +x, -y, +y, -z, +z: a fixed light direction makes faces distinguishable
_SHADE = np.array([0.85, 0.9, 0.8, 0.95, 0.7, 1.0])


def _box_faces(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
    """Faces of boxes lo/hi (B, 3) as parallelograms: origin, u, v (B, 6, 3) and area (B, 6).

    Face 2·i is the min side on axis i, face 2·i + 1 the max side."""
    ext = hi - lo
    origin = np.repeat(lo[:, None, :], 6, axis=1)
    u, v, area = np.zeros_like(origin), np.zeros_like(origin), np.zeros(origin.shape[:2])
    for axis in range(3):  # three axes, each vectorised over boxes
        j, k = [a for a in range(3) if a != axis]
        origin[:, 2 * axis + 1, axis] = hi[:, axis]
        u[:, 2 * axis : 2 * axis + 2, j] = ext[:, None, j]
        v[:, 2 * axis : 2 * axis + 2, k] = ext[:, None, k]
        area[:, 2 * axis : 2 * axis + 2] = (ext[:, j] * ext[:, k])[:, None]
    return origin, u, v, area


def _sample_surfaces(elements: list[_Element], n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """n points uniform by area over the sampled faces: xyz (n, 3), element (n,), face side (n,) in 0..5,
    minus the points hidden inside another element's box."""
    lo = np.concatenate([e.lo for e in elements])
    hi = np.concatenate([e.hi for e in elements])
    box_owner = np.repeat(np.arange(len(elements)), [len(e.lo) for e in elements])
    origin, u, v, area = _box_faces(lo, hi)
    area = (area * np.concatenate([e.faces for e in elements])).reshape(-1)
    face = np.repeat(np.arange(area.size), rng.multinomial(n, area / area.sum()))
    ab = rng.random((n, 2))
    xyz = origin.reshape(-1, 3)[face] + ab[:, :1] * u.reshape(-1, 3)[face] + ab[:, 1:] * v.reshape(-1, 3)[face]
    owner = box_owner[face // 6]
    hidden = np.zeros(n, dtype=bool)
    for b in range(len(lo)):  # ~100 boxes, each test vectorised over all points
        inside = np.all((xyz > lo[b] - _EPS) & (xyz < hi[b] + _EPS), axis=1)
        hidden |= inside & (owner != box_owner[b])
    keep = ~hidden
    return xyz[keep], owner[keep], face[keep] % 6


def generate_room(rng: np.random.Generator, num_points: int) -> dict[str, np.ndarray]:
    """One room of about num_points points (exactly, unless hidden points leave fewer).

    Returns coords float32 (N, 3) in metres (mm grid), colors float32 (N, 3) in [0, 1] (k / 255),
    sem_labels int64 (N,) into S3DIS_CLASSES, instance_labels int64 (N,) 0..K-1 (-1 = stuff)."""
    elements = _build_room(rng)
    xyz, owner, side = _sample_surfaces(elements, int(np.ceil(_OVERSAMPLE * num_points)), rng)
    pick = rng.permutation(len(xyz))[:num_points]  # also shuffles, as a scanner's order is not by object
    xyz, owner, side = xyz[pick], owner[pick], side[pick]
    cls = np.array([e.cls for e in elements])
    color = np.stack([e.color for e in elements])
    sem = cls[owner]
    thing = ~np.isin(sem, [_CLS[s] for s in STUFF_CLASSES])
    inst = np.full(len(owner), -1, dtype=np.int64)
    # contiguous ids in placement order, even if a small thing lost all its points
    inst[thing] = np.unique(owner[thing], return_inverse=True)[1]
    coords = np.round(xyz + rng.normal(0, _COORD_NOISE, xyz.shape), 3).astype(np.float32)
    rgb = color[owner] * _SHADE[side][:, None] + rng.normal(0, _COLOR_NOISE, xyz.shape)
    return {
        "coords": coords,
        "colors": rgb8_to_unit(np.clip(np.round(rgb * 255), 0, 255)),
        "sem_labels": sem.astype(np.int64),
        "instance_labels": inst,
    }


# ------------------------------------------------------------------ dataset


class Rooms3D(Dataset):
    """rooms3d as a torch Dataset, generated on the fly.

    Args:
        split: "train", "val" or "test" (independent random streams).
        num_scenes: length of the split (default 200 train, 50 val / test).
        seed: dataset seed; item i is a pure function of (seed, split, i).
        points_per_room: inclusive range (low, high) of points per room; use small values in tests.

    Item: coords float32 (N, 3) metres, colors float32 (N, 3) in [0, 1], sem_labels int64 (N,)
    into `class_names` (S3DIS's 13), instance_labels int64 (N,) 0..K-1 (-1 = ceiling, floor,
    wall), scene_id str.
    """

    class_names = list(S3DIS_CLASSES)
    stuff_classes = list(STUFF_CLASSES)
    thing_classes = [c for c in S3DIS_CLASSES if c not in STUFF_CLASSES]
    num_classes = len(S3DIS_CLASSES)

    def __init__(
        self,
        split: str = "train",
        *,
        num_scenes: int | None = None,
        seed: int = 0,
        points_per_room: tuple[int, int] = (20000, 100000),
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"Rooms3D split: expected one of {sorted(_SPLIT_CODES)}, got {split!r}")
        low, high = (int(p) for p in points_per_room)
        if not 1 <= low <= high:
            raise ValueError(f"Rooms3D points_per_room: expected 1 <= low <= high, got {tuple(points_per_room)}")
        self.split, self.seed, self.points_per_room = split, int(seed), (low, high)
        self.num_scenes = _DEFAULT_SCENES[split] if num_scenes is None else int(num_scenes)
        if self.num_scenes < 0:
            raise ValueError(f"Rooms3D num_scenes: expected >= 0, got {num_scenes}")

    def __len__(self) -> int:
        return self.num_scenes

    def scene_id(self, index: int) -> str:
        return f"rooms3d_{self.split}_{index:05d}"

    def __getitem__(self, index: int) -> dict:
        if not -self.num_scenes <= index < self.num_scenes:
            raise IndexError(f"Rooms3D {self.split}: index {index} out of range for {self.num_scenes} scenes")
        index %= self.num_scenes
        rng = np.random.default_rng((self.seed, _SPLIT_CODES[self.split], index))
        room = generate_room(rng, int(rng.integers(self.points_per_room[0], self.points_per_room[1] + 1)))
        item = {k: torch.from_numpy(v) for k, v in room.items()}
        item["scene_id"] = self.scene_id(index)
        return item

    def write_s3dis_raw(self, root: str, area: int = 1) -> list[str]:
        """Write every scene as room `room_<i + 1>` of `root/Area_<area>` (S3DIS raw text layout,
        stuff as one annotation file per class). Returns the room names in index order."""
        rooms = [f"room_{i + 1}" for i in range(len(self))]
        for i, room in enumerate(rooms):
            write_s3dis_raw(self[i], root, area, room)
        return rooms

    def write_preprocessed(self, root: str, dataset: str = "s3dis", *, area: int = 1) -> list[str]:
        """Write every scene in the mmdet3d binary layout under root. dataset "s3dis": names
        `Area_<area>_room_<i + 1>`, S3DIS class ids; "scannet": names `scene<i>_00` and semantic ids
        mapped to raw NYU40 (S3DIS_TO_NYU40), as ScanNet stores them. Returns the names in index order."""
        if dataset not in ("s3dis", "scannet"):
            raise ValueError(f"write_preprocessed dataset: expected 's3dis' or 'scannet', got {dataset!r}")
        names = []
        for i in range(len(self)):
            scene = self[i]
            if dataset == "scannet":
                scene["sem_labels"] = torch.as_tensor(S3DIS_TO_NYU40)[scene["sem_labels"]]
            names.append(f"Area_{area}_room_{i + 1}" if dataset == "s3dis" else f"scene{i:04d}_00")
            write_preprocessed(scene, root, names[-1])
        return names

    def __repr__(self) -> str:
        return (
            f"Rooms3D(split={self.split!r}, num_scenes={self.num_scenes}, seed={self.seed}, "
            f"points_per_room={self.points_per_room})"
        )
