"""Classification metrics as pure functions of predictions and targets (or a confusion matrix).

Everything is computed from a confusion matrix so that sums over data shards (or ranks) combine
exactly: accumulate :func:`confusion_matrix` per batch, add them up, then read the metrics off.
"""
from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """``cm[t, p]`` = number of samples with target ``t`` predicted as ``p`` (int64, C × C)."""
    preds, targets = preds.reshape(-1).long(), targets.reshape(-1).long()
    if preds.shape != targets.shape:
        raise ValueError(f"preds and targets differ in size: {tuple(preds.shape)} vs {tuple(targets.shape)}")
    index = targets * num_classes + preds
    return torch.bincount(index.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy_from_confusion(cm: Tensor) -> float:
    """Trace over total of a confusion matrix (NaN when it counts no sample)."""
    total = int(cm.sum())
    return float(cm.diagonal().sum()) / total if total else float("nan")


def macro_f1_from_confusion(cm: Tensor) -> float:
    """Mean over classes of F1 = 2·TP / (2·TP + FP + FN); classes absent from both targets and
    predictions are left out of the mean (their F1 is undefined), as scikit-learn does with
    ``labels`` restricted to the classes present."""
    cm = cm.double()
    tp = cm.diagonal()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    present = denom > 0
    if not bool(present.any()):
        return float("nan")
    return float((2 * tp[present] / denom[present]).mean())


def accuracy(preds: Tensor, targets: Tensor) -> float:
    """Fraction of ``preds`` equal to ``targets`` (class indices)."""
    preds, targets = preds.reshape(-1), targets.reshape(-1)
    if preds.shape != targets.shape:
        raise ValueError(f"preds and targets differ in size: {tuple(preds.shape)} vs {tuple(targets.shape)}")
    return float((preds == targets).double().mean()) if preds.numel() else float("nan")


def macro_f1(preds: Tensor, targets: Tensor, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in targets or predictions."""
    if num_classes is None:
        num_classes = int(max(int(preds.max()), int(targets.max()))) + 1 if preds.numel() else 1
    return macro_f1_from_confusion(confusion_matrix(preds, targets, num_classes))
