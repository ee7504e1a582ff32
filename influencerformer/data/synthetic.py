"""shapes2d: seeded synthetic instance-segmentation images, generated on the fly.

Four thing classes, decided by *shape* only (colours are random): rectangle, ellipse, triangle,
ring. Shapes are rotated, have a random aspect ratio, occlude each other (later shapes are in
front, so masks are disjoint) and are dropped from the scene when too little of them is visible.
Optional "stuff" bands (sky at the top, grass at the bottom), each with its own texture, give a
panoptic / semantic target (``sem_seg``).

Presets (``SHAPES_PRESETS``):

- ``"default"``: 128x128, 1-8 shapes, radius 8-24 px, 1-2 stuff bands, textured background.
- ``"crowded"``: the benchmark of docs/background.md: 128x128, 10-40 shapes, radius 5-16 px, aspect
  0.7-1.3, visible area >= 30 px. Measured over the first 200 train images (seed 0): 24.5 visible
  instances per image on average, min 9, max 39 (docs/background.md: about 23, 8-37); about 2.6 ms of CPU
  time per image (one core).
- ``"dense"``: the CPU benchmark that decides (``configs/shapes2d_dense.yaml``): 96x96, 10-16 shapes, radius
  6-11 px, aspect 0.7-1.3, visible area >= 30 px. First 300 train images (seed 0): 12.9 visible instances per
  image on average, min 9, max 16.
- ``"medium"``: 64x64, 4-15 shapes, radius 4-10 px, visible area >= 15 px: small enough to train
  on two CPU cores in minutes. Same measurement: 9.7 per image, min 3, max 15; about 0.8 ms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

THING_CLASSES = ("rectangle", "ellipse", "triangle", "ring")
STUFF_CLASSES = ("sky", "grass")
VOID = 255  # sem_seg value of pixels that belong to no class

_RING_INNER = 0.6  # inner / outer radius of a ring: thick enough to survive at radius 5
_TRI_RADIUS = 1.25  # triangle circumradius in units of r, so its area is close to the others
_EXTENT = 1.5  # half-size of a shape's bounding box in units of max(rx, ry) (covers all four)
_SHADING = 0.1  # colour gradient across a shape: neighbours of equal colour stay separable
_SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ShapesConfig:
    """Generation parameters of shapes2d (a preset, then keyword overrides).

    Attributes:
        image_size: side of the square image, pixels.
        min_instances, max_instances: number of shapes placed per image (uniform); shapes with
            visible area < ``min_area`` are then removed, so the visible count can be smaller.
        radius_min, radius_max: shape radius (geometric mean of the two semi-axes), pixels.
        aspect_min, aspect_max: ratio of the two semi-axes.
        rotate: rotate each shape by a uniform random angle.
        min_area: smallest visible area, pixels, of a kept shape.
        min_stuff, max_stuff: number of stuff bands (0-2) per image.
        texture: amplitude of the background's sinusoidal texture.
        noise_std: std of the Gaussian pixel noise added to the whole image.
        num_train, num_val: default number of images of each split.
    """

    image_size: int = 128
    min_instances: int = 1
    max_instances: int = 8
    radius_min: float = 8.0
    radius_max: float = 24.0
    aspect_min: float = 0.6
    aspect_max: float = 1.6
    rotate: bool = True
    min_area: int = 30
    min_stuff: int = 1
    max_stuff: int = 2
    texture: float = 0.08
    noise_std: float = 0.03
    num_train: int = 2000
    num_val: int = 200

    def __post_init__(self) -> None:
        _check_range("image_size", 16, self.image_size, None)
        _check_range("min_instances", 0, self.min_instances, self.max_instances)
        _check_range("radius_min", 1.0, self.radius_min, self.radius_max)
        _check_range("aspect_min", 1e-3, self.aspect_min, self.aspect_max)
        _check_range("min_area", 1, self.min_area, None)
        _check_range("min_stuff", 0, self.min_stuff, self.max_stuff)
        _check_range("max_stuff", 0, self.max_stuff, len(STUFF_CLASSES))
        _check_range("num_train", 0, self.num_train, None)
        _check_range("num_val", 0, self.num_val, None)
        if self.texture < 0 or self.noise_std < 0:
            raise ValueError(
                f"texture and noise_std must be >= 0, got {self.texture} and {self.noise_std}"
            )


def _check_range(name: str, low: float, value: float, high: float | None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"shapes2d config: {name} must be in {bound}, got {value}")


SHAPES_PRESETS: dict[str, ShapesConfig] = {
    "default": ShapesConfig(),
    "crowded": ShapesConfig(
        image_size=128, min_instances=10, max_instances=40, radius_min=5.0, radius_max=16.0,
        aspect_min=0.7, aspect_max=1.3, min_area=30, min_stuff=0, max_stuff=0, texture=0.05,
    ),
    "dense": ShapesConfig(
        image_size=96, min_instances=10, max_instances=16, radius_min=6.0, radius_max=11.0,
        aspect_min=0.7, aspect_max=1.3, min_area=30, min_stuff=0, max_stuff=0, texture=0.05,
    ),
    "medium": ShapesConfig(
        image_size=64, min_instances=4, max_instances=15, radius_min=4.0, radius_max=10.0,
        aspect_min=0.7, aspect_max=1.3, min_area=15, min_stuff=0, max_stuff=0, texture=0.05,
    ),
}


def make_config(preset: str = "default", **overrides) -> ShapesConfig:
    """The preset's :class:`ShapesConfig` with ``overrides`` applied (unknown key: ValueError)."""
    if preset not in SHAPES_PRESETS:
        raise ValueError(f"unknown shapes2d preset {preset!r}; valid: {sorted(SHAPES_PRESETS)}")
    valid = [f.name for f in dataclasses.fields(ShapesConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown shapes2d option(s) {unknown}; valid keys: {valid}")
    return dataclasses.replace(SHAPES_PRESETS[preset], **overrides)


# --------------------------------------------------------------------------- rasterisation


def _inside(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of normalised, rotated coordinates ``u, v`` (any shape) in shape ``kind``."""
    if kind == 0:  # rectangle
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    r2 = u * u + v * v
    if kind == 1:  # ellipse
        return r2 <= 1.0
    if kind == 2:  # equilateral triangle, circumradius _TRI_RADIUS: base + two slanted sides
        return (v >= -0.5 * _TRI_RADIUS) & (v <= _TRI_RADIUS - np.sqrt(3.0) * np.abs(u))
    if kind == 3:  # ring
        return (r2 <= 1.0) & (r2 >= _RING_INNER**2)
    raise ValueError(f"shape kind must be in 0..{len(THING_CLASSES) - 1}, got {kind}")


def rasterize_shape(kind, cx, cy, rx, ry, angle, size):
    """Rasterise one shape on a ``size`` x ``size`` grid, evaluated at pixel centres.

    Args:
        kind: index into ``THING_CLASSES``.
        cx, cy: centre in pixels (x = column, y = row); rx, ry: semi-axes in pixels;
        angle: rotation in radians.
    Returns:
        ``(window, inside, u)``: ``window`` a pair of slices (rows, cols) of the shape's clipped
        bounding box, ``inside`` bool ``(h, w)`` over that window and ``u`` float ``(h, w)`` the
        normalised coordinate along the shape's first axis (for shading); ``None`` if off-image.
    """
    half = int(np.ceil(_EXTENT * max(rx, ry))) + 1
    y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, size)
    x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, size)
    if y0 >= y1 or x0 >= x1:
        return None
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    c, s = np.cos(angle), np.sin(angle)
    u = (c * xs + s * ys) / rx
    v = (-s * xs + c * ys) / ry
    return (slice(y0, y1), slice(x0, x1)), _inside(kind, u, v), u


# --------------------------------------------------------------------------- scene


def _background(cfg: ShapesConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured background and stuff bands.

    Returns:
        image float32 ``(S, S, 3)``, stuff index map int64 ``(S, S)`` (-1 = none), and the
        background's base colour ``(3,)``.
    """
    size = cfg.image_size
    # broadcastable (S, 1) / (1, S) grids: full (S, S) arrays only where a formula needs them
    yy = np.arange(size, dtype=np.float32)[:, None]
    xx = np.arange(size, dtype=np.float32)[None, :]
    base = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    freq = rng.uniform(1 / 32, 1 / 8, 2) * rng.choice([-1.0, 1.0], 2)
    # plane wave sin(a + b) = sin a cos b + cos a sin b: 1-D sines only (sin on S^2 is slow)
    a = (2 * np.pi * freq[0] * xx + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    b = (2 * np.pi * freq[1] * yy).astype(np.float32)
    wave = np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b)
    image = base + wave[..., None] * (cfg.texture * rng.choice([-1.0, 1.0], 3)).astype(np.float32)
    stuff = np.full((size, size), -1, dtype=np.int64)
    n_stuff = rng.integers(cfg.min_stuff, cfg.max_stuff + 1)
    for which in rng.choice(len(STUFF_CLASSES), n_stuff, replace=False):
        # wavy band boundary; each band covers at most ~40 % of the height, so two never overlap
        height = rng.uniform(0.15, 0.35) * size
        amp, period = rng.uniform(0, 0.05) * size, rng.uniform(0.5, 1.5) * size
        boundary = height + amp * np.sin(2 * np.pi * xx / period + rng.uniform(0, 2 * np.pi))
        region = yy < boundary if which == 0 else yy >= size - boundary
        image[region] = np.broadcast_to(_stuff_texture(which, yy, xx, rng), image.shape)[region]
        stuff[region] = which
    return image, stuff, base


def _stuff_texture(which: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture of stuff class ``which``, broadcastable to ``(S, S, 3)``: sky = smooth vertical
    gradient, grass = fine wavy vertical stripes (texture, not colour, identifies the class).
    ``yy`` is ``(S, 1)``, ``xx`` is ``(1, S)``."""
    size = yy.shape[0]
    if which == 0:
        top = np.array([0.45, 0.65, 0.95]) + rng.uniform(-0.1, 0.05, 3)
        return top + 0.3 * (yy / size)[..., None] * np.array([0.8, 0.6, 0.1])
    green = np.array([0.25, 0.6, 0.2]) + rng.uniform(-0.1, 0.1, 3)
    blades = np.sin(2 * np.pi * xx / rng.uniform(2.5, 4.0) + 2.0 * np.sin(yy / 5.0))
    return green + 0.12 * blades[..., None]


def _place_shapes(cfg: ShapesConfig, rng: np.random.Generator, base: np.ndarray) -> list[dict]:
    """Sample the shapes of one image (back to front) and rasterise each in its own window."""
    size, n = cfg.image_size, int(rng.integers(cfg.min_instances, cfg.max_instances + 1))
    kinds = rng.integers(0, len(THING_CLASSES), n)
    radius = rng.uniform(cfg.radius_min, cfg.radius_max, n)
    aspect = np.sqrt(rng.uniform(cfg.aspect_min, cfg.aspect_max, n))
    angle = rng.uniform(0, 2 * np.pi, n) if cfg.rotate else np.zeros(n)
    centre = rng.uniform(0, size, (n, 2))
    colour = rng.uniform(0, 1, (n, 3))
    # a shape of (almost) the background's colour would be an invisible target: shift it away
    close = np.abs(colour - base).max(axis=1) < 0.25
    colour[close] = (colour[close] + 0.5) % 1.0
    shapes = []
    for i in range(n):
        raster = rasterize_shape(
            int(kinds[i]), centre[i, 0], centre[i, 1], radius[i] * aspect[i], radius[i] / aspect[i],
            angle[i], size,
        )
        if raster is not None:
            window, inside, u = raster
            shapes.append(dict(kind=int(kinds[i]), colour=colour[i], window=window, inside=inside, u=u))
    return shapes


def _owner_map(shapes: list[dict], size: int) -> np.ndarray:
    """Index of the front-most shape at every pixel, int64 ``(S, S)``, -1 = none."""
    owner = np.full((size, size), -1, dtype=np.int64)
    for i, shape in enumerate(shapes):
        owner[shape["window"]][shape["inside"]] = i
    return owner


def generate_scene(cfg: ShapesConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One shapes2d image from ``rng``.

    Shapes whose visible area is below ``cfg.min_area`` are removed from the scene (not drawn),
    so every painted object is annotated. Removing a shape only uncovers the shapes behind it, so
    one removal pass suffices: every kept shape's visible area can only grow.

    Returns:
        ``image`` float32 ``(3, S, S)`` in [0, 1], ``masks`` bool ``(K, S, S)`` disjoint (back to
        front), ``labels`` int64 ``(K,)`` in 0..3, ``sem_seg`` int64 ``(S, S)`` (things 0..3, stuff
        4.., ``VOID`` elsewhere).
    """
    size = cfg.image_size
    image, stuff, base = _background(cfg, rng)
    shapes = _place_shapes(cfg, rng, base)
    areas = np.bincount(_owner_map(shapes, size).ravel() + 1, minlength=len(shapes) + 1)[1:]
    shapes = [s for s, a in zip(shapes, areas) if a >= cfg.min_area]
    for shape in shapes:
        shade = shape["colour"] + _SHADING * shape["u"][shape["inside"]][:, None]
        image[shape["window"]][shape["inside"]] = shade
    owner = _owner_map(shapes, size)
    image += np.float32(cfg.noise_std) * rng.standard_normal(image.shape, dtype=np.float32)
    labels = np.array([s["kind"] for s in shapes], dtype=np.int64)
    masks = owner[None] == np.arange(len(shapes))[:, None, None]
    sem_seg = np.where(stuff >= 0, stuff + len(THING_CLASSES), VOID)
    sem_seg = np.where(owner >= 0, labels[np.maximum(owner, 0)] if len(shapes) else 0, sem_seg)
    return {
        "image": np.clip(image, 0.0, 1.0).transpose(2, 0, 1).astype(np.float32),
        "masks": masks,
        "labels": labels,
        "sem_seg": sem_seg.astype(np.int64),
    }


# --------------------------------------------------------------------------- dataset


class Shapes2D(Dataset):
    """shapes2d as a torch Dataset: item ``index`` of ``split`` is a pure function of
    ``(seed, split, index)``, generated on the fly (nothing stored, nothing downloaded).

    Args:
        split: ``"train"`` or ``"val"`` (independent random streams, so val never repeats train).
        preset: a key of ``SHAPES_PRESETS`` (``"default"``, ``"crowded"``, ``"medium"``).
        num_images: length of the split; ``None`` = the preset's ``num_train`` / ``num_val``.
        seed: dataset seed.
        **overrides: fields of :class:`ShapesConfig` (unknown key: ValueError listing valid keys).

    Item: ``image`` float32 ``(3, H, W)`` in [0, 1], ``masks`` bool ``(K, H, W)`` disjoint,
    ``labels`` int64 ``(K,)`` in ``0..num_classes-1``, ``image_id`` int (= index), ``sem_seg``
    int64 ``(H, W)`` (thing ids, then stuff ids, 255 = void).
    """

    def __init__(self, split: str = "train", *, preset: str = "default", num_images: int | None = None,
                 seed: int = 0, **overrides) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"Shapes2D split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
        self.config = make_config(preset, **overrides)
        self.split, self.preset, self.seed = split, preset, int(seed)
        default = self.config.num_train if split == "train" else self.config.num_val
        self.num_images = default if num_images is None else int(num_images)
        if self.num_images < 0:
            raise ValueError(f"Shapes2D num_images must be >= 0, got {num_images}")
        self.thing_classes = list(THING_CLASSES)
        self.class_names = self.thing_classes  # same attribute name as COCOInstanceDataset
        self.stuff_classes = list(STUFF_CLASSES) if self.config.max_stuff > 0 else []
        self.num_classes = len(THING_CLASSES)
        self.category_ids = list(range(1, self.num_classes + 1))

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(
                f"Shapes2D {self.split}: index {index} out of range for {self.num_images} images"
            )
        index = index % self.num_images
        rng = np.random.default_rng((self.seed, _SPLIT_CODES[self.split], index))
        scene = generate_scene(self.config, rng)
        return {
            "image": torch.from_numpy(scene["image"]),
            "masks": torch.from_numpy(scene["masks"]),
            "labels": torch.from_numpy(scene["labels"]),
            "image_id": index,
            "sem_seg": torch.from_numpy(scene["sem_seg"]),
        }

    def __repr__(self) -> str:
        return (f"Shapes2D(split={self.split!r}, preset={self.preset!r}, "
                f"num_images={self.num_images}, seed={self.seed})")
