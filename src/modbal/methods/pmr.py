"""Prototypical Modal Rebalance (PMR; Fan et al., CVPR 2023).

Before each epoch, class prototypes c_m^k (the mean encoder feature of modality m over the
training samples of class k) are computed in eval mode, without gradients, from the first
``fraction`` of the training loader's batches, and blended with the previous ones,
c ← (1 − μ)·c_new + μ·c_old. Per step, s_m = −‖h_m − c_m^k‖₂ (B × C, one batched distance call)
gives a prototype cross-entropy PCE_m = CE(s_m, y) (prototypes are constants, so it trains the
encoder only) and a prototype score S_m = Σ_i softmax(s_m)_i[y_i]. A modality whose score is below
the others', ρ_m = S_m / mean_{k≠m} S_k < 1, gets the weight α; the others 0:

    L = CE(f(x), y) + Σ_m β_m·PCE_m,    β_m = α if ρ_m < 1 else 0

For M = 2 this is the released code exactly (ρ_a = S_a / S_v; only the weaker modality's prototype
loss is on, none at ρ = 1); for M > 2 it is the natural generalisation (the same ratio the
OGM-GE method in modbal uses).

Where modbal differs from the released code (each as documented in docs/methods.md):
- a class absent from the prototype batches keeps its previous prototype; one never seen yet is
  left out of the distances, and samples of it out of PCE and S (the code divides by zero → NaN);
- distances by ``torch.cdist`` (exact mode), whose gradient is 0 at distance 0 (the code's
  sqrt(dot) gives NaN there, e.g. for a class with one prototype sample at an epoch's first step);
- the modulation window is [start_epoch, end_epoch) as elsewhere in modbal (``--modulation_ends``
  is inclusive);
- features with token or map axes are mean-pooled to one vector per sample.
The EMA follows the code's schedule: the prototypes before epochs 0 and 1 are fresh, the EMA applies
from epoch 2 on (the code passes ``epoch = 0`` to its post-epoch computation after epoch 0).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt import protocol_forward
from ..distributed import all_reduce_sum, unwrap, world_size
from ..model import eval_mode
from ..registry import METHODS
from .base import (
    Coefficient,
    EpochData,
    Method,
    at_least_float32,
    bind_modalities,
    check_window,
    coefficient_statistics,
    in_window,
    pool_feature,
    require_encoder_parameters,
)
from .ogm_ge import dominance_ratios


# -- the formulas, as pure functions ---------------------------------------------------------
def prototype_logits(features: Tensor, prototypes: Tensor, known: Tensor) -> Tensor:
    """s = −‖h − c_k‖₂ for every sample and class (B × C); classes without a prototype get −inf."""
    dist = torch.cdist(at_least_float32(features), prototypes.to(at_least_float32(features).dtype),
                       compute_mode="donot_use_mm_for_euclid_dist")
    return (-dist).masked_fill(~known, float("-inf"))


def class_sums(features: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class feature sums (C × D) and sample counts (C)."""
    sums = torch.zeros(num_classes, features.shape[-1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, targets, features.double())
    counts = torch.bincount(targets, minlength=num_classes).double()
    return sums, counts


def update_prototypes(sums: Tensor, counts: Tensor, old: Tensor | None, old_known: Tensor | None,
                      momentum: float, blend: bool) -> tuple[Tensor, Tensor]:
    """New prototypes and which classes have one: the class means, blended as (1 − μ)·new + μ·old
    when ``blend`` and an old prototype exists; a class without samples keeps its old prototype."""
    seen = counts > 0
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    if old is None:
        return torch.where(seen.unsqueeze(-1), means, torch.zeros_like(means)), seen
    old = old.to(means)
    mixed = (1 - momentum) * means + momentum * old if blend else means
    mixed = torch.where((seen & old_known).unsqueeze(-1), mixed, means)
    out = torch.where(seen.unsqueeze(-1), mixed, old)
    return out, seen | old_known


def prototype_coefficients(ratios: Tensor, alpha: float) -> Tensor:
    """β_m = α where ρ_m < 1 (the weaker modality), else 0."""
    return torch.where(ratios < 1, torch.full_like(ratios, alpha), torch.zeros_like(ratios))


# -- the method --------------------------------------------------------------------------------
@METHODS.register("pmr")
class PMR(Method):
    """PMR on any :class:`~modbal.MultimodalModel` whose encoders have parameters.

    Args:
        alpha (float): α, the weight of the weaker modality's prototype loss (>= 0). Default: 1.0
            (the code's default; its scripts use 0.5–3).
        momentum (float): μ of the prototype EMA, in [0, 1). Default: 0.2 (the code's default).
        fraction (float): share of the training loader's batches the prototypes are computed from
            (the first ones of the epoch's order; at least one batch). Default: 0.1 (the code).
        start_epoch, end_epoch (int): the window [start, end) in which the prototype loss is on
            (end None: to the end). Prototypes are computed every epoch regardless.

    Needs ``method.before_epoch(model, EpochData(epoch, train_loader))`` before each epoch (the
    runner calls it). Statistics: ``proto_score/<m>``, ``proto_ratio/<m>``, ``beta/<m>``,
    ``proto_loss/<m>``, ``coef/<m>`` (= β_m).
    """

    name = "pmr"
    acts_on_encoders = True
    coefficient = Coefficient("β_m, the weight of modality m's prototype cross-entropy added to the loss "
                              "(also logged as beta/<m>)", neutral=0.0)

    def __init__(self, alpha: float = 1.0, momentum: float = 0.2, fraction: float = 0.1,
                 start_epoch: int = 0, end_epoch: int | None = None) -> None:
        if not (isinstance(alpha, (int, float)) and alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"Invalid alpha: {alpha!r} (must be a finite number >= 0)")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"Invalid momentum: {momentum!r} (must be in [0, 1))")
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"Invalid fraction: {fraction!r} (must be in (0, 1])")
        check_window(start_epoch, end_epoch)
        self.alpha, self.momentum, self.fraction = float(alpha), float(momentum), float(fraction)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self._modalities: tuple[str, ...] | None = None
        self._prototypes: dict[str, Tensor] = {}
        self._known: dict[str, Tensor] = {}
        self._epoch = 0
        self._stats: dict[str, float] = {}

    # -- loop hooks -----------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        require_encoder_parameters(model, "PMR")

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch

    @torch.no_grad()
    def before_epoch(self, model: nn.Module, data: EpochData) -> None:
        inner = unwrap(model)
        require_encoder_parameters(inner, "PMR")
        self._modalities = bind_modalities(self._modalities, inner.modalities, "PMR")
        num_classes = getattr(inner.fusion, "num_classes", None)
        if not isinstance(num_classes, int):
            raise ValueError(f"PMR sizes its class prototypes from the fusion's num_classes; "
                             f"{type(inner.fusion).__name__} lacks it (set it)")
        limit = None
        if hasattr(data.train_loader, "__len__"):
            limit = max(1, math.floor(len(data.train_loader) * self.fraction + 1e-9))
        sums: dict[str, Tensor] = {}
        counts: Tensor | None = None
        with eval_mode(inner):
            for inputs, targets in data.batches(data.train_loader, limit):
                features = inner.encode(inputs)
                for m in inner.modalities:
                    s, c = class_sums(pool_feature(features[m]), targets, num_classes)
                    sums[m] = sums[m] + s if m in sums else s
                counts = c if counts is None else counts + c
        if counts is None:
            raise ValueError("PMR: the training loader yielded no batches for the prototypes")
        # one all-reduce for every modality's sums and the counts
        flat = all_reduce_sum(torch.cat([*(sums[m].flatten() for m in inner.modalities), counts]))
        parts = flat.split([*(sums[m].numel() for m in inner.modalities), num_classes])
        counts = parts[-1]
        blend = data.epoch >= 2
        dtype = at_least_float32(next(inner.parameters())).dtype  # the features' precision, at least float32
        for i, m in enumerate(inner.modalities):
            s = parts[i].view_as(sums[m])
            proto, known = update_prototypes(s, counts, self._prototypes.get(m), self._known.get(m),
                                             self.momentum, blend)
            self._prototypes[m], self._known[m] = proto.to(dtype), known

    def in_window(self) -> bool:
        return in_window(self._epoch, self.start_epoch, self.end_epoch)

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        inner = unwrap(model)
        if not self._prototypes:
            raise RuntimeError("PMR has no prototypes yet: call method.before_epoch(model, EpochData(epoch, "
                               "train_loader)) before each epoch (the runner does)")
        self._modalities = bind_modalities(self._modalities, inner.modalities, "PMR")
        logits, features = protocol_forward(model, inputs, aux=lambda f: f)
        loss = F.cross_entropy(at_least_float32(logits), targets)
        names = inner.modalities
        ce_sums, reduced = [], []
        for m in names:
            known = self._known[m].to(targets.device)
            sim = prototype_logits(pool_feature(features[m]), self._prototypes[m].to(targets.device), known)
            valid = known[targets]
            ce_sums.append(F.cross_entropy(sim[valid], targets[valid], reduction="sum"))
            prob = torch.softmax(sim.detach(), -1).gather(-1, targets.view(-1, 1)).squeeze(-1)
            score = torch.where(valid, prob, torch.zeros_like(prob)).double().sum()
            reduced.append(torch.stack([score, ce_sums[-1].detach().double(), valid.double().sum()]))
        # one all-reduce: the global batch's scores S_m, prototype-loss sums and sample counts
        totals = all_reduce_sum(torch.stack(reduced)).cpu()
        scores, counts = totals[:, 0], totals[:, 2].clamp_min(1)
        ratios = dominance_ratios(scores)
        betas = prototype_coefficients(ratios, self.alpha) if self.in_window() else torch.zeros_like(ratios)
        share = world_size()  # each rank's sum over the global count: DDP's average is the global mean
        for i in range(len(names)):
            if float(betas[i]) != 0.0:
                loss = loss + float(betas[i]) * ce_sums[i] * (share / float(counts[i]))
        self._stats = {}
        for i, m in enumerate(names):
            self._stats.update({f"proto_score/{m}": float(scores[i]), f"proto_ratio/{m}": float(ratios[i]),
                                f"beta/{m}": float(betas[i]), f"proto_loss/{m}": float(totals[i, 1] / counts[i])})
        self._stats.update(coefficient_statistics({m: float(betas[i]) for i, m in enumerate(names)}))
        return loss

    # -- bookkeeping ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def prototypes(self) -> dict[str, Tensor]:
        """The current prototypes (C × D per modality; rows of classes never seen are zeros)."""
        return {m: p.clone() for m, p in self._prototypes.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"modalities": list(self._modalities) if self._modalities else None, "epoch": self._epoch,
                "prototypes": {m: p.detach().cpu().clone() for m, p in self._prototypes.items()},
                "known": {m: k.detach().cpu().clone() for m, k in self._known.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "epoch", "prototypes", "known"}
        if set(state) != expected:
            raise ValueError(f"PMR state must have keys {sorted(expected)}, got {sorted(state)}")
        if set(state["prototypes"]) != set(state["known"]):
            raise ValueError(f"PMR state: prototypes for {sorted(state['prototypes'])} but known classes "
                             f"for {sorted(state['known'])}")
        self._modalities = tuple(state["modalities"]) if state["modalities"] else None
        self._epoch = int(state["epoch"])
        self._prototypes = {m: torch.as_tensor(p).clone() for m, p in state["prototypes"].items()}
        self._known = {m: torch.as_tensor(k).bool().clone() for m, k in state["known"].items()}
