"""MMCosine (Xu et al., ICASSP 2023): late fusion by summed cosine classifiers, one per modality.

Modality m's logits are s·cos(h_m, w_m,c) for every class c, where w_m,c is class c's row of
modality m's block of the head weight: features and class weights are L2-normalised, so no
modality wins by the norm of its features or weights, and the fused logits are their sum (no bias).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import FUSIONS
from ._common import check_features
from .base import Fusion


@FUSIONS.register("mmcosine")
class CosineFusion(Fusion):
    """Σ_m s·normalize(h_m)·normalize(W_m)ᵀ, W_m modality m's columns of one C × ΣD_m weight.

    Args:
        scaling (float): the scale s (> 0). Default 10 (the authors' CREMA-D default; their
            BalanceBenchmark port uses 15).

    ``mono_logits`` gives each modality's scaled cosine logits (they sum to the fused logits), so
    methods reading per-modality heads (OGM-GE, MSLR, MSES) work on it, as the authors combine
    MMCosine with OGM-GE.
    """

    has_mono_heads = True

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int, scaling: float = 10.0) -> None:
        super().__init__(feature_shapes, num_classes)
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 0 < scaling < math.inf:
            raise ValueError(f"Invalid scaling: {scaling!r} (must be a finite number > 0)")
        self.scaling = float(scaling)
        widths = [math.prod(s) for s in self.feature_shapes.values()]
        self.head = nn.Linear(sum(widths), num_classes, bias=False)
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self._columns = {m: slice(a, a + w) for m, a, w in zip(self.modalities, starts, widths)}

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        """The concatenated L2-normalised features."""
        return torch.cat([F.normalize(features[m].flatten(1), dim=1) for m in self.modalities], dim=1)

    def mono_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: s·cos(h_m, W_m rows)}``; the values sum to the fused logits."""
        check_features(self, features)
        return {m: self.scaling * F.normalize(features[m].flatten(1), dim=1)
                @ F.normalize(self.head.weight[:, self._columns[m]], dim=1).T for m in self.modalities}

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(self.mono_logits(features).values())).sum(0)

    def head_parameters(self, modality: str) -> list[tuple[nn.Parameter, tuple[slice, ...] | None]]:
        """The weight's columns of ``modality``."""
        return [(self.head.weight, (slice(None), self._columns[modality]))]
