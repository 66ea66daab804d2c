"""On-the-fly Gradient Modulation with Generalization Enhancement (OGM-GE; Peng et al., CVPR 2022).

Per step, as the authors' code: each modality's score is the sum over the (global) batch of the
softmax probability of the true class under its own output, s_m = Σ_i softmax(o_m,i)[y_i]; the
ratio ρ_m = s_m / mean_{k≠m} s_k (M = 2: ρ_a = s_a/s_v, the paper's ratio) marks the dominant
modality (ρ_m > 1). After backward, inside the modulation window, the gradient g of each selected
encoder parameter becomes k_m·g + N(0, (std(g) + 1e-8)²) (std of the gradient before scaling;
the noise is the generalization enhancement), with Eq. (10) as the code computes it:
k_m = 1 − tanh(α·ρ_m) for the dominant modality, 1 otherwise. The loss is plain cross-entropy on
the fused logits, so forward values equal joint training's.

The scored output o_m is the modality's own head where the fusion has one (``sum``: head_m(h_m);
``concat``: W_m·h_m + b/M, the original scoring), and the exact Shapley mono-modal output of the
model protocol for every other fusion. Selected parameters: encoder weight tensors (2 dims or
more), the original's conv-weights-only rule generalised; ``params="all"`` takes every encoder
parameter. Encoder parameters are ``unwrap(model).encoders[m]``; the fusion is never scaled.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt import shapley_forward
from ..distributed import all_reduce_sum, rank, unwrap
from ..registry import METHODS
from .base import (
    Coefficient,
    Method,
    at_least_float32,
    bind_modalities,
    check_window,
    coefficient_statistics,
    in_window,
    require_encoder_parameters,
)
from .heads import capture_fusion_features, check_scores, scores_heads

VARIANTS = ("original", "smooth")
#: names of earlier releases, refused with a pointer to the new one
RENAMED = {"paper": "smooth", "code": "original"}
PARAMS = ("weights", "all")


# -- the formulas, as pure functions ---------------------------------------------------------
def true_class_scores(mono: Tensor, targets: Tensor) -> Tensor:
    """Per-sample softmax probability of the true class for each mono-modal output (M × B)."""
    probs = torch.softmax(at_least_float32(mono), dim=-1)
    index = targets.view(1, -1, 1).expand(mono.shape[0], -1, 1)
    return probs.gather(-1, index).squeeze(-1)


def dominance_ratios(scores: Tensor, floor: float = 1e-12) -> Tensor:
    """ρ_m = s_m / mean_{k≠m} s_k (M = 2: ρ_a = s_a / s_v and ρ_v = 1 / ρ_a)."""
    m = scores.shape[0]
    others = (scores.sum() - scores) / (m - 1)
    return scores / others.clamp_min(floor)


def ogm_coefficients(ratios: Tensor, alpha: float, variant: str = "original") -> Tensor:
    """Gradient coefficients k_m for ratios ρ_m.

    ``"original"``: k = 1 − tanh(α·ρ) where ρ > 1, else 1: Eq. (10) as the authors' code computes
    it (written there 1 − tanh(α·relu(ρ))); k jumps from 1 to 1 − tanh(α) as ρ crosses 1.
    ``"smooth"``: k = 1 − tanh(α·relu(ρ − 1)), modbal's continuous variant (1 at balance); it
    suppresses far less at the same α (0.90 against 0.46 at ρ = 1.2, α = 0.5).
    """
    check_variant(variant)
    if variant == "original":
        return torch.where(ratios > 1, 1 - torch.tanh(alpha * ratios), torch.ones_like(ratios))
    return 1 - torch.tanh(alpha * torch.relu(ratios - 1))


def check_variant(variant: str) -> None:
    if variant in RENAMED:
        raise ValueError(f"OGM-GE variant {variant!r} was renamed {RENAMED[variant]!r} ('original': the authors' "
                         f"1 − tanh(α·ρ) for the dominant modality, the default; 'smooth': 1 − tanh(α·relu(ρ − 1)))")
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant {variant!r}; allowed values: {', '.join(VARIANTS)}")


def gradient_noise_std(grad: Tensor) -> float:
    """Standard deviation of the generalization-enhancement noise for one gradient tensor, as the
    original: std(grad) + 1e-8 (unbiased std; taken as 0 for a single element)."""
    std = float(grad.float().std()) if grad.numel() > 1 else 0.0
    return (std if math.isfinite(std) else 0.0) + 1e-8


def selected(p: nn.Parameter, params: str) -> bool:
    """Whether OGM-GE modulates encoder parameter ``p``: weight tensors (2+ dims) or all."""
    return params == "all" or p.dim() >= 2


# -- the method --------------------------------------------------------------------------------
@METHODS.register("ogm_ge")
class OGMGE(Method):
    """OGM-GE on any :class:`~modbal.MultimodalModel`.

    Args:
        alpha (float): modulation strength α (> 0). Default: 0.5.
        ge (bool): generalization enhancement (Gaussian gradient noise). Default: True.
        variant (str): ``"original"`` (1 − tanh(α·ρ) for the dominant modality, the authors'
            code) or ``"smooth"`` (1 − tanh(α·relu(ρ − 1)), modbal's continuous variant).
            Default: ``"original"``.
        start_epoch, end_epoch (int): modulation window [start, end) in 0-based epochs (end None:
            to the end). The original's inclusive ``modulation_starts <= epoch <= modulation_ends``
            is ``start_epoch=starts, end_epoch=ends + 1``. Outside it gradients are untouched.
        params (str): ``"weights"`` (encoder parameters with 2 or more dims: conv and linear
            weights, the original's conv-weights-only rule) or ``"all"`` (every encoder
            parameter, biases and normalisation included). Default: ``"weights"``.
        scores (str): ``"auto"`` (the fusion's own heads where it has them, else Shapley),
            ``"heads"`` or ``"shapley"``. Default: ``"auto"``.
        muting (str): muting mode for Shapley scores (``"features"`` or ``"inputs"``).
        seed (int, optional): seed of the noise generators. None: rank 0's ``torch.initial_seed()``
            at the first noisy step (so the global seed makes runs reproducible). Every rank uses
            the same seed: DDP gradients are identical across ranks after backward, and so is the
            noise, so replicas never drift apart.
    """

    name = "ogm_ge"
    acts_on_encoders = True
    coefficient = Coefficient("k_m, the multiplier of modality m's encoder gradient (1 outside the window)")

    def __init__(self, alpha: float = 0.5, ge: bool = True, variant: str = "original",
                 start_epoch: int = 0, end_epoch: int | None = None, params: str = "weights",
                 scores: str = "auto", muting: str = "features", seed: int | None = None) -> None:
        if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"Invalid alpha: {alpha} (must be a finite number > 0)")
        check_variant(variant)
        check_window(start_epoch, end_epoch)
        if params not in PARAMS:
            raise ValueError(f"Invalid params {params!r}; allowed values: {', '.join(PARAMS)}")
        check_scores(scores)
        if muting not in ("features", "inputs"):
            raise ValueError(f"Invalid muting {muting!r}; allowed values: features, inputs")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int >= 0 or None)")
        self.alpha, self.ge, self.variant = float(alpha), bool(ge), variant
        self.start_epoch, self.end_epoch, self.params = start_epoch, end_epoch, params
        self.scores, self.muting, self.seed = scores, muting, seed
        self._modalities: tuple[str, ...] | None = None
        self._epoch = 0
        self._coefficients: Tensor | None = None  # of the last loss() call; None: nothing to apply
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}  # generator states loaded before the device was seen
        self._resolved_seed: int | None = seed
        self._stats: dict[str, float] = {}

    # -- loop hooks -----------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch

    def in_window(self) -> bool:
        return in_window(self._epoch, self.start_epoch, self.end_epoch)

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        inner = unwrap(model)
        heads = scores_heads(self.scores, model, "OGM-GE")
        if heads:
            logits, mono = self._heads_forward(model, inner, inputs)
            names = inner.modalities
        else:
            out = shapley_forward(model, inputs, self.muting)
            logits, mono, names = out.logits, out.mono.detach(), out.modalities
        self._modalities = bind_modalities(self._modalities, names, "OGM-GE")
        per_sample = true_class_scores(mono, targets)
        correct = (mono.argmax(-1) == targets).double()
        # sums (not means) over the global batch, as the paper; one all-reduce for everything
        sums = all_reduce_sum(torch.cat([per_sample.double(), correct], 0).sum(-1)).cpu()
        m = len(names)
        count = float(all_reduce_sum(torch.tensor([targets.shape[0]], dtype=torch.float64, device=targets.device)))
        scores, accuracy = sums[:m], sums[m:] / count
        ratios = dominance_ratios(scores)
        coefficients = ogm_coefficients(ratios, self.alpha, self.variant)
        self._coefficients = coefficients if self.in_window() else None
        self._stats = {}
        source = "head" if heads else "mono"
        for i, n in enumerate(names):
            self._stats.update({f"score/{n}": float(scores[i]), f"ratio/{n}": float(ratios[i]),
                                f"{source}_acc/{n}": float(accuracy[i])})
            self._stats.update(coefficient_statistics({n: float(coefficients[i]) if self.in_window() else 1.0}))
        return F.cross_entropy(at_least_float32(logits), targets)

    def _heads_forward(self, model: nn.Module, inner: nn.Module,
                       inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The fused logits and each modality's own head output (M × B × C, detached), from one
        model forward: the fusion's input features are captured with a forward pre-hook."""
        fusion = inner.fusion
        captured: dict[str, Any] = {}
        handle = capture_fusion_features(fusion, captured)
        try:
            logits = model(inputs)  # one forward through any DDP wrapper
        finally:
            handle.remove()
        with torch.no_grad():
            heads = fusion.mono_logits({m: f.detach() for m, f in captured["features"].items()})
        return logits, torch.stack([heads[m] for m in inner.modalities]).detach()

    def after_backward(self, model: nn.Module) -> None:
        if self._coefficients is None:
            return
        inner = unwrap(model)
        for i, m in enumerate(inner.modalities):
            k = float(self._coefficients[i])
            for p in inner.encoders[m].parameters():
                if p.grad is None or not selected(p, self.params):
                    continue
                std = gradient_noise_std(p.grad) if self.ge else 0.0
                if k != 1.0:
                    p.grad.mul_(k)
                if self.ge:
                    noise = torch.randn(p.grad.shape, generator=self._generator(p.grad.device),
                                        device=p.grad.device, dtype=p.grad.dtype)
                    p.grad.add_(noise, alpha=std)
        self._coefficients = None  # applied once per loss() call

    # -- noise generators -----------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        key = torch.device(device).type  # per device type: every rank restores the same state
        if key not in self._generators:
            if self._resolved_seed is None:
                mine = torch.initial_seed() % (1 << 62) if rank() == 0 else 0
                self._resolved_seed = int(all_reduce_sum(torch.tensor([mine], dtype=torch.int64, device=device)))
            gen = torch.Generator(device=device)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            else:
                gen.manual_seed(self._resolved_seed)
            self._generators[key] = gen
        return self._generators[key]

    # -- bookkeeping ----------------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        require_encoder_parameters(model, "OGM-GE")
        warn_adaptive_optimizer(optimizer, "OGM-GE")

    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        generators = {k: g.get_state() for k, g in self._generators.items()}
        generators.update({k: v.clone() for k, v in self._pending.items() if k not in generators})
        return {"modalities": list(self._modalities) if self._modalities else None,
                "epoch": self._epoch, "seed": self._resolved_seed, "generators": generators}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"modalities", "epoch", "seed", "generators"}
        if set(state) != expected:
            raise ValueError(f"OGM-GE state must have keys {sorted(expected)}, got {sorted(state)}")
        self._modalities = tuple(state["modalities"]) if state["modalities"] else None
        self._epoch = int(state["epoch"])
        self._resolved_seed = None if state["seed"] is None else int(state["seed"])
        self._generators = {}
        self._pending = {k: v.detach().cpu().clone() for k, v in state["generators"].items()}
        self._coefficients = None


ADAPTIVE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop,
                       torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta)


def warn_adaptive_optimizer(optimizer: torch.optim.Optimizer, method: str) -> None:
    """Warn that a gradient-scaling method is mostly cancelled by an adaptive optimizer."""
    if isinstance(optimizer, ADAPTIVE_OPTIMIZERS):
        import warnings

        warnings.warn(
            f"{method} scales gradients; {type(optimizer).__name__} divides each update by the running "
            f"RMS of the gradient, which cancels a steady per-parameter scale (see docs/baselines.md, "
            f"'Modulation under adaptive optimizers'); the paper uses SGD with momentum",
            stacklevel=3,
        )
