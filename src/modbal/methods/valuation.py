"""Sample-level modality valuation (Wei, Feng, Yang, Hu, CVPR 2024): re-sample what each modality misses.

After a warm-up, before every epoch each training sample's modalities are valued in eval mode: a
coalition S of modalities is worth v(S) = 1 when the fused prediction with the other modalities'
features zeroed is right (the full set is worth ``full_value`` = 2 when right, as released; the
empty set 0), and φ_m is modality m's Shapley value. The epoch then trains on every sample once plus
extra copies of sample i that keep modality m alone (the others' features zeroed): 3 copies when
φ_m < −0.1, 2 when −0.1 < φ_m < 0.4, 1 when 0.4 < φ_m < 1, none otherwise, so each modality gets
more practice where it contributes little.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum, unwrap
from ..model import eval_mode
from ..registry import METHODS
from .base import EXAMPLE_TAG, EpochData, Examples, Method, at_least_float32

#: (lower, upper, copies): the released thresholds, strict on both sides
COPIES = ((-math.inf, -0.1, 3), (-0.1, 0.4, 2), (0.4, 1.0, 1))


# -- the formulas, as pure functions ---------------------------------------------------------
def keep_only(features: Mapping[str, Tensor], keep: Tensor, modalities: tuple[str, ...]) -> dict[str, Tensor]:
    """``features`` with modality i's rows zeroed where ``keep`` (B × M booleans) is False."""
    out = {}
    for i, m in enumerate(modalities):
        mask = keep[:, i].view(-1, *([1] * (features[m].dim() - 1)))
        out[m] = torch.where(mask, features[m], torch.zeros_like(features[m]))
    return out


def shapley_values(values: Tensor) -> Tensor:
    """Exact Shapley values (M × B) of the games ``values`` (2^M × B, index = coalition bitmask)."""
    count = values.shape[0].bit_length() - 1
    out = values.new_zeros(count, values.shape[1])
    for m in range(count):
        for mask in range(values.shape[0]):
            if mask >> m & 1:
                continue
            size = bin(mask).count("1")
            weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
            out[m] += weight * (values[mask | 1 << m] - values[mask])
    return out


def extra_copies(phi: Tensor) -> Tensor:
    """The number of extra copies for each value in ``phi`` (released thresholds; NaN: none)."""
    out = torch.zeros_like(phi, dtype=torch.long)
    for low, high, copies in COPIES:
        out[(phi > low) & (phi < high)] = copies
    return out


def resampled_examples(phi: Tensor) -> Examples:
    """Every sample once (tag 0), then for each sample i and modality m its extra copies keeping m
    alone (tag m + 1), in the released dataset's order."""
    copies = extra_copies(phi)  # N × M
    indices, tags = [torch.arange(len(phi))], [torch.zeros(len(phi), dtype=torch.long)]
    per_sample = copies.sum(1)
    if per_sample.sum() > 0:
        modality = torch.arange(phi.shape[1]).expand_as(copies)
        indices.append(torch.arange(len(phi)).repeat_interleave(per_sample))
        tags.append((modality + 1).flatten().repeat_interleave(copies.flatten()))
    return Examples(torch.cat(indices), torch.cat(tags))


# -- the method --------------------------------------------------------------------------------
@METHODS.register("valuation")
class Valuation(Method):
    """Sample-level valuation and re-sampling of the training set.

    Args:
        warmup (int): epochs of plain training before the first valuation (>= 1). Default 5.
        full_value (float): v(all modalities) of a right fused prediction. Default 2 (the released
            value, which makes φ ≥ 1, i.e. no copies, whenever the fused prediction and the
            modality alone are right); 1 is the plain game.

    The training set is re-sampled through the runner's sampler (``train_examples``): each epoch
    after the warm-up has N + (extra copies) examples, permuted and sharded like the plain set.
    Statistics: ``value/<m>`` (the mean φ_m of the last valuation) and ``examples`` (the number of
    training examples of the epoch).
    """

    name = "valuation"
    resamples = True

    def __init__(self, warmup: int = 5, full_value: float = 2.0) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"Invalid warmup: {warmup!r} (must be an integer >= 1)")
        if isinstance(full_value, bool) or not isinstance(full_value, (int, float)) or not math.isfinite(full_value):
            raise ValueError(f"Invalid full_value: {full_value!r} (must be a finite number)")
        self.warmup, self.full_value = warmup, float(full_value)
        self.values: Tensor | None = None   # φ, N × M, of the last valuation (NaN: not valued)
        self._stats: dict[str, float] = {}

    def before_epoch(self, model: nn.Module, data: EpochData) -> None:
        if data.epoch < self.warmup:
            self.values = None
            return
        self.values = self.valuate(model, data)
        inner = unwrap(model)
        valued = self.values[~self.values.isnan().any(1)]
        self._stats = {f"value/{m}": float(valued[:, i].mean()) if len(valued) else math.nan
                       for i, m in enumerate(inner.modalities)}

    def valuate(self, model: nn.Module, data: EpochData) -> Tensor:
        """φ (N × M) of every training sample, from one eval-mode pass over the training loader
        (each rank its share; summed over ranks)."""
        from ..train.data import loader_batch_indices  # the training package imports this module

        inner = unwrap(model)
        names = inner.modalities
        if not hasattr(getattr(data.train_loader, "batch_sampler", None), "indices_of"):
            raise ValueError(f"{self.name} values each training sample, so its training loader's batch sampler must "
                             f"tell the sample numbers (modbal.train.data.ShardedBatchSampler)")
        size = len(data.train_loader.dataset)
        sums = torch.zeros(size, len(names) + 1, dtype=torch.float64)
        masks = torch.tensor([[mask >> i & 1 for i in range(len(names))] for mask in range(1 << len(names))],
                             dtype=torch.bool)
        with torch.no_grad(), eval_mode(inner):
            for number, (inputs, targets) in enumerate(data.batches(data.train_loader)):
                rows = loader_batch_indices(data.train_loader, number)
                inputs = {m: x for m, x in inputs.items() if m != EXAMPLE_TAG}
                features = inner.encode(inputs)
                values = [torch.zeros_like(targets, dtype=torch.float64)]  # v(∅) = 0
                for mask in range(1, 1 << len(names)):
                    keep = masks[mask].to(targets.device).expand(len(targets), -1)
                    right = (inner.fusion(keep_only(features, keep, names)).argmax(-1) == targets).double()
                    values.append(right * (self.full_value if mask == len(masks) - 1 else 1.0))
                phi = shapley_values(torch.stack(values)).T.cpu()
                sums[rows, :-1] += phi
                sums[rows, -1] += 1
        sums = all_reduce_sum(sums.to(data.device or "cpu")).cpu()
        count = sums[:, -1:]
        return torch.where(count > 0, sums[:, :-1] / count.clamp(min=1), torch.full_like(sums[:, :-1], math.nan))

    def train_examples(self, epoch: int) -> Examples | None:
        if epoch < self.warmup or self.values is None:
            return None
        examples = resampled_examples(self.values)
        self._stats["examples"] = float(len(examples.indices))
        return examples

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        inputs = dict(inputs)
        tags = inputs.pop(EXAMPLE_TAG, None)
        if tags is None:  # a loader without re-sampling (warm-up in a plain loop)
            return F.cross_entropy(at_least_float32(model(inputs)), targets)
        inner = unwrap(model)
        names = inner.modalities
        # tag m + 1 keeps modality m alone; the fusion runs on the muted features inside the forward
        keep = (tags.view(-1, 1) == 0) | (tags.view(-1, 1) == torch.arange(1, len(names) + 1, device=tags.device))
        _, logits = model(inputs, aux=lambda features: inner.fusion(keep_only(features, keep, names)))
        return F.cross_entropy(at_least_float32(logits), targets)

    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values, "stats": dict(self._stats)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"values", "stats"})
        values = state.get("values")
        if unknown or (values is not None and (not isinstance(values, Tensor) or values.dim() != 2)):
            raise ValueError(f"{self.name} state must be {{'values': N × M tensor or None, 'stats'}}, "
                             f"got keys {sorted(state)}")
        self.values = None if values is None else values.clone()
        self._stats = dict(state.get("stats", {}))
