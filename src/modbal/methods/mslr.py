"""Modality-Specific Learning Rates (MSLR; Yao & Mihalcea, 2022), adaptive variant.

Each modality's encoder is its own optimizer group (key ``"modality"``); the fusion and every
other parameter form one more group that keeps the base learning rate. Modality m's factor is

    λ_m(0) = λ_m⁰                                        (the initial factor, default 1.0)
    λ_m(t+1) = λ_m⁰ · a_m(t) / mean(a_m(t−k+1), …, a_m(t))   after validation of epoch t

with a_m(t) the validation mono-modal accuracy ``mono_acc/<m>`` of epoch t and the mean over the
last k epochs *including* t (fewer at the start; k = 5 by default). A modality improving faster than
its recent average gets a larger step, a stalling one a smaller step. λ is floored at
``min_factor`` (> 0) and set to λ⁰ while the mean accuracy is 0.

The factor is applied multiplicatively to the group's current learning rate,
``lr ← lr · λ_new / λ_applied``, where ``λ_applied`` is stored in the group itself
(``group["lr_factor"]``, saved with the optimizer's state). So the group's lr is always
``schedule(t) · λ_m`` for chainable schedulers (StepLR, MultiStepLR, ExponentialLR,
CosineAnnealingLR with eta_min = 0, ...) whatever their order of application, and applying the
same factor twice is a no-op (resumption is safe).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import unwrap
from ..registry import METHODS
from .base import Method, at_least_float32, per_modality_param_groups


# -- the formulas, as pure functions ---------------------------------------------------------
def mslr_factor(initial: float, history: list[float], window: int, min_factor: float) -> float:
    """λ = λ⁰ · a_t / mean(last ``window`` of ``history``), ``history[-1]`` = a_t; λ⁰ when the
    mean is 0; floored at ``min_factor``."""
    if not history:
        return initial
    recent = history[-window:]
    mean = sum(recent) / len(recent)
    factor = initial if mean <= 0 else initial * history[-1] / mean
    return max(factor, min_factor)


def apply_lr_factor(group: dict[str, Any], factor: float) -> None:
    """Set a param group's lr factor to ``factor`` multiplicatively (composes with schedulers)."""
    old = group.get("lr_factor", 1.0)
    if factor != old:
        group["lr"] = group["lr"] * factor / old
    group["lr_factor"] = factor


@METHODS.register("mslr")
class MSLR(Method):
    """Adaptive modality-specific learning rates (the loss is plain joint cross-entropy).

    Args:
        initial_factors (dict, optional): ``{modality: λ⁰_m}`` (> 0); unlisted modalities get 1.0.
            Paper code: AV-MNIST audio 1.3 / image 0.7; CREMA-D audio 0.9 / visual 1.1.
        window (int): k, the number of recent epochs averaged. Default: 5.
        min_factor (float): floor on λ (> 0, keeps the multiplicative update invertible).
            Default: 1e-3.

    The runner must call :meth:`setup` once the optimizer exists so that the first epoch already
    runs at ``base lr · λ⁰``; later factors are applied in :meth:`on_epoch_end`.
    """

    name = "mslr"
    rescales_learning_rates = True

    def __init__(self, initial_factors: Mapping[str, float] | None = None, window: int = 5,
                 min_factor: float = 1e-3) -> None:
        factors = dict(initial_factors or {})
        for m, f in factors.items():
            if not (isinstance(f, (int, float)) and f > 0 and math.isfinite(f)):
                raise ValueError(f"Invalid initial factor for {m!r}: {f} (must be a finite number > 0)")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"Invalid window: {window} (must be an int >= 1)")
        if not (min_factor > 0 and math.isfinite(min_factor)):
            raise ValueError(f"Invalid min_factor: {min_factor} (must be > 0)")
        self.initial_factors = {m: float(f) for m, f in factors.items()}
        self.window, self.min_factor = window, float(min_factor)
        self._modalities: tuple[str, ...] | None = None
        self._history: dict[str, list[float]] = {}
        self._factors: dict[str, float] = {}

    def _bind(self, model: nn.Module) -> tuple[str, ...]:
        names = tuple(unwrap(model).modalities)
        unknown = sorted(set(self.initial_factors) - set(names))
        if unknown:
            raise ValueError(f"MSLR initial_factors name unknown modalities {unknown}; the model has {list(names)}")
        if self._modalities is None:
            self._modalities = names
        elif self._modalities != names:
            raise ValueError(f"MSLR was used with modalities {list(self._modalities)}, now got {list(names)}")
        for m in names:
            self._factors.setdefault(m, self.initial_factors.get(m, 1.0))
            self._history.setdefault(m, [])
        return names

    def factors(self) -> dict[str, float]:
        """The current λ_m (what the optimizer's groups carry after the last hook)."""
        return dict(self._factors)

    # -- optimizer ------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        self._bind(model)
        return per_modality_param_groups(model, "MSLR")

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        found = {g.get("modality") for g in optimizer.param_groups}
        missing = [m for m in self._factors if m not in found]
        if missing:
            raise ValueError(f"MSLR: the optimizer has no param group for modalities {missing}; build it "
                             f"from method.param_groups(model)")
        for group in optimizer.param_groups:
            m = group.get("modality")
            if m is not None:
                apply_lr_factor(group, self._factors[m])

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._bind(model)
        self._apply(optimizer)

    # -- loop hooks -----------------------------------------------------------------------------
    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        return F.cross_entropy(at_least_float32(model(inputs)), targets)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float], model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
        names = self._bind(model)
        missing = [f"mono_acc/{m}" for m in names if f"mono_acc/{m}" not in metrics]
        if missing:
            raise KeyError(f"MSLR needs the validation metrics {missing}; got {sorted(metrics)}")
        for m in names:
            history = self._history[m]
            history.append(float(metrics[f"mono_acc/{m}"]))
            del history[:-self.window]
            self._factors[m] = mslr_factor(self.initial_factors.get(m, 1.0), history, self.window,
                                           self.min_factor)
        self._apply(optimizer)

    # -- bookkeeping ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        return {f"lr_factor/{m}": f for m, f in self._factors.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"modalities": list(self._modalities) if self._modalities else None,
                "history": {m: list(h) for m, h in self._history.items()},
                "factors": dict(self._factors)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "history", "factors"}
        if set(state) != expected:
            raise ValueError(f"MSLR state must have keys {sorted(expected)}, got {sorted(state)}")
        self._modalities = tuple(state["modalities"]) if state["modalities"] else None
        self._history = {m: [float(a) for a in h] for m, h in state["history"].items()}
        self._factors = {m: float(f) for m, f in state["factors"].items()}
