"""A small ResNet-style CNN (written here: torchvision is not a dependency).

Stem (two stride-2 3x3 convs) + 4 stages of basic residual blocks, returning
features at strides 4, 8, 16, 32 under the detectron2 names ``res2..res5``.
GroupNorm instead of BatchNorm: batches are small and split across DDP ranks,
where batch statistics would be noisy and rank-dependent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

STAGE_NAMES = ("res2", "res3", "res4", "res5")


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm whose group count divides ``channels`` (gcd with 32, as detectron2 uses 32)."""
    return nn.GroupNorm(math.gcd(max_groups, channels), channels)


def conv_norm_act(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias: the norm has one) -> GroupNorm -> optional ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        group_norm(c_out),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a residual; 1x1 projection when the shape changes.

    Shapes: ``(B, c_in, H, W) -> (B, c_out, H / stride, W / stride)``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_norm_act(c_in, c_out, 3, stride)
        self.conv2 = conv_norm_act(c_out, c_out, 3, 1, act=False)
        self.shortcut = (
            nn.Identity() if stride == 1 and c_in == c_out else conv_norm_act(c_in, c_out, 1, stride, act=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """Stem + 4 stages; ``forward(images (B,3,H,W)) -> {"res2": (B,w0,H/4,W/4), ..., "res5": (B,w3,H/32,W/32)}``.

    Args:
        widths: channels of res2..res5 (4 ints).
        depths: basic blocks per stage (4 ints >= 1).
        stem_width: channels of the stem's first conv (the second outputs ``widths[0]``).
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (2, 2, 2, 2),
                 stem_width: int = 32):
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError(f"backbone widths and depths must have 4 entries (res2..res5), "
                             f"got widths={tuple(widths)} depths={tuple(depths)}")
        if min(depths) < 1 or min(widths) < 1 or stem_width < 1:
            raise ValueError(f"backbone widths/depths/stem_width must be >= 1, got widths={tuple(widths)} "
                             f"depths={tuple(depths)} stem_width={stem_width}")
        self.widths = tuple(int(w) for w in widths)
        # Two stride-2 convs reach stride 4 (ResNet's 7x7 + max-pool does the same, at more cost on CPU).
        self.stem = nn.Sequential(conv_norm_act(3, stem_width, 3, 2), conv_norm_act(stem_width, widths[0], 3, 2))
        stages, c_in = [], widths[0]
        for i, (c_out, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2  # res2 stays at the stem's stride 4
            blocks = [BasicBlock(c_in, c_out, stride)] + [BasicBlock(c_out, c_out) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)

    @property
    def strides(self) -> dict[str, int]:
        return dict(zip(STAGE_NAMES, (4, 8, 16, 32)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        x, features = self.stem(images), {}
        for name, stage in zip(STAGE_NAMES, self.stages):
            x = stage(x)
            features[name] = x
        return features
