"""Metrics: COCO mask AP, mIoU, PQ, and diagnostics of query behaviour."""

from influencerformer.metrics.coco import build_coco_gt, coco_mask_ap, encode_masks, masks_to_coco_results
from influencerformer.metrics.diagnostics import (
    assignment_stability,
    count_duplicates,
    duplicate_rate,
    f1_at_iou,
    f1_from_counts,
    mask_iou,
    query_usage,
)
from influencerformer.metrics.instance3d import InstanceAP3D, instance_ap_3d, semantic_miou_3d
from influencerformer.metrics.semantic import MeanIoU, PanopticQuality, mean_iou, panoptic_quality

__all__ = [
    "InstanceAP3D",
    "instance_ap_3d",
    "semantic_miou_3d",
    "MeanIoU",
    "PanopticQuality",
    "assignment_stability",
    "build_coco_gt",
    "coco_mask_ap",
    "count_duplicates",
    "duplicate_rate",
    "encode_masks",
    "f1_at_iou",
    "f1_from_counts",
    "mask_iou",
    "masks_to_coco_results",
    "mean_iou",
    "panoptic_quality",
    "query_usage",
]
