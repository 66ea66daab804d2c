"""A synthetic multimodal task with known ground truth, generated in memory from a seed.

Each modality carries the class through Gaussian clusters: ``x_m = μ_m[ỹ_m] + N(0, I)`` where
``ỹ_m`` is the true label, or with probability ``label_noise`` a uniformly random one. The
modality's informativeness is set by ``label_noise`` and ``separation`` (distance scale of the
class means); its learning speed by ``dim`` (the same separation spread over more dimensions
means a lower per-dimension signal-to-noise ratio, so gradient descent finds it later). The
defaults pair a fast, low-dimensional, noisy-label cue with a slow, high-dimensional, clean one:
joint training leans on the fast cue first and learns the more informative slow one later
(``recipes/synthetic_competition.yaml`` sets two equally informative cues learned at different
speeds, where joint training leaves the slow one under-trained).
Bayes accuracies (per modality and joint) are computed from the true generative model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import Tensor

from ..registry import DATASETS
from .base import DatasetSplits, TensorMultimodalDataset


@dataclass(frozen=True)
class ModalitySpec:
    """How one synthetic modality carries the label."""

    dim: int
    separation: float
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.separation < 0:
            raise ValueError(f"separation must be >= 0, got {self.separation}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")


DEFAULT_MODALITIES: dict[str, ModalitySpec] = {
    "fast": ModalitySpec(dim=4, separation=6.0, label_noise=0.4),
    "slow": ModalitySpec(dim=256, separation=3.5, label_noise=0.0),
}


class _Generator:
    def __init__(self, specs: Mapping[str, ModalitySpec], num_classes: int, seed: int) -> None:
        self.specs, self.num_classes = dict(specs), num_classes
        self.rng = torch.Generator().manual_seed(seed)
        self.means = {}
        for m, spec in self.specs.items():
            raw = torch.randn(num_classes, spec.dim, generator=self.rng)
            self.means[m] = raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12) * spec.separation

    def sample(self, n: int) -> tuple[dict[str, Tensor], Tensor]:
        labels = torch.randint(self.num_classes, (n,), generator=self.rng)
        inputs = {}
        for m, spec in self.specs.items():
            noisy = torch.rand(n, generator=self.rng) < spec.label_noise
            shown = torch.where(noisy, torch.randint(self.num_classes, (n,), generator=self.rng), labels)
            inputs[m] = self.means[m][shown] + torch.randn(n, spec.dim, generator=self.rng)
        return inputs, labels

    def log_likelihoods(self, m: str, x: Tensor) -> Tensor:
        """log p(x_m | y) for every class (N × C) under the label-noise mixture."""
        spec = self.specs[m]
        log_gauss = -0.5 * torch.cdist(x.double(), self.means[m].double()).pow(2)
        mixture = torch.logsumexp(log_gauss, dim=1, keepdim=True) - math.log(self.num_classes)
        if spec.label_noise == 0:
            return log_gauss
        if spec.label_noise == 1:
            return mixture.expand_as(log_gauss)
        return torch.logaddexp(log_gauss + math.log(1 - spec.label_noise), mixture + math.log(spec.label_noise))

    def bayes_accuracies(self, n: int) -> dict[str, float]:
        inputs, labels = self.sample(n)
        scores = {m: self.log_likelihoods(m, inputs[m]) for m in self.specs}
        result = {m: float((s.argmax(1) == labels).double().mean()) for m, s in scores.items()}
        result["joint"] = float((sum(scores.values()).argmax(1) == labels).double().mean())
        return result


@DATASETS.register("synthetic")
def synthetic(
    num_train: int = 4000, num_val: int = 1000, num_test: int = 2000, num_classes: int = 10,
    modalities: Mapping[str, Mapping[str, float] | ModalitySpec] | None = None, seed: int = 0,
    bayes_samples: int = 20000,
) -> DatasetSplits:
    """Build the synthetic task. ``modalities`` maps names to :class:`ModalitySpec` fields."""
    raw = DEFAULT_MODALITIES if modalities is None else modalities
    specs = {m: s if isinstance(s, ModalitySpec) else ModalitySpec(**s) for m, s in raw.items()}
    if len(specs) < 2:
        raise ValueError(f"the synthetic task needs at least 2 modalities, got {list(specs)}")
    for key, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                   ("bayes_samples", bayes_samples)):
        if n < 1:
            raise ValueError(f"{key} must be >= 1, got {n}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    gen = _Generator(specs, num_classes, seed)
    classes = [str(c) for c in range(num_classes)]
    parts = [TensorMultimodalDataset(*gen.sample(n), classes) for n in (num_train, num_val, num_test)]
    info = {"modalities": {m: asdict(s) for m, s in specs.items()}, "seed": seed,
            "bayes_accuracy": gen.bayes_accuracies(bayes_samples)}
    return DatasetSplits("synthetic", train=parts[0], val=parts[1], test=parts[2], info=info)
