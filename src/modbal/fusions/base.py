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

    Fusions whose logits are a sum of per-modality heads (late fusion by ``sum`` or ``concat``)
    set :attr:`has_mono_heads` and define :meth:`mono_logits` and :meth:`head_parameters`: the
    scores the original OGM-GE, MSLR and MSES code reads, and the parameters those methods modulate
    beside the encoder.
    """

    #: True when the logits are Σ_m head_m(h_m) + shared bias, so each modality has its own head
    has_mono_heads: bool = False

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

    def output_weights(self) -> list[Tensor]:
        """The weight tensor(s) of the final classification layer (the layer that produces the
        logits): ``[self.head.weight]`` when ``head`` is a Linear. The AGM code's safety clip
        watches the gradient of these weights."""
        head = getattr(self, "head", None)
        if isinstance(head, nn.Linear):
            return [head.weight]
        raise NotImplementedError(f"{type(self).__name__} has no linear classification layer `head`; "
                                  f"override output_weights() to name the weights that produce its logits")

    def mono_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's own head output (B × C), summing to the logits; only for fusions with
        :attr:`has_mono_heads`."""
        raise NotImplementedError(f"{type(self).__name__} has no per-modality heads (has_mono_heads is False)")

    def head_parameters(self, modality: str) -> list[tuple[nn.Parameter, tuple[slice, ...] | None]]:
        """The parameters (and, for a shared tensor, the index of the entries) that belong to
        ``modality``'s own head alone; shared entries such as a common bias are not listed."""
        raise NotImplementedError(f"{type(self).__name__} has no per-modality heads (has_mono_heads is False)")
