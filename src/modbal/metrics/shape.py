"""SHAPE-style modality contributions (Hu et al., 2022): Shapley values of a metric over coalitions.

The value of a coalition S of modalities is the model's accuracy when every modality outside S is
muted, v(S). Each modality's contribution is its exact Shapley value φ_m of v
(:func:`modbal.shapley.shapley_values`), so Σ_m φ_m = v(all) − v(∅). The cooperation term measures
gains relative to the empty coalition, as SHAPE does: v(all) − v(∅) − Σ_m (v({m}) − v(∅)). It is 0
when the modalities add up without interacting, positive when together they do more than the sum of
what each adds alone, negative when less.

Coalition outputs come from the model itself: ``model(inputs, shapley="inputs")`` (the whole model
re-run on zeroed inputs, the paper code's muting) or ``"features"`` (muted features from an
all-zero sample), in eval mode; ``out.coalitions[mask]`` are the logits of coalition ``mask``
(bit i set: modality i present).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..adapt import as_multimodal, shapley_forward
from ..model import MUTING_MODES, eval_mode
from ..shapley import full_coalition, num_coalitions, shapley_values


def _values(values: Any, num_modalities: int) -> Tensor:
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.shape != (num_coalitions(num_modalities),):
        raise ValueError(f"expected {num_coalitions(num_modalities)} coalition values for "
                         f"{num_modalities} modalities, got shape {tuple(v.shape)}")
    return v


def shape_scores(values: Any, modalities: Sequence[str]) -> dict[str, Any]:
    """Contributions and cooperation from coalition values ``values[mask]`` = v(S).

    Returns:
        ``{"shapley": {m: φ_m}, "single": {m: v({m})}, "full": v(all), "empty": v(∅),
        "cooperation": v(all) − v(∅) − Σ_m (v({m}) − v(∅)), "coalitions": {label: v(S)}}``, labels such as
        ``"audio+image"`` (``"∅"`` for the empty coalition).

    >>> shape_scores([0.1, 0.5, 0.3, 0.9], ["a", "b"])["shapley"]   # doctest: +SKIP
    {'a': 0.5, 'b': 0.3}
    """
    modalities = tuple(modalities)
    m = len(modalities)
    v = _values(values, m)
    phi = shapley_values(v, m)
    single = {name: float(v[1 << i]) for i, name in enumerate(modalities)}
    full, empty = float(v[full_coalition(m)]), float(v[0])
    labels = {}
    for mask in range(num_coalitions(m)):
        members = [name for i, name in enumerate(modalities) if mask >> i & 1]
        labels["+".join(members) if members else "∅"] = float(v[mask])
    return {
        "shapley": {name: float(phi[i]) for i, name in enumerate(modalities)},
        "single": single,
        "full": full,
        "empty": empty,
        "cooperation": full - empty - sum(value - empty for value in single.values()),
        "coalitions": labels,
    }


@torch.no_grad()
def coalition_accuracies(model: nn.Module, loader: Iterable, muting: str = "inputs",
                         device: torch.device | str | None = None) -> Tensor:
    """Accuracy of every coalition (2^M, float64) over a loader of ``(inputs, labels)`` batches.

    The model runs in eval mode (restored afterwards); ``muting`` is ``"inputs"`` or ``"features"``.
    """
    if muting not in MUTING_MODES:
        raise ValueError(f"unknown muting mode {muting!r}; allowed values: {', '.join(MUTING_MODES)}")
    correct: Tensor | None = None
    total = 0
    with eval_mode(model):
        for inputs, labels in loader:
            if device is not None:
                inputs = {k: x.to(device) for k, x in inputs.items()}
                labels = labels.to(device)
            out = shapley_forward(model, inputs, muting)
            hits = (out.coalitions.argmax(-1) == labels.unsqueeze(0)).sum(1).to("cpu", torch.float64)
            correct = hits if correct is None else correct + hits
            total += labels.shape[0]
    if correct is None or total == 0:
        raise ValueError("the loader yielded no samples")
    return correct / total


def model_shape_scores(model: nn.Module, loader: Iterable, muting: str = "inputs",
                       device: torch.device | str | None = None) -> dict[str, Any]:
    """:func:`shape_scores` of the model's coalition accuracies on ``loader``."""
    values = coalition_accuracies(model, loader, muting, device)
    result = shape_scores(values, as_multimodal(model).modalities)
    result["muting"] = muting
    return result
