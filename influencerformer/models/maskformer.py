"""The assembled 2D model: backbone -> FPN pixel decoder -> query decoder (Mask2Former layout).

One typed config (``MaskFormerConfig``) with named presets sized for where they run:
"tiny" and "medium" train on 2 CPU cores, "crowded" is the benchmark recipe (docs/background.md: 100 queries,
6 decoder layers, all supervised), "base" is Mask2Former-sized for a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch
from torch import nn

from .backbone import ResNetBackbone
from .pixel_decoder import FPNPixelDecoder
from .query_decoder import QueryDecoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MaskFormerConfig:
    """Model hyper-parameters (defaults = the "base" preset, Mask2Former's decoder sizes).

    num_classes: object classes C (the class head has C + 1 outputs; the last is "no object").
    num_queries: Q learned queries.
    hidden_dim: width of queries, memory and pixel-decoder convs.
    num_decoder_layers: decoder layers; predictions = layers + 1 (query init + each layer).
    nheads: attention heads (must divide hidden_dim).
    dim_feedforward: decoder FFN width.
    mask_dim: channels of mask features / mask embeddings.
    dropout: decoder dropout (Mask2Former uses 0).
    masked_attention: restrict cross-attention to each query's previous foreground (Mask2Former).
    backbone_widths / backbone_depths: channels and basic blocks of res2..res5.
    stem_width: channels of the backbone stem's first conv.
    mask_stride: stride of the mask logits, 4 (Mask2Former) or 2 (the stride-4 features upsampled 2x bilinearly
        before the mask-feature conv: finer targets and boundaries for small objects, 4x the mask locations).
    pixel_mean / pixel_std: per-channel normalisation applied inside the model to [0, 1] images.
    """

    num_classes: int = 4
    num_queries: int = 100
    hidden_dim: int = 256
    num_decoder_layers: int = 9
    nheads: int = 8
    dim_feedforward: int = 2048
    mask_dim: int = 256
    dropout: float = 0.0
    masked_attention: bool = True
    backbone_widths: tuple[int, ...] = (64, 128, 256, 512)
    backbone_depths: tuple[int, ...] = (2, 2, 2, 2)
    stem_width: int = 32
    mask_stride: int = 4
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        for name in ("backbone_widths", "backbone_depths", "pixel_mean", "pixel_std"):
            setattr(self, name, tuple(getattr(self, name)))  # YAML gives lists; keep configs hashable/comparable
        for name in ("num_classes", "num_queries", "hidden_dim", "num_decoder_layers", "nheads",
                     "dim_feedforward", "mask_dim", "stem_width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MaskFormerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_dim % self.nheads != 0:
            raise ValueError(f"MaskFormerConfig.hidden_dim ({self.hidden_dim}) must be divisible by "
                             f"nheads ({self.nheads})")
        if self.hidden_dim % 4 != 0:
            raise ValueError(f"MaskFormerConfig.hidden_dim must be divisible by 4 (sine positions), "
                             f"got {self.hidden_dim}")
        if len(self.backbone_widths) != 4 or len(self.backbone_depths) != 4:
            raise ValueError(f"MaskFormerConfig.backbone_widths/backbone_depths need 4 entries, got "
                             f"{self.backbone_widths} / {self.backbone_depths}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError(f"MaskFormerConfig.pixel_mean/pixel_std need 3 entries (std > 0), got "
                             f"{self.pixel_mean} / {self.pixel_std}")
        if self.mask_stride not in (2, 4):
            raise ValueError(f"MaskFormerConfig.mask_stride must be 2 or 4, got {self.mask_stride}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MaskFormerConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "MaskFormerConfig":
        """A named preset (``tiny``, ``medium``, ``crowded``, ``base``) with keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown MaskFormerConfig preset {name!r}; valid presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "MaskFormerConfig":
        """Build from a plain dict (YAML, checkpoint); unknown keys raise instead of being ignored."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown MaskFormerConfig key(s) {unknown}; valid keys: {valid}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Sizes chosen for where each preset runs; measured CPU step times are in docs / the model tests' report.
PRESETS: dict[str, dict] = {
    # 128x128 shapes on 2 CPU cores.
    "tiny": dict(num_queries=32, hidden_dim=64, num_decoder_layers=3, nheads=4, dim_feedforward=256, mask_dim=64,
                 backbone_widths=(16, 32, 64, 128), backbone_depths=(1, 1, 1, 1), stem_width=16),
    # 64x64 "medium" shapes on CPU.
    "medium": dict(num_queries=50, hidden_dim=96, num_decoder_layers=4, nheads=4, dim_feedforward=384, mask_dim=96,
                   backbone_widths=(24, 48, 96, 192), backbone_depths=(1, 2, 2, 1), stem_width=16),
    # The CPU benchmark that decides (shapes2d "dense", 96x96): >= 50 queries, masks at stride 2 (48x48).
    "dense": dict(num_queries=60, hidden_dim=96, num_decoder_layers=4, nheads=4, dim_feedforward=384, mask_dim=96,
                  backbone_widths=(24, 48, 96, 192), backbone_depths=(1, 2, 2, 1), stem_width=16, mask_stride=2),
    # the crowded benchmark recipe (GPU; docs/background.md §2): 100 queries, 6 decoder layers, all supervised.
    "crowded": dict(num_queries=100, hidden_dim=128, num_decoder_layers=6, nheads=8, dim_feedforward=1024,
                    mask_dim=128, backbone_widths=(32, 64, 128, 256), backbone_depths=(2, 2, 2, 2), stem_width=32),
    # Mask2Former-sized decoder (GPU).
    "base": dict(num_queries=100, hidden_dim=256, num_decoder_layers=9, nheads=8, dim_feedforward=2048,
                 mask_dim=256, backbone_widths=(64, 128, 256, 512), backbone_depths=(2, 2, 2, 2), stem_width=32),
}


class MaskFormer(nn.Module):
    """``forward(images (B, 3, H, W) float in [0, 1])`` ->
    ``{"pred_logits": (B, Q, C+1), "pred_masks": (B, Q, H/s, W/s) (s = mask_stride), "aux_outputs": [num_decoder_layers dicts]}``.

    H and W must be multiples of 32 (the backbone's coarsest stride) so every level aligns.
    """

    def __init__(self, cfg: MaskFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.backbone = ResNetBackbone(cfg.backbone_widths, cfg.backbone_depths, cfg.stem_width)
        self.pixel_decoder = FPNPixelDecoder(cfg.backbone_widths, conv_dim=cfg.hidden_dim, mask_dim=cfg.mask_dim,
                                             mask_stride=cfg.mask_stride)
        self.decoder = QueryDecoder(
            num_classes=cfg.num_classes, hidden_dim=cfg.hidden_dim, num_queries=cfg.num_queries,
            num_layers=cfg.num_decoder_layers, nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward,
            mask_dim=cfg.mask_dim, dropout=cfg.dropout, masked_attention=cfg.masked_attention)

    def forward(self, images: torch.Tensor) -> dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % 32 or images.shape[-1] % 32:
            raise ValueError(f"image height and width must be multiples of 32, got {tuple(images.shape[-2:])}")
        x = (images - self.pixel_mean) / self.pixel_std
        pix = self.pixel_decoder(self.backbone(x))
        return self.decoder(pix["memory"], pix["mask_features"], pix["memory_pos"], pix["memory_shapes"])

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
