"""Under-use gap modulation (UGM): modbal's own method; see docs/research/balance-gap-plan.md.

Per step: one forward gives the fused logits, the Shapley mono-modal outputs o_m of the fused
model and the method's linear heads u_m on the encoder features h_m. The under-use gap of modality
m is d_m = CE(o_m, y) − CE(u_m(h_m), y) (global batch means): how much worse the modality does
inside the fused model than a head trained on its features alone. Its exponential average
D_m ← μ·D_m + (1 − μ)·d_m (D_m = 0 before the first step) gives
κ_m = clip(exp(α·(D_m − mean_k D_k)), 1/κ_max, κ_max), which multiplies the gradient of the fused
loss reaching modality m through o_m (as AGM applies its κ; Σ_m o_m = f(all), so the forward value
is joint training's). The loss is CE(fused) + β·Σ_m CE(u_m(h_m)); with ``heads="probe"`` the heads
see detached features (they only measure), with ``heads="assist"`` their loss also trains the
encoders. ``predict="with_experts"`` scores fused logits + Σ_m log_softmax(u_m(h_m)).

Two options change what the gap reads and what κ acts on. ``gauge="accuracy"`` takes
d_m = acc(u_m(h_m), y) − acc(o_m, y) (the batch fractions each gets right, argmax), which does not
depend on the outputs' calibration, as a cross-entropy difference does. ``target="head_loss"``
leaves the fused gradient unscaled and lets κ_m (detached) weight modality m's head loss instead:
CE(fused) + β·Σ_m κ_m·CE(u_m(h_m)), uni-modal assistance weighted by under-use (needs
``heads="assist"``, since probe heads do not reach the encoders).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt import protocol_forward
from ..distributed import batch_means, unwrap
from ..registry import METHODS
from .agm import scale_gradient
from .base import (
    Coefficient,
    Method,
    Prediction,
    at_least_float32,
    bind_modalities,
    coefficient_statistics,
    method_modules,
    modality_heads,
)
from .unimodal_assist import branch_losses

HEADS = ("probe", "assist")
PREDICTIONS = ("fused", "with_experts")
GAUGES = ("loss", "accuracy")
TARGETS = ("fused_gradient", "head_loss")


# -- the formulas, as pure functions ---------------------------------------------------------
def update_gaps(gaps: Tensor, batch_gaps: Tensor, momentum: float) -> Tensor:
    """D_m ← μ·D_m + (1 − μ)·d_m: the smoothed under-use gaps after one batch."""
    return momentum * gaps + (1 - momentum) * batch_gaps


def gap_coefficients(gaps: Tensor, alpha: float, kappa_max: float) -> Tensor:
    """κ_m = clip(exp(α·(D_m − mean_k D_k)), 1/κ_max, κ_max): a modality under-used more than the
    others gets more of the fused gradient, one whose gap is closed gets less."""
    return torch.exp(alpha * (gaps - gaps.mean())).clamp(1 / kappa_max, kappa_max)


def batch_gaps(mono: Tensor, heads: Tensor, targets: Tensor, gauge: str) -> Tensor:
    """d_m over the global batch (all ranks), float64 on CPU: CE(o_m, y) − CE(u_m(h_m), y) for
    ``gauge="loss"``, acc(u_m(h_m), y) − acc(o_m, y) for ``gauge="accuracy"`` (``mono``, ``heads``:
    M×B×C)."""
    if gauge == "loss":
        per_sample = branch_losses([*mono, *heads], targets)
    else:
        per_sample = (torch.cat([heads, mono]).argmax(-1) == targets).double()
    means = batch_means(per_sample).cpu()
    m = mono.shape[0]
    return means[:m] - means[m:]


def expert_outputs(fused: Tensor, mono: Tensor, heads: Tensor) -> Prediction:
    """The product of the fused model and the uni-modal experts: logits f(all) + Σ_m log_softmax(u_m)
    and each modality's part o_m + log_softmax(u_m) (``mono``: M×B×C Shapley outputs; ``heads``:
    M×B×C head logits)."""
    experts = F.log_softmax(at_least_float32(heads), dim=-1)
    return Prediction(at_least_float32(fused) + experts.sum(0), at_least_float32(mono) + experts)


def _check_number(value: object, what: str, low: float, high: float = math.inf, low_open: bool = False,
                  high_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {what}: {value!r} (must be a number in {bounds})")
    return float(value)


# -- the method --------------------------------------------------------------------------------
@METHODS.register("ugm")
class UGM(Method):
    """Under-use gap modulation: the fused-loss gradient reaching each encoder scaled by how much
    worse its modality does inside the fused model than on a head of its own.

    Args:
        alpha (float): modulation strength α (>= 0; 0 is joint training plus the heads). Default: 1.
        beta (float): weight β of the heads' cross-entropies (>= 0). Default: 1.
        momentum (float): μ of the gaps' exponential average, in [0, 1). Default: 0.9.
        kappa_max (float): bound of κ, which stays in [1/κ_max, κ_max] (>= 1). Default: 4.
        heads (str): ``"probe"`` (the heads see detached features: they only measure) or
            ``"assist"`` (their loss also trains the encoders). Default: probe.
        predict (str): ``"fused"`` (evaluation scores the model's output) or ``"with_experts"``
            (fused logits + Σ_m log_softmax(u_m(h_m)), the product with the uni-modal experts).
            Default: fused.
        until_epoch (int, optional): modulate during epochs [0, until_epoch) only; later κ = 1
            (the gaps keep being measured, the heads keep training). Default: None (always).
        gauge (str): ``"loss"`` (d_m = CE(o_m, y) − CE(u_m(h_m), y)) or ``"accuracy"``
            (d_m = acc(u_m(h_m), y) − acc(o_m, y), free of the outputs' calibration). Default: loss.
        target (str): ``"fused_gradient"`` (κ_m scales the fused-loss gradient through o_m) or
            ``"head_loss"`` (κ_m weights modality m's head loss, the fused gradient is joint
            training's; needs ``heads="assist"``). Default: fused_gradient.

    Call ``method.attach(model)`` before building the optimizer (the runner does): the heads become
    ``model.method_modules[<modality>]``. Statistics: ``gap/<m>`` (D_m after the step) and
    ``coef/<m>`` (κ_m).
    """

    name = "ugm"
    acts_on_encoders = True
    coefficient = Coefficient("κ_m, the scale of the fused-loss gradient through modality m's mono-modal output o_m "
                              "(target=fused_gradient) or the weight of its head's loss (target=head_loss)")

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, momentum: float = 0.9, kappa_max: float = 4.0,
                 heads: str = "probe", predict: str = "fused", until_epoch: int | None = None, gauge: str = "loss",
                 target: str = "fused_gradient") -> None:
        self.alpha = _check_number(alpha, "alpha", 0.0, high_open=True)
        self.beta = _check_number(beta, "beta", 0.0, high_open=True)
        self.momentum = _check_number(momentum, "momentum", 0.0, 1.0, high_open=True)
        self.kappa_max = _check_number(kappa_max, "kappa_max", 1.0)
        if heads not in HEADS:
            raise ValueError(f"Invalid heads {heads!r}; allowed values: {', '.join(HEADS)}")
        if predict not in PREDICTIONS:
            raise ValueError(f"Invalid predict {predict!r}; allowed values: {', '.join(PREDICTIONS)}")
        if until_epoch is not None and (isinstance(until_epoch, bool) or not isinstance(until_epoch, int)
                                        or until_epoch < 1):
            raise ValueError(f"Invalid until_epoch: {until_epoch!r} (must be an integer >= 1, or None: always)")
        if gauge not in GAUGES:
            raise ValueError(f"Invalid gauge {gauge!r}; allowed values: {', '.join(GAUGES)}")
        if target not in TARGETS:
            raise ValueError(f"Invalid target {target!r}; allowed values: {', '.join(TARGETS)}")
        if target == "head_loss" and heads != "assist":
            raise ValueError(f"target='head_loss' needs heads='assist' (got heads={heads!r}): probe heads' "
                             f"losses do not reach the encoders")
        self.heads, self.prediction, self.until_epoch = heads, predict, until_epoch
        self.gauge, self.target = gauge, target
        self.predicts = predict == "with_experts"
        self._modalities: tuple[str, ...] | None = None
        self._gaps: Tensor | None = None  # float64, CPU: D_m
        self._count = 0
        self._epoch = 0
        self._stats: dict[str, float] = {}

    def build_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return modality_heads(model, self.name)

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch

    def _forward(self, model: nn.Module, inputs: Mapping[str, Tensor], detach: bool) -> tuple[Any, list[Tensor]]:
        """The model's Shapley output and each head's logits, from one forward (DDP sees the heads)."""
        heads = method_modules(model, self.name)
        names = unwrap(model).modalities
        return protocol_forward(model, inputs, shapley="features",
                                aux=lambda f: [heads[m](f[m].detach() if detach else f[m]) for m in names])

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        out, heads = self._forward(model, inputs, detach=self.heads == "probe")
        self._modalities = bind_modalities(self._modalities, out.modalities, self.name)
        mono, heads = at_least_float32(out.mono), at_least_float32(torch.stack(heads))
        kappa = self._decide(batch_gaps(mono.detach(), heads.detach(), targets, self.gauge))
        kappa = kappa.to(device=mono.device, dtype=mono.dtype)
        head_losses = branch_losses(heads, targets).mean(-1)
        if self.target == "head_loss":
            return F.cross_entropy(at_least_float32(out.logits), targets) + self.beta * (kappa * head_losses).sum()
        return F.cross_entropy(scale_gradient(mono, kappa).sum(0), targets) + self.beta * head_losses.sum()

    def _decide(self, batch_gaps: Tensor) -> Tensor:
        names = self._modalities
        if not torch.isfinite(batch_gaps).all():
            bad = [n for n, d in zip(names, batch_gaps.tolist()) if not math.isfinite(d)]
            raise FloatingPointError(f"{self.name}: non-finite under-use gap for {bad} at step {self._count} "
                                     f"(a diverging mono-modal output or head; lower the learning rate)")
        gaps = torch.zeros_like(batch_gaps) if self._gaps is None else self._gaps
        self._gaps = update_gaps(gaps, batch_gaps, self.momentum)
        self._count += 1
        active = self.until_epoch is None or self._epoch < self.until_epoch
        kappa = gap_coefficients(self._gaps, self.alpha, self.kappa_max) if active else torch.ones_like(self._gaps)
        self._stats = {f"gap/{n}": float(d) for n, d in zip(names, self._gaps)}
        self._stats.update(coefficient_statistics({n: float(k) for n, k in zip(names, kappa)}))
        return kappa

    def predict(self, model: nn.Module, inputs: Mapping[str, Tensor]) -> Prediction:
        out, heads = self._forward(model, inputs, detach=False)
        return expert_outputs(out.logits, out.mono, torch.stack(heads))

    # -- bookkeeping ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        return {"modalities": list(self._modalities) if self._modalities else None,
                "gaps": None if self._gaps is None else self._gaps.clone(), "count": self._count,
                "epoch": self._epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "gaps", "count", "epoch"}
        if set(state) != expected:
            raise ValueError(f"{self.name} state must have keys {sorted(expected)}, got {sorted(state)}")
        modalities = tuple(state["modalities"]) if state["modalities"] else None
        gaps = state["gaps"]
        if gaps is not None and (modalities is None or not isinstance(gaps, Tensor)
                                 or tuple(gaps.shape) != (len(modalities),)):
            raise ValueError(f"{self.name} state: gaps of shape {tuple(getattr(gaps, 'shape', ()))} do not match "
                             f"modalities {modalities}")
        self._modalities = modalities
        self._gaps = None if gaps is None else gaps.detach().double().cpu().clone()
        self._count, self._epoch = int(state["count"]), int(state["epoch"])
