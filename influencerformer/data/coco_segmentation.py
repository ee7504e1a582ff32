"""COCO segmentations (polygons, uncompressed and compressed RLE): validated, converted to compressed RLE, decoded.

Every format is checked before pycocotools sees it (its decoder does not bounds-check a compressed string), and
a fault raises ValueError naming the annotation id and what is wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pycocotools.mask as mask_utils


def _bad(ann: dict, why: str) -> ValueError:
    return ValueError(f"annotation id {ann.get('id')}: bad segmentation: {why}")


def rle_string_counts(counts: str) -> np.ndarray:
    """Run lengths int64 ``(R,)`` of a COCO compressed RLE string (pycocotools' rleFrString).

    Each run is a little-endian base-32 varint (chars offset by 48, bit 0x20 = more chars follow,
    bit 0x10 of the last char = sign); runs after the second are deltas from the run two earlier.
    Vectorised over characters. Used to validate a string before pycocotools' decoder, which
    does not bounds-check and would write past its buffer on a corrupt string.
    """
    c = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if (c < 0).any() or (c > 63).any():
        raise ValueError("characters outside the RLE alphabet ('0'..'o')")
    ends = np.flatnonzero((c & 0x20) == 0)
    if ends.size == 0 or ends[-1] != c.size - 1:
        raise ValueError("string ends inside a run (truncated)")
    starts = np.concatenate([[0], ends[:-1] + 1])
    run = np.repeat(np.arange(ends.size), ends - starts + 1)
    shift = 5 * (np.arange(c.size) - starts[run])
    if shift.max() > 50:
        raise ValueError("run length varint too long")
    x = np.add.reduceat((c & 0x1F) << shift, starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.int64(1) << (5 * (ends - starts + 1))[negative]
    # undo the delta coding: run m (m > 2) stores count[m] - count[m - 2]
    out = x.copy()
    out[1::2] = np.cumsum(x[1::2])
    out[2::2] = np.cumsum(x[2::2])
    return out


def segmentation_to_rle(ann: dict, height: int, width: int) -> dict:
    """Compressed RLE ``{"size": [h, w], "counts": str}`` of ``ann["segmentation"]``.

    Accepts polygons (list of ``[x1, y1, x2, y2, ...]``, >= 3 points each), uncompressed RLE
    (``counts`` a list of ints) and compressed RLE (``counts`` a str). Raises ValueError naming
    the annotation id and what is wrong.
    """
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return _polygons_to_rle(ann, seg, height, width)
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise _bad(ann, f"expected polygons (list) or RLE (dict with 'counts' and 'size'), got {seg!r:.80}")
    if list(seg["size"]) != [height, width]:
        raise _bad(ann, f"RLE size {list(seg['size'])} does not match image (height, width) "
                        f"= ({height}, {width})")
    counts = seg["counts"]
    if isinstance(counts, list):
        runs = np.asarray(counts)
        if runs.dtype.kind not in "iu" or runs.ndim != 1:  # floats, strings, nested lists
            raise _bad(ann, "uncompressed RLE counts must be a flat list of integers")
        runs = runs.astype(np.int64)
    elif isinstance(counts, (str, bytes)):
        counts = counts.decode("ascii") if isinstance(counts, bytes) else counts
        try:
            runs = rle_string_counts(counts)
        except (ValueError, UnicodeEncodeError) as err:
            raise _bad(ann, f"compressed RLE counts: {err}") from err
    else:
        raise _bad(ann, f"RLE counts must be a list or a string, got {type(counts).__name__}")
    if (runs < 0).any() or runs.sum() != height * width:
        raise _bad(ann, f"RLE runs sum to {runs.sum()} (negative runs: {bool((runs < 0).any())}), "
                        f"image has {height * width} pixels")
    if isinstance(counts, list):
        return mask_utils.frPyObjects(seg, height, width)
    return {"size": [height, width], "counts": counts}


def _polygons_to_rle(ann: dict, polygons: list, height: int, width: int) -> dict:
    if not polygons:
        raise _bad(ann, "empty polygon list")
    for i, poly in enumerate(polygons):
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
            raise _bad(ann, f"polygon {i} must be a flat list of numbers [x1, y1, x2, y2, ...]")
        if len(poly) < 6 or len(poly) % 2:
            raise _bad(ann, f"polygon {i} has {len(poly)} coordinates; need an even number >= 6 (3 points)")
        if not all(math.isfinite(v) for v in poly):
            raise _bad(ann, f"polygon {i} has a non-finite coordinate")
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def decode_masks(anns: list[dict], height: int, width: int) -> np.ndarray:
    """Masks bool ``(K, height, width)`` of ``anns`` (one decode call for all of them)."""
    if not anns:
        return np.zeros((0, height, width), dtype=bool)
    rles = [segmentation_to_rle(ann, height, width) for ann in anns]
    return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
