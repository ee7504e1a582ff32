"""Batch image items of different sizes: pad to a common size, keep per-image targets as lists."""

from __future__ import annotations

import torch

from influencerformer.data.transforms import pad_item


def _check_item(index: int, item: dict) -> None:
    """Fail with the item index and the offending field rather than deep inside the model."""
    for key in ("image", "masks", "labels", "image_id"):
        if key not in item:
            raise ValueError(f"collate_batch: item {index} has no {key!r} (keys: {sorted(item)})")
    image, masks, labels = item["image"], item["masks"], item["labels"]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"collate_batch: item {index} image must be (3, H, W), got {tuple(image.shape)}")
    if masks.dim() != 3 or masks.shape[1:] != image.shape[1:] or masks.dtype != torch.bool:
        raise ValueError(
            f"collate_batch: item {index} masks must be bool (K, {image.shape[1]}, {image.shape[2]}), "
            f"got {masks.dtype} {tuple(masks.shape)}"
        )
    if labels.shape != (masks.shape[0],):
        raise ValueError(
            f"collate_batch: item {index} labels must be ({masks.shape[0]},) to match masks, "
            f"got {tuple(labels.shape)}"
        )


def collate_batch(items: list[dict], *, size_divisibility: int = 1) -> dict:
    """Collate dataset items into a padded batch (use as a DataLoader ``collate_fn``).

    Args:
        items: B items ``{"image": float (3, H_i, W_i), "masks": bool (K_i, H_i, W_i),
            "labels": long (K_i,), "image_id": int}``, optional ``sem_seg (H_i, W_i)`` and
            ``image_size`` (valid extent of an already padded image).
        size_divisibility: round the padded size up to a multiple of this (backbone strides).
    Returns:
        ``images`` float ``(B, 3, H, W)`` zero-padded at bottom/right to the largest item;
        ``targets`` list of ``{"labels": (K_i,), "masks": bool (K_i, H, W)}`` padded with False;
        ``image_ids`` list of B ints; ``image_sizes`` list of B ``(h_i, w_i)`` valid extents;
        ``sem_segs`` long ``(B, H, W)`` padded with 255, only when every item has ``sem_seg``.
    """
    if not items:
        raise ValueError("collate_batch: got an empty list of items")
    if size_divisibility < 1:
        raise ValueError(f"collate_batch: size_divisibility must be >= 1, got {size_divisibility}")
    for index, item in enumerate(items):
        _check_item(index, item)
    div = size_divisibility
    height = -(-max(item["image"].shape[1] for item in items) // div) * div
    width = -(-max(item["image"].shape[2] for item in items) // div) * div
    padded = [pad_item(item, (height, width)) for item in items]
    batch = {
        "images": torch.stack([item["image"] for item in padded]),
        "targets": [{"labels": item["labels"], "masks": item["masks"]} for item in padded],
        "image_ids": [int(item["image_id"]) for item in padded],
        "image_sizes": [tuple(int(s) for s in item["image_size"]) for item in padded],
    }
    if all("sem_seg" in item for item in padded):
        batch["sem_segs"] = torch.stack([item["sem_seg"] for item in padded])
    return batch
