"""The model protocol: per-modality encoders and one fusion that returns logits.

``MultimodalModel(encoders, fusion)`` covers late, intermediate and early fusion: for raw-input
early fusion the encoders are identities and the fusion is the whole network. Calling the model
with ``shapley="features"`` or ``shapley="inputs"`` also evaluates every coalition of muted
modalities inside ``forward`` (so DistributedDataParallel sees one forward) and returns a
:class:`ShapleyOutput`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .shapley import full_coalition, mono_outputs, num_coalitions

MUTING_MODES = ("features", "inputs")
MIN_MODALITIES, MAX_MODALITIES = 2, 8


@dataclass
class ShapleyOutput:
    """Everything one batch yields for balancing methods.

    Attributes:
        logits: fused output f(all), shape (B, C).
        coalitions: f(S) for every coalition bitmask S, shape (2^M, B, C).
        mono: mono-modal outputs o_m stacked in modality order, shape (M, B, C); Σ_m o_m = f(all).
        modalities: modality names in bit order.
    """

    logits: Tensor
    coalitions: Tensor
    mono: Tensor
    modalities: tuple[str, ...]

    def mono_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.modalities, self.mono))


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put ``module`` in eval mode, restoring each submodule's own flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def mute_inputs(inputs: Mapping[str, Tensor], keep: Iterable[str]) -> dict[str, Tensor]:
    """``inputs`` with every modality not in ``keep`` replaced by zeros (the paper code's muting)."""
    kept = set(keep)
    unknown = sorted(kept - set(inputs))
    if unknown:
        raise KeyError(f"modalities {unknown} to keep are not among the inputs {list(inputs)}")
    return {m: x if m in kept else torch.zeros_like(x) for m, x in inputs.items()}


class MultimodalModel(nn.Module):
    """Encoders (one per modality) and a fusion that maps the dict of features to logits.

    Args:
        encoders: ``{modality: module}``; each sees only its own modality's tensor.
        fusion: module taking ``{modality: feature}`` and returning class logits. Fusions that
            define ``represent(features)`` expose their fused representation (used by probes).

    >>> model = MultimodalModel({"a": nn.Linear(4, 8), "b": nn.Linear(3, 8)}, fusion)
    >>> logits = model({"a": xa, "b": xb})
    >>> out = model({"a": xa, "b": xb}, shapley="features")   # ShapleyOutput
    """

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module) -> None:
        super().__init__()
        names = tuple(encoders)
        if not MIN_MODALITIES <= len(names) <= MAX_MODALITIES:
            raise ValueError(
                f"MultimodalModel needs {MIN_MODALITIES} to {MAX_MODALITIES} modalities, got "
                f"{len(names)}: {list(names)}"
            )
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion = fusion
        self.modalities: tuple[str, ...] = names

    # -- plain passes -----------------------------------------------------------------------
    def _check_inputs(self, inputs: Mapping[str, Tensor]) -> int:
        missing = [m for m in self.modalities if m not in inputs]
        extra = [m for m in inputs if m not in self.encoders]
        if missing or extra:
            raise KeyError(
                f"model inputs must have exactly the modalities {list(self.modalities)}; "
                f"missing {missing}, unexpected {extra}"
            )
        sizes = {m: inputs[m].shape[0] for m in self.modalities}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"modalities disagree on the batch size: {sizes}")
        return next(iter(sizes.values()))

    def encode(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run each encoder on its own modality."""
        self._check_inputs(inputs)
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def represent(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The fusion's fused representation (before its classification head)."""
        represent = getattr(self.fusion, "represent", None)
        if represent is None:
            raise TypeError(f"{type(self.fusion).__name__} does not define represent(features)")
        return represent(self.encode(inputs))

    def forward(
        self, inputs: Mapping[str, Tensor], shapley: str | None = None,
        aux: Callable[[dict[str, Tensor]], Any] | None = None,
    ) -> Tensor | ShapleyOutput | tuple[Any, Any]:
        """Logits for ``inputs``; with ``shapley=`` a muting mode, a :class:`ShapleyOutput`. With
        ``aux``, the pair ``(that, aux(features))``: a balancing method's own modules (e.g.
        per-modality heads) run on the encoder features inside ``forward``, so a
        DistributedDataParallel wrapper sees them as part of the one forward."""
        if shapley not in (None, *MUTING_MODES):
            raise ValueError(f"unknown muting mode {shapley!r}; allowed values: {', '.join(MUTING_MODES)}")
        features = self.encode(inputs)
        if shapley is None:
            out = self.fusion(features)
        elif shapley == "features":
            out = self._shapley_features(inputs, features)
        else:
            out = self._shapley_inputs(inputs, features)
        return out if aux is None else (out, aux(features))

    # -- coalitions -------------------------------------------------------------------------
    def zero_features(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each encoder applied (eval mode, with gradients) to one all-zero sample, shape (1, ...)."""
        with eval_mode(self.encoders):
            return {m: self.encoders[m](torch.zeros_like(inputs[m][:1])) for m in self.modalities}

    def _finish(self, full: Tensor, muted: Tensor, batch: int) -> ShapleyOutput:
        count = num_coalitions(len(self.modalities))
        muted = muted.reshape(count - 1, batch, *full.shape[1:])
        coalitions = torch.cat([muted, full.unsqueeze(0)], dim=0)
        mono = mono_outputs(coalitions, len(self.modalities))
        return ShapleyOutput(full, coalitions, mono, self.modalities)

    def _shapley_features(self, inputs: Mapping[str, Tensor], features: dict[str, Tensor]) -> ShapleyOutput:
        """Encoders once on the batch; muted modalities get the zero-sample feature (broadcast)."""
        batch = self._check_inputs(inputs)
        zeros = self.zero_features(inputs)
        full = self.fusion(features)
        muted_masks = range(full_coalition(len(self.modalities)))  # every mask but the full one
        stacked = {}
        for i, m in enumerate(self.modalities):
            real, zero = features[m], zeros[m].expand_as(features[m])
            stacked[m] = torch.cat([real if mask >> i & 1 else zero for mask in muted_masks], dim=0)
        with eval_mode(self.fusion):
            muted = self.fusion(stacked)
        return self._finish(full, muted, batch)

    def _shapley_inputs(self, inputs: Mapping[str, Tensor], features: dict[str, Tensor]) -> ShapleyOutput:
        """The paper code's semantics: the whole model re-run in eval mode on zeroed inputs."""
        batch = self._check_inputs(inputs)
        full = self.fusion(features)
        muted_masks = range(full_coalition(len(self.modalities)))
        stacked = {}
        for i, m in enumerate(self.modalities):
            real, zero = inputs[m], torch.zeros_like(inputs[m])
            stacked[m] = torch.cat([real if mask >> i & 1 else zero for mask in muted_masks], dim=0)
        with eval_mode(self):
            muted = self.fusion(self.encode(stacked))
        return self._finish(full, muted, batch)
