"""Late fusion by concatenation: a linear head over the concatenated features."""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from ..registry import FUSIONS
from .base import Fusion


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
    """``Linear(concat_m flatten(feature_m))`` — the paper's late fusion on AV-MNIST."""

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int) -> None:
        super().__init__(feature_shapes, num_classes)
        width = sum(math.prod(s) for s in self.feature_shapes.values())
        self.head = nn.Linear(width, num_classes)

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([features[m].flatten(1) for m in self.modalities], dim=1)
