"""Datasets (synthetic shapes2d, COCO), transforms and batch collation."""

from influencerformer.data.coco import COCOInstanceDataset, export_coco, find_coco_files
from influencerformer.data.collate import collate_batch
from influencerformer.data.pointcloud import PreprocessedPointDataset, instance_targets, write_preprocessed
from influencerformer.data.rooms3d import Rooms3D
from influencerformer.data.s3dis import S3DIS_CLASSES, S3DISFormatWarning, S3DISRawDataset, write_s3dis_raw
from influencerformer.data.synthetic import SHAPES_PRESETS, Shapes2D, ShapesConfig

__all__ = [
    "PreprocessedPointDataset",
    "Rooms3D",
    "S3DISFormatWarning",
    "S3DISRawDataset",
    "S3DIS_CLASSES",
    "instance_targets",
    "write_preprocessed",
    "write_s3dis_raw",
    "COCOInstanceDataset",
    "SHAPES_PRESETS",
    "Shapes2D",
    "ShapesConfig",
    "collate_batch",
    "export_coco",
    "find_coco_files",
]
