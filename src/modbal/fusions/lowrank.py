"""Low-rank Multimodal Fusion (LMF, Liu et al., 2018): the tensor-fusion weight in rank-r factors.

Equivalent to a linear map of TFN's outer product whose weight tensor has CP rank ``rank``, at a
cost linear (not exponential) in the number of modalities.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..registry import FUSIONS
from ._common import flat_features, flat_width, positive_int
from .base import Fusion


@FUSIONS.register("lowrank")
class LowRankFusion(Fusion):
    """h = Σ_r w_r · Π_m ([x_m; 1] W_m^(r)) + b, then a Linear head (h is the representation).

    Args:
        rank: number of rank-one factors r. Default 4.
        dim: width of the fused representation h. Default 32.
    """

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int,
                 rank: int = 4, dim: int = 32) -> None:
        super().__init__(feature_shapes, num_classes)
        positive_int(rank, "rank", "lowrank fusion")
        positive_int(dim, "dim", "lowrank fusion")
        self.rank, self.dim = rank, dim
        self.factors = nn.ParameterDict()
        for m, s in self.feature_shapes.items():
            # std 1/sqrt(fan-in): each factor's output has about the input's scale, so the
            # product over M modalities neither vanishes nor explodes as M grows.
            fan_in = flat_width(s) + 1
            self.factors[m] = nn.Parameter(torch.randn(rank, fan_in, dim) / fan_in ** 0.5)
        self.rank_weights = nn.Parameter(torch.randn(1, rank) / rank ** 0.5)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.head = nn.Linear(dim, num_classes)

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        fused = None
        for m, x in zip(self.modalities, flat_features(self, features)):
            z = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            part = torch.einsum("bi,rid->rbd", z, self.factors[m])  # (rank, B, dim)
            fused = part if fused is None else fused * part
        return torch.einsum("or,rbd->bd", self.rank_weights, fused) + self.bias
