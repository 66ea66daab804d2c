"""Modality-Specific Learning Rates (MSLR; Yao & Mihalcea, 2022), adaptive variant, as the AGM
authors' code runs it.

Modality m's factor is λ_m = λ⁰_m · r_m, with r_m a ratio updated after each epoch's validation
from a_m(t), the validation accuracy of modality m's own output (its head where the fusion has
per-modality heads, its Shapley mono-modal output otherwise). The first k epochs (k = 5) only fill
a memory and keep r_m = 1; from then on

    r_m = a_m(t) / mean(a_m(t−k), …, a_m(t−1))      (the k previous epochs; epoch t excluded)

and the memory slides by one (a_m(t) in, the oldest out). A modality improving faster than its
recent average gets a larger step, a stalling one a smaller step. λ is floored at ``min_factor``
(> 0) and r_m is 1 while the mean is 0. λ acts only inside the modulation window
[start_epoch, end_epoch) (default the code's epochs 1–20, i.e. [0, 20) here); outside it the
factor is 1.

``form="gradient"`` (default, the original): after backward, the gradients of modality m's
encoder *and* of its own head (``fusion.head_parameters(m)``, when the fusion has heads) are
multiplied by λ_m. ``form="lr"``: λ_m multiplies the learning rate of the encoder's optimizer group
instead (``lr ← lr · λ_new / λ_applied``, with ``λ_applied`` stored in the group as
``group["lr_factor"]``, so it composes with chainable schedulers and resumption re-applies nothing).
The two differ in what they scale: a gradient multiplier leaves weight decay unscaled, reaches
momentum gradually and is cancelled by Adam's normalisation; a learning-rate factor scales the
whole update, weight decay and momentum included, and acts fully under Adam.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import unwrap
from ..registry import METHODS
from .base import (
    Coefficient,
    Method,
    at_least_float32,
    check_window,
    coefficient_statistics,
    in_window,
    per_modality_param_groups,
    require_encoder_parameters,
)
from .heads import check_scores, metric_name, modality_gradient_slices, scale_gradients
from .ogm_ge import warn_adaptive_optimizer

FORMS = ("gradient", "lr")


# -- the formulas, as pure functions ---------------------------------------------------------
def mslr_update(memory: list[float], accuracy: float, window: int) -> tuple[float, list[float]]:
    """One epoch of the schedule: ``(ratio, memory)``. While the memory holds fewer than ``window``
    accuracies, ``accuracy`` is appended and the ratio is 1; then the ratio is
    ``accuracy / mean(memory)`` (1 when that mean is 0) and the memory slides by one."""
    if len(memory) < window:
        return 1.0, [*memory, accuracy]
    mean = sum(memory) / len(memory)
    return (accuracy / mean if mean > 0 else 1.0), [*memory[1:], accuracy]


def mslr_factor(initial: float, ratio: float, min_factor: float) -> float:
    """λ = max(λ⁰ · r, ``min_factor``)."""
    return max(initial * ratio, min_factor)


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
            Paper code: AV-MNIST audio 1.3 / image 0.7; CREMA-D audio 0.9 / visual 1.1;
            UR-Funny audio 0.9 / visual 1.4 / text 0.7.
        window (int): k, the epochs that fill the memory and are averaged. Default: 5.
        min_factor (float): floor on λ (> 0). Default: 1e-3.
        start_epoch, end_epoch (int): window [start, end) in 0-based epochs where λ acts (end None:
            to the end). Default: [0, 20), the code's ``0 <= epoch <= 20`` over 1-based epochs.
        form (str): ``"gradient"`` (multiply the gradients of the encoder and its own head, the
            original) or ``"lr"`` (multiply the encoder group's learning rate). Default: gradient.
        scores (str): accuracy of the modality's own head (``"heads"``), of its Shapley mono-modal
            output (``"shapley"``), or ``"auto"`` (heads where the fusion has them). Default: auto.

    With ``form="lr"`` the runner must call :meth:`setup` once the optimizer exists so that the
    first epoch already runs at ``base lr · λ⁰``.
    """

    name = "mslr"
    acts_on_encoders = True
    coefficient = Coefficient("λ_m, the multiplier of modality m's encoder and head gradient (its encoder's "
                              "learning rate with form='lr'); also logged as factor/<m>")

    def __init__(self, initial_factors: Mapping[str, float] | None = None, window: int = 5,
                 min_factor: float = 1e-3, start_epoch: int = 0, end_epoch: int | None = 20,
                 form: str = "gradient", scores: str = "auto") -> None:
        factors = dict(initial_factors or {})
        for m, f in factors.items():
            if not (isinstance(f, (int, float)) and f > 0 and math.isfinite(f)):
                raise ValueError(f"Invalid initial factor for {m!r}: {f} (must be a finite number > 0)")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"Invalid window: {window} (must be an int >= 1)")
        if not (min_factor > 0 and math.isfinite(min_factor)):
            raise ValueError(f"Invalid min_factor: {min_factor} (must be > 0)")
        check_window(start_epoch, end_epoch)
        if form not in FORMS:
            raise ValueError(f"Invalid form {form!r}; allowed values: {', '.join(FORMS)}")
        check_scores(scores)
        self.initial_factors = {m: float(f) for m, f in factors.items()}
        self.window, self.min_factor = window, float(min_factor)
        self.start_epoch, self.end_epoch, self.form, self.scores = start_epoch, end_epoch, form, scores
        #: the lr form rescales its groups' rates multiplicatively (config refuses a cosine floor)
        self.rescales_learning_rates = form == "lr"
        self._modalities: tuple[str, ...] | None = None
        self._memory: dict[str, list[float]] = {}
        self._ratios: dict[str, float] = {}
        self._epoch = 0  # the epoch being trained (or, after on_epoch_end, the next one)

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
            self._ratios.setdefault(m, 1.0)
            self._memory.setdefault(m, [])
        return names

    def factors(self, epoch: int | None = None) -> dict[str, float]:
        """λ_m in effect during ``epoch`` (default: the current one); 1 outside the window."""
        epoch = self._epoch if epoch is None else epoch
        inside = in_window(epoch, self.start_epoch, self.end_epoch)
        return {m: mslr_factor(self.initial_factors.get(m, 1.0), r, self.min_factor) if inside else 1.0
                for m, r in self._ratios.items()}

    # -- optimizer ------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        self._bind(model)
        require_encoder_parameters(model, "MSLR")
        return per_modality_param_groups(model, "MSLR") if self.form == "lr" else super().param_groups(model)

    def _apply_lr(self, optimizer: torch.optim.Optimizer) -> None:
        factors = self.factors()
        found = {g.get("modality") for g in optimizer.param_groups}
        missing = [m for m in factors if m not in found]
        if missing:
            raise ValueError(f"MSLR form='lr': the optimizer has no param group for modalities {missing}; "
                             f"build it from method.param_groups(model)")
        for group in optimizer.param_groups:
            m = group.get("modality")
            if m is not None:
                apply_lr_factor(group, factors[m])

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._bind(model)
        require_encoder_parameters(model, "MSLR")
        if self.form == "lr":
            self._apply_lr(optimizer)
        else:
            warn_adaptive_optimizer(optimizer, "MSLR (form='gradient'; form='lr' acts under it)")

    # -- loop hooks -----------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        return F.cross_entropy(at_least_float32(model(inputs)), targets)

    def after_backward(self, model: nn.Module) -> None:
        if self.form != "gradient":
            return
        for m, factor in self.factors().items():
            if factor != 1.0:
                scale_gradients(modality_gradient_slices(model, m, head=True), factor)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float], model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
        names = self._bind(model)
        keys = {m: metric_name("acc", self.scores, model, m, "MSLR") for m in names}
        missing = [k for k in keys.values() if k not in metrics]
        if missing:
            raise KeyError(f"MSLR needs the validation metrics {missing}; got {sorted(metrics)}")
        for m in names:
            self._ratios[m], self._memory[m] = mslr_update(self._memory[m], float(metrics[keys[m]]), self.window)
        self._epoch = epoch + 1
        if self.form == "lr":
            self._apply_lr(optimizer)

    # -- bookkeeping ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        factors = self.factors()
        return {**{f"factor/{m}": f for m, f in factors.items()}, **coefficient_statistics(factors)}

    def state_dict(self) -> dict[str, Any]:
        return {"modalities": list(self._modalities) if self._modalities else None,
                "memory": {m: list(h) for m, h in self._memory.items()},
                "ratios": dict(self._ratios), "epoch": self._epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "memory", "ratios", "epoch"}
        if set(state) != expected:
            raise ValueError(f"MSLR state must have keys {sorted(expected)}, got {sorted(state)}")
        self._modalities = tuple(state["modalities"]) if state["modalities"] else None
        self._memory = {m: [float(a) for a in h] for m, h in state["memory"].items()}
        self._ratios = {m: float(r) for m, r in state["ratios"].items()}
        self._epoch = int(state["epoch"])
