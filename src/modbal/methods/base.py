"""The balancing-method protocol: a small stateful object usable in any training loop.

A method builds the loss from the model's outputs and may act at a few named points of the loop.
Every hook is a documented no-op here, so a method implements only what it needs (like a
Lightning callback), and ``state_dict()``/``load_state_dict()`` carry its running state into
checkpoints (like ``torch.optim``).

Typical use in a plain loop::

    for inputs, targets in loader:
        loss = method.loss(model, inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        method.after_backward(model)
        optimizer.step()
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..distributed import unwrap


class Method:
    """Base class of balancing methods (joint training is the trivial one)."""

    #: registry name, set by subclasses
    name: str = "method"
    #: True once the method wants training to end early (MSES when every modality has stopped)
    should_stop: bool = False
    #: True when the method turns off parameters during training (DDP must then allow unused ones)
    freezes_parameters: bool = False
    #: True when the method rescales its param groups' lr multiplicatively during training, which
    #: only composes with chainable schedules (config validation refuses a cosine floor with it)
    rescales_learning_rates: bool = False

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        """The training loss for one batch; its ``backward()`` leaves the method's gradients."""
        raise NotImplementedError

    def after_backward(self, model: nn.Module) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``: gradient edits go here."""

    def after_step(self, model: nn.Module) -> None:
        """After ``optimizer.step()``."""

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Once the optimizer exists: apply optimizer-side state (MSLR's learning-rate factors,
        MSES's frozen encoders). Idempotent. The runner calls it after building the optimizer from
        :meth:`param_groups` and, when resuming, after ``method.load_state_dict`` and *before*
        ``optimizer.load_state_dict`` (so the optimizer's groups match the saved ones)."""

    def prepare_inputs(self, inputs: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The inputs as this method's model sees them, in training and in evaluation (identity;
        the uni-modal method zeroes the other modalities)."""
        return inputs

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based)."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float], model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
        """After evaluation on the validation split; ``metrics`` holds its results."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups; methods with per-modality learning rates override this."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def statistics(self) -> dict[str, float]:
        """What the last step decided, for logging (e.g. ``kappa/audio``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


def check_finite_gradients(model: nn.Module, method: str) -> None:
    """Raise ``FloatingPointError`` naming the first parameter whose gradient is not finite."""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise FloatingPointError(
                f"{method}: non-finite gradient in parameter {name!r}; the step was stopped before "
                f"the optimizer touched the weights (lower alpha, set a cap or kappa bounds, or clip)"
            )


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is half/bfloat16 (autocast), unchanged otherwise: statistics and
    losses are never computed in reduced precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def require_encoder_parameters(model: nn.Module, method: str) -> None:
    """Raise a clear ``ValueError`` when a modality's encoder has no parameters for ``method`` to act on."""
    inner = unwrap(model)
    empty = [m for m in inner.modalities if next(inner.encoders[m].parameters(), None) is None]
    if empty:
        raise ValueError(
            f"{method} acts on each modality's encoder parameters, but the encoders of {empty} have none "
            f"(raw-input early fusion with identity encoders?), so it cannot balance this model; "
            f"AGM works through the fusion and applies here")


def per_modality_param_groups(model: nn.Module, method: str, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One optimizer group per encoder (key ``"modality"``; empty for modalities in ``exclude``) and
    one group for every other trainable parameter (the fusion)."""
    require_encoder_parameters(model, method)
    inner = unwrap(model)
    excluded = set(exclude)
    groups, seen = [], set()
    for m in inner.modalities:
        seen.update(id(p) for p in inner.encoders[m].parameters())
        params = [] if m in excluded else [p for p in inner.encoders[m].parameters() if p.requires_grad]
        groups.append({"params": params, "modality": m})
    groups.append({"params": [p for p in inner.parameters() if p.requires_grad and id(p) not in seen]})
    return groups


def check_window(start_epoch: int, end_epoch: int | None) -> None:
    """Validate a modulation window [start_epoch, end_epoch) (end None: to the end of training)."""
    if start_epoch < 0 or (end_epoch is not None and end_epoch <= start_epoch):
        raise ValueError(f"Invalid modulation window: start_epoch={start_epoch}, end_epoch={end_epoch}")


def in_window(epoch: int, start_epoch: int, end_epoch: int | None) -> bool:
    """Whether ``epoch`` lies in the modulation window [start_epoch, end_epoch)."""
    return epoch >= start_epoch and (end_epoch is None or epoch < end_epoch)


def bind_modalities(bound: tuple[str, ...] | None, modalities: Iterable[str], method: str) -> tuple[str, ...]:
    """The modality names a stateful method is bound to; an error if a later call brings others."""
    names = tuple(modalities)
    if bound is not None and bound != names:
        raise ValueError(f"{method} was used with modalities {list(bound)}, now got {list(names)}")
    return names
