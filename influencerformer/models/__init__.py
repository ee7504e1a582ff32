"""Models: a small ResNet backbone, FPN pixel decoder, Mask2Former query decoder and post-processing."""

from .backbone import ResNetBackbone
from .maskformer import PRESETS, MaskFormer, MaskFormerConfig
from .point_model import PointModelConfig, PointQueryModel
from .pixel_decoder import FPNPixelDecoder, sine_position_embedding
from .postprocess import instance_inference, panoptic_inference, semantic_inference
from .query_decoder import QueryDecoder, attention_mask_from_masks

__all__ = [
    "PointModelConfig",
    "PointQueryModel",
    "PRESETS",
    "FPNPixelDecoder",
    "MaskFormer",
    "MaskFormerConfig",
    "QueryDecoder",
    "ResNetBackbone",
    "attention_mask_from_masks",
    "instance_inference",
    "panoptic_inference",
    "semantic_inference",
    "sine_position_embedding",
]
