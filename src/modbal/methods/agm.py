"""Adaptive Gradient Modulation (AGM; Li et al., ICCV 2023, arXiv 2308.07686).

Per step: the Shapley mono-modal outputs o_m give mono-modal cross-entropies s_m; their spread
gives ratios r_m = exp(M/(M−1)·(s̄ − s_m)); the same formula applied to the running average of
s_m (taken before this batch is added) gives the reference τ_m; and κ_m = exp(α·min(τ_m − r_m, cap))
multiplies the gradient that reaches o_m. The loss is cross-entropy on Σ_m o_m = f(all), so the
forward value equals joint training's and only the gradient split between modalities changes.
A modality ahead of its own history (r_m > τ_m) is slowed (κ_m < 1), a lagging one sped up.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt import shapley_forward
from ..distributed import batch_means, unwrap
from ..registry import METHODS
from .base import (
    Coefficient,
    Method,
    at_least_float32,
    bind_modalities,
    check_finite_gradients,
    check_window,
    coefficient_statistics,
    in_window,
)

REFERENCES = ("cumulative", "ema", "fixed")


# -- the formulas, as pure functions ---------------------------------------------------------
def mono_cross_entropy(mono: Tensor, targets: Tensor, prob_floor: float = 1e-8) -> Tensor:
    """Per-sample −log p_m(y) of each mono-modal output (M × B), probabilities floored."""
    probs = torch.softmax(at_least_float32(mono), dim=-1).clamp_min(prob_floor)
    index = targets.view(1, -1, 1).expand(mono.shape[0], -1, 1)
    return -probs.log().gather(-1, index).squeeze(-1)


def competition_ratios(scores: Tensor) -> Tensor:
    """r_m = exp(M/(M−1)·(mean(s) − s_m)); for M = 2, r_a = exp(s_v − s_a)."""
    m = scores.shape[0]
    return torch.exp(m / (m - 1) * (scores.mean() - scores))


def modulation_coefficients(tau: Tensor, ratios: Tensor, alpha: float, cap: float | None) -> Tensor:
    """κ_m = exp(α·min(τ_m − r_m, cap)) (no cap when ``cap`` is None)."""
    gap = tau - ratios
    if cap is not None:
        gap = gap.clamp_max(cap)
    return torch.exp(alpha * gap)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient of row m (axis 0) by ``scale[m]`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype), None


def scale_gradient(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` unchanged, with the gradient of ``x[m]`` multiplied by ``scale[m]``."""
    return _ScaleGradient.apply(x, scale)


def output_weights(model: nn.Module) -> list[Tensor]:
    """The weights of the model's final classification layer, from its fusion's ``output_weights()``."""
    fusion = getattr(model, "fusion", None)
    if not callable(getattr(fusion, "output_weights", None)):
        raise TypeError(f"AGM clip_when_head_grad_exceeds watches the fusion's output weights, but "
                        f"{type(fusion).__name__} has no output_weights() method")
    return fusion.output_weights()


# -- the method --------------------------------------------------------------------------------
@METHODS.register("agm")
class AGM(Method):
    """Adaptive Gradient Modulation as a drop-in loss for any :class:`~modbal.MultimodalModel`.

    Args:
        alpha (float): modulation strength α (paper: 2.5 AV-MNIST, 1.5 CREMA-D, 4/6 UR-Funny).
        reference (str): running reference for τ: ``"cumulative"`` (the paper code: mean of s_m
            over all steps so far), ``"ema"`` (exponential average with ``momentum``) or
            ``"fixed"`` (τ = 1). Default: ``"cumulative"``.
        momentum (float): β of the ``"ema"`` reference. Default: 0.99.
        cap (float, optional): cap on τ − r inside the exponent (paper code: 10 on CREMA-D,
            7 on UR-Funny, none elsewhere). Default: None.
        start_epoch, end_epoch (int): modulation window [start, end) in epochs (end None: to the
            end). Outside it κ = 1, or the last κ with ``hold_last=True`` (the paper code).
        kappa_min, kappa_max (float, optional): bounds on κ.
        clip_grad_norm (float, optional): clip the total gradient norm to this after backward
            (every step, unless ``clip_when_head_grad_exceeds`` is set).
        clip_when_head_grad_exceeds (float, optional): clip (to ``clip_grad_norm``) only on steps
            where an element of the gradient of the fusion's output weights
            (:meth:`~modbal.fusions.base.Fusion.output_weights`) leaves [−t, t]: the AGM code's
            safety clip (t = 1 and norm 1 on AV-MNIST, CREMA-D and MOSEI; 5 and 5 on UR-Funny; none
            on AVE). Default: None.
        muting (str): ``"features"`` (encoders once, muted features from a zero sample; fast) or
            ``"inputs"`` (the paper code: the model re-run on zeroed inputs). Default: features.
        prob_floor (float): floor on probabilities in s_m. Default: 1e-8.
        scores (str): which output s_m is the cross-entropy of: ``"shapley"`` (the paper: the
            Shapley mono-modal output o_m) or ``"masked"`` (an ablation: f({m}), the model with every
            other modality muted). The gradient is modulated through o_m either way. Default: shapley.

    Note:
        The running statistics keep updating outside the modulation window, so τ always reflects
        the whole training history, as the paper code's cumulative mean does.
    """

    name = "agm"
    coefficient = Coefficient("κ_m, the scale of the gradient through modality m's mono-modal output o_m "
                              "(also logged as kappa/<m>)")

    def __init__(
        self, alpha: float = 1.0, reference: str = "cumulative", momentum: float = 0.99,
        cap: float | None = None, start_epoch: int = 0, end_epoch: int | None = None,
        hold_last: bool = False, kappa_min: float | None = None, kappa_max: float | None = None,
        clip_grad_norm: float | None = None, clip_when_head_grad_exceeds: float | None = None,
        muting: str = "features", prob_floor: float = 1e-8, scores: str = "shapley",
    ) -> None:
        if not alpha >= 0:
            raise ValueError(f"Invalid alpha: {alpha} (must be >= 0)")
        if reference not in REFERENCES:
            raise ValueError(f"Invalid reference {reference!r}; allowed values: {', '.join(REFERENCES)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
        check_window(start_epoch, end_epoch)
        if kappa_min is not None and kappa_max is not None and kappa_min > kappa_max:
            raise ValueError(f"Invalid kappa bounds: kappa_min={kappa_min} > kappa_max={kappa_max}")
        if kappa_min is not None and kappa_min < 0:
            raise ValueError(f"Invalid kappa_min: {kappa_min} (must be >= 0)")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"Invalid clip_grad_norm: {clip_grad_norm} (must be > 0)")
        if clip_when_head_grad_exceeds is not None:
            if not clip_when_head_grad_exceeds > 0:
                raise ValueError(f"Invalid clip_when_head_grad_exceeds: {clip_when_head_grad_exceeds} (must be > 0)")
            if clip_grad_norm is None:
                raise ValueError("clip_when_head_grad_exceeds needs clip_grad_norm (the norm to clip to)")
        if muting not in ("features", "inputs"):
            raise ValueError(f"Invalid muting {muting!r}; allowed values: features, inputs")
        if not 0 < prob_floor < 1:
            raise ValueError(f"Invalid prob_floor: {prob_floor}")
        if scores not in ("shapley", "masked"):
            raise ValueError(f"Invalid scores {scores!r}; allowed values: shapley, masked")
        self.alpha, self.reference, self.momentum, self.cap = alpha, reference, momentum, cap
        self.start_epoch, self.end_epoch, self.hold_last = start_epoch, end_epoch, hold_last
        self.kappa_min, self.kappa_max = kappa_min, kappa_max
        self.clip_grad_norm, self.clip_when_head_grad_exceeds = clip_grad_norm, clip_when_head_grad_exceeds
        self.muting, self.prob_floor, self.scores = muting, prob_floor, scores
        self._modalities: tuple[str, ...] | None = None
        self._count = 0
        self._running: Tensor | None = None  # float64, CPU: the running average S_m
        self._last_kappa: Tensor | None = None
        self._epoch = 0
        self._stats: dict[str, float] = {}

    # -- loop hooks -----------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        out = shapley_forward(model, inputs, self.muting)
        self._modalities = bind_modalities(self._modalities, out.modalities, "AGM")
        mono = at_least_float32(out.mono)
        m = len(out.modalities)
        scored = mono if self.scores == "shapley" else at_least_float32(out.coalitions[[1 << i for i in range(m)]])
        per_sample = mono_cross_entropy(scored, targets, self.prob_floor)
        correct = (mono.argmax(-1) == targets).float()
        means = batch_means(torch.cat([per_sample, correct])).double().cpu()
        kappa = self._decide(means[:m], means[m:])
        scaled = scale_gradient(mono, kappa.to(device=mono.device, dtype=mono.dtype))
        return F.cross_entropy(scaled.sum(0), targets)

    def after_backward(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        total = nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(total):
            check_finite_gradients(unwrap(model), "AGM")
            raise FloatingPointError(f"AGM: non-finite total gradient norm {float(total)}")
        self._stats["grad_norm"] = float(total)
        if self.clip_grad_norm is None:
            return
        limit = self.clip_when_head_grad_exceeds
        clip = limit is None or any(w.grad is not None and bool((w.grad.abs() > limit).any())
                                    for w in output_weights(unwrap(model)))
        if clip:
            nn.utils.clip_grads_with_norm_(params, self.clip_grad_norm, total)
        self._stats["clipped"] = float(clip and float(total) > self.clip_grad_norm)

    # -- the decision ---------------------------------------------------------------------------
    def _reference(self, m: int) -> Tensor:
        if self.reference == "fixed" or self._count == 0:
            return torch.ones(m, dtype=torch.float64)
        return competition_ratios(self._running)

    def _update_running(self, scores: Tensor) -> None:
        if self._count == 0:
            self._running = scores.clone()
        elif self.reference == "ema":
            self._running = self.momentum * self._running + (1 - self.momentum) * scores
        else:
            self._running = self._running + (scores - self._running) / (self._count + 1)
        self._count += 1

    def _decide(self, scores: Tensor, mono_acc: Tensor) -> Tensor:
        m = scores.shape[0]
        tau = self._reference(m)
        ratios = competition_ratios(scores)
        if in_window(self._epoch, self.start_epoch, self.end_epoch):
            kappa = modulation_coefficients(tau, ratios, self.alpha, self.cap)
            if self.kappa_min is not None or self.kappa_max is not None:
                kappa = kappa.clamp(self.kappa_min, self.kappa_max)
        elif self.hold_last and self._last_kappa is not None:
            kappa = self._last_kappa
        else:
            kappa = torch.ones(m, dtype=torch.float64)
        names = self._modalities
        if not (torch.isfinite(scores).all() and torch.isfinite(tau).all() and torch.isfinite(kappa).all()):
            # the modalities whose own score is non-finite (a ratio mixes every score, so it is not a witness)
            bad = [n for i, n in enumerate(names) if not math.isfinite(float(scores[i]))] or \
                [n for i, n in enumerate(names) if not all(math.isfinite(float(t[i])) for t in (ratios, tau, kappa))]
            raise FloatingPointError(
                f"AGM: non-finite statistics for {'modality' if len(bad) == 1 else 'modalities'} "
                f"{', '.join(map(repr, bad))} at step {self._count}: "
                + ", ".join(f"{n}: s={float(scores[i]):.4g} r={float(ratios[i]):.4g} "
                            f"tau={float(tau[i]):.4g} kappa={float(kappa[i]):.4g}" for i, n in enumerate(names))
                + f" (alpha={self.alpha}, cap={self.cap}); lower alpha, set cap or kappa_max"
            )
        self._update_running(scores)
        self._last_kappa = kappa
        self._stats = {}
        for i, n in enumerate(names):
            self._stats.update({f"s/{n}": float(scores[i]), f"r/{n}": float(ratios[i]),
                                f"tau/{n}": float(tau[i]), f"kappa/{n}": float(kappa[i]),
                                f"mono_acc/{n}": float(mono_acc[i])})
        self._stats.update(coefficient_statistics({n: float(kappa[i]) for i, n in enumerate(names)}))
        return kappa

    # -- bookkeeping ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        return {
            "modalities": list(self._modalities) if self._modalities else None,
            "count": self._count,
            "running": None if self._running is None else self._running.clone(),
            "last_kappa": None if self._last_kappa is None else self._last_kappa.clone(),
            "epoch": self._epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "count", "running", "last_kappa", "epoch"}
        if set(state) != expected:
            raise ValueError(f"AGM state must have keys {sorted(expected)}, got {sorted(state)}")
        modalities = tuple(state["modalities"]) if state["modalities"] else None
        running = state["running"]
        if running is not None and (modalities is None or running.shape != (len(modalities),)):
            raise ValueError(f"AGM state: running average shape {tuple(running.shape)} "
                             f"does not match modalities {modalities}")
        self._modalities = modalities
        self._count = int(state["count"])
        self._running = None if running is None else running.detach().double().cpu().clone()
        last = state["last_kappa"]
        self._last_kappa = None if last is None else last.detach().double().cpu().clone()
        self._epoch = int(state["epoch"])
