"""The padding convention of the sequence encoders: trailing all-zero time steps are padding.

A sequence's length is one past its last time step with any non-zero value; all-zero steps in the
middle count as real steps (e.g. silence). An all-zero sequence (AGM's muted sample) has length 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def sequence_lengths(x: Tensor) -> Tensor:
    """Valid length of each sequence in ``x`` (B × T × F) under the trailing-zeros convention, (B,) int64."""
    nonzero = (x != 0).flatten(2).any(dim=2)  # (B, T)
    steps = torch.arange(1, x.shape[1] + 1, device=x.device)
    return (nonzero * steps).amax(dim=1) if x.shape[1] else nonzero.new_zeros(x.shape[0], dtype=torch.long)


def check_sequence_shape(input_shape: Sequence[int], where: str) -> tuple[int, int]:
    """(T, F) from ``input_shape``, or a ``ValueError`` naming the encoder and the shape."""
    shape = tuple(input_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{where} expects input_shape (T, F) (time steps, features per step), got {shape}")
    return shape[0], shape[1]


def check_sequence_batch(x: Tensor, features: int, where: str) -> None:
    """A ``ValueError`` unless ``x`` is B × T × ``features``."""
    if x.dim() != 3 or x.shape[2] != features:
        raise ValueError(f"{where} expects a batch of shape (B, T, {features}), got {tuple(x.shape)}")
