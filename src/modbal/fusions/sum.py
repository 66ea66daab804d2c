"""Late fusion by summing per-modality linear heads (the additive late fusion of OGM-GE/AGM code)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..registry import FUSIONS
from ._common import flat_features, flat_width
from .base import Fusion


@FUSIONS.register("sum")
class SumFusion(Fusion):
    """``Σ_m Linear_m(flatten(feature_m))``: one linear head per modality, logits summed.

    Each modality's contribution to the logits is additive, so its own head alone reads its
    share. ``represent`` returns the concatenated features (the input of the summed heads).

    Args:
        bias: give every per-modality head a bias (their sum acts as one shared bias). Default True.
    """

    has_mono_heads = True

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int,
                 bias: bool = True) -> None:
        super().__init__(feature_shapes, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(flat_width(s), num_classes, bias=bias)
                                    for m, s in self.feature_shapes.items()})

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.cat(flat_features(self, features), dim=1)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        flat = flat_features(self, features)
        return torch.stack([self.heads[m](x) for m, x in zip(self.modalities, flat)]).sum(0)

    def output_weights(self) -> list[Tensor]:
        """Every per-modality head's weight: together they are the one linear layer over the
        concatenated features that produces the logits."""
        return [self.heads[m].weight for m in self.modalities]

    def mono_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: Linear_m(h_m)}``, the original OGM-GE/AGM code's ``out_a = audio_cls(a)``."""
        return {m: self.heads[m](x) for m, x in zip(self.modalities, flat_features(self, features))}

    def head_parameters(self, modality: str) -> list[tuple[nn.Parameter, tuple[slice, ...] | None]]:
        return [(p, None) for p in self.heads[modality].parameters()]
