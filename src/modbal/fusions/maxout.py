"""The AGM paper code's "early fusion" on AV-MNIST: a MaxOut MLP over the concatenated features."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..registry import FUSIONS
from ._common import flat_features, flat_width, positive_int
from .base import Fusion


class MaxOut(nn.Module):
    """``max_k (W_k x + b_k)``: a linear map to ``out_features × pieces`` values, max over pieces."""

    def __init__(self, in_features: int, out_features: int, pieces: int = 2) -> None:
        super().__init__()
        self.out_features, self.pieces = out_features, pieces
        self.linear = nn.Linear(in_features, out_features * pieces)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).view(x.shape[0], self.out_features, self.pieces).amax(dim=-1)


@FUSIONS.register("maxout")
class MaxOutFusion(Fusion):
    """concat → BatchNorm → [MaxOut → BatchNorm → Dropout] per hidden width → Linear head.

    The paper uses widths (2048, 1024); the small defaults keep CPU runs cheap.

    Args:
        hidden: MaxOut output widths, one layer each. Default (64, 32); the paper: (2048, 1024).
        pieces: linear pieces per MaxOut unit. Default 2.
        dropout: dropout after each MaxOut block. Default 0.3.
        eps: BatchNorm epsilon (the paper code uses 1e-4). Default 1e-4.
    """

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int,
                 hidden: Sequence[int] = (64, 32), pieces: int = 2, dropout: float = 0.3,
                 eps: float = 1e-4) -> None:
        super().__init__(feature_shapes, num_classes)
        hidden = [positive_int(h, "hidden", "maxout fusion") for h in hidden]
        if not hidden:
            raise ValueError("maxout fusion: option 'hidden' needs at least one width")
        positive_int(pieces, "pieces", "maxout fusion")
        width = sum(flat_width(s) for s in self.feature_shapes.values())
        layers: list[nn.Module] = [nn.BatchNorm1d(width, eps=eps)]
        for h in hidden:
            layers += [MaxOut(width, h, pieces), nn.BatchNorm1d(h, eps=eps), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.body(torch.cat(flat_features(self, features), dim=1))
