"""MLA (Zhang et al., CVPR 2024): alternating uni-modal adaptation through one shared head.

Per batch, for each modality m in turn: h_m = encoder_m(x_m), L_m = CE(W·h_m + b, y), backward,
one optimizer step (encoder m and the shared head W move). With ``projection`` on, the head's
weight gradient is first projected, OWM style, away from the directions of earlier modalities'
features: P ← P − k kᵀ / (α + r k) with r the batch-mean feature, k = P rᵀ, α = 0.1^(1 + batch /
batches per epoch), P ← P / ‖P‖_F, grad_W ← grad_W Pᵀ (not on the very first update). The
released code tests a parameter name that never matches, so its projection never runs: ``projection
= False`` (the default) is what its numbers come from. At test time the fused logits are
Σ_m w_m (W h_m + b) with w = softmax_m(−H_m), H_m the entropy of modality m's prediction.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum, unwrap
from ..registry import METHODS
from .base import (
    Method,
    ModalityHead,
    Prediction,
    StepContext,
    at_least_float32,
    method_modules,
    pool_feature,
    require_encoder_parameters,
)

#: test-time weights: per-sample entropy (the paper's), the released batch-level entropy, fixed
FUSION_WEIGHTS = ("entropy", "entropy_batch", "fixed")


# -- the formulas, as pure functions ---------------------------------------------------------
def prediction_entropy(logits: Tensor) -> Tensor:
    """H = −Σ_c p_c log p_c of p = softmax(logits) per sample: (..., C) → (...)."""
    logp = F.log_softmax(at_least_float32(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_weights(mono: Tensor) -> Tensor:
    """Per-sample weights w_m = exp(H_max − H_m) / Σ_j exp(H_max − H_j) = softmax_m(−H_m) of the
    uni-modal logits ``mono`` (M×B×C) → M×B×1."""
    return torch.softmax(-prediction_entropy(mono), dim=0).unsqueeze(-1)


def batch_entropy_weights(mono: Tensor) -> Tensor:
    """The released code's weights: one per modality for the whole batch, from the entropy of
    softmax over the *batch* axis summed over samples and classes (M×B×C → M×1×1)."""
    logp = torch.log_softmax(at_least_float32(mono), dim=1)
    entropy = -(logp.exp() * logp).sum(dim=(1, 2))
    return torch.softmax(-entropy, dim=0).view(-1, 1, 1)


def owm_projector(projector: Tensor, feature_mean: Tensor, alpha: float) -> Tensor:
    """One orthogonal-weight-modification update of the projector P (D×D) by the batch-mean feature
    r (D): P − k kᵀ / (α + r k) with k = P rᵀ, then divided by its Frobenius norm."""
    r = feature_mean.reshape(1, -1).to(projector.dtype)
    k = projector @ r.T
    updated = projector - (k @ k.T) / (alpha + (r @ k))
    return updated / torch.linalg.matrix_norm(updated)


def projection_alpha(batch_index: int, batches_per_epoch: int) -> float:
    """α = 0.1^λ with λ = batch index / batches per epoch + 1."""
    return 0.1 ** (batch_index / max(1, batches_per_epoch) + 1.0)


def check_shared_head(model: nn.Module, method: str) -> int:
    """The common feature size D of every encoder (a clear error when they differ)."""
    require_encoder_parameters(model, method)
    shapes = {m: tuple(s) for m, s in unwrap(model).fusion.feature_shapes.items()}
    sizes = {m: (s[-1] if s else None) for m, s in shapes.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"{method} trains one classifier head shared by every modality, so every encoder's feature "
                         f"must end in the same size; got feature shapes {shapes} (set the encoders' out_dim equal)")
    return int(next(iter(sizes.values())))


# -- the method --------------------------------------------------------------------------------
@METHODS.register("mla")
class MLA(Method):
    """Alternating uni-modal training through a shared linear head, one optimizer step per modality
    per batch, and entropy-weighted uni-modal outputs at test time.

    Args:
        projection (bool): project the shared head's weight gradient (OWM, the paper's gradient
            modification). Default False: the released code's name check never matches, so its runs
            train without it.
        fusion_weights (str): ``entropy`` (per-sample weights from each modality's prediction
            entropy, the paper's rule; default), ``entropy_batch`` (the released code: entropy of
            the softmax over the batch axis, one weight per modality and batch, so a sample's
            prediction depends on the batch it is evaluated in), or ``fixed`` (``weights``).
        weights (dict): ``{modality: w}`` for ``fixed`` (default: 1/M each; the released code uses
            0.5/0.5 and, for audio/visual/text, 0.35/0.25/0.40).

    The model's fusion is not used: the shared head (``model.method_modules.head``, built by
    ``attach``) maps each modality's (mean-pooled) feature to logits, so every encoder must give
    features of the same size. The method owns its step (``train_step``, M sub-steps per batch) and
    its evaluation output (``predict``). Statistics: ``loss/<m>`` (global batch mean).
    """

    name = "mla"
    acts_on_encoders = True
    owns_step = True
    predicts = True

    def __init__(self, projection: bool = False, fusion_weights: str = "entropy",
                 weights: Mapping[str, float] | None = None) -> None:
        if not isinstance(projection, bool):
            raise ValueError(f"Invalid projection: {projection!r} (must be true or false)")
        if fusion_weights not in FUSION_WEIGHTS:
            raise ValueError(f"Invalid fusion_weights {fusion_weights!r}; allowed values: {', '.join(FUSION_WEIGHTS)}")
        if weights is not None:
            if fusion_weights != "fixed":
                raise ValueError("weights apply to fusion_weights='fixed' only")
            if not isinstance(weights, Mapping) or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights.values()):
                raise ValueError(f"Invalid weights: {weights!r} (must map each modality to a number >= 0)")
        self.projection, self.fusion_weights = projection, fusion_weights
        self.weights = None if weights is None else {str(m): float(w) for m, w in weights.items()}
        self.updates = 0                       # optimizer steps taken (the released exp_count)
        self.projector: Tensor | None = None   # P, D×D, once projection has started
        self._stats: dict[str, float] = {}

    def build_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        check_shared_head(model, self.name)
        self._fixed_weights(unwrap(model).modalities)  # unknown names fail here
        inner = unwrap(model)
        return {"head": ModalityHead(next(iter(inner.fusion.feature_shapes.values())), inner.fusion.num_classes)}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        check_shared_head(model, self.name)
        return super().param_groups(model)

    def substeps(self, model: nn.Module) -> int:
        return len(unwrap(model).modalities)

    def train_step(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor, step: StepContext,
                   substep: int) -> Tensor:
        inner = unwrap(model)
        modality = inner.modalities[substep]
        head = method_modules(model, self.name)["head"]
        with step.autocast():
            feature = inner.encoders[modality](inputs[modality])
            logits = head(feature)
        loss = F.cross_entropy(at_least_float32(logits), targets)
        finite = step.backward(loss)
        if self.projection and finite:
            self._project(head.linear.weight, pool_feature(feature.detach()), step)
        step.step()
        self.updates += 1
        sums = all_reduce_sum(torch.stack([loss.detach().double() * targets.shape[0],
                                           loss.new_tensor(float(targets.shape[0]), dtype=torch.float64)]))
        self._stats[f"loss/{modality}"] = float(sums[0] / sums[1])
        return loss

    def _project(self, weight: nn.Parameter, features: Tensor, step: StepContext) -> None:
        """The OWM projection of the head weight's gradient (global batch-mean feature)."""
        features = at_least_float32(features)
        sums = all_reduce_sum(torch.cat([features.sum(0), features.new_tensor([features.shape[0]])]))
        mean = sums[:-1] / sums[-1]
        if self.projector is None:
            self.projector = torch.eye(mean.numel(), dtype=weight.dtype, device=weight.device)
        if self.updates == 0:  # the released plug-in skips the very first update
            return
        alpha = projection_alpha(step.step_in_epoch, step.steps_per_epoch or 1)
        self.projector = owm_projector(self.projector.to(weight.device), mean, alpha)
        if weight.grad is not None:
            weight.grad.copy_(weight.grad @ self.projector.T.to(weight.grad.dtype))

    def _fixed_weights(self, modalities: Sequence[str]) -> list[float]:
        if self.weights is None:
            return [1.0 / len(modalities)] * len(modalities)
        unknown, missing = sorted(set(self.weights) - set(modalities)), [m for m in modalities if m not in self.weights]
        if unknown or missing:
            raise ValueError(f"{self.name} weights must name exactly the modalities {list(modalities)}; "
                             f"unknown {unknown}, missing {missing}")
        return [self.weights[m] for m in modalities]

    def predict(self, model: nn.Module, inputs: Mapping[str, Tensor]) -> Prediction:
        inner = unwrap(model)
        head = method_modules(model, self.name)["head"]
        raw = at_least_float32(torch.stack([head(inner.encoders[m](inputs[m])) for m in inner.modalities]))
        if self.fusion_weights == "entropy":
            weights = entropy_weights(raw)
        elif self.fusion_weights == "entropy_batch":
            weights = batch_entropy_weights(raw)
        else:
            weights = raw.new_tensor(self._fixed_weights(inner.modalities)).view(-1, 1, 1)
        mono = weights * raw
        return Prediction(mono.sum(0), mono)

    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "projector": None if self.projector is None else self.projector.detach().cpu(),
                "losses": dict(self._stats)}  # a batch resumed between sub-steps still logs every modality

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"updates", "projector", "losses"})
        if unknown:
            raise ValueError(f"{self.name} state has unknown keys {unknown}")
        updates, projector = state.get("updates", 0), state.get("projector")
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"{self.name} state: updates must be an integer >= 0, got {updates!r}")
        if projector is not None and (not isinstance(projector, Tensor) or projector.dim() != 2
                                      or projector.shape[0] != projector.shape[1]):
            raise ValueError(f"{self.name} state: projector must be a square matrix, got {type(projector).__name__}")
        losses = state.get("losses", {})
        if not isinstance(losses, Mapping) or not all(isinstance(v, float) for v in losses.values()):
            raise ValueError(f"{self.name} state: losses must map names to numbers, got {losses!r}")
        self.updates, self._stats = updates, dict(losses)
        self.projector = None if projector is None else projector.clone()
