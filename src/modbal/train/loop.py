"""The one training loop every method shares, firing the :class:`~modbal.methods.base.Method` hooks.

Per step: ``loss = method.loss(model, inputs, y)`` → ``zero_grad`` → ``backward`` →
``method.after_backward(model)`` → ``optimizer.step()`` → ``method.after_step(model)`` →
``method.statistics()`` logged. Per epoch: ``method.on_epoch_start(epoch)`` and then
``method.before_epoch(model, EpochData(...))`` (passes over the loaders) before the first batch;
after the last, evaluation on the validation split → ``method.on_epoch_end(epoch, metrics, model,
optimizer)`` → validation again if the method set ``changed_weights`` (the epoch record then keeps the
first results under ``val_before_change/``) → the scheduler steps → the best epoch (on validation
only) is tracked.
A method with ``owns_step`` replaces the per-step sequence by ``method.substeps(model)`` calls of
``method.train_step(model, inputs, y, StepContext, k)`` (MLA: one optimizer step per modality); the
loop keeps logging, checkpointing (``checkpoint_every`` counts these sub-steps, so a checkpoint may
fall between two of them and a resumed run continues with the next) and evaluation, which uses
``method.predict`` for methods with ``predicts``. Adding a method never touches this file.

The optimizer is built from ``method.param_groups(model)``: each group is a dict with
``params`` and optionally its own ``lr`` (absolute, wins over ``optim.lr``) or ``lr_scale``
(multiplies ``optim.lr``), ``weight_decay``, … and any extra keys (e.g. ``modality``), which
torch keeps in ``optimizer.param_groups`` where ``on_epoch_end`` can find them.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..distributed import all_reduce_sum, unwrap
from ..methods.base import EpochData, Method, StepContext, predictor
from .data import loader_batch_indices, nonfinite_input_error, to_device
from .evaluate import autocast, evaluate

SELECT_MODE = {"acc": "max", "macro_f1": "max", "loss": "min"}


# -- set-up helpers -----------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """``torch.use_deterministic_algorithms(enabled)`` plus the cuDNN/cuBLAS settings it needs."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def build_optimizer(groups: Iterable[Mapping[str, Any]], optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over ``groups`` (from ``method.param_groups``); see the module doc."""
    base_lr = float(optim["lr"])
    prepared = []
    for i, group in enumerate(groups):
        group = dict(group)
        if "params" not in group:
            raise ValueError(f"param_groups()[{i}] has no 'params' key (keys: {sorted(group)})")
        group["params"] = list(group["params"])
        scale = group.pop("lr_scale", None)
        if "lr" not in group and scale is not None:
            group["lr"] = base_lr * float(scale)
        if scale is not None:
            group["lr_scale"] = float(scale)
        if group["params"] or "modality" in group:  # an emptied modality group (MSES) keeps its slot,
            prepared.append(group)                      # so a saved optimizer state still matches
    if not any(g["params"] for g in prepared):
        raise ValueError("the method's param_groups() hold no parameters to train")
    name = optim["name"]
    wd = float(optim.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(prepared, lr=base_lr, momentum=float(optim.get("momentum", 0.0)),
                               weight_decay=wd, nesterov=bool(optim.get("nesterov", False)))
    betas = tuple(float(b) for b in optim.get("betas", (0.9, 0.999)))
    eps = float(optim.get("eps", 1e-8))
    if name == "adam":
        return torch.optim.Adam(prepared, lr=base_lr, betas=betas, eps=eps, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(prepared, lr=base_lr, betas=betas, eps=eps, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}; allowed values: sgd, adam, adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any], epochs: int) -> Any:
    """``none`` | ``step`` (StepLR(step_size, gamma)) | ``cosine`` (to ``min_lr`` over ``epochs``);
    stepped once per epoch, after ``method.on_epoch_end``."""
    schedule = optim.get("schedule", "none")
    if schedule == "none":
        return None
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(optim["step_size"]),
                                               gamma=float(optim["gamma"]))
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs),
                                                          eta_min=float(optim["min_lr"]))
    raise ValueError(f"unknown schedule {schedule!r}; allowed values: none, step, cosine")


# -- loop state ---------------------------------------------------------------------------------
@dataclass
class LoopState:
    """Where the loop stands; saved in checkpoints so a run resumes mid-epoch exactly."""

    epoch: int = 0                 # the epoch being trained (0-based)
    step_in_epoch: int = 0         # batches of ``epoch`` already done
    global_step: int = 0           # optimizer steps done in total
    loss_sum: float = 0.0          # this epoch's sums over training samples
    correct: float = 0.0
    seen: float = 0.0
    acc_seen: float = 0.0          # samples whose training predictions were observed
    best_epoch: int = -1
    best_score: float | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0         # training time over all sessions
    epoch_time_s: float = 0.0      # time spent in the current epoch (over sessions)
    updates: int = 0               # sub-steps done in total (= global_step unless a method owns its step)
    substep: int = 0               # sub-steps of the current batch done (method-owned steps, e.g. MLA)
    substep_loss: float = 0.0      # their summed global-mean losses

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "LoopState":
        state = dict(state)
        state.setdefault("updates", state.get("global_step", 0))  # saved before sub-steps existed
        return cls(**state)


def _improved(score: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(score):
        return False
    if best is None:
        return True
    return score > best if mode == "max" else score < best


class _LogitsProbe:
    """Captures the first full-batch logits the model returns in a step (for training accuracy)."""

    def __init__(self, model: nn.Module) -> None:
        self.logits: torch.Tensor | None = None
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.logits is None:
            if isinstance(output, tuple):  # model(inputs, aux=...) returns (output, aux(features))
                output = output[0]
            logits = getattr(output, "logits", output)
            if isinstance(logits, torch.Tensor):
                self.logits = logits.detach()

    def take(self) -> torch.Tensor | None:
        logits, self.logits = self.logits, None
        return logits

    def remove(self) -> None:
        self.handle.remove()


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr`` (the first group that names no modality, e.g. the fusion's) and ``lr/<modality>``
    for groups that name one."""
    shared = [g for g in optimizer.param_groups if "modality" not in g] or optimizer.param_groups
    out = {"lr": float(shared[0]["lr"])}
    for g in optimizer.param_groups:
        if "modality" in g:
            out[f"lr/{g['modality']}"] = float(g["lr"])
    return out


def _autocast_loss(method: Method, model: nn.Module, inputs: Any, targets: torch.Tensor, device: torch.device,
                   amp: str) -> torch.Tensor:
    with autocast(device, amp):
        return method.loss(model, inputs, targets)


# -- the loop -----------------------------------------------------------------------------------
def fit(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    epochs: int,
    *,
    scheduler: Any = None,
    scaler: Any = None,
    device: torch.device | str | None = None,
    amp: str = "none",
    state: LoopState | None = None,
    select: str = "acc",
    max_steps_per_epoch: int | None = None,
    checkpoint_every: int = 0,
    on_step: Callable[[LoopState, dict[str, Any]], None] | None = None,
    on_epoch: Callable[[LoopState, dict[str, Any], bool], None] | None = None,
    on_checkpoint: Callable[[LoopState], None] | None = None,
    progress: bool = False,
) -> LoopState:
    """Train ``model`` with ``method`` for ``epochs`` epochs (from ``state``, when resuming).

    Args:
        model: the model (possibly DistributedDataParallel-wrapped) handed to the method hooks.
        train_loader: yields ``({modality: tensor}, targets)``; if its ``batch_sampler`` (or
            ``sampler``) has ``set_epoch(epoch, start)``, it is told the epoch and how many
            batches to skip (mid-epoch resume).
        val_loader: the validation split (never test) — it decides the best epoch.
        select: validation metric for the best epoch (``acc``/``macro_f1`` higher, ``loss`` lower).
        on_step(state, record): after each step; record = epoch, step, loss, acc, lr, statistics.
        on_epoch(state, record, improved): after each epoch (state already points at the next).
        on_checkpoint(state): every ``checkpoint_every`` steps (mid-epoch checkpoints).
        progress: show a tqdm bar with loss, accuracy and κ.

    Returns the final :class:`LoopState` (``best_epoch``, ``best_val``…).
    """
    state = state or LoopState()
    device = torch.device(device) if device is not None else next(unwrap(model).parameters()).device
    mode = SELECT_MODE[select]
    sampler = getattr(train_loader, "batch_sampler", None)
    if not hasattr(sampler, "set_epoch"):
        sampler = getattr(train_loader, "sampler", None)
    probe = _LogitsProbe(unwrap(model))
    t0 = time.perf_counter()

    def checkpoint() -> None:
        """A mid-epoch checkpoint (``on_checkpoint``), with the time spent so far booked."""
        nonlocal t0
        if on_checkpoint is None:
            return
        now = time.perf_counter()
        state.epoch_time_s += now - t0
        state.elapsed_s += now - t0
        t0 = now
        on_checkpoint(state)

    try:
        while state.epoch < epochs:
            epoch = state.epoch
            t0 = time.perf_counter()
            fresh = state.step_in_epoch == 0 and state.substep == 0  # not a resume inside this epoch
            if fresh:
                method.on_epoch_start(epoch)
                state.loss_sum = state.correct = state.seen = state.acc_seen = 0.0
                state.epoch_time_s = 0.0
            if hasattr(sampler, "set_epoch"):
                try:
                    sampler.set_epoch(epoch, state.step_in_epoch)
                except TypeError:  # a torch DistributedSampler: set_epoch(epoch) only
                    sampler.set_epoch(epoch)
            examples = getattr(getattr(train_loader, "dataset", None), "set_examples", None)
            if examples is not None:  # a re-sampled training set: passes over it see every sample once
                examples(None)
            if fresh:  # passes over data between epochs (PMR's prototypes, G-Blending)
                method.before_epoch(model, EpochData(epoch, train_loader, val_loader, device=device, amp=amp,
                                                     optimizer=optimizer, max_steps=max_steps_per_epoch))
            if examples is not None:  # the method's examples for this epoch (from its state when resuming)
                examples(method.train_examples(epoch))
            total = len(train_loader) if hasattr(train_loader, "__len__") else None
            total_batches = total
            if total is not None and max_steps_per_epoch:
                total = min(total, max_steps_per_epoch)
            bar = None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=total, initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                           leave=False, dynamic_ncols=True)
            model.train()
            for inputs, targets in train_loader:
                if max_steps_per_epoch and state.step_in_epoch >= max_steps_per_epoch:
                    break
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                probe.take()  # forget outputs of anything run since the last step (e.g. evaluation)

                def check_loss(compute: Callable[[], torch.Tensor]) -> torch.Tensor:
                    try:
                        loss = compute()
                        if not torch.isfinite(loss.detach()).all():
                            raise FloatingPointError(
                                f"{method.name}: non-finite training loss {float(loss.detach())} at epoch {epoch}, "
                                f"step {state.global_step + 1}; lower the learning rate or the method's strength")
                    except FloatingPointError as e:  # the batch's data first: name the modality and sample
                        raise nonfinite_input_error(
                            inputs, "training", loader_batch_indices(train_loader, state.step_in_epoch),
                            getattr(train_loader, "dataset", None),
                            f" (epoch {epoch}, step {state.global_step + 1})") or e
                    return loss

                if method.owns_step:  # the method's own sub-steps; a checkpoint may fall between them
                    context = StepContext(optimizer, device, amp, scaler, epoch, state.step_in_epoch, total_batches)
                    count = method.substeps(model)
                    while state.substep < count:
                        loss = check_loss(lambda: method.train_step(model, inputs, targets, context, state.substep))
                        n_local = float(targets.shape[0])
                        sums = all_reduce_sum(torch.stack([loss.detach().double() * n_local,
                                                           torch.tensor(n_local, dtype=torch.float64,
                                                                        device=loss.device)]))
                        state.substep_loss += float(sums[0] / sums[1])
                        state.substep += 1
                        state.updates += 1
                        if state.substep < count and checkpoint_every and state.updates % checkpoint_every == 0:
                            checkpoint()
                    # the batch's loss: the mean of its sub-steps' global-mean losses (the same on every rank)
                    loss = torch.tensor(state.substep_loss / count, dtype=torch.float64, device=device)
                    state.substep, state.substep_loss = 0, 0.0
                else:
                    loss = check_loss(lambda: _autocast_loss(method, model, inputs, targets, device, amp))
                    optimizer.zero_grad(set_to_none=True)
                    overflow = False
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                        grads = [p.grad for p in model.parameters() if p.grad is not None]
                        overflow = not torch.isfinite(nn.utils.get_total_norm(grads))
                    else:
                        loss.backward()
                    if not overflow:  # an fp16 overflow is the scaler's to handle: it skips the step
                        method.after_backward(model)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    method.after_step(model)
                    state.updates += 1
                logits = probe.take()
                n = targets.shape[0]
                has_acc = logits is not None and logits.shape[0] == n
                f64 = {"dtype": torch.float64, "device": loss.device}
                correct = (logits.argmax(-1) == targets).sum() if has_acc else torch.zeros((), **f64)
                sums = all_reduce_sum(torch.stack([loss.detach().double() * n, correct.double(),
                                                   torch.tensor(float(n), **f64),
                                                   torch.tensor(float(n if has_acc else 0), **f64)]))
                step_loss_sum, step_correct, step_n, step_acc_n = (float(v) for v in sums.cpu())
                state.loss_sum += step_loss_sum
                state.correct += step_correct
                state.seen += step_n
                state.acc_seen += step_acc_n
                state.step_in_epoch += 1
                state.global_step += 1
                stats = method.statistics()
                record = {"epoch": epoch, "step": state.global_step, "loss": step_loss_sum / step_n}
                if step_acc_n:
                    record["acc"] = step_correct / step_acc_n
                record.update(current_lrs(optimizer))
                record.update(stats)
                if on_step is not None:
                    on_step(state, record)
                if bar is not None:
                    post = {"loss": f"{state.loss_sum / state.seen:.3f}"}
                    if state.acc_seen:
                        post["acc"] = f"{state.correct / state.acc_seen:.3f}"
                    kappas = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("kappa/")}
                    if kappas:
                        post["κ"] = " ".join(f"{m}={v:.2f}" for m, v in kappas.items())
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if checkpoint_every and state.updates % checkpoint_every == 0:
                    checkpoint()
            if bar is not None:
                bar.close()
            if state.seen == 0:
                raise ValueError(f"epoch {epoch}: the training loader yielded no batches "
                                 f"(dataset smaller than one batch with drop_last?)")
            lrs = current_lrs(optimizer)  # the rates this epoch trained with
            val = evaluate(model, val_loader, device=device, amp=amp, prepare=method.prepare_inputs,
                           predict=predictor(method, model))
            method.on_epoch_end(epoch, val, model, optimizer)
            before_change = None
            if method.changed_weights:  # the epoch ends with other weights (MSES's restore): score those
                method.changed_weights = False
                before_change = val
                val = evaluate(model, val_loader, device=device, amp=amp, prepare=method.prepare_inputs,
                               predict=predictor(method, model))
            if scheduler is not None:
                scheduler.step()
            score = val[select]
            improved = _improved(score, state.best_score, mode)
            if improved:
                state.best_epoch, state.best_score, state.best_val = epoch, score, dict(val)
            dt = time.perf_counter() - t0
            state.epoch_time_s += dt
            state.elapsed_s += dt
            record = {"epoch": epoch, "train/loss": state.loss_sum / state.seen}
            if state.acc_seen:
                record["train/acc"] = state.correct / state.acc_seen
            record.update({f"val/{k}": v for k, v in val.items()})
            if before_change is not None:
                record.update({f"val_before_change/{k}": v for k, v in before_change.items()})
            record.update(lrs)
            record["time_s"] = state.epoch_time_s
            state.epoch, state.step_in_epoch = epoch + 1, 0
            if on_epoch is not None:
                on_epoch(state, record, improved)
            if method.should_stop:
                break
    finally:
        probe.remove()
    return state
