"""Helpers shared by the fusions: checking and flattening the per-modality features."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from torch import Tensor, nn


def flat_width(shape: Sequence[int]) -> int:
    """Number of values in one sample's feature of ``shape``."""
    return math.prod(shape)


def check_features(fusion: nn.Module, features: Mapping[str, Tensor]) -> None:
    """Raise a clear error when a modality is missing or its per-sample shape is not the declared one."""
    missing = [m for m in fusion.modalities if m not in features]
    if missing:
        raise KeyError(f"{type(fusion).__name__} expects features for {list(fusion.modalities)}; "
                       f"missing {missing}")
    for m in fusion.modalities:
        shape, expected = tuple(features[m].shape[1:]), fusion.feature_shapes[m]
        if shape != expected:
            raise ValueError(f"{type(fusion).__name__}: modality {m!r} feature has per-sample shape "
                             f"{shape}, expected {expected}")


def flat_features(fusion: nn.Module, features: Mapping[str, Tensor]) -> list[Tensor]:
    """The checked features, each flattened to (B, prod(shape)), in modality order."""
    check_features(fusion, features)
    return [features[m].flatten(1) for m in fusion.modalities]


def positive_int(value: int, name: str, where: str) -> int:
    """``value`` if it is an int >= 1, else a ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: option {name!r} must be a positive integer, got {value!r}")
    return value
