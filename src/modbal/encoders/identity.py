"""The identity encoder: passes the raw input through, for raw-input early fusion (``early``)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..registry import ENCODERS


@ENCODERS.register("identity")
class IdentityEncoder(nn.Module):
    """Returns its input unchanged; ``out_shape`` is ``input_shape`` (no parameters)."""

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__()
        self.out_shape = tuple(input_shape)

    def forward(self, x: Tensor) -> Tensor:
        return x
