"""InfoReg (Huang, Wei, Yang, Hu, CVPR 2025, "Adaptive Unimodal Regulation for Balanced Multimodal
Information Acquisition").

Per step, as the authors' code (InfoReg_CVPR2025, ``train_epoch``): the loss is
CE(f(h), y) + Σ_m CE(o_m, y) with o_m each modality's own output; s_m = Σ_i softmax(o_m,i)[y_i] over
the (global) batch. While the prime learning window is open, the modality ahead of the others
(gap_m = s_m − mean_{k≠m} s_k > 0; M = 2: s_a − s_v) has its encoder pulled back toward its
weights at the start of the epoch: g ← g + β_m·(θ − θ̄), β_m = c_m·exp(tanh(gap_m)). Then the
squared gradients of each encoder's Linear/Conv weights accumulate into a Fisher-information trace
(Σ over layers of the mean of the epoch's sums). The window is open in epoch e when
k = (tr₁ − tr₂)/tr₁ > threshold, with tr₁ the mean of the last ``history`` epoch traces and tr₂ the
mean of the ``history`` before the last (the history starts as ``history`` zeros; k = 1 in epoch 0).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt import shapley_forward
from ..distributed import unwrap
from ..registry import METHODS
from .base import Coefficient, Method, at_least_float32, bind_modalities, coefficient_statistics, encoder_parameters
from .heads import check_scores, scores_heads
from .opm import scores_from_outputs

FISHER_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_BETA = 0.95  # the original's constant for the leading modality it expects (audio)


# -- the formulas, as pure functions ---------------------------------------------------------
def window_indicator(traces: Sequence[float], history: int) -> float:
    """k = (tr₁ − tr₂)/tr₁ over the epoch traces so far (padded in front with ``history`` zeros);
    1 before the first trace, 0 when tr₁ is 0 (nothing learnt: the original divides by zero)."""
    if not traces:
        return 1.0
    padded = [0.0] * history + list(traces)
    tr1 = sum(padded[-history:]) / history
    tr2 = sum(padded[-history - 1:-1]) / history
    return (tr1 - tr2) / tr1 if tr1 != 0 else 0.0


def proximal_strengths(scores: Tensor, base: Tensor) -> Tensor:
    """β_m = c_m·exp(tanh(gap_m)) where gap_m = s_m − mean_{k≠m} s_k > 0, else 0."""
    m = scores.shape[0]
    gap = scores - (scores.sum() - scores) / (m - 1)
    return torch.where(gap > 0, base * torch.exp(torch.tanh(gap)), torch.zeros_like(gap))


def fisher_trace(accumulated: Sequence[Tensor]) -> float:
    """Σ over layers of the mean of the accumulated squared gradients."""
    return float(sum(float(a.double().mean()) for a in accumulated))


# -- the method --------------------------------------------------------------------------------
@METHODS.register("inforeg")
class InfoReg(Method):
    """InfoReg on any :class:`~modbal.MultimodalModel` whose encoders have parameters.

    Args:
        beta (float or sequence, optional): the base c_m of the proximal strength, one for all
            modalities or one per modality in model order. The original hard-codes 0.95 for audio
            and 0.1 for visual (CREMA-D: audio first), i.e. ``beta=[0.95, 0.1]``. Default (None):
            0.95 for every modality.
        threshold (float): the window is open while k > threshold. Default: 0.05 (the code).
        history (int): epochs averaged in tr₁ and tr₂. Default: 10 (the code).
        trace (str): whose Fisher trace drives the window: ``"first"`` (the first modality's
            encoder, as the original uses audio's), ``"all"`` (the sum over encoders) or a modality
            name. Default: ``"first"``.
        scores (str): the outputs o_m trained by the uni-modal losses and scored: ``"auto"`` (the
            fusion's own heads where it has them, ``concat``: W_m·h_m + b/M as the original;
            Shapley mono-modal outputs otherwise), ``"heads"`` or ``"shapley"``. Default: auto.

    In a loop of your own, call ``method.on_epoch_start(epoch)`` before each epoch: it records the
    finished epoch's trace and opens the next.

    The proximal term is a gradient; under Adam it is normalised like the rest of the gradient, so
    β acts relative to the loss gradient's running scale rather than as an absolute pull.
    """

    name = "inforeg"
    acts_on_encoders = True
    coefficient = Coefficient("β_m, the strength of the pull of modality m's encoder toward its weights at the "
                              "epoch's start, added to its gradient (also logged as beta/<m>)", neutral=0.0)

    def __init__(self, beta: float | Sequence[float] | None = None, threshold: float = 0.05, history: int = 10,
                 trace: str = "first", scores: str = "auto") -> None:
        beta = DEFAULT_BETA if beta is None else beta
        values = [beta] if isinstance(beta, (int, float)) else list(beta)
        if not values or not all(isinstance(b, (int, float)) and b >= 0 and math.isfinite(b) for b in values):
            raise ValueError(f"Invalid beta: {beta!r} (a number >= 0 or one per modality)")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"Invalid threshold: {threshold!r} (must be a finite number)")
        if not (isinstance(history, int) and history >= 1):
            raise ValueError(f"Invalid history: {history!r} (must be an int >= 1)")
        check_scores(scores)
        self.beta, self.threshold, self.history = beta, float(threshold), history
        self.trace, self.scores = trace, scores
        self._modalities: tuple[str, ...] | None = None
        self._epoch = 0
        self._k = 1.0
        self._traces: list[float] = []  # the window's trace, one per finished epoch
        self._anchor: dict[str, list[Tensor]] | None = None  # encoder weights at the epoch's start
        self._fisher: dict[str, list[Tensor]] | None = None  # Σ grad² of each Linear/Conv weight
        self._betas: Tensor | None = None  # of the last loss() call
        self._stats: dict[str, float] = {}

    # -- loop hooks -----------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Close the previous epoch (record its Fisher trace), open this one: k from the traces, a
        new anchor at the first step."""
        if self._fisher is not None and self._modalities is not None:
            names = self._modalities
            watched = names if self.trace == "all" else [names[0] if self.trace == "first" else self.trace]
            self._traces.append(sum(fisher_trace(self._fisher[m]) for m in watched))
        self._epoch = epoch
        self._k = window_indicator(self._traces, self.history)
        self._anchor = self._fisher = None

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        inner = unwrap(model)
        names = self._bind(inner.modalities)
        params = encoder_parameters(model, "InfoReg")
        if self._anchor is None:  # first step of the epoch: the weights θ̄ to pull back to
            self._anchor = {m: [p.detach().clone() for p in params[m]] for m in names}
        self._anchor = {m: [a.to(p) for a, p in zip(self._anchor[m], params[m])] for m in names}  # a loaded state
        if self._fisher is not None:
            layers = {m: fisher_weights(inner.encoders[m]) for m in names}
            self._fisher = {m: [a.to(w) for a, w in zip(self._fisher[m], layers[m])] for m in names}
        if scores_heads(self.scores, model, "InfoReg"):
            logits, heads = model(inputs, aux=inner.fusion.mono_logits)
            mono = torch.stack([heads[m] for m in names])
        else:
            out = shapley_forward(model, inputs, "features")
            logits, mono = out.logits, out.mono
        scores = scores_from_outputs(mono.detach(), targets)
        active = self._k > self.threshold
        self._betas = proximal_strengths(scores, self._base(len(names))) if active else None
        self._stats = {"window_k": self._k, "window_open": float(active)}
        if self._traces:
            self._stats["window_trace"] = self._traces[-1]  # the last finished epoch's
        for i, m in enumerate(names):
            self._stats.update({f"score/{m}": float(scores[i]),
                                f"beta/{m}": float(self._betas[i]) if active else 0.0})
        self._stats.update(coefficient_statistics({m: self._stats[f"beta/{m}"] for m in names}))
        losses = [F.cross_entropy(at_least_float32(logits), targets)]
        losses += [F.cross_entropy(at_least_float32(o), targets) for o in mono]
        return torch.stack(losses).sum()

    def after_backward(self, model: nn.Module) -> None:
        inner = unwrap(model)
        names = self._bind(inner.modalities)
        params = encoder_parameters(model, "InfoReg")
        with torch.no_grad():
            if self._betas is not None and self._anchor is not None:
                for i, m in enumerate(names):
                    beta = float(self._betas[i])
                    if beta == 0:
                        continue
                    for p, anchor in zip(params[m], self._anchor[m]):
                        pull = beta * (p - anchor)
                        p.grad = pull if p.grad is None else p.grad.add_(pull)
            layers = {m: fisher_weights(inner.encoders[m]) for m in names}
            if self._fisher is None:
                self._fisher = {m: [torch.zeros_like(w) for w in layers[m]] for m in names}
            for m in names:
                for acc, w in zip(self._fisher[m], layers[m]):
                    if w.grad is not None:
                        acc.add_(w.grad * w.grad)
        self._betas = None

    # -- helpers --------------------------------------------------------------------------------
    def _bind(self, modalities: tuple[str, ...]) -> tuple[str, ...]:
        first = self._modalities is None
        self._modalities = bind_modalities(self._modalities, modalities, "InfoReg")
        if first:
            if self.trace not in ("first", "all") and self.trace not in modalities:
                raise ValueError(f"InfoReg trace={self.trace!r} names no modality of the model "
                                 f"{list(modalities)}; allowed: first, all or one of them")
            self._base(len(modalities))
        return self._modalities

    def _base(self, m_total: int) -> Tensor:
        if isinstance(self.beta, (int, float)):
            return torch.full((m_total,), float(self.beta), dtype=torch.float64)
        if len(self.beta) != m_total:
            raise ValueError(f"InfoReg beta has {len(self.beta)} values, the model has {m_total} modalities")
        return torch.tensor([float(b) for b in self.beta], dtype=torch.float64)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        encoder_parameters(model, "InfoReg")
        self._bind(unwrap(model).modalities)

    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        return {"modalities": list(self._modalities) if self._modalities else None, "epoch": self._epoch,
                "k": self._k, "traces": list(self._traces),
                "anchor": _copy(self._anchor), "fisher": _copy(self._fisher)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "epoch", "k", "traces", "anchor", "fisher"}
        if set(state) != expected:
            raise ValueError(f"InfoReg state must have keys {sorted(expected)}, got {sorted(state)}")
        self._modalities = tuple(state["modalities"]) if state["modalities"] else None
        self._epoch, self._k = int(state["epoch"]), float(state["k"])
        self._traces = [float(t) for t in state["traces"]]
        self._anchor = None if state["anchor"] is None else {m: list(v) for m, v in state["anchor"].items()}
        self._fisher = None if state["fisher"] is None else {m: list(v) for m, v in state["fisher"].items()}
        self._betas = None


def _copy(tensors: dict[str, list[Tensor]] | None) -> dict[str, list[Tensor]] | None:
    return None if tensors is None else {m: [t.clone() for t in v] for m, v in tensors.items()}


def fisher_weights(encoder: nn.Module) -> list[nn.Parameter]:
    """The weights of an encoder's Linear and Conv layers that train (the Fisher trace's layers)."""
    return [mod.weight for mod in encoder.modules() if isinstance(mod, FISHER_LAYERS) and mod.weight.requires_grad]
