"""The fusion protocol: ``{modality: feature}`` → logits, with the head inside the fusion."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn


class Fusion(nn.Module):
    """Base class of fusions.

    Args:
        feature_shapes: per-modality feature shape without the batch axis, in modality order
            (e.g. ``{"audio": (512,), "image": (512,)}``, or ``(T, D)`` for token sequences).
        num_classes: number of output logits.

    Subclasses define :meth:`represent` (the fused representation, used by the competition
    probe) and ``self.head``; or override :meth:`forward` when the logits are not a head over one
    representation (e.g. per-modality heads summed).
    """

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int) -> None:
        super().__init__()
        if len(feature_shapes) < 2:
            raise ValueError(f"a fusion needs at least 2 modalities, got {list(feature_shapes)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.feature_shapes = {m: tuple(s) for m, s in feature_shapes.items()}
        self.modalities = tuple(feature_shapes)
        self.num_classes = num_classes

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        """The fused representation (B × D) before the classification head."""
        raise NotImplementedError

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.head(self.represent(features))
