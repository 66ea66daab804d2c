"""On-the-fly Gradient Modulation with Generalization Enhancement (OGM-GE; Peng et al., CVPR 2022).

Per step: each modality's score is the sum over the (global) batch of its mono-modal output's
softmax probability of the true class, s_m = Σ_i softmax(o_m,i)[y_i]; the ratio of a modality's
score to the mean score of the others, ρ_m = s_m / mean_{k≠m} s_k (M = 2: ρ_a = s_a/s_v, the
paper's ratio), marks the dominant modality (ρ_m > 1). After backward, every encoder's gradients
are multiplied by k_m = 1 − tanh(α·relu(ρ_m − 1)) (the paper's formula: k = 1 for the
non-dominant modality, continuous at balance) and, with generalization enhancement, a Gaussian
N(0, std(g)) is added to each encoder parameter tensor g (std of the gradient before scaling).
The loss is plain cross-entropy on the fused logits, so forward values equal joint training's.

Mono-modal outputs are the Shapley ones of the model protocol (``model(inputs, shapley=...)
.mono``), which exist for every fusion, linear or not; fusions that define
``mono_logits(features) -> {modality: B×C}`` (per-modality heads) can be scored from those
instead with ``scores="heads"``. Encoder parameters are ``unwrap(model).encoders[m]``.
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
from .base import Method, at_least_float32, bind_modalities, check_window, in_window, require_encoder_parameters

COEFFICIENTS = ("paper", "code")
SCORES = ("shapley", "heads")


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


def ogm_coefficients(ratios: Tensor, alpha: float, variant: str = "paper") -> Tensor:
    """Gradient coefficients k_m for ratios ρ_m.

    ``"paper"``: k = 1 − tanh(α·relu(ρ − 1)) (OGM-GE paper; 1 at balance, continuous).
    ``"code"``: k = 1 − tanh(α·ρ) where ρ > 1, else 1 (the released OGM-GE and AGM code, written
    1 − tanh(α·relu(ρ)); it jumps from 1 to 1 − tanh(α) as ρ crosses 1).
    """
    if variant == "paper":
        return 1 - torch.tanh(alpha * torch.relu(ratios - 1))
    if variant == "code":
        return torch.where(ratios > 1, 1 - torch.tanh(alpha * ratios), torch.ones_like(ratios))
    raise ValueError(f"Invalid variant {variant!r}; allowed values: {', '.join(COEFFICIENTS)}")


def gradient_noise_std(grad: Tensor) -> float:
    """Standard deviation of the generalization-enhancement noise for one gradient tensor:
    std(grad) (unbiased; 0 for a single element)."""
    if grad.numel() < 2:
        return 0.0
    std = float(grad.float().std())
    return std if math.isfinite(std) else 0.0


# -- the method --------------------------------------------------------------------------------
@METHODS.register("ogm_ge")
class OGMGE(Method):
    """OGM-GE on any :class:`~modbal.MultimodalModel`.

    Args:
        alpha (float): modulation strength α (> 0). Default: 0.5.
        ge (bool): generalization enhancement (Gaussian gradient noise). Default: True.
        variant (str): ``"paper"`` (1 − tanh(α·relu(ρ − 1))) or ``"code"`` (1 − tanh(α·ρ) for the
            dominant modality, the released code). Default: ``"paper"``.
        start_epoch, end_epoch (int): modulation window [start, end) in epochs (end None: to the
            end). Outside it gradients are left as they are (no scaling, no noise).
        scores (str): ``"shapley"`` (mono-modal Shapley outputs, any fusion) or ``"heads"``
            (the fusion's ``mono_logits(features)``, e.g. per-modality heads). Default: shapley.
        muting (str): muting mode for ``scores="shapley"`` (``"features"`` or ``"inputs"``).
        seed (int, optional): seed of the noise generators. None: rank 0's ``torch.initial_seed()``
            at the first noisy step (so the global seed makes runs reproducible). Every rank uses
            the same seed: DDP gradients are identical across ranks after backward, and so is the
            noise, so replicas never drift apart.
    """

    name = "ogm_ge"

    def __init__(self, alpha: float = 0.5, ge: bool = True, variant: str = "paper",
                 start_epoch: int = 0, end_epoch: int | None = None, scores: str = "shapley",
                 muting: str = "features", seed: int | None = None) -> None:
        if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"Invalid alpha: {alpha} (must be a finite number > 0)")
        if variant not in COEFFICIENTS:
            raise ValueError(f"Invalid variant {variant!r}; allowed values: {', '.join(COEFFICIENTS)}")
        check_window(start_epoch, end_epoch)
        if scores not in SCORES:
            raise ValueError(f"Invalid scores {scores!r}; allowed values: {', '.join(SCORES)}")
        if muting not in ("features", "inputs"):
            raise ValueError(f"Invalid muting {muting!r}; allowed values: features, inputs")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int >= 0 or None)")
        self.alpha, self.ge, self.variant = float(alpha), bool(ge), variant
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
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
        if self.scores == "shapley":
            out = shapley_forward(model, inputs, self.muting)
            logits, mono, names = out.logits, out.mono.detach(), out.modalities
        else:
            logits, mono = self._heads_forward(model, inner, inputs)
            names = inner.modalities
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
        for i, n in enumerate(names):
            self._stats.update({f"score/{n}": float(scores[i]), f"ratio/{n}": float(ratios[i]),
                                f"coef/{n}": float(coefficients[i]) if self.in_window() else 1.0,
                                f"mono_acc/{n}": float(accuracy[i])})
        return F.cross_entropy(at_least_float32(logits), targets)

    def _heads_forward(self, model: nn.Module, inner: nn.Module,
                       inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        fusion = inner.fusion
        head_fn = getattr(fusion, "mono_logits", None)
        if head_fn is None:
            raise TypeError(f"OGM-GE scores='heads' needs a fusion with mono_logits(features); "
                            f"{type(fusion).__name__} has none (use scores='shapley')")
        captured: dict[str, Any] = {}
        handle = fusion.register_forward_pre_hook(lambda _mod, args: captured.setdefault("f", args[0]))
        try:
            logits = model(inputs)  # one forward through any DDP wrapper
        finally:
            handle.remove()
        with torch.no_grad():
            heads = head_fn({m: f.detach() for m, f in captured["f"].items()})
        return logits, torch.stack([heads[m] for m in inner.modalities]).detach()

    def after_backward(self, model: nn.Module) -> None:
        if self._coefficients is None:
            return
        inner = unwrap(model)
        for i, m in enumerate(inner.modalities):
            k = float(self._coefficients[i])
            for p in inner.encoders[m].parameters():
                if p.grad is None:
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
