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
    """``Linear(concat_m flatten(feature_m))`` — the paper's late fusion on AV-MNIST.

    Modality m's own head is its block of columns W_m of the weight, with an equal share of the
    bias: ``mono_logits`` gives W_m·h_m + b/M, as the original OGM-GE code scores concat fusion.
    """

    has_mono_heads = True

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int) -> None:
        super().__init__(feature_shapes, num_classes)
        widths = [math.prod(s) for s in self.feature_shapes.values()]
        self.head = nn.Linear(sum(widths), num_classes)
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self._columns = {m: slice(a, a + w) for m, a, w in zip(self.modalities, starts, widths)}

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([features[m].flatten(1) for m in self.modalities], dim=1)

    def mono_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: W_m·h_m + b/M}``; the values sum to the fused logits."""
        share = self.head.bias / len(self.modalities)
        return {m: features[m].flatten(1) @ self.head.weight[:, self._columns[m]].T + share
                for m in self.modalities}

    def head_parameters(self, modality: str) -> list[tuple[nn.Parameter, tuple[slice, ...] | None]]:
        """The weight's columns of ``modality`` (the bias is shared by all modalities)."""
        return [(self.head.weight, (slice(None), self._columns[modality]))]
