"""What OGM-GE, MSLR and MSES read and act on: each modality's own head, where the fusion has one.

The original code of these methods scores each modality by its own classifier head (``out_a =
audio_cls(a)`` for summed heads, ``W_a·a + b/2`` for a concatenation head) and, for MSLR and
MSES, scales the gradients of the modality's encoder *and* that head. Fusions with
``has_mono_heads`` (``sum``, ``concat``) expose both; for every other fusion the methods fall back
to the exact Shapley mono-modal outputs o_m of the model protocol and to the encoder alone.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..distributed import unwrap

#: ``"auto"``: the fusion's own heads where it has them, Shapley mono-modal outputs otherwise
SCORES = ("auto", "heads", "shapley")

GradientSlice = tuple[nn.Parameter, "tuple[slice, ...] | None"]  # (parameter, index of its entries or None)


def check_scores(scores: str) -> None:
    if scores not in SCORES:
        raise ValueError(f"Invalid scores {scores!r}; allowed values: {', '.join(SCORES)}")


def scores_heads(scores: str, model: nn.Module, method: str) -> bool:
    """Whether ``scores`` means the fusion's own heads for ``model`` (an error if it asks for heads
    that the fusion does not have)."""
    has_heads = bool(getattr(unwrap(model).fusion, "has_mono_heads", False))
    if scores == "heads" and not has_heads:
        raise TypeError(f"{method} scores='heads' needs a fusion with per-modality heads (has_mono_heads), "
                        f"{type(unwrap(model).fusion).__name__} has none; use scores='shapley' or 'auto'")
    return scores == "heads" or (scores == "auto" and has_heads)


def metric_name(kind: str, scores: str, model: nn.Module, modality: str, method: str) -> str:
    """The validation metric a method reads: ``head_<kind>/<m>`` or ``mono_<kind>/<m>``."""
    return f"{'head' if scores_heads(scores, model, method) else 'mono'}_{kind}/{modality}"


def modality_gradient_slices(model: nn.Module, modality: str, head: bool) -> list[GradientSlice]:
    """Modality ``modality``'s encoder parameters (whole tensors) and, with ``head`` and a fusion
    with own heads, the parts of the fusion's parameters that are that modality's head alone."""
    inner = unwrap(model)
    slices: list[GradientSlice] = [(p, None) for p in inner.encoders[modality].parameters()]
    if head and getattr(inner.fusion, "has_mono_heads", False):
        slices += list(inner.fusion.head_parameters(modality))
    return slices


def scale_gradients(slices: Iterable[GradientSlice], factor: float) -> None:
    """Multiply the gradient (or the indexed part of it) of each slice by ``factor`` in place."""
    with torch.no_grad():
        for p, index in slices:
            if p.grad is None:
                continue
            if index is None:
                p.grad.mul_(factor)
            else:
                p.grad[index] *= factor


def capture_fusion_features(fusion: nn.Module, store: dict[str, Any]) -> RemovableHandle:
    """A forward pre-hook keeping, under ``store["features"]``, the features of the fusion's first
    call after ``store`` was emptied (the real ones: muted coalitions come later); it changes
    nothing. Remove the returned handle when done."""
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        store.setdefault("features", args[0])

    return fusion.register_forward_pre_hook(hook)
