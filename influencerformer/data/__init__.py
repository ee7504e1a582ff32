"""Datasets (synthetic shapes2d, COCO), transforms and batch collation."""

from influencerformer.data.coco import COCOInstanceDataset, export_coco, find_coco_files
from influencerformer.data.collate import collate_batch
from influencerformer.data.synthetic import SHAPES_PRESETS, Shapes2D, ShapesConfig

__all__ = [
    "COCOInstanceDataset",
    "SHAPES_PRESETS",
    "Shapes2D",
    "ShapesConfig",
    "collate_batch",
    "export_coco",
    "find_coco_files",
]
