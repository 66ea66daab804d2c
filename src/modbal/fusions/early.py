"""Raw-input early fusion: flattened raw inputs concatenated and run through one MLP.

Use with ``identity`` encoders so the "features" are the raw inputs; the whole network then lives
in the fusion, and muting a modality zeroes its raw input.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..registry import FUSIONS
from ._common import flat_features, flat_width, positive_int
from .base import Fusion


@FUSIONS.register("early")
class EarlyFusion(Fusion):
    """concat_m flatten(input_m) → [Linear → (BatchNorm) → ReLU → (Dropout)] per width → Linear head.

    Args:
        hidden: hidden widths (at least one). Default (256, 128).
        dropout: dropout after each hidden layer. Default 0.
        batchnorm: BatchNorm1d before each ReLU. Default False.
    """

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int,
                 hidden: Sequence[int] = (256, 128), dropout: float = 0.0,
                 batchnorm: bool = False) -> None:
        super().__init__(feature_shapes, num_classes)
        hidden = [positive_int(h, "hidden", "early fusion") for h in hidden]
        if not hidden:
            raise ValueError("early fusion: option 'hidden' needs at least one width")
        width = sum(flat_width(s) for s in self.feature_shapes.values())
        layers: list[nn.Module] = []
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.body(torch.cat(flat_features(self, features), dim=1))
