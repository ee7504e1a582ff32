"""FPN-style pixel decoder: multi-scale backbone features -> per-pixel mask features + decoder memory.

MaskFormer's ``BasePixelDecoder`` (lateral 1x1 + top-down nearest upsample-add + 3x3 output convs)
rather than Mask2Former's deformable-attention encoder: it has no custom CUDA op, runs on CPU, and
the criterion comparison this project exists for does not depend on the pixel decoder.
Like Mask2Former, the transformer decoder reads three scales (1/32, 1/16, 1/8) round-robin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import STAGE_NAMES, conv_norm_act


def sine_position_embedding(height: int, width: int, dim: int, *, temperature: float = 10000.0,
                            device=None, dtype=torch.float32) -> torch.Tensor:
    """DETR's normalised 2D sine embedding for an ``height x width`` grid -> ``(height * width, dim)``.

    First ``dim/2`` channels encode y, the rest x; each half interleaves sin/cos over geometric
    frequencies. Coordinates are normalised to (0, 2*pi] so the embedding does not depend on the
    image size in pixels (one model serves several resolutions).
    """
    if dim % 4 != 0:
        raise ValueError(f"sine position embedding dim must be divisible by 4, got {dim}")
    eps, half = 1e-6, dim // 2
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / (height + eps) * 2 * math.pi
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / (width + eps) * 2 * math.pi
    freq = temperature ** (2 * (torch.arange(half, device=device) // 2).float() / half)  # (half,)

    def encode(coord: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, half), channels sin,cos,sin,cos...
        angles = coord[:, None] / freq
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, half)
    pos_x = encode(x)[None, :, :].expand(height, width, half)
    return torch.cat((pos_y, pos_x), dim=2).reshape(height * width, dim).to(dtype)


class FPNPixelDecoder(nn.Module):
    """FPN over ``res2..res5``.

    ``forward(features)`` with ``features[name]``: ``(B, in_channels[i], H/s, W/s)`` returns
      - ``mask_features``: ``(B, mask_dim, H/s, W/s)``, ``s = mask_stride`` (4, or 2: the stride-4 FPN output
        upsampled 2x bilinearly before the mask-feature conv)
      - ``memory``: list of 3 ``(B, h_l * w_l, conv_dim)`` at strides 32, 16, 8, level embedding added
      - ``memory_pos``: list of 3 ``(B, h_l * w_l, conv_dim)`` sine positional embeddings
      - ``memory_shapes``: list of 3 ``(h_l, w_l)``, needed to resize masks for masked attention.
    """

    num_memory_levels = 3

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256, mask_stride: int = 4):
        super().__init__()
        if mask_stride not in (2, 4):
            raise ValueError(f"pixel decoder mask_stride must be 2 or 4, got {mask_stride}")
        self.mask_stride = mask_stride
        if len(in_channels) != 4:
            raise ValueError(f"pixel decoder in_channels must have 4 entries (res2..res5), got {tuple(in_channels)}")
        # The coarsest level has no lateral: its 3x3 output conv maps it to conv_dim directly.
        self.lateral = nn.ModuleList(
            [conv_norm_act(c, conv_dim, 1, act=False) for c in in_channels[:-1]] + [nn.Identity()]
        )
        self.output = nn.ModuleList(
            [conv_norm_act(c if i == 3 else conv_dim, conv_dim, 3) for i, c in enumerate(in_channels)]
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        # Tells the decoder which scale a memory token came from (positions alone are scale-free).
        self.level_embed = nn.Parameter(torch.randn(self.num_memory_levels, conv_dim) * 0.02)
        self.conv_dim = conv_dim

    def forward(self, features: dict[str, torch.Tensor]) -> dict:
        missing = [n for n in STAGE_NAMES if n not in features]
        if missing:
            raise ValueError(f"pixel decoder features missing {missing}; expected keys {list(STAGE_NAMES)}")
        outs, y = [], None
        for i in reversed(range(4)):  # top-down: res5 -> res2
            lateral = self.lateral[i](features[STAGE_NAMES[i]])
            if y is not None:
                lateral = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = self.output[i](lateral)
            outs.append(y)  # outs: strides 32, 16, 8, 4
        memory, memory_pos, shapes = [], [], []
        for level, feat in enumerate(outs[: self.num_memory_levels]):
            h, w = feat.shape[-2:]
            pos = sine_position_embedding(h, w, self.conv_dim, device=feat.device, dtype=feat.dtype)
            memory.append(feat.flatten(2).transpose(1, 2) + self.level_embed[level])
            memory_pos.append(pos.unsqueeze(0).expand(feat.shape[0], -1, -1))
            shapes.append((h, w))
        finest = outs[-1]
        if self.mask_stride == 2:
            finest = F.interpolate(finest, scale_factor=2, mode="bilinear", align_corners=False)
        return {"mask_features": self.mask_features(finest), "memory": memory,
                "memory_pos": memory_pos, "memory_shapes": shapes}
