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

#: sample level: copies per sample by its values; modality level: copies of the weakest modality
LEVELS = ("sample", "modality")
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


def modality_level_examples(phi: Tensor, alpha: float, part_ratio: float, generator: torch.Generator) -> Examples:
    """Every sample once, then int(d·N) random samples (with replacement) keeping only the modality
    with the largest gap g_m = 1 − mean φ_m over a random part of the samples (int(N·part_ratio),
    with replacement), d = (max g − min g)·2/3·α; on a tie the last such modality."""
    n = len(phi)
    part = torch.randint(n, (max(1, int(n * part_ratio)),), generator=generator)
    gaps = 1.0 - phi[part].nanmean(0)
    difference = float(gaps.max() - gaps.min()) / 3 * 2 * alpha
    choice = torch.randint(n, (int(difference * n),), generator=generator)
    low = len(gaps) - 1 - int(torch.argmax(gaps.flip(0)))
    return Examples(torch.cat([torch.arange(n), choice]),
                    torch.cat([torch.zeros(n, dtype=torch.long), torch.full_like(choice, low + 1)]))


# -- the method --------------------------------------------------------------------------------
@METHODS.register("valuation")
class Valuation(Method):
    """Sample-level valuation and re-sampling of the training set.

    Args:
        warmup (int): epochs of plain training before the first valuation (>= 1). Default 5.
        full_value (float): v(all modalities) of a right fused prediction. Default 2 (the released
            value, which makes φ ≥ 1, i.e. no copies, whenever the fused prediction and the
            modality alone are right); 1 is the plain game.
        level (str): ``sample`` (default: copies per sample by its own values) or ``modality``
            (the paper's modality-level variant: int(d·N) random copies keeping the modality that
            contributes least on average, d = (max gap − min gap)·2/3·α).
        alpha (float): α of the modality level. Default 1.
        part_ratio (float): the share of samples (drawn with replacement) whose values the modality
            level averages. Default 0.2.
        seed (int): seeds the modality level's draws (with the epoch), the same on every rank.

    The training set is re-sampled through the runner's sampler (``train_examples``): each epoch
    after the warm-up has N + (extra copies) examples, permuted and sharded like the plain set.
    Statistics: ``value/<m>`` (the mean φ_m of the last valuation) and ``examples`` (the number of
    training examples of the epoch).
    """

    name = "valuation"
    resamples = True

    def __init__(self, warmup: int = 5, full_value: float = 2.0, level: str = "sample", alpha: float = 1.0,
                 part_ratio: float = 0.2, seed: int = 0) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"Invalid warmup: {warmup!r} (must be an integer >= 1)")
        if isinstance(full_value, bool) or not isinstance(full_value, (int, float)) or not math.isfinite(full_value):
            raise ValueError(f"Invalid full_value: {full_value!r} (must be a finite number)")
        if level not in LEVELS:
            raise ValueError(f"Invalid level {level!r}; allowed values: {', '.join(LEVELS)}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
            raise ValueError(f"Invalid alpha: {alpha!r} (must be a finite number >= 0)")
        if isinstance(part_ratio, bool) or not isinstance(part_ratio, (int, float)) or not 0 < part_ratio <= 1:
            raise ValueError(f"Invalid part_ratio: {part_ratio!r} (must be in (0, 1])")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r} (must be an integer)")
        self.warmup, self.full_value = warmup, float(full_value)
        self.level, self.alpha, self.part_ratio, self.seed = level, float(alpha), float(part_ratio), seed
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
        if self.level == "sample":
            examples = resampled_examples(self.values)
        else:
            valued = self.values.isnan().any(1).logical_not()
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            examples = modality_level_examples(self.values[valued], self.alpha, self.part_ratio, generator)
            examples.indices = valued.nonzero().flatten()[examples.indices]
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
