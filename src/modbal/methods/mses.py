"""Modality-Specific Early Stopping (MSES): stop training each encoder at its own best epoch.

After validation of epoch t, modality m's smoothed loss is

    L̃_m(0) = ℓ_m(0),    L̃_m(t) = 0.6·L̃_m(t−1) + 0.4·ℓ_m(t)

with ℓ_m(t) the validation mono-modal loss ``mono_loss/<m>``. Whenever L̃_m reaches a new minimum
(by more than ``min_delta``) a copy of encoder m's weights and buffers is kept. When L̃_m has not
improved for ``patience`` epochs, encoder m is *stopped*: its best weights are restored and it is
frozen — ``requires_grad = False``, its parameters removed from the optimizer's groups and their
optimizer state (momentum, Adam moments) deleted, so neither momentum nor weight decay can move it
again, and it runs in eval mode (BatchNorm statistics and dropout fixed). The fusion and the other
encoders keep training until every modality has stopped (:attr:`MSES.should_stop`) or the epochs
run out. The loss is plain joint cross-entropy.

Resuming: :meth:`MSES.state_dict` holds the best weights, the stopped set and the smoothing state.
After ``load_state_dict`` on a fresh model and optimizer, :meth:`MSES.setup` (the runner calls it
before ``optimizer.load_state_dict``) freezes the stopped encoders again; :meth:`MSES.param_groups`
already leaves them out when the state is loaded first. As a safety net, every ``loss`` call
re-applies ``requires_grad = False`` to stopped encoders and ``after_backward`` drops any gradient
they have, so they stay still even if ``setup`` was never called (torch optimizers skip
parameters without a gradient).
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import unwrap
from ..model import eval_mode
from ..registry import METHODS
from .base import Method, at_least_float32, per_modality_param_groups


# -- the formulas, as pure functions ---------------------------------------------------------
def smooth_loss(previous: float | None, current: float, keep: float = 0.6) -> float:
    """L̃(t) = keep·L̃(t−1) + (1 − keep)·ℓ(t); the first value is ℓ(0)."""
    return current if previous is None else keep * previous + (1 - keep) * current


def freeze_parameters(params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None) -> None:
    """``requires_grad = False``, gradient dropped, and (with an optimizer) removed from every param
    group with its optimizer state deleted. Idempotent."""
    ids = {id(p) for p in params}
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        for p in params:
            optimizer.state.pop(p, None)


@METHODS.register("mses")
class MSES(Method):
    """Modality-specific early stopping.

    Args:
        patience (int): epochs without improvement of the smoothed loss before a modality stops
            (paper code: AV-MNIST 10, CREMA-D 80, UR-Funny 30). Default: 10.
        smoothing (float): weight of the previous smoothed value (0.6 in the paper code).
        min_delta (float): an improvement must lower the best smoothed loss by more than this.
        restore_best (bool): load the encoder's best weights when it stops. Default: True.
    """

    name = "mses"
    freezes_parameters = True

    def __init__(self, patience: int = 10, smoothing: float = 0.6, min_delta: float = 0.0,
                 restore_best: bool = True) -> None:
        if not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"Invalid patience: {patience} (must be an int >= 1)")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"Invalid smoothing: {smoothing} (must be in [0, 1))")
        if not (min_delta >= 0 and math.isfinite(min_delta)):
            raise ValueError(f"Invalid min_delta: {min_delta} (must be >= 0)")
        self.patience, self.smoothing, self.min_delta = patience, float(smoothing), float(min_delta)
        self.restore_best = bool(restore_best)
        self._modalities: tuple[str, ...] | None = None
        self._smoothed: dict[str, float] = {}
        self._best: dict[str, float] = {}
        self._best_epoch: dict[str, int] = {}
        self._best_state: dict[str, dict[str, Tensor]] = {}
        self._stale: dict[str, int] = {}
        self._stopped: dict[str, int] = {}  # modality -> epoch at which it stopped

    # -- queries --------------------------------------------------------------------------------
    @property
    def stopped(self) -> frozenset[str]:
        return frozenset(self._stopped)

    @property
    def should_stop(self) -> bool:
        """True once every modality has stopped (the runner may end training)."""
        return self._modalities is not None and set(self._stopped) >= set(self._modalities)

    def _bind(self, model: nn.Module) -> nn.Module:
        inner = unwrap(model)
        names = tuple(inner.modalities)
        if self._modalities is None:
            self._modalities = names
        elif self._modalities != names:
            raise ValueError(f"MSES was used with modalities {list(self._modalities)}, now got {list(names)}")
        return inner

    # -- optimizer ------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """One group per encoder (key ``"modality"``; empty once stopped) and one for the rest."""
        self._bind(model)
        return per_modality_param_groups(model, "MSES", exclude=self._stopped)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        inner = self._bind(model)
        for m in self._stopped:
            freeze_parameters(list(inner.encoders[m].parameters()), optimizer)

    # -- loop hooks -----------------------------------------------------------------------------
    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        inner = self._bind(model)
        with ExitStack() as stack:
            for m in self._stopped:
                freeze_parameters(list(inner.encoders[m].parameters()), None)
                stack.enter_context(eval_mode(inner.encoders[m]))
            logits = model(inputs)
        return F.cross_entropy(at_least_float32(logits), targets)

    def after_backward(self, model: nn.Module) -> None:
        inner = unwrap(model)
        for m in self._stopped:
            for p in inner.encoders[m].parameters():
                p.grad = None

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float], model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
        inner = self._bind(model)
        active = [m for m in inner.modalities if m not in self._stopped]
        missing = [f"mono_loss/{m}" for m in active if f"mono_loss/{m}" not in metrics]
        if missing:
            raise KeyError(f"MSES needs the validation metrics {missing}; got {sorted(metrics)}")
        for m in active:
            value = float(metrics[f"mono_loss/{m}"])
            smoothed = smooth_loss(self._smoothed.get(m), value, self.smoothing)
            self._smoothed[m] = smoothed
            if m not in self._best or smoothed < self._best[m] - self.min_delta:
                self._best[m], self._best_epoch[m], self._stale[m] = smoothed, epoch, 0
                self._best_state[m] = {k: v.detach().to("cpu", copy=True)
                                       for k, v in inner.encoders[m].state_dict().items()}
            else:
                self._stale[m] += 1
            if self._stale[m] >= self.patience:
                self._stop(m, epoch, inner, optimizer)

    def _stop(self, m: str, epoch: int, inner: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        encoder = inner.encoders[m]
        if self.restore_best:
            with torch.no_grad():
                encoder.load_state_dict(self._best_state[m])
        freeze_parameters(list(encoder.parameters()), optimizer)
        self._stopped[m] = epoch

    # -- bookkeeping ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        for m in self._modalities or ():
            stats[f"stopped/{m}"] = float(m in self._stopped)
            if m in self._smoothed:
                stats[f"smoothed_loss/{m}"] = self._smoothed[m]
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "modalities": list(self._modalities) if self._modalities else None,
            "smoothed": dict(self._smoothed), "best": dict(self._best),
            "best_epoch": dict(self._best_epoch), "stale": dict(self._stale),
            "stopped": dict(self._stopped),
            "best_state": {m: {k: v.clone() for k, v in s.items()} for m, s in self._best_state.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "smoothed", "best", "best_epoch", "stale", "stopped", "best_state"}
        if set(state) != expected:
            raise ValueError(f"MSES state must have keys {sorted(expected)}, got {sorted(state)}")
        self._modalities = tuple(state["modalities"]) if state["modalities"] else None
        self._smoothed = {m: float(v) for m, v in state["smoothed"].items()}
        self._best = {m: float(v) for m, v in state["best"].items()}
        self._best_epoch = {m: int(v) for m, v in state["best_epoch"].items()}
        self._stale = {m: int(v) for m, v in state["stale"].items()}
        self._stopped = {m: int(v) for m, v in state["stopped"].items()}
        self._best_state = {m: {k: v.detach().cpu().clone() for k, v in s.items()}
                            for m, s in state["best_state"].items()}
