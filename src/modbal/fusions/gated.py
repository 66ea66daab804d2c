"""Gated fusion: learned sigmoid gates decide, per dimension, how much of each modality passes."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..registry import FUSIONS
from ._common import flat_features, flat_width, positive_int
from .base import Fusion


@FUSIONS.register("gated")
class GatedFusion(Fusion):
    """A gated multimodal unit for any M: h_m = tanh(W_m x_m), g_m = σ(V_m [x_1; …; x_M]),
    fused = Σ_m g_m ⊙ h_m → Linear head.

    Each gate sees every modality, so one modality can open or close another's channel (for M = 2
    this is the GMU of Arevalo et al. with independent instead of complementary gates).

    Args:
        dim: width of the gated representation. Default 64.
    """

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int,
                 dim: int = 64) -> None:
        super().__init__(feature_shapes, num_classes)
        positive_int(dim, "dim", "gated fusion")
        widths = {m: flat_width(s) for m, s in self.feature_shapes.items()}
        total = sum(widths.values())
        self.project = nn.ModuleDict({m: nn.Linear(w, dim) for m, w in widths.items()})
        self.gates = nn.ModuleDict({m: nn.Linear(total, dim) for m in widths})
        self.head = nn.Linear(dim, num_classes)

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        flat = flat_features(self, features)
        joint = torch.cat(flat, dim=1)
        return sum(torch.sigmoid(self.gates[m](joint)) * torch.tanh(self.project[m](x))
                   for m, x in zip(self.modalities, flat))
