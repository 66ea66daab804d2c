"""Joint training: plain cross-entropy on the fused output."""
from __future__ import annotations

from typing import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import METHODS
from .base import Method, at_least_float32


@METHODS.register("joint")
class Joint(Method):
    """Plain cross-entropy on ``model(inputs)``; the reference every balancing method is compared to."""

    name = "joint"

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        return F.cross_entropy(at_least_float32(model(inputs)), targets)
