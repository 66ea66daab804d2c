"""Tensor Fusion Network (Zadeh et al., 2017): the outer product of [feature_m; 1] over modalities.

The appended 1 keeps every unimodal and lower-order interaction term in the product. Its size is
Π_m (d_m + 1), so each modality is first projected to a small width (chosen automatically from
``max_features`` unless given).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from ..registry import FUSIONS
from ._common import flat_features, flat_width, positive_int
from .base import Fusion


@FUSIONS.register("tensor")
class TensorFusion(Fusion):
    """[W_m x_m; 1] per modality → flattened outer product → Linear → ReLU (→ Dropout) → Linear head.

    Args:
        proj_dim: width each modality is projected to before the product. Default None: the
            largest d with (d + 1)^M <= ``max_features`` (63 for M = 2, 15 for M = 3, 7 for M = 4).
        project: False uses the raw flattened features (no projection); then the product must
            still fit ``max_features``. Default True.
        max_features: largest allowed size of the flattened product. Default 4096.
        hidden: width of the post-fusion layer (the representation). Default 64.
        dropout: dropout on the product and after the post-fusion layer. Default 0.
    """

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int,
                 proj_dim: int | None = None, project: bool = True, max_features: int = 4096,
                 hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__(feature_shapes, num_classes)
        positive_int(hidden, "hidden", "tensor fusion")
        positive_int(max_features, "max_features", "tensor fusion")
        count = len(self.modalities)
        if project:
            if proj_dim is None:
                proj_dim = max(1, int(math.floor(max_features ** (1.0 / count) + 1e-9)) - 1)
            positive_int(proj_dim, "proj_dim", "tensor fusion")
            dims = {m: proj_dim for m in self.modalities}
            self.project = nn.ModuleDict({m: nn.Linear(flat_width(s), proj_dim)
                                          for m, s in self.feature_shapes.items()})
        else:
            dims = {m: flat_width(s) for m, s in self.feature_shapes.items()}
            self.project = None
        size = math.prod(d + 1 for d in dims.values())
        if size > max_features:
            raise ValueError(f"tensor fusion: the outer product of {dims} (+1 each) has {size} values, "
                             f"more than max_features={max_features}; project to a smaller proj_dim "
                             f"or raise max_features")
        self.product_size = size
        self.body = nn.Sequential(nn.Dropout(dropout), nn.Linear(size, hidden), nn.ReLU(),
                                  nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        flat = flat_features(self, features)
        product = None
        for m, x in zip(self.modalities, flat):
            if self.project is not None:
                x = self.project[m](x)
            z = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            product = z if product is None else (product.unsqueeze(2) * z.unsqueeze(1)).flatten(1)
        return self.body(product)
