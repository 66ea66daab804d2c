"""MMPareto (Wei & Hu, ICML 2024): uni-modal assistance without conflict, per encoder.

Per step, as the authors' code: the multimodal loss L_mm = CE(f(h), y) and one uni-modal loss
L_m = CE(o_m, y) per modality. For each encoder m, with g_mm = ∇_θm L_mm and g_uni = ∇_θm L_m
(θm all its tensors), the weights are (½, ½) when cos(g_mm, g_uni) > 0 and the two-vector
min-norm (MGDA) weights (c, 1 − c) otherwise. Then every encoder tensor p gets
g_new = 2(c·g_mm,p + (1 − c)·g_uni,p), rescaled to the norm of the plain sum g_mm,p + g_uni,p when
that is larger, times γ (1.5 in the code). Heads keep the plain gradient of L_mm + Σ_m L_m.

Cost: the authors' code runs M + 2 backward passes (one per loss, then the sum). Here ∇ Σ_m L_m on
the encoders (each L_m reaches only its own encoder, so one pass gives every g_uni) is one
``torch.autograd.grad`` pass, the loop's usual backward of L_mm + Σ_m L_m gives g_mm + g_uni, and
g_mm is their difference: two backward passes for any M.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum, unwrap, world_size
from ..model import eval_mode
from ..registry import METHODS
from ..shapley import full_coalition, mono_outputs
from .base import (
    Method,
    at_least_float32,
    bind_modalities,
    encoder_gradients,
    encoder_parameters,
    method_modules,
    modality_heads,
)
from .ogm_ge import warn_adaptive_optimizer

HEADS = ("separate", "shapley")


# -- the formulas, as pure functions ---------------------------------------------------------
def min_norm_weight(v1v1: float, v1v2: float, v2v2: float) -> float:
    """c minimising ‖c·v1 + (1 − c)·v2‖² over [0, 1] from the three dot products (the two-vector
    case of the MGDA min-norm solver, with its end clamps 0.999 and 0.001)."""
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return (v2v2 - v1v2) / (v1v1 + v2v2 - 2 * v1v2)


def pareto_weights(g_mm: list[Tensor], g_uni: list[Tensor]) -> tuple[float, float, float]:
    """(k_mm, k_uni, cos) for one encoder: (½, ½) when the two gradients (all its tensors
    concatenated) agree, cos > 0; the min-norm weights otherwise."""
    dots = torch.stack([torch.stack([torch.dot(a.reshape(-1), a.reshape(-1)), torch.dot(a.reshape(-1), b.reshape(-1)),
                                     torch.dot(b.reshape(-1), b.reshape(-1))]) for a, b in zip(g_mm, g_uni)])
    mm_mm, mm_uni, uni_uni = dots.double().sum(0).tolist()  # one device sync per encoder
    cos = mm_uni / max(math.sqrt(mm_mm * uni_uni), 1e-8)
    if cos > 0:
        return 0.5, 0.5, cos
    c = min_norm_weight(mm_mm, mm_uni, uni_uni)
    return c, 1.0 - c, cos


def pareto_gradient(g_mm: Tensor, g_uni: Tensor, k_mm: float, k_uni: float, gamma: float) -> Tensor:
    """γ·g_new·max(1, ‖g_mm + g_uni‖/‖g_new‖) with g_new = 2(k_mm·g_mm + k_uni·g_uni), for one tensor
    (the rescale is per tensor; a zero g_new stays zero)."""
    new = 2 * (k_mm * g_mm + k_uni * g_uni)
    new_norm = new.norm()
    ratio = (g_mm + g_uni).norm() / new_norm if new_norm > 0 else new_norm.new_ones(())
    return new * (gamma * torch.clamp(ratio, min=1.0))


# -- the method --------------------------------------------------------------------------------
@METHODS.register("mmpareto")
class MMPareto(Method):
    """MMPareto on any :class:`~modbal.MultimodalModel` whose encoders have parameters.

    Args:
        gamma (float): the final scale γ of the encoder gradients (> 0). Default: 1.5 (the code).
        heads (str): the uni-modal outputs o_m: ``"separate"`` (the authors' code: a linear head
            per modality on its pooled feature, trained by L_m alone and owned by the method; call
            ``method.attach(model)`` before building the optimizer) or ``"shapley"`` (the exact
            Shapley mono-modal outputs of the model's own fusion, which L_m then also trains;
            BalanceBenchmark's port uses the concat head's slices, which these equal up to a
            constant). Default: ``"separate"``.

    With Adam-type optimizers γ and the norm rescale largely cancel (a steady scale of a
    parameter's gradient does not change its Adam update); the direction change on conflict stays.
    """

    name = "mmpareto"
    acts_on_encoders = True

    def __init__(self, gamma: float = 1.5, heads: str = "separate") -> None:
        if not (isinstance(gamma, (int, float)) and gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"Invalid gamma: {gamma} (must be a finite number > 0)")
        if heads not in HEADS:
            raise ValueError(f"Invalid heads {heads!r}; allowed values: {', '.join(HEADS)}")
        self.gamma, self.heads = float(gamma), heads
        self._modalities: tuple[str, ...] | None = None
        self._g_uni: dict[str, list[Tensor]] | None = None  # of the last loss() call
        self._stats: dict[str, float] = {}

    def build_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return modality_heads(model, "MMPareto") if self.heads == "separate" else {}

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        inner = unwrap(model)
        self._modalities = bind_modalities(self._modalities, inner.modalities, "MMPareto")
        params = encoder_parameters(model, "MMPareto")
        heads = method_modules(model, "MMPareto") if self.heads == "separate" else None

        def uni_outputs(features: dict[str, Tensor]) -> list[Tensor]:
            if heads is not None:
                return [heads[m](features[m]) for m in inner.modalities]
            return list(own_shapley_mono(inner, features, inner.zero_features(inputs)))

        logits, mono = model(inputs, aux=uni_outputs)  # one forward, through any DDP wrapper
        loss_mm = F.cross_entropy(at_least_float32(logits), targets)
        loss_uni = [F.cross_entropy(at_least_float32(o), targets) for o in mono]
        uni_total = torch.stack(loss_uni).sum()
        flat = [p for m in inner.modalities for p in params[m]]
        grads = iter(encoder_gradients(model, {"uni": uni_total}, flat)["uni"])
        self._g_uni = {m: [next(grads) for _ in params[m]] for m in inner.modalities}
        means = all_reduce_sum(torch.stack([loss_mm, *loss_uni]).detach().double()).cpu() / world_size()
        self._stats = {"loss_mm": float(means[0])}
        self._stats.update({f"loss_uni/{m}": float(v) for m, v in zip(inner.modalities, means[1:])})
        return loss_mm + uni_total

    def after_backward(self, model: nn.Module) -> None:
        if self._g_uni is None:
            return
        params = encoder_parameters(model, "MMPareto")
        with torch.no_grad():
            for m, g_uni in self._g_uni.items():
                tensors = [(p, u) for p, u in zip(params[m], g_uni) if p.grad is not None]
                g_mm = [p.grad - u for p, u in tensors]  # the loop's backward gave g_mm + g_uni
                k_mm, k_uni, cos = pareto_weights(g_mm, [u for _, u in tensors])
                for (p, u), mm in zip(tensors, g_mm):
                    if k_mm == k_uni:  # g_new is the plain sum g_mm + g_uni = p.grad: the ratio is 1
                        p.grad.mul_(self.gamma)
                    else:
                        p.grad.copy_(pareto_gradient(mm, u, k_mm, k_uni, self.gamma))
                self._stats.update({f"cos/{m}": cos, f"weight_mm/{m}": k_mm})
        self._g_uni = None  # applied once per loss() call

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        encoder_parameters(model, "MMPareto")
        warn_adaptive_optimizer(optimizer, "MMPareto")
        if self.heads == "separate":
            method_modules(model, "MMPareto")

    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        return {"modalities": list(self._modalities) if self._modalities else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"modalities"}:
            raise ValueError(f"MMPareto state must have the key 'modalities', got {sorted(state)}")
        self._modalities = tuple(state["modalities"]) if state["modalities"] else None
        self._g_uni = None


# -- passes the method needs -------------------------------------------------------------------
def own_shapley_mono(inner: nn.Module, features: Mapping[str, Tensor], zeros: Mapping[str, Tensor]) -> Tensor:
    """The Shapley mono-modal outputs o_m (M × B × C; feature muting, as ``model(inputs,
    shapley="features")``), each with gradients to its own modality's features (and zero-sample
    feature) only: ∇_θm of a loss on o_m is ∇_θm L_m, not a mix of every modality's loss."""
    names = inner.modalities
    mono = []
    for i, m in enumerate(names):
        real = {k: f if k == m else f.detach() for k, f in features.items()}
        zero = {k: (z if k == m else z.detach()).expand_as(features[k]) for k, z in zeros.items()}
        full = inner.fusion(real)
        masks = range(full_coalition(len(names)))
        stacked = {k: torch.cat([real[k] if mask >> j & 1 else zero[k] for mask in masks])
                   for j, k in enumerate(names)}
        with eval_mode(inner.fusion):
            muted = inner.fusion(stacked).reshape(len(masks), *full.shape)
        mono.append(mono_outputs(torch.cat([muted, full.unsqueeze(0)]), len(names))[i])
    return torch.stack(mono)
