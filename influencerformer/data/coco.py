"""COCO instance segmentation: reader (polygons, compressed / uncompressed RLE) and writer.

The reader follows COCO's conventions: ``iscrowd`` annotations are kept in the ground truth used
for evaluation (``dataset.coco``) but dropped from the training targets; category ids, which are
not contiguous in COCO (1..90 for 80 classes), are mapped to labels ``0..C-1`` in id order, and
``dataset.category_ids[label]`` maps back. The segmentation formats are checked and decoded in
``coco_segmentation.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from influencerformer.data.coco_segmentation import (  # noqa: F401  (rle_string_counts: re-exported)
    decode_masks,
    rle_string_counts,
    segmentation_to_rle,
)
from influencerformer.data.errors import DataError
from influencerformer.data.transforms import pad_item, resize_longest

# --------------------------------------------------------------------------- json loading


def load_coco_json(ann_file: str | Path) -> dict:
    """Read and structurally validate a COCO instances json (images, annotations, categories).

    Every annotation's segmentation is decoded to RLE once, so a bad polygon or RLE is found here, not when
    its image is loaded mid-run. Missing ``iscrowd`` defaults to 0; missing ``area`` / ``bbox`` are computed
    from the mask (COCOeval needs both). Raises FileNotFoundError / DataError naming the file and the problem
    (the first one, with the count of the others: :func:`check_coco` lists them all).
    """
    data, problems = _load_coco_json(Path(ann_file))
    if problems:
        more = f" (and {len(problems) - 1} more: `influencerformer check-data` lists them)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return data


def _load_coco_json(ann_file: Path) -> tuple[dict, list[str]]:
    """(data, one line per bad annotation); a structural fault of the file raises DataError at once."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {ann_file} not found")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{ann_file}: malformed json: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a json object at top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: {key!r} must be a list, got {type(data.get(key)).__name__}")
    images = _index_by_id(data["images"], ("file_name", "height", "width"), "image", ann_file)
    categories = _index_by_id(data["categories"], ("name",), "category", ann_file)
    for image in images.values():
        size = (image["height"], image["width"])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            raise DataError(f"{ann_file}: image id {image['id']}: height and width must be positive "
                            f"integers, got {size}")
    problems, good = [], []
    for ann in data["annotations"]:
        try:
            _check_annotation(ann, images, categories, ann_file)
            image = images[ann["image_id"]]
            rle = segmentation_to_rle(ann, image["height"], image["width"])  # validates polygons and RLE
        except ValueError as err:
            problems.append(str(err) if str(err).startswith(str(ann_file)) else f"{ann_file}: {err}")
            continue
        ann.setdefault("iscrowd", 0)
        if "area" not in ann or "bbox" not in ann:
            ann.setdefault("area", float(mask_utils.area(rle)))
            ann.setdefault("bbox", mask_utils.toBbox(rle).tolist())
        good.append(ann)
    data["annotations"] = good
    return data, problems


def _index_by_id(entries: list, fields: tuple[str, ...], kind: str, ann_file: Path) -> dict:
    """``{id: entry}`` after checking every entry has an int id (unique) and ``fields``."""
    index = {}
    for pos, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise DataError(f"{ann_file}: {kind}s[{pos}] must be an object with an integer 'id'")
        missing = [f for f in fields if f not in entry]
        if missing:
            raise DataError(f"{ann_file}: {kind} id {entry['id']} is missing {missing}")
        if entry["id"] in index:
            raise DataError(f"{ann_file}: duplicate {kind} id {entry['id']}")
        index[entry["id"]] = entry
    return index


def _check_annotation(ann: object, images: dict, categories: dict, ann_file: Path) -> None:
    if not isinstance(ann, dict) or "id" not in ann:
        raise ValueError(f"{ann_file}: every annotation must be an object with an 'id', got {ann!r:.80}")
    for key in ("image_id", "category_id", "segmentation"):
        if key not in ann:
            raise ValueError(f"{ann_file}: annotation id {ann['id']} has no {key!r}")
    if ann["image_id"] not in images:
        raise ValueError(f"{ann_file}: annotation id {ann['id']}: unknown image id {ann['image_id']}")
    if ann["category_id"] not in categories:
        raise ValueError(
            f"{ann_file}: annotation id {ann['id']}: unknown category id {ann['category_id']} "
            f"(known: {sorted(categories)})"
        )


# --------------------------------------------------------------------------- dataset


def _quiet_coco(data: dict) -> COCO:
    """A pycocotools COCO index over ``data`` (without its progress prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_image(path: Path, image_id: int) -> torch.Tensor:
    """RGB image float32 ``(3, H, W)`` in [0, 1] (grey / RGBA / palette converted to RGB).
    A file PIL cannot decode (corrupt, truncated, not an image) raises DataError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"COCO image file {path} for image id {image_id} not found")
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's ways of saying "corrupt"
        raise DataError(f"image file {path} (image id {image_id}) cannot be decoded: "
                        f"{type(err).__name__}: {err}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class COCOInstanceDataset(Dataset):
    """COCO-format instance segmentation as a torch Dataset.

    Args:
        image_dir: folder holding the images named by ``file_name``.
        ann_file: COCO instances json.
        image_size: if set, resize so the longest side is this many pixels (masks follow).
        pad_to: if set, pad (bottom / right) to this int (square) or ``(h, w)``.

    Attributes: ``coco`` (pycocotools COCO over every annotation, crowd ones included: the
    evaluation ground truth), ``category_ids`` (COCO id of each contiguous label),
    ``class_names``, ``num_classes``, ``image_ids`` (dataset order).

    Item: ``image`` float32 ``(3, H, W)``, ``masks`` bool ``(K, H, W)`` (non-crowd, non-empty
    annotations, json order), ``labels`` int64 ``(K,)``, ``image_id`` int, ``orig_size``
    ``(H0, W0)`` as stored; plus ``image_size`` (valid extent) when padded.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, *, image_size: int | None = None,
                 pad_to: int | tuple[int, int] | None = None) -> None:
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder {self.image_dir} not found")
        self.coco = _quiet_coco(load_coco_json(self.ann_file))
        categories = sorted(self.coco.cats.values(), key=lambda cat: cat["id"])
        self.category_ids = [cat["id"] for cat in categories]
        self.class_names = [cat["name"] for cat in categories]
        self.thing_classes = self.class_names
        self.num_classes = len(categories)
        self._label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}
        self.image_ids = sorted(self.coco.imgs)
        self.image_size, self.pad_to = image_size, pad_to
        missing = [self.image_dir / self.coco.imgs[i]["file_name"] for i in self.image_ids
                   if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:  # found now, not when the image's turn comes mid-run
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"COCO image file {missing[0]} listed in {self.ann_file} not found{more}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        image = load_image(path, image_id)
        height, width = info["height"], info["width"]
        if tuple(image.shape[1:]) != (height, width):
            raise DataError(
                f"image file {path} (image id {image_id}) is {image.shape[1]}x{image.shape[2]} (h x w) "
                f"but {self.ann_file} says {height}x{width}"
            )
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a["iscrowd"]]
        masks = torch.from_numpy(decode_masks(anns, height, width))
        labels = torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        keep = masks.flatten(1).any(dim=1)  # an empty target mask has no pixels to supervise
        item = {"image": image, "masks": masks[keep], "labels": labels[keep], "image_id": int(image_id),
                "orig_size": (height, width)}
        if self.image_size is not None:
            item = resize_longest(item, self.image_size)
        if self.pad_to is not None:
            item = pad_item(item, self.pad_to)
        return item


def check_coco(image_dir: str | Path, ann_file: str | Path) -> tuple[int, list[str]]:
    """(images checked, one line per problem) of a COCO split: every annotation decoded, every image file
    present, decodable and of the size the json gives. Used by ``influencerformer check-data``."""
    image_dir, ann_file = Path(image_dir), Path(ann_file)
    if not ann_file.is_file():
        return 0, [f"{ann_file}: annotation file not found"]
    try:
        data, problems = _load_coco_json(ann_file)
    except DataError as err:
        return 0, [str(err)]
    for image in data["images"]:
        path = image_dir / image["file_name"]
        if not path.is_file():
            problems.append(f"{path}: image file of image id {image['id']} not found")
            continue
        try:
            shape = tuple(load_image(path, image["id"]).shape[1:])
        except DataError as err:
            problems.append(str(err))
            continue
        if shape != (image["height"], image["width"]):
            problems.append(f"{path}: image id {image['id']} is {shape[0]}x{shape[1]} (h x w) but {ann_file} says "
                            f"{image['height']}x{image['width']}")
    return len(data["images"]), problems


def find_coco_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, ann_file)`` of ``split`` under a COCO root. Layouts tried in order:

    1. COCO: ``annotations/instances_{split}.json`` + ``{split}/`` (``split`` may omit the year:
       ``"val"`` finds ``val2017``);
    2. per-split export: ``{split}/annotations.json`` + ``{split}/images/``;
    3. one json + images: ``annotations.json`` (or the only ``*.json``) + ``images/`` (or root).
    """
    root = Path(root)
    tried = []
    names = [split] if split[-1:].isdigit() else [split, f"{split}2017"]
    for name in names:
        ann, images = root / "annotations" / f"instances_{name}.json", root / name
        tried.append(f"{ann} + {images}/")
        if ann.is_file() and images.is_dir():
            return images, ann
    ann, images = root / split / "annotations.json", root / split / "images"
    tried.append(f"{ann} + {images}/")
    if ann.is_file() and images.is_dir():
        return images, ann
    jsons = sorted(root.glob("*.json")) if root.is_dir() else []
    ann = jsons[0] if len(jsons) == 1 else None
    if (root / "annotations.json").is_file():
        ann = root / "annotations.json"
    tried.append(f"{root}/annotations.json or a single {root}/*.json")
    if ann is not None:
        return (root / "images" if (root / "images").is_dir() else root), ann
    raise FileNotFoundError(f"no COCO files for split {split!r} under {root}; tried: " + "; ".join(tried))


# --------------------------------------------------------------------------- writer


def _coco_annotations(masks: torch.Tensor, labels: torch.Tensor, image_id: int, category_ids: list[int],
                      first_id: int) -> list[dict]:
    """COCO annotation dicts (compressed RLE as str, area, bbox) of bool masks ``(K, H, W)``."""
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    areas, boxes = mask_utils.area(rles), mask_utils.toBbox(rles)
    anns = []
    for k, rle in enumerate(rles):
        anns.append({
            "id": first_id + k, "image_id": image_id, "category_id": category_ids[int(labels[k])],
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": float(areas[k]), "bbox": [float(v) for v in boxes[k]], "iscrowd": 0,
        })
    return anns


def export_coco(dataset, path: str | Path, *, max_images: int | None = None) -> Path:
    """Write ``dataset`` (items as Shapes2D / COCOInstanceDataset return them) as COCO files.

    Writes ``path/images/{image_id:012d}.png`` (8-bit RGB) and ``path/annotations.json``
    (COCO instances; annotation ids from 1, since COCOeval treats id 0 as "unmatched").
    The dataset needs ``category_ids`` and ``class_names`` (or ``thing_classes``).

    Returns:
        the path of the json file.
    """
    path = Path(path)
    (path / "images").mkdir(parents=True, exist_ok=True)
    names = getattr(dataset, "class_names", None) or getattr(dataset, "thing_classes")
    categories = [{"id": cid, "name": name, "supercategory": "shape"}
                  for cid, name in zip(dataset.category_ids, names)]
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    images, annotations = [], []
    for index in range(count):
        item = dataset[index]
        image_id, (height, width) = int(item["image_id"]), item["image"].shape[1:]
        file_name = f"{image_id:012d}.png"
        pixels = (item["image"].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(path / "images" / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)})
        annotations += _coco_annotations(item["masks"], item["labels"], image_id, dataset.category_ids,
                                         len(annotations) + 1)
    ann_file = path / "annotations.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file
