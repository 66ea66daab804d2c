"""A multilayer perceptron encoder for vector (or flattened) inputs."""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from ..registry import ENCODERS


@ENCODERS.register("mlp")
class MLPEncoder(nn.Module):
    """Flatten → [Linear → ReLU (→ Dropout)] per hidden width → features of size ``out_dim``.

    Args:
        input_shape: shape of one sample (without batch).
        hidden: hidden widths. Default: (128,).
        out_dim: feature size. Default: 64.
        dropout: dropout after each hidden layer. Default: 0.
    """

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (128,), out_dim: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers += [nn.Linear(width, out_dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_shape = (out_dim,)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
