import pytest
import torch
from torch.utils.data import DataLoader

from influencerformer.data import Shapes2D, collate_batch


def _item(h, w, k, image_id, sem=True):
    gen = torch.Generator().manual_seed(image_id)
    masks = torch.zeros(k, h, w, dtype=torch.bool)
    for i in range(k):
        masks[i, i, : w // 2] = True
    item = {"image": torch.rand(3, h, w, generator=gen), "masks": masks,
            "labels": torch.arange(k, dtype=torch.int64), "image_id": image_id}
    if sem:
        item["sem_seg"] = torch.randint(0, 4, (h, w), generator=gen)
    return item


def test_pads_to_largest_and_keeps_content():
    items = [_item(10, 14, 3, 1), _item(12, 9, 0, 2)]
    batch = collate_batch(items)
    assert batch["images"].shape == (2, 3, 12, 14)
    assert batch["image_ids"] == [1, 2] and batch["image_sizes"] == [(10, 14), (12, 9)]
    assert torch.equal(batch["images"][0, :, :10, :14], items[0]["image"])
    assert (batch["images"][0, :, 10:] == 0).all() and (batch["images"][1, :, :, 9:] == 0).all()
    t0, t1 = batch["targets"]
    assert t0["masks"].shape == (3, 12, 14) and t0["masks"].dtype == torch.bool
    assert torch.equal(t0["masks"][:, :10, :14], items[0]["masks"]) and not t0["masks"][:, 10:].any()
    assert torch.equal(t0["labels"], items[0]["labels"])
    assert t1["masks"].shape == (0, 12, 14) and t1["labels"].shape == (0,)
    assert batch["sem_segs"].shape == (2, 12, 14) and (batch["sem_segs"][0, 10:] == 255).all()
    assert torch.equal(batch["sem_segs"][1, :, :9], items[1]["sem_seg"])


def test_size_divisibility_and_optional_sem_seg():
    batch = collate_batch([_item(10, 14, 1, 1), _item(12, 9, 1, 2, sem=False)], size_divisibility=8)
    assert batch["images"].shape == (2, 3, 16, 16)
    assert batch["targets"][1]["masks"].shape == (1, 16, 16)
    assert "sem_segs" not in batch  # only when every item has one


def test_dataloader_with_shapes2d():
    loader = DataLoader(Shapes2D("val", preset="medium", num_images=4), batch_size=4, collate_fn=collate_batch)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 64, 64) and len(batch["targets"]) == 4
    assert batch["image_ids"] == [0, 1, 2, 3] and batch["sem_segs"].shape == (4, 64, 64)


def test_bad_items_raise():
    with pytest.raises(ValueError, match="empty list"):
        collate_batch([])
    item = _item(8, 8, 2, 1)
    with pytest.raises(ValueError, match=r"item 1 has no 'labels'"):
        collate_batch([item, {k: v for k, v in item.items() if k != "labels"}])
    with pytest.raises(ValueError, match=r"item 0 masks must be bool \(K, 8, 8\), got torch.bool \(2, 8, 7\)"):
        collate_batch([{**item, "masks": item["masks"][:, :, :7]}])
    with pytest.raises(ValueError, match=r"item 0 labels must be \(2,\) to match masks, got \(3,\)"):
        collate_batch([{**item, "labels": torch.zeros(3, dtype=torch.int64)}])
    with pytest.raises(ValueError, match=r"item 0 image must be \(3, H, W\), got \(1, 8, 8\)"):
        collate_batch([{**item, "image": item["image"][:1]}])
    with pytest.raises(ValueError, match="size_divisibility must be >= 1"):
        collate_batch([item], size_divisibility=0)
