"""Modality-Specific Early Stopping (MSES): stop each modality at its own best epoch, as the AGM
authors' code runs it.

After validation of epoch t, with ℓ_m(t) the validation loss of modality m's own output (its head
where the fusion has per-modality heads, its Shapley mono-modal output otherwise), the smoothed
loss is the 2-tap mean of the two latest *raw* losses

    L̃_m(0) = ℓ_m(0),    L̃_m(t) = 0.6·ℓ_m(t−1) + 0.4·ℓ_m(t).

Its minimum's epoch b_m is the modality's best epoch (a later epoch must lower the minimum by more
than ``min_delta``). Modality m stops after epoch t when t − b_m > ``patience``. By default, as in
the original:

- ``restore="model"``: the whole model (every encoder, the fusion, buffers) and the optimizer's
  per-parameter state (momentum, Adam moments) go back to where they were after epoch b_m. The
  learning rates stay as the schedule has them now. A restore sets
  :attr:`~modbal.methods.base.Method.changed_weights`, so the loop validates the restored weights
  and its best-epoch tracking and logs describe the weights the epoch ends with;
- ``freeze="zero_grad"``: from then on the gradients of m's encoder and of its own head (where the
  fusion has per-modality heads) are multiplied by 0 after every backward. Momentum and weight
  decay still move those weights, and BatchNorm statistics still update, as in the original.

Options: ``restore="encoder"`` restores only encoder m's weights and buffers (the other encoders
and the fusion keep what they learned since b_m); ``restore="none"`` restores nothing.
``freeze="remove"`` really freezes encoder m: ``requires_grad = False``, its parameters removed
from the optimizer's groups with their state, and eval mode, so nothing moves it again (its head
inside a shared fusion tensor keeps training). The fusion and the other modalities train on;
:attr:`MSES.should_stop` turns True when every modality has stopped. The loss is plain joint
cross-entropy.

Resuming: :meth:`MSES.state_dict` holds the loss history, best epochs, stopped set and the
snapshots still needed (CPU copies). After ``load_state_dict`` on a fresh model and optimizer,
:meth:`MSES.setup` (the runner calls it before ``optimizer.load_state_dict``) re-freezes the
stopped encoders with ``freeze="remove"``.
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
from .base import (
    Coefficient,
    Method,
    at_least_float32,
    coefficient_statistics,
    per_modality_param_groups,
    require_encoder_parameters,
)
from .heads import check_scores, metric_name, modality_gradient_slices, scale_gradients

RESTORES = ("model", "encoder", "none")
FREEZES = ("zero_grad", "remove")


# -- the formulas, as pure functions ---------------------------------------------------------
def smooth_loss(previous: float | None, current: float, weight: float = 0.6) -> float:
    """L̃(t) = weight·ℓ(t−1) + (1 − weight)·ℓ(t) from the two latest raw losses; ℓ(0) at first."""
    return current if previous is None else weight * previous + (1 - weight) * current


def should_stop_modality(epoch: int, best_epoch: int, patience: int) -> bool:
    """The original's rule: stop once more than ``patience`` epochs have passed since the best."""
    return epoch - best_epoch > patience


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


def _cpu_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else value


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """The optimizer's per-parameter state (CPU copies), keyed by parameter name, so it can be put
    back whatever the param groups look like by then."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: _cpu_copy(v) for k, v in state.items()}
            for p, state in optimizer.state.items() if id(p) in names and state}


def load_optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer,
                                 saved: Mapping[str, Mapping[str, Any]]) -> None:
    """Replace the optimizer's per-parameter state by ``saved`` (parameters absent there lose their
    state); group settings (learning rates, ...) stay as they are. Goes through
    ``optimizer.load_state_dict`` so tensors land on the parameters' devices and dtypes."""
    names = {id(p): n for n, p in model.named_parameters()}
    current = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {k: _cpu_copy(v) for k, v in saved[names[id(p)]].items()}
             for i, p in enumerate(params) if names.get(id(p)) in saved}
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


@METHODS.register("mses")
class MSES(Method):
    """Modality-specific early stopping.

    Args:
        patience (int): a modality stops when more than ``patience`` epochs have passed since its
            best smoothed loss (paper code: AV-MNIST 10, CREMA-D 80, UR-Funny 30). Default: 10.
        smoothing (float): weight of the previous epoch's raw loss in the 2-tap mean (0.6 in the
            paper code); 0 disables smoothing.
        min_delta (float): an improvement must lower the best smoothed loss by more than this.
        restore (str): on stop, ``"model"`` (whole model and optimizer state of the best epoch, the
            original), ``"encoder"`` (the stopping encoder's weights only) or ``"none"``.
        freeze (str): a stopped modality's ``"zero_grad"`` (gradients of its encoder and own head
            times 0, the original) or ``"remove"`` (encoder out of the optimizer, eval mode).
        scores (str): loss of the modality's own head (``"heads"``), of its Shapley mono-modal
            output (``"shapley"``), or ``"auto"`` (heads where the fusion has them). Default: auto.
    """

    name = "mses"
    acts_on_encoders = True
    coefficient = Coefficient("1 while modality m trains, 0 once it has stopped (its encoder's gradient zeroed, or "
                              "the encoder out of the optimizer with freeze='remove')")

    def __init__(self, patience: int = 10, smoothing: float = 0.6, min_delta: float = 0.0,
                 restore: str = "model", freeze: str = "zero_grad", scores: str = "auto") -> None:
        if not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"Invalid patience: {patience} (must be an int >= 1)")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"Invalid smoothing: {smoothing} (must be in [0, 1))")
        if not (min_delta >= 0 and math.isfinite(min_delta)):
            raise ValueError(f"Invalid min_delta: {min_delta} (must be >= 0)")
        if restore not in RESTORES:
            raise ValueError(f"Invalid restore {restore!r}; allowed values: {', '.join(RESTORES)}")
        if freeze not in FREEZES:
            raise ValueError(f"Invalid freeze {freeze!r}; allowed values: {', '.join(FREEZES)}")
        check_scores(scores)
        self.patience, self.smoothing, self.min_delta = patience, float(smoothing), float(min_delta)
        self.restore, self.freeze, self.scores = restore, freeze, scores
        #: DDP must allow unused parameters when stopped encoders leave the graph
        self.freezes_parameters = freeze == "remove"
        self._modalities: tuple[str, ...] | None = None
        self._previous: dict[str, float] = {}  # ℓ_m of the last epoch (raw)
        self._smoothed: dict[str, float] = {}
        self._best: dict[str, float] = {}
        self._best_epoch: dict[str, int] = {}
        self._stopped: dict[str, int] = {}  # modality -> epoch after which it stopped
        self._snapshots: dict[int, dict[str, Any]] = {}  # epoch -> what restore needs

    # -- queries --------------------------------------------------------------------------------
    @property
    def stopped(self) -> frozenset[str]:
        return frozenset(self._stopped)

    @property
    def should_stop(self) -> bool:
        """True once every modality has stopped (the runner may end training)."""
        return self._modalities is not None and set(self._stopped) >= set(self._modalities)

    def best_epochs(self) -> dict[str, int]:
        return dict(self._best_epoch)

    def _bind(self, model: nn.Module) -> nn.Module:
        inner = unwrap(model)
        names = tuple(inner.modalities)
        if self._modalities is None:
            self._modalities = names
        elif self._modalities != names:
            raise ValueError(f"MSES was used with modalities {list(self._modalities)}, now got {list(names)}")
        return inner

    def _removed(self) -> list[str]:
        return list(self._stopped) if self.freeze == "remove" else []

    # -- optimizer ------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """With ``freeze="remove"``: one group per encoder (key ``"modality"``; empty once stopped)
        and one for the rest; otherwise one group."""
        self._bind(model)
        if self.freeze != "remove":
            require_encoder_parameters(model, "MSES")
            return super().param_groups(model)
        return per_modality_param_groups(model, "MSES", exclude=self._stopped)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        inner = self._bind(model)
        require_encoder_parameters(model, "MSES")
        for m in self._removed():
            freeze_parameters(list(inner.encoders[m].parameters()), optimizer)

    # -- loop hooks -----------------------------------------------------------------------------
    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        inner = self._bind(model)
        with ExitStack() as stack:
            for m in self._removed():
                freeze_parameters(list(inner.encoders[m].parameters()), None)
                stack.enter_context(eval_mode(inner.encoders[m]))
            logits = model(inputs)
        return F.cross_entropy(at_least_float32(logits), targets)

    def after_backward(self, model: nn.Module) -> None:
        inner = unwrap(model)
        for m in self._stopped:
            if self.freeze == "remove":
                for p in inner.encoders[m].parameters():
                    p.grad = None
            else:
                scale_gradients(modality_gradient_slices(model, m, head=True), 0.0)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float], model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
        inner = self._bind(model)
        active = [m for m in inner.modalities if m not in self._stopped]
        keys = {m: metric_name("loss", self.scores, model, m, "MSES") for m in active}
        missing = [k for k in keys.values() if k not in metrics]
        if missing:
            raise KeyError(f"MSES needs the validation metrics {missing}; got {sorted(metrics)}")
        improved = []
        for m in active:
            value = float(metrics[keys[m]])
            smoothed = smooth_loss(self._previous.get(m), value, self.smoothing)
            self._previous[m], self._smoothed[m] = value, smoothed
            if m not in self._best or smoothed < self._best[m] - self.min_delta:
                self._best[m], self._best_epoch[m] = smoothed, epoch
                improved.append(m)
        if improved and self.restore != "none":
            self._snapshot(epoch, improved, inner, optimizer)
        for m in active:  # in modality order: when two stop together, the last restore wins, as the original
            if should_stop_modality(epoch, self._best_epoch[m], self.patience):
                self._stop(m, epoch, inner, optimizer)
        self._drop_unused_snapshots()

    def _snapshot(self, epoch: int, improved: list[str], inner: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.restore == "model":
            self._snapshots[epoch] = {"model": {k: _cpu_copy(v) for k, v in inner.state_dict().items()},
                                      "optimizer": optimizer_state_by_name(inner, optimizer)}
        else:
            snap = self._snapshots.setdefault(epoch, {"encoders": {}})
            for m in improved:
                snap["encoders"][m] = {k: _cpu_copy(v) for k, v in inner.encoders[m].state_dict().items()}

    def _stop(self, m: str, epoch: int, inner: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Stop modality ``m``: restore what :attr:`restore` names (flagging the changed weights), freeze."""
        snap = self._snapshots.get(self._best_epoch[m])
        if self.restore == "model":
            with torch.no_grad():
                inner.load_state_dict(snap["model"])
            load_optimizer_state_by_name(inner, optimizer, snap["optimizer"])
        elif self.restore == "encoder":
            with torch.no_grad():
                inner.encoders[m].load_state_dict(snap["encoders"][m])
        self.changed_weights = self.changed_weights or self.restore != "none"
        if self.freeze == "remove":
            freeze_parameters(list(inner.encoders[m].parameters()), optimizer)
        self._stopped[m] = epoch

    def _drop_unused_snapshots(self) -> None:
        needed = {self._best_epoch[m] for m in self._best_epoch if m not in self._stopped}
        for epoch in [e for e in self._snapshots if e not in needed]:
            del self._snapshots[epoch]
        for epoch, snap in self._snapshots.items():
            if "encoders" in snap:
                snap["encoders"] = {m: s for m, s in snap["encoders"].items()
                                    if m not in self._stopped and self._best_epoch[m] == epoch}

    # -- bookkeeping ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        for m in self._modalities or ():
            stats[f"stopped/{m}"] = float(m in self._stopped)
            if m in self._smoothed:
                stats[f"smoothed_loss/{m}"] = self._smoothed[m]
        stats.update(coefficient_statistics({m: float(m not in self._stopped) for m in self._modalities or ()}))
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "modalities": list(self._modalities) if self._modalities else None,
            "previous": dict(self._previous), "smoothed": dict(self._smoothed), "best": dict(self._best),
            "best_epoch": dict(self._best_epoch), "stopped": dict(self._stopped),
            "snapshots": {e: _copy_tree(s) for e, s in self._snapshots.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "previous", "smoothed", "best", "best_epoch", "stopped", "snapshots"}
        if set(state) != expected:
            raise ValueError(f"MSES state must have keys {sorted(expected)}, got {sorted(state)}")
        self._modalities = tuple(state["modalities"]) if state["modalities"] else None
        self._previous = {m: float(v) for m, v in state["previous"].items()}
        self._smoothed = {m: float(v) for m, v in state["smoothed"].items()}
        self._best = {m: float(v) for m, v in state["best"].items()}
        self._best_epoch = {m: int(v) for m, v in state["best_epoch"].items()}
        self._stopped = {m: int(v) for m, v in state["stopped"].items()}
        self._snapshots = {int(e): _copy_tree(s) for e, s in state["snapshots"].items()}


def _copy_tree(value: Any) -> Any:
    """A deep copy of nested dicts of tensors, tensors on the CPU."""
    if isinstance(value, Mapping):
        return {k: _copy_tree(v) for k, v in value.items()}
    return _cpu_copy(value)
