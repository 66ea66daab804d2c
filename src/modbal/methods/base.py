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

Methods that train modules of their own (per-modality heads) need one more call, before the
optimizer is built: ``method.attach(model)`` (see :meth:`Method.attach`). Methods that compute
something over data between epochs (prototypes, held-out estimates) need
``method.before_epoch(model, EpochData(epoch, train_loader, val_loader))`` before each epoch's
first batch (see :meth:`Method.before_epoch`); the runner does both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_sum, unwrap, world_size

#: attribute of the (unwrapped) model that holds the method's own modules
MODULES_ATTRIBUTE = "method_modules"
#: prefix of the one statistics key for a method's per-modality coefficient: ``coef/<modality>``
COEF_PREFIX = "coef/"


@dataclass(frozen=True)
class Coefficient:
    """What a method logs as ``coef/<m>`` (:attr:`Method.coefficient`): ``meaning``, the factor it
    applies to modality m's gradient, loss term or learning rate, in a line; ``neutral``, the value
    at which it leaves modality m's training as joint training would (None when no value does, e.g.
    loss weights that sum to 1). Reports plot every method's ``coef/<m>`` under this one name."""

    meaning: str
    neutral: float | None = 1.0


def coefficient_statistics(values: Mapping[str, float]) -> dict[str, float]:
    """``{"coef/<m>": value}`` from ``{m: value}``: how every method reports its coefficient."""
    return {f"{COEF_PREFIX}{m}": float(v) for m, v in values.items()}


@dataclass
class EpochData:
    """What :meth:`Method.before_epoch` may read: the epoch (0-based), the loaders the loop trains
    and validates with (under DDP each rank's shard), where the model lives, the autocast mode, the
    training optimizer (read-only: its class and settings) and the loop's cap on batches per epoch.
    Statistics gathered from the loaders must be all-reduced (:func:`modbal.distributed.all_reduce_sum`)
    so that every rank decides the same."""

    epoch: int
    train_loader: Iterable[Any]
    val_loader: Iterable[Any] | None = None
    device: torch.device | str | None = None
    amp: str = "none"
    optimizer: torch.optim.Optimizer | None = None
    max_steps: int | None = None

    def batches(self, loader: Iterable[Any], limit: int | None = None) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """``(inputs, targets)`` of ``loader`` moved to :attr:`device`, at most ``limit`` batches
        (and at most :attr:`max_steps`)."""
        from ..train.data import to_device  # the training package imports this module

        caps = [c for c in (limit, self.max_steps) if c is not None]
        cap = min(caps) if caps else None
        for i, (inputs, targets) in enumerate(loader):
            if cap is not None and i >= cap:
                break
            if self.device is None:
                yield inputs, targets
            else:
                yield to_device(inputs, torch.device(self.device)), to_device(targets, torch.device(self.device))


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
    #: True when the method acts on encoder parameters (its own losses or gradient edits reach the
    #: model only through the encoders), so it refuses models whose encoders have none
    acts_on_encoders: bool = False
    #: set True by :meth:`on_epoch_end` when it changed the weights after validation (MSES's
    #: restores); the loop then validates again, scores the epoch with those results and clears it
    changed_weights: bool = False
    #: the per-modality coefficient :meth:`statistics` reports as ``coef/<m>`` every step (None: the
    #: method has none, and logs no ``coef/`` key)
    coefficient: Coefficient | None = None

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

    def build_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules this method trains beside the model (per-modality heads, a shared head,
        learnable weights), freshly built from the unwrapped ``model`` (its ``modalities``,
        ``fusion.feature_shapes``, ``fusion.num_classes``); ``{}`` for methods without any."""
        return {}

    def attach(self, model: nn.Module) -> None:
        """Register :meth:`build_modules` on the model as ``model.method_modules`` (an
        ``nn.ModuleDict``), so ``.to(device)``, DistributedDataParallel, ``model.parameters()``,
        :meth:`param_groups`, the model's ``state_dict`` (checkpoints, exact resume, evaluation)
        all include them. Call it once before the optimizer is built (and before wrapping in DDP);
        idempotent; a no-op for methods without modules. Read them back with
        :func:`method_modules`."""
        attach_modules(model, self.build_modules(unwrap(model)), self.name)

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based)."""

    def before_epoch(self, model: nn.Module, data: EpochData) -> None:
        """Before the first batch of ``data.epoch``, after :meth:`on_epoch_start` (not again when a
        run resumes in the middle of that epoch: what it computes belongs in :meth:`state_dict`).
        Passes over training or validation data go here (PMR's prototypes, G-Blending's
        estimates). The model is in whatever mode the loop left it; a pass that needs eval mode
        sets it and restores it. Default: nothing."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float], model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
        """After evaluation on the validation split; ``metrics`` holds its results. A method that
        changes the weights here sets :attr:`changed_weights`, so the epoch is scored on the new ones."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups; methods with per-modality learning rates override this."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def statistics(self) -> dict[str, float]:
        """What the last step decided, for logging (e.g. ``kappa/audio``); a method with a
        :attr:`coefficient` includes it as ``coef/<m>`` (:func:`coefficient_statistics`)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    # -- training schemes: a method-owned step, the evaluation output, the run it trains in ---------
    #: True when the method replaces the loss → backward → step sequence with :meth:`train_step`
    owns_step: bool = False
    #: True when evaluation uses the method's combination of outputs (:meth:`predict`), not the fusion's
    predicts: bool = False
    #: False when the method updates no weights (UME's ensemble of prior runs): ``modbal bench`` then
    #: tries no learning rates for it and runs it for one epoch
    trains: bool = True

    def configure(self, config: Mapping[str, Any], input_shapes: Mapping[str, Sequence[int]]) -> None:
        """The run this method trains in (the runner calls it before :meth:`build_modules`): its
        resolved config and its dataset's input shapes. Methods that read prior runs (UMT's
        teachers) check and load them here. Default: nothing."""

    def substeps(self, model: nn.Module) -> int:
        """How many times :meth:`train_step` runs on each batch (MLA: one per modality)."""
        return 1

    def train_step(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor, step: StepContext,
                   substep: int) -> Tensor:
        """For methods with :attr:`owns_step`: sub-step ``substep`` (0-based, < :meth:`substeps`) of
        one batch, doing its own forward, ``step.backward(loss)`` and ``step.step()`` (zero or more
        optimizer updates); returns the sub-step's loss (detached or not) for logging. The loop may
        checkpoint between sub-steps, so everything a later sub-step needs is recomputed or kept in
        :meth:`state_dict`."""
        raise NotImplementedError(f"{type(self).__name__} sets owns_step but defines no train_step")

    #: True when the method re-samples the training set between epochs (:meth:`train_examples`)
    resamples: bool = False

    def train_examples(self, epoch: int) -> Examples | None:
        """For methods with :attr:`resamples`: the training examples of ``epoch`` (called by the loop
        after :meth:`before_epoch`, also when a run resumes inside the epoch, so it must follow from
        the method's state): sample indices into the training split, repeats allowed, and optional
        integer tags, which reach :meth:`loss` in ``inputs[EXAMPLE_TAG]`` (every training batch of a
        re-sampling method carries them; 0 for untagged rows). None: every sample once. Every
        rank must return the same examples: the sampler permutes them (seeded by run and epoch) and
        gives each rank its share of every batch."""
        return None

    def predict(self, model: nn.Module, inputs: Mapping[str, Tensor]) -> Prediction:
        """For methods with :attr:`predicts`: the logits evaluation scores (and each modality's part of
        them), in place of the model's fused output (MLA's entropy-weighted uni-modal outputs, UME's
        ensemble). Runs under ``no_grad`` in eval mode."""
        raise NotImplementedError(f"{type(self).__name__} sets predicts but defines no predict")


def attach_modules(model: nn.Module, modules: Mapping[str, nn.Module], method: str) -> None:
    """``model.method_modules = nn.ModuleDict(modules)`` on the unwrapped model, on the device and
    floating dtype of the model's parameters. Idempotent: a model that already carries modules of
    the same structure (names, types, parameter and buffer shapes) keeps them (e.g. a checkpoint's
    weights loaded since); different ones are refused."""
    if not modules:
        return
    inner = unwrap(model)
    built = nn.ModuleDict(dict(modules))
    existing = getattr(inner, MODULES_ATTRIBUTE, None)
    if existing is not None:
        if _structure(existing) != _structure(built):
            raise ValueError(f"{method}: the model already carries method modules {sorted(existing.keys())} of "
                             f"another structure than this method's {sorted(built.keys())}; build a fresh model")
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(f"{method}: attach(model) must come before wrapping the model in "
                         f"DistributedDataParallel (the wrapper would not see the new modules)")
    if inner is not model:
        raise ValueError(f"{method} adds modules of its own to the model, and {type(model).__name__} is not a "
                         f"MultimodalModel: train its view, model = modbal.adapt(model), which shares its weights "
                         f"and carries the method's modules")
    ref = next(inner.parameters(), None)
    if ref is not None:
        built.to(device=ref.device)
        if ref.is_floating_point():
            built.to(dtype=ref.dtype)
    setattr(inner, MODULES_ATTRIBUTE, built)


def _structure(modules: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    types = [(name, type(m).__name__, ()) for name, m in modules.named_modules()]
    shapes = [(name, "tensor", tuple(t.shape)) for name, t in modules.state_dict().items()]
    return types + shapes


def method_modules(model: nn.Module, method: str = "method") -> nn.ModuleDict:
    """The modules :meth:`Method.attach` registered on ``model`` (through a DDP wrapper)."""
    modules = getattr(unwrap(model), MODULES_ATTRIBUTE, None)
    if modules is None:
        raise RuntimeError(f"{method} trains modules of its own, but the model carries none: call "
                           f"method.attach(model) before building the optimizer")
    return modules


def encoder_parameters(model: nn.Module, method: str = "method") -> dict[str, list[nn.Parameter]]:
    """Each modality's trainable encoder parameters, in modality order (an error when an encoder
    has none, e.g. raw-input early fusion)."""
    require_encoder_parameters(model, method)
    inner = unwrap(model)
    return {m: [p for p in inner.encoders[m].parameters() if p.requires_grad] for m in inner.modalities}


def encoder_gradients(model: nn.Module, losses: Mapping[str, Tensor],
                      params: Sequence[Tensor] | None = None) -> dict[str, list[Tensor]]:
    """∂loss/∂p for every named loss and every p in ``params`` (default: all encoder parameters, in
    modality order), by ``torch.autograd.grad`` with the graph kept, so the usual ``backward`` can
    follow; ``p.grad`` is left untouched and parameters a loss does not reach get zeros. Under
    DistributedDataParallel the gradients are averaged over ranks (one all-reduce), like DDP's own
    backward, so every rank decides from the global batch."""
    if params is None:
        params = [p for ps in encoder_parameters(model).values() for p in ps]
    params = list(params)
    out: dict[str, list[Tensor]] = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    world = world_size()
    if world > 1 and out:
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for gs in out.values() for g in gs])) / world
        offset = 0
        for gs in out.values():
            for i, g in enumerate(gs):
                gs[i] = flat[offset:offset + g.numel()].view_as(g)
                offset += g.numel()
    return out


def pool_feature(feature: Tensor) -> Tensor:
    """One vector per sample: a B×D feature as is, a B×…×D one (tokens, maps) averaged over the
    middle axes."""
    return feature if feature.dim() == 2 else feature.flatten(1, -2).mean(1)


class ModalityHead(nn.Module):
    """A linear classifier on one modality's (pooled) encoder feature: the separate uni-modal head
    of the methods that add per-modality losses."""

    def __init__(self, feature_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if len(feature_shape) < 1:
            raise ValueError(f"a modality head needs a feature shape with a last axis, got {tuple(feature_shape)}")
        self.linear = nn.Linear(int(feature_shape[-1]), num_classes)

    def forward(self, feature: Tensor) -> Tensor:
        return self.linear(pool_feature(feature))


def modality_heads(model: nn.Module, method: str) -> dict[str, nn.Module]:
    """One :class:`ModalityHead` per modality of ``model``, sized from its fusion's feature shapes."""
    require_encoder_parameters(model, method)
    inner = unwrap(model)
    shapes = getattr(inner.fusion, "feature_shapes", None)
    classes = getattr(inner.fusion, "num_classes", None)
    complete = isinstance(shapes, Mapping) and all(m in shapes for m in inner.modalities)
    if not complete or not isinstance(classes, int):
        raise ValueError(f"{method} sizes its per-modality heads from the fusion's feature_shapes ({{modality: "
                         f"feature shape}}) and num_classes; {type(inner.fusion).__name__} lacks them (set both)")
    return {m: ModalityHead(shapes[m], classes) for m in inner.modalities}


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


# -- training schemes: a method-owned step and the method's evaluation output ----------------------
#: the key under which a re-sampling method's training batches carry their rows' tags
EXAMPLE_TAG = "example_tag"


@dataclass
class Examples:
    """What :meth:`Method.train_examples` returns: ``indices`` (K sample numbers of the training
    split, repeats allowed) and ``tags`` (K integers >= 0, or None)."""

    indices: Tensor
    tags: Tensor | None = None


@dataclass
class Prediction:
    """What :meth:`Method.predict` returns: ``logits`` (B×C) and ``mono`` (M×B×C, modality order),
    each modality's part of the logits (``mono.sum(0) == logits`` for additive combinations);
    evaluation reports ``mono_acc/<m>`` and ``mono_loss/<m>`` from it."""

    logits: Tensor
    mono: Tensor


@dataclass
class StepContext:
    """What a method-owned step (:meth:`Method.train_step`) works with: the run's optimizer, the
    gradient scaler (fp16 on CUDA) and autocast mode, the device, and where the loop stands
    (``step_in_epoch`` batches done, ``steps_per_epoch`` the loader's length).

    The step runs on the *unwrapped* model (the runner does not wrap owned-step methods in
    DistributedDataParallel): :meth:`backward` averages the gradients over ranks itself, so every
    rank takes the same update from the global batch."""

    optimizer: torch.optim.Optimizer
    device: torch.device | str | None = None
    amp: str = "none"
    scaler: Any = None
    epoch: int = 0
    step_in_epoch: int = 0
    steps_per_epoch: int | None = None

    def autocast(self) -> Any:
        """The loop's autocast context (``amp``) for forward passes."""
        from ..train.evaluate import autocast  # the training package imports this module

        return autocast(torch.device(self.device or "cpu"), self.amp)

    def backward(self, loss: Tensor) -> bool:
        """``zero_grad`` → ``backward`` (scaled under fp16) → gradients averaged over ranks →
        unscaled. Returns False when an fp16 gradient overflowed (the scaler then skips the step:
        call :meth:`step` anyway, and edit no gradient)."""
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        average_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
        if self.scaler is None:
            return True
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return bool(torch.isfinite(nn.utils.get_total_norm(grads)))

    def step(self) -> None:
        """``optimizer.step()`` (through the scaler under fp16)."""
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()


def average_gradients(params: Iterable[Tensor]) -> None:
    """Average ``p.grad`` over ranks in place (one all-reduce of the flattened gradients; every rank
    must hold gradients for the same parameters); nothing in a single process."""
    world = world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if world <= 1 or not grads:
        return
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def predictor(method: Method, model: nn.Module) -> Any:
    """``inputs → method.predict(model, inputs)`` for methods that evaluate with their own output
    (:attr:`Method.predicts`), else None (evaluation uses the model's)."""
    return (lambda inputs: method.predict(model, inputs)) if method.predicts else None
