"""ResNet18 (He et al., 2016) written for this project, for 1- or 3-channel images, spectrograms
and video frames; the standard encoder of the AGM/OGM-GE experiments (512-d output)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..registry import ENCODERS
from .cnn import as_image_batch, image_channels

STEMS = ("standard", "small")


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@ENCODERS.register("resnet18")
class ResNet18Encoder(nn.Module):
    """Stem → 4 stages of 2 BasicBlocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2) → global average
    pool; output 8w = 512 features with the default width.

    Input shapes: (H, W) (one channel), (C, H, W), or (T, C, H, W) video frames: every frame goes
    through the trunk and the frame features are averaged over time.

    Args:
        input_shape: one sample's shape, as above.
        stem: "standard" (7×7 stride-2 conv + 3×3 stride-2 max-pool, for ImageNet-sized inputs) or
            "small" (3×3 stride-1 conv, no max-pool, for 28×28/32×32 inputs). Default "standard".
        width: channels of the first stage (64 in ResNet18; smaller values for cheap tests). Default 64.
    """

    def __init__(self, input_shape: Sequence[int], stem: str = "standard", width: int = 64) -> None:
        super().__init__()
        shape = tuple(input_shape)
        self.frames = len(shape) == 4
        if self.frames and min(shape) < 1:
            raise ValueError(f"resnet18 encoder: invalid frames input_shape {shape}")
        channels, _, _ = image_channels(shape[1:] if self.frames else shape,
                                        "resnet18 encoder (or (T, C, H, W) frames)")
        self.input_shape = shape
        if stem not in STEMS:
            raise ValueError(f"resnet18 encoder: unknown stem {stem!r}; allowed values: {', '.join(STEMS)}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"resnet18 encoder: width must be a positive integer, got {width!r}")
        if stem == "standard":
            self.stem = nn.Sequential(nn.Conv2d(channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True))
        stages, in_channels = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2 ** i
            stages.append(nn.Sequential(BasicBlock(in_channels, out_channels, stride),
                                        BasicBlock(out_channels, out_channels, 1)))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_shape = (in_channels,)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def trunk(self, x: Tensor) -> Tensor:
        """Features (N × 8w) of a batch of images (N × C × H × W)."""
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        x = as_image_batch(x, self.input_shape, "resnet18 encoder")
        if not self.frames:
            return self.trunk(x)
        batch, steps = x.shape[:2]
        return self.trunk(x.flatten(0, 1)).view(batch, steps, -1).mean(dim=1)
