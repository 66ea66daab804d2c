"""Uni-modal assistance: the joint loss plus one cross-entropy per modality on a separate head.

Per step: L = w_fused·CE(f(x), y) + Σ_m w_m·CE(head_m(h_m), y), where h_m is modality m's encoder
feature (mean-pooled over token or map axes) and head_m a linear classifier owned by the method
(``method.attach(model)``). Each head sees only its own loss; the encoders receive the fused and
their own uni-modal gradient. With every weight 1 this is the "uniform baseline" of the MMPareto
code (``uniform_baseline.py``: L_mm + L_a + L_v, plain backward), the cheap multitask ablation that
accounts for much of the gain reported for gradient-editing methods.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt import protocol_forward
from ..distributed import batch_means, unwrap
from ..registry import METHODS
from .base import Coefficient, Method, at_least_float32, coefficient_statistics, method_modules, modality_heads

FUSED = "fused"


# -- the formulas, as pure functions ---------------------------------------------------------
def branch_losses(outputs: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Per-sample cross-entropy of every branch's logits (K × B), in float32 or wider."""
    return torch.stack([F.cross_entropy(at_least_float32(o), targets, reduction="none") for o in outputs])


def blended_loss(per_sample: Tensor, weights: Sequence[float]) -> Tensor:
    """Σ_k w_k · mean_i ℓ_k,i: the weighted sum of the branches' batch-mean losses."""
    return (per_sample.mean(-1) * per_sample.new_tensor(list(weights))).sum()


def check_weight(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {what}: {value!r} (must be a finite number >= 0)")
    return float(value)


def forward_with_heads(model: nn.Module, inputs: Mapping[str, Tensor], method: str) -> tuple[Tensor, list[Tensor]]:
    """The fused logits and each modality's head logits (modality order), from one forward: the
    heads run inside ``model.forward`` (``aux``), so DistributedDataParallel sees them."""
    heads = method_modules(model, method)
    names = unwrap(model).modalities
    logits, outs = protocol_forward(model, inputs, aux=lambda features: [heads[m](features[m]) for m in names])
    return logits, outs


# -- the method --------------------------------------------------------------------------------
@METHODS.register("unimodal_assist")
class UniModalAssist(Method):
    """Joint loss plus weighted per-modality losses on separate linear heads.

    Args:
        weights (float | dict | None): w_m, one number for every modality or ``{modality: number}``
            (each >= 0). Default (None): 1 for every modality (the MMPareto code's uniform baseline).
        fused_weight (float): w_fused of the fused output's loss (>= 0). Default: 1.

    Call ``method.attach(model)`` before building the optimizer (the runner does): it adds the heads
    to the model as ``model.method_modules[<modality>]``, so they are trained, saved and moved with it.
    Statistics: ``loss/fused`` and ``loss/<m>`` (global batch means of each branch's loss), ``coef/<m>``.
    """

    name = "unimodal_assist"
    acts_on_encoders = True
    coefficient = Coefficient("w_m, the (fixed) weight of modality m's uni-modal head loss", neutral=0.0)

    def __init__(self, weights: float | Mapping[str, float] | None = None, fused_weight: float = 1.0) -> None:
        if weights is None:
            weights = 1.0
        if isinstance(weights, Mapping):
            self.weights: float | dict[str, float] = {str(m): check_weight(w, f"weights[{m!r}]")
                                                      for m, w in weights.items()}
        else:
            self.weights = check_weight(weights, "weights")
        self.fused_weight = check_weight(fused_weight, "fused_weight")
        self._stats: dict[str, float] = {}

    def build_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        modality_weights(self.weights, unwrap(model).modalities, self.name)  # unknown names fail here
        return modality_heads(model, self.name)

    def branch_weights(self, modalities: Sequence[str]) -> list[float]:
        """[w_fused, w_m for m in modalities]."""
        return [self.fused_weight, *modality_weights(self.weights, modalities, self.name)]

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        names = unwrap(model).modalities
        logits, heads = forward_with_heads(model, inputs, self.name)
        per_sample = branch_losses([logits, *heads], targets)
        self._stats = branch_statistics(per_sample, names)
        weights = self.branch_weights(names)
        self._stats.update(coefficient_statistics(dict(zip(names, weights[1:]))))
        return blended_loss(per_sample, weights)

    def statistics(self) -> dict[str, float]:
        return dict(self._stats)


def modality_weights(weights: float | Mapping[str, float], modalities: Sequence[str], method: str) -> list[float]:
    """The per-modality weights in modality order (a mapping must name exactly the modalities)."""
    if not isinstance(weights, Mapping):
        return [float(weights)] * len(modalities)
    unknown, missing = sorted(set(weights) - set(modalities)), [m for m in modalities if m not in weights]
    if unknown or missing:
        raise ValueError(f"{method} weights must name exactly the modalities {list(modalities)}; "
                         f"unknown {unknown}, missing {missing}")
    return [float(weights[m]) for m in modalities]


def branch_statistics(per_sample: Tensor, modalities: Sequence[str]) -> dict[str, float]:
    """``loss/fused`` and ``loss/<m>``: each branch's mean loss over the global batch."""
    means = batch_means(per_sample.detach()).tolist()
    return {f"loss/{name}": v for name, v in zip((FUSED, *modalities), means)}
