"""FiLM fusion: one modality conditions the others by feature-wise affine modulation (γ ⊙ h + β)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..registry import FUSIONS
from ._common import flat_features, flat_width, positive_int
from .base import Fusion


@FUSIONS.register("film")
class FiLMFusion(Fusion):
    """The conditioning modality c yields (γ_m, β_m) for every other modality m, which modulate
    m's projected feature: h_m = γ_m(x_c) ⊙ W_m x_m + β_m; the head reads concat_{m≠c} h_m.

    For M = 2 this is the OGM-GE code's FiLM (one modality modulates the other); for M > 2 the
    same conditioning modality modulates each of the others with its own (γ, β) generator.
    γ is parameterised as 1 + Δγ so modulation starts near the identity.

    Args:
        condition: name of the conditioning modality. Default: the first modality.
        dim: width of each projected (and modulated) feature. Default 64.
        include_condition: also append the conditioning feature (projected to ``dim``) to the
            representation. Default False (as in the OGM-GE code).
    """

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int,
                 condition: str | None = None, dim: int = 64, include_condition: bool = False) -> None:
        super().__init__(feature_shapes, num_classes)
        positive_int(dim, "dim", "film fusion")
        condition = self.modalities[0] if condition is None else condition
        if condition not in self.feature_shapes:
            raise ValueError(f"film fusion: conditioning modality {condition!r} is not one of "
                             f"{list(self.modalities)}")
        self.condition, self.dim, self.include_condition = condition, dim, include_condition
        self.others = tuple(m for m in self.modalities if m != condition)
        cond_width = flat_width(self.feature_shapes[condition])
        self.project = nn.ModuleDict({m: nn.Linear(flat_width(self.feature_shapes[m]), dim)
                                      for m in self.others})
        self.film = nn.ModuleDict({m: nn.Linear(cond_width, 2 * dim) for m in self.others})
        if include_condition:
            self.project_condition = nn.Linear(cond_width, dim)
        width = dim * (len(self.others) + int(include_condition))
        self.head = nn.Linear(width, num_classes)

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        flat = dict(zip(self.modalities, flat_features(self, features)))
        cond = flat[self.condition]
        parts = []
        for m in self.others:
            delta_gamma, beta = self.film[m](cond).chunk(2, dim=1)
            parts.append((1 + delta_gamma) * self.project[m](flat[m]) + beta)
        if self.include_condition:
            parts.append(self.project_condition(cond))
        return torch.cat(parts, dim=1)
