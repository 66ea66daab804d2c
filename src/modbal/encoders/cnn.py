"""A small configurable 2-D CNN for images and spectrograms (cheap enough for CPU runs)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..registry import ENCODERS


def image_channels(input_shape: Sequence[int], where: str) -> tuple[int, int, int]:
    """(C, H, W) from an (H, W) or (C, H, W) ``input_shape``; (H, W) means one channel."""
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{where} expects input_shape (H, W) or (C, H, W), got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def as_image_batch(x: Tensor, input_shape: Sequence[int], where: str) -> Tensor:
    """Check ``x`` is a batch of ``input_shape`` samples; add the channel axis to (B, H, W) input."""
    if x.dim() != len(input_shape) + 1:
        raise ValueError(f"{where} expects a batch of shape (B, *{tuple(input_shape)}), got {tuple(x.shape)}")
    return x.unsqueeze(1) if len(input_shape) == 2 else x  # (B, H, W) → (B, 1, H, W)


@ENCODERS.register("cnn")
class CNNEncoder(nn.Module):
    """[Conv k×k → (BatchNorm) → ReLU → (MaxPool 2)] per channel width → global average pool
    (→ Linear → ReLU to ``out_dim``).

    Args:
        input_shape: (H, W) (one channel) or (C, H, W).
        channels: output channels of each conv block. Default (16, 32).
        kernel_size: conv kernel size (odd, "same" padding). Default 3.
        batchnorm: BatchNorm2d after each conv. Default True.
        pool: 2×2 max-pool after each block while the map is at least 2×2. Default True.
        out_dim: size of the output feature; None keeps the last channel count. Default None.
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (16, 32),
                 kernel_size: int = 3, batchnorm: bool = True, pool: bool = True,
                 out_dim: int | None = None) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.image_shape = image_channels(input_shape, "cnn encoder")
        channels = list(channels)
        if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"cnn encoder: option 'channels' must be positive integers, got {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"cnn encoder: kernel_size must be a positive odd integer, got {kernel_size}")
        width, (h, w) = self.image_shape[0], self.image_shape[1:]
        layers: list[nn.Module] = []
        for c in channels:
            layers.append(nn.Conv2d(width, c, kernel_size, padding=kernel_size // 2, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU(inplace=True))
            if pool and h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            width = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if out_dim is not None:
            layers += [nn.Linear(width, out_dim), nn.ReLU(inplace=True)]
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.out_shape = (width,)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(as_image_batch(x, self.input_shape, "cnn encoder"))
