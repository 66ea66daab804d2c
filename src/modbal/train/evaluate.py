"""Evaluation: accuracy, macro-F1, loss and each modality's mono-modal (Shapley) accuracy and loss.

``evaluate(model, loader)`` runs ``model(inputs, shapley="features")`` in eval mode without
gradients; ``mono_acc/<m>`` and ``mono_loss/<m>`` score the mono-modal output o_m of modality m
(its exact Shapley share of the logits) as if it were a classifier. When the fusion has
per-modality heads (``has_mono_heads``: ``sum``, ``concat``), ``head_acc/<m>`` and
``head_loss/<m>`` score each modality's own head, ``fusion.mono_logits`` on the encoded features
(the outputs the original OGM-GE, MSLR and MSES code reads). Sums (and the confusion matrix) are
all-reduced across ranks, so every rank gets the metrics of the whole split.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum, unwrap
from ..methods.heads import capture_fusion_features
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


def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device | None = None,
             amp: str = "none", shapley: str = "features",
             prepare: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
             predict: Callable[[Mapping[str, Tensor]], Any] | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``loader``: ``acc``, ``macro_f1``, ``loss``, ``mono_acc/<m>``,
    ``mono_loss/<m>`` and, for fusions with per-modality heads, ``head_acc/<m>``,
    ``head_loss/<m>`` (cross-entropy averaged over samples). ``prepare`` maps each batch's inputs
    first (the method's ``prepare_inputs``, e.g. the uni-modal method's muting). ``predict`` replaces
    the model's output by a method's own (``logits`` and per-modality ``mono``: MLA, UME; see
    :func:`modbal.methods.base.predictor`); there are no ``head_*`` metrics then."""
    return evaluate_with_confusion(model, loader, device, amp, shapley, prepare, predict)[0]


@torch.no_grad()
def evaluate_with_confusion(model: nn.Module, loader: Iterable[Any], device: torch.device | None = None,
                            amp: str = "none", shapley: str = "features",
                            prepare: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
                            predict: Callable[[Mapping[str, Tensor]], Any] | None = None
                            ) -> tuple[dict[str, float], Tensor]:
    """:func:`evaluate`'s metrics and the confusion matrix of the (fused or method's) prediction
    they are read from: ``cm[t, p]``, samples of class t predicted as p, over the whole split (all
    ranks), int64 C × C."""
    base = unwrap(model)
    device = device or _device_of(base)
    modalities = tuple(base.modalities)
    m_count = len(modalities)
    heads = predict is None and bool(getattr(base.fusion, "has_mono_heads", False))
    groups = 2 if heads else 1  # mono (Shapley) and, with heads, head outputs
    cm = None
    # loss, then (correct, loss) per modality for each group of outputs, then the count
    sums = torch.zeros(1 + 2 * m_count * groups + 1, dtype=torch.float64)
    captured: dict[str, Any] = {}
    hook = capture_fusion_features(base.fusion, captured) if heads else None
    try:
        with eval_mode(base):
            for inputs, targets in loader:
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                if prepare is not None:
                    inputs = prepare(inputs)
                captured.clear()
                with autocast(device, amp):
                    # the fusion's first call sees the real features
                    out = base(inputs, shapley=shapley) if predict is None else predict(inputs)
                    outputs = [out.mono]
                    if heads:
                        own = base.fusion.mono_logits(captured["features"])
                        outputs.append(torch.stack([own[m] for m in modalities]))
                logits = out.logits.float()
                batch_cm = confusion_matrix(logits.argmax(-1), targets, logits.shape[-1])
                cm = batch_cm if cm is None else cm + batch_cm
                parts = [F.cross_entropy(logits, targets, reduction="sum").reshape(1)]
                for per_modality in outputs:
                    per_modality = per_modality.float()
                    flat = per_modality.reshape(-1, per_modality.shape[-1])
                    losses = F.cross_entropy(flat, targets.repeat(m_count), reduction="none").view(m_count, -1)
                    parts += [(per_modality.argmax(-1) == targets).sum(-1).to(logits.dtype), losses.sum(-1)]
                parts.append(logits.new_tensor([targets.shape[0]]))
                sums += torch.cat(parts).double().cpu()
    finally:
        if hook is not None:
            hook.remove()
    if cm is None:
        raise ValueError("evaluate() got an empty loader")
    num_classes = cm.shape[0]
    reduced = all_reduce_sum(torch.cat([sums, cm.double().flatten()]).to(device)).cpu()
    sums, cm = reduced[:sums.numel()], reduced[sums.numel():].view(num_classes, num_classes)
    count = float(sums[-1])
    metrics = {"acc": accuracy_from_confusion(cm), "macro_f1": macro_f1_from_confusion(cm),
               "loss": float(sums[0]) / count}
    for g, source in enumerate(("mono", "head")[:groups]):
        offset = 1 + 2 * m_count * g
        for i, m in enumerate(modalities):
            metrics[f"{source}_acc/{m}"] = float(sums[offset + i]) / count
        for i, m in enumerate(modalities):
            metrics[f"{source}_loss/{m}"] = float(sums[offset + m_count + i]) / count
    return metrics, cm.round().long()
