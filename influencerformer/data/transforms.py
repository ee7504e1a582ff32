"""Geometric transforms of an image item whose masks must follow the image exactly.

An item is the dict every image dataset returns: ``image`` float ``(3, H, W)``, ``masks`` bool
``(K, H, W)``, ``labels`` long ``(K,)`` and optionally ``sem_seg`` long ``(H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255  # sem_seg value of padding, as in the datasets' "void"


def resized_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """``(h, w)`` after scaling so that the longer side is ``longest`` (aspect kept, >= 1 px)."""
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of float ``(N, H, W)``; antialiased when shrinking (no aliasing of thin
    structures). Image and masks use this same call, so they stay aligned pixel for pixel."""
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]


def resize_longest(item: dict, longest: int) -> dict:
    """Resize ``item`` so its longer side is ``longest`` pixels.

    The image is resized bilinearly; each mask is resized with the *same* filter as a float and
    kept where it exceeds 0.5. The filter's weights are non-negative and sum to one, so resized
    disjoint masks sum to <= 1 per pixel and stay disjoint. Instances that vanish are dropped
    (with their labels). ``sem_seg`` uses nearest neighbour.

    Args:
        item: ``image (3, H, W)``, ``masks (K, H, W)`` bool, ``labels (K,)``, optional
            ``sem_seg (H, W)``; other keys are copied.
    Returns:
        a new item with ``image (3, h, w)``, ``masks (K', h, w)``, ``labels (K',)``, K' <= K.
    """
    if longest < 1:
        raise ValueError(f"resize: longest side must be >= 1, got {longest}")
    image = item["image"]
    size = resized_shape(image.shape[-2], image.shape[-1], longest)
    if size == tuple(image.shape[-2:]):
        return dict(item)
    out = dict(item)
    out["image"] = _interpolate(image, size).clamp_(0.0, 1.0)
    masks = item["masks"]
    if masks.shape[0]:
        masks = _interpolate(masks.float(), size) > 0.5
    else:
        masks = masks.new_zeros((0, *size))
    keep = masks.flatten(1).any(dim=1)
    out["masks"], out["labels"] = masks[keep], item["labels"][keep]
    if "sem_seg" in item:
        sem = item["sem_seg"][None, None].float()
        out["sem_seg"] = F.interpolate(sem, size=size, mode="nearest-exact")[0, 0].to(item["sem_seg"].dtype)
    return out


def pad_item(item: dict, size: int | tuple[int, int]) -> dict:
    """Pad ``item`` at the bottom and right to ``size`` = ``(h, w)`` (or an int for a square).

    Image pads with 0, masks with False, ``sem_seg`` with ``IGNORE_INDEX``; the original extent
    is recorded as ``item["image_size"] = (H, W)`` unless already present.
    """
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    height, width = item["image"].shape[-2:]
    if h < height or w < width:
        raise ValueError(f"pad: target size ({h}, {w}) is smaller than the image ({height}, {width})")
    pad = (0, w - width, 0, h - height)
    out = dict(item)
    out.setdefault("image_size", (int(height), int(width)))
    out["image"] = F.pad(item["image"], pad, value=0.0)
    out["masks"] = F.pad(item["masks"], pad, value=False)
    if "sem_seg" in item:
        out["sem_seg"] = F.pad(item["sem_seg"], pad, value=IGNORE_INDEX)
    return out
