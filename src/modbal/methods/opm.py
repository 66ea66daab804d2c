"""On-the-fly Prediction Modulation (OPM) and the journal's OGM (Wei, Hu, Du, Wen, TPAMI 2024,
"On-the-fly Modulation for Balanced Multimodal Learning").

Per step, as the authors' code (BML_TPAMI2024, ``Modality_drop`` and ``calcu_q``): each modality's
score is s_m = Σ_i softmax(o_m,i)[y_i] over the (global) batch; with ρ_m = s_m / mean_{k≠m} s_k
(M = 2: s_a/s_v) the dominant modality gets the drop probability
q_m = clip(q_base·(1 + λ·tanh(ρ_m − 1)), 0, 1) where ρ_m > 1, and q_m = 0 otherwise. With
probability p_exe the batch is modulated: each sample keeps modality m with probability 1 − q_m
(z_m,i ~ Bernoulli(1 − q_m)), and the fusion sees h_m,i·z_m,i / (1 − θ), θ = Σ_m d_m q_m / Σ_m d_m
(d_m the feature width). The loss is cross-entropy on the fused logits; evaluation never drops.

The original also removes samples whose every modality was dropped; that cannot happen (the
lowest-scoring modality has ρ ≤ 1, so q = 0 and it is always kept), so modbal has no such step.

OGM in the same code (``--use_modulation``) is OGM-GE's step (:class:`~modbal.methods.OGMGE`) with
the journal's warm-up and window, and OGM+ (``--use_OGM_plus``): the weaker modalities' gradients
multiplied by a constant instead of the dominant one's being reduced.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum, rank, unwrap, world_size
from ..model import eval_mode
from ..registry import METHODS
from .base import Method, at_least_float32, bind_modalities, check_window, coefficient_statistics, in_window
from .heads import check_scores, scores_heads
from .mmpareto import own_shapley_mono
from .ogm_ge import OGMGE, dominance_ratios, true_class_scores


# -- the formulas, as pure functions ---------------------------------------------------------
def drop_probabilities(ratios: Tensor, q_base: float, lam: float) -> Tensor:
    """q_m = clip(q_base·(1 + λ·tanh(relu(ρ_m − 1))), 0, 1) for the dominant modalities (ρ_m > 1),
    0 for the others."""
    boost = torch.tanh(torch.relu(ratios - 1))
    return torch.where(boost > 0, q_base * (1 + lam * boost), torch.zeros_like(ratios)).clamp(0.0, 1.0)


def drop_scale(q: Tensor, widths: Tensor) -> float:
    """1 / (1 − θ), θ = Σ_m d_m q_m / Σ_m d_m: the rescale of every feature after dropping."""
    theta = float((widths * q).sum() / widths.sum())
    return 1.0 / (1.0 - theta)


def scores_from_outputs(mono: Tensor, targets: Tensor) -> Tensor:
    """s_m = Σ_i softmax(o_m,i)[y_i] over the global batch (float64, CPU), from M × B × C outputs."""
    return all_reduce_sum(true_class_scores(mono, targets).double().sum(-1)).cpu()


# -- the method --------------------------------------------------------------------------------
@METHODS.register("opm")
class OPM(Method):
    """OPM on any :class:`~modbal.MultimodalModel` (it acts on features, so raw-input early fusion
    with identity encoders works too: it then drops input modalities).

    Args:
        q_base (float): base drop probability of the dominant modality, in [0, 1]. Default: 0.5
            (the authors' training script; their config default is 0.4).
        lam (float): λ, how much the dominance raises q (≥ 0). Default: 0.5.
        p_exe (float): probability that a batch is modulated at all, in [0, 1]. Default: 0.7.
        start_epoch, end_epoch (int): modulation window [start, end) in epochs (end None: to the
            end). Default start 6: the original warms up without dropping while epoch ≤ 5.
        scores (str): which o_m is scored: ``"auto"`` (the fusion's own heads where it has them,
            ``sum``: head_m(h_m), ``concat``: W_m·h_m + b/M as the original; Shapley mono-modal
            outputs otherwise), ``"heads"`` or ``"shapley"``. Scored on the unmasked features, with
            the fusion in eval mode and no gradient. Default: ``"auto"``.
        seed (int, optional): seed of the drop generator (CPU). None: rank 0's
            ``torch.initial_seed()`` at the first modulated step. Every rank draws the same stream
            (the batch decision, then the keep masks of the whole global batch) and takes its own
            shard's rows, so training under DDP equals training in one process.

    In a loop of your own, call ``method.on_epoch_start(epoch)`` before each epoch (the window and
    the warm-up count epochs).
    """

    name = "opm"

    def __init__(self, q_base: float = 0.5, lam: float = 0.5, p_exe: float = 0.7, start_epoch: int = 6,
                 end_epoch: int | None = None, scores: str = "auto", seed: int | None = None) -> None:
        for key, value, upper in (("q_base", q_base, 1.0), ("p_exe", p_exe, 1.0), ("lam", lam, math.inf)):
            if not (isinstance(value, (int, float)) and 0 <= value <= upper and math.isfinite(value)):
                raise ValueError(f"Invalid {key}: {value} (must be a number in [0, {upper}])")
        check_window(start_epoch, end_epoch)
        check_scores(scores)
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int >= 0 or None)")
        self.q_base, self.lam, self.p_exe = float(q_base), float(lam), float(p_exe)
        self.start_epoch, self.end_epoch, self.scores, self.seed = start_epoch, end_epoch, scores, seed
        self._modalities: tuple[str, ...] | None = None
        self._epoch = 0
        self._generator: torch.Generator | None = None
        self._pending: Tensor | None = None  # a generator state loaded before the first draw
        self._resolved_seed = seed
        self._stats: dict[str, float] = {}

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        inner = unwrap(model)
        self._modalities = bind_modalities(self._modalities, inner.modalities, "OPM")
        if not in_window(self._epoch, self.start_epoch, self.end_epoch):
            self._stats = {"executed": 0.0}
            return F.cross_entropy(at_least_float32(model(inputs)), targets)
        use_heads = scores_heads(self.scores, model, "OPM")

        def modulate(_fusion: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            handle.remove()  # once: scoring with Shapley outputs calls the fusion again
            return (self._drop(inner, args[0], inputs, targets, use_heads),)

        handle = inner.fusion.register_forward_pre_hook(modulate)
        try:
            logits = model(inputs)  # one forward through any DDP wrapper; the hook masks the features
        finally:
            handle.remove()
        return F.cross_entropy(at_least_float32(logits), targets)

    def _drop(self, inner: nn.Module, features: dict[str, Tensor], inputs: Mapping[str, Tensor], targets: Tensor,
              use_heads: bool) -> dict[str, Tensor]:
        names = inner.modalities
        with torch.no_grad(), eval_mode(inner.fusion):
            detached = {m: f.detach() for m, f in features.items()}
            if use_heads:
                heads = inner.fusion.mono_logits(detached)
                mono = torch.stack([heads[m] for m in names])
            else:
                mono = own_shapley_mono(inner, detached, inner.zero_features(inputs))
        scores = scores_from_outputs(mono, targets)
        ratios = dominance_ratios(scores)
        q = drop_probabilities(ratios, self.q_base, self.lam)
        gen = self._rng(targets.device)
        executed = bool(torch.rand((), generator=gen, dtype=torch.float64) < self.p_exe)
        self._stats = {"executed": float(executed)}
        for i, m in enumerate(names):
            self._stats.update({f"score/{m}": float(scores[i]), f"ratio/{m}": float(ratios[i]), f"q/{m}": float(q[i]),
                                f"kept/{m}": 1.0})
        if not executed:
            return features
        local = targets.shape[0]  # equal on every rank: the runner's sampler shards the global batch contiguously
        table = torch.rand((local * world_size(), len(names)), generator=gen, dtype=torch.float64)
        kept = table < (1 - q)
        keep = kept[rank() * local:(rank() + 1) * local]
        widths = torch.tensor([float(math.prod(features[m].shape[1:])) for m in names], dtype=torch.float64)
        scale = drop_scale(q, widths)
        out = {}
        for i, m in enumerate(names):
            f = features[m]
            mask = keep[:, i].to(device=f.device, dtype=f.dtype).view(-1, *([1] * (f.dim() - 1)))
            out[m] = f * mask * scale
            self._stats[f"kept/{m}"] = float(kept[:, i].double().mean())  # over the global batch
        return out

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            if self._resolved_seed is None:
                mine = torch.initial_seed() % (1 << 62) if rank() == 0 else 0
                self._resolved_seed = int(all_reduce_sum(torch.tensor([mine], dtype=torch.int64, device=device)))
            self._generator = torch.Generator()
            if self._pending is not None:
                self._generator.set_state(self._pending)
                self._pending = None
            else:
                self._generator.manual_seed(self._resolved_seed)
        return self._generator

    # -- bookkeeping ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        generator = self._generator.get_state() if self._generator is not None else self._pending
        return {"modalities": list(self._modalities) if self._modalities else None, "epoch": self._epoch,
                "seed": self._resolved_seed, "generator": generator}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "epoch", "seed", "generator"}
        if set(state) != expected:
            raise ValueError(f"OPM state must have keys {sorted(expected)}, got {sorted(state)}")
        self._modalities = tuple(state["modalities"]) if state["modalities"] else None
        self._epoch = int(state["epoch"])
        self._resolved_seed = None if state["seed"] is None else int(state["seed"])
        self._generator = None
        self._pending = None if state["generator"] is None else state["generator"].detach().cpu().clone()


@METHODS.register("ogm")
class OGM(OGMGE):
    """OGM as the TPAMI 2024 code runs it: OGM-GE's scores, coefficient k_m = 1 − tanh(α·ρ_m) for the
    dominant modality and gradient noise on the encoders' weight tensors, after a warm-up.

    Args:
        alpha (float): α. Default: 0.8 (the authors' ``train_ogm.sh``).
        start_epoch, end_epoch (int): modulation window [start, end) in 0-based epochs. Default 6
            and 61: the code skips epochs ≤ 5 (warm-up) and its script modulates epochs 0–60.
        boost (float, optional): OGM+: leave the dominant modality alone and multiply the
            gradients of the others (ρ_m < 1) by ``boost`` (the code: 4). Default: None (OGM).
        ge, variant, params, scores, muting, seed: as :class:`~modbal.methods.OGMGE` (the
            journal's default ``--modulation OGM_GE`` adds the noise: ``ge=True``).
    """

    name = "ogm"
    acts_on_encoders = True

    def __init__(self, alpha: float = 0.8, ge: bool = True, variant: str = "original", start_epoch: int = 6,
                 end_epoch: int | None = 61, boost: float | None = None, params: str = "weights",
                 scores: str = "auto", muting: str = "features", seed: int | None = None) -> None:
        super().__init__(alpha=alpha, ge=ge, variant=variant, start_epoch=start_epoch, end_epoch=end_epoch,
                         params=params, scores=scores, muting=muting, seed=seed)
        if boost is not None and not (isinstance(boost, (int, float)) and boost > 0 and math.isfinite(boost)):
            raise ValueError(f"Invalid boost: {boost!r} (must be a finite number > 0, or None)")
        self.boost = None if boost is None else float(boost)

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        loss = super().loss(model, inputs, targets)
        if self.boost is not None and self._coefficients is not None:
            names = self._modalities or ()
            ratios = torch.tensor([self._stats[f"ratio/{m}"] for m in names], dtype=torch.float64)
            self._coefficients = plus_coefficients(ratios, self.boost)
            self._stats.update(coefficient_statistics(dict(zip(names, self._coefficients.tolist()))))
        return loss


def plus_coefficients(ratios: Tensor, boost: float) -> Tensor:
    """OGM+: ``boost`` for the modalities behind (ρ_m < 1), 1 for the others."""
    return torch.where(ratios < 1, torch.full_like(ratios, boost), torch.ones_like(ratios))
