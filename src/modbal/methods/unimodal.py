"""Uni-modal training: one modality alone, the others muted (zeroed inputs).

Gives the uni-modal rows of result tables and the "mono-modal concept" model of the competition
strength metric (a modality trained without competition). The network is the multimodal one with
every other modality's input replaced by zeros — in training *and* evaluation
(:meth:`UniModal.prepare_inputs`) — so early and late fusion are both covered. The muted encoders
are run in eval mode (their BatchNorm statistics and dropout stay fixed), are left out of the
optimizer (:meth:`UniModal.param_groups`) and their gradients are dropped after backward, so only
the trained modality's encoder and the fusion ever change.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import unwrap
from ..model import eval_mode, mute_inputs
from ..registry import METHODS
from .base import Method, at_least_float32


@METHODS.register("unimodal")
class UniModal(Method):
    """Train ``modality`` alone; the other modalities' inputs are zeros.

    Args:
        modality (str): the modality to train (one of the model's modalities).

    The loss is cross-entropy on ``model(prepare_inputs(inputs))``. ``param_groups`` holds the
    trained encoder and every non-encoder parameter (the fusion); ``after_backward`` sets the other
    encoders' gradients to ``None`` (so even an optimizer built from all parameters leaves them
    untouched: torch optimizers skip parameters without a gradient, weight decay and momentum
    included).
    """

    name = "unimodal"

    def __init__(self, modality: str) -> None:
        if not isinstance(modality, str) or not modality:
            raise ValueError(f"Invalid modality: {modality!r} (must be a modality name)")
        self.modality = modality

    def _check(self, model: nn.Module) -> nn.Module:
        inner = unwrap(model)
        if self.modality not in inner.modalities:
            raise ValueError(f"uni-modal modality {self.modality!r} is not one of the model's "
                             f"modalities {list(inner.modalities)}")
        return inner

    def prepare_inputs(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return mute_inputs(inputs, [self.modality])

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        inner = self._check(model)
        muted = {id(p) for m in inner.modalities if m != self.modality
                 for p in inner.encoders[m].parameters()}
        return [{"params": [p for p in inner.parameters() if p.requires_grad and id(p) not in muted]}]

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        inner = self._check(model)
        with ExitStack() as stack:
            for m in inner.modalities:
                if m != self.modality:
                    stack.enter_context(eval_mode(inner.encoders[m]))
            logits = model(self.prepare_inputs(inputs))
        return F.cross_entropy(at_least_float32(logits), targets)

    def after_backward(self, model: nn.Module) -> None:
        inner = self._check(model)
        for m in inner.modalities:
            if m != self.modality:
                for p in inner.encoders[m].parameters():
                    p.grad = None
