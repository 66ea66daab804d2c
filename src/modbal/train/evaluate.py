"""Evaluation: accuracy, macro-F1, loss and each modality's mono-modal (Shapley) accuracy and loss.

``evaluate(model, loader)`` runs ``model(inputs, shapley="features")`` in eval mode without
gradients; ``mono_acc/<m>`` and ``mono_loss/<m>`` score the mono-modal output o_m of modality m
(its exact Shapley share of the logits) as if it were a classifier. Sums (and the confusion
matrix) are all-reduced across ranks, so every rank gets the metrics of the whole split.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum, unwrap
from ..metrics.classification import accuracy_from_confusion, confusion_matrix, macro_f1_from_confusion
from ..model import eval_mode
from .data import to_device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast for ``amp`` in {"none", "bf16", "fp16"} on ``device``'s type."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device | None = None,
             amp: str = "none", shapley: str = "features",
             prepare: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
             predict: Callable[[Mapping[str, Tensor]], Any] | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``loader``: ``acc``, ``macro_f1``, ``loss``, ``mono_acc/<m>``,
    ``mono_loss/<m>`` (cross-entropy averaged over samples). ``prepare`` maps each batch's inputs
    first (the method's ``prepare_inputs``, e.g. the uni-modal method's muting). ``predict`` replaces
    the model's output by a method's own (``logits`` and per-modality ``mono``: MLA, UME; see
    :func:`modbal.methods.base.predictor`)."""
    base = unwrap(model)
    device = device or _device_of(base)
    modalities = tuple(base.modalities)
    m_count = len(modalities)
    cm = None
    sums = torch.zeros(1 + 2 * m_count + 1, dtype=torch.float64)  # loss, mono_correct, mono_loss, count
    with eval_mode(base):
        for inputs, targets in loader:
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            if prepare is not None:
                inputs = prepare(inputs)
            with autocast(device, amp):
                out = base(inputs, shapley=shapley) if predict is None else predict(inputs)
            logits, mono = out.logits.float(), out.mono.float()
            batch_cm = confusion_matrix(logits.argmax(-1), targets, logits.shape[-1])
            cm = batch_cm if cm is None else cm + batch_cm
            flat_mono = mono.reshape(-1, mono.shape[-1])
            mono_loss = F.cross_entropy(flat_mono, targets.repeat(m_count), reduction="none").view(m_count, -1)
            row = torch.cat([
                F.cross_entropy(logits, targets, reduction="sum").reshape(1),
                (mono.argmax(-1) == targets).sum(-1).to(logits.dtype),
                mono_loss.sum(-1),
                logits.new_tensor([targets.shape[0]]),
            ])
            sums += row.double().cpu()
    if cm is None:
        raise ValueError("evaluate() got an empty loader")
    num_classes = cm.shape[0]
    reduced = all_reduce_sum(torch.cat([sums, cm.double().flatten()]).to(device)).cpu()
    sums, cm = reduced[:sums.numel()], reduced[sums.numel():].view(num_classes, num_classes)
    count = float(sums[-1])
    metrics = {"acc": accuracy_from_confusion(cm), "macro_f1": macro_f1_from_confusion(cm),
               "loss": float(sums[0]) / count}
    for i, m in enumerate(modalities):
        metrics[f"mono_acc/{m}"] = float(sums[1 + i]) / count
    for i, m in enumerate(modalities):
        metrics[f"mono_loss/{m}"] = float(sums[1 + m_count + i]) / count
    return metrics
