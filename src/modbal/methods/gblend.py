"""Gradient-Blending (G-Blending; Wang, Tran & Feiszli, CVPR 2020).

The loss of uni-modal assistance with weights chosen from each branch's overfitting-to-
generalization ratio: L = Σ_k w_k·CE(out_k, y) over the branches k ∈ {fused, each modality},
out_m = head_m(h_m) on a separate linear head (the released code's ``a_last_out``/``v_last_out``),
Σ_k w_k = 1. The weights come from short estimation runs on held-out data: from the current
checkpoint, a copy of each branch's network alone (modality m: its encoder and head; fused: the
encoders and the fusion) is trained for n epochs on its own loss, and with L^T, L^V its mean
training and validation losses (evaluation mode) at the start and the end,

    ΔG_k = L^V_start − L^V_end,   ΔO_k = (L^V_end − L^T_end) − (L^V_start − L^T_start),
    w_k ∝ max(ΔG_k, 0) / ΔO_k²

(the paper's w* ∝ ΔG/ΔO²). ``mode="offline"`` estimates once, before the first epoch;
``mode="online"`` again every n epochs (the paper's super-epochs), from the current weights. The
released code contains only the weighted loss (weights given by hand); the estimation follows the
paper, see docs/methods.md for what is inferred.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum, unwrap
from ..model import eval_mode
from ..registry import METHODS
from .base import (
    Coefficient,
    EpochData,
    Method,
    at_least_float32,
    average_gradients,
    bind_modalities,
    coefficient_statistics,
    method_modules,
    modality_heads,
    require_encoder_parameters,
)
from .unimodal_assist import FUSED, blended_loss, branch_losses, branch_statistics, forward_with_heads

MODES = ("offline", "online")


# -- the formulas, as pure functions ---------------------------------------------------------
def ogr_weight(train_start: float, val_start: float, train_end: float, val_end: float,
               floor: float = 1e-12) -> float:
    """Unnormalised G-Blending weight ΔG / ΔO² of one branch (0 when validation loss did not fall)."""
    gain = val_start - val_end
    overfit = (val_end - train_end) - (val_start - train_start)
    return max(gain, 0.0) / max(overfit * overfit, floor)


def normalize_weights(raw: Sequence[float]) -> list[float] | None:
    """``raw`` scaled to sum 1; None when every entry is 0 (no branch generalised)."""
    total = float(sum(raw))
    return None if not total > 0 or not math.isfinite(total) else [float(w) / total for w in raw]


def fresh_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class and settings over ``params``. ``defaults`` can hold
    settings the constructor does not take (AdamW's ``decoupled_weight_decay``, which AdamW sets
    itself), so only those the constructor accepts are passed."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    settings = {k: v for k, v in optimizer.defaults.items() if takes_any or k in accepted}
    return type(optimizer)(params, **settings)


# -- the method --------------------------------------------------------------------------------
@METHODS.register("gblend")
class GBlending(Method):
    """G-Blending with separate per-modality heads and estimated weights.

    Args:
        mode (str): ``"offline"`` (weights estimated once, before epoch 0) or ``"online"``
            (re-estimated before every ``epochs``-th epoch). Default: offline.
        epochs (int): n, the epochs each estimation run trains a branch for (and, online, the
            length of a super-epoch). Default: 10.

    The estimation runs train copies with a fresh optimizer of the training optimizer's class and
    settings (``optimizer.defaults``), so ``before_epoch`` needs ``EpochData.optimizer`` and
    ``val_loader`` (the runner passes them). Until the first estimate (and if no branch's validation
    loss falls) the weights are uniform, 1/(M+1). Statistics: ``weight/<k>``, ``loss/<k>`` for
    k in ``fused`` and the modalities, ``coef/<m>`` (= ``weight/<m>``).
    """

    name = "gblend"
    acts_on_encoders = True
    coefficient = Coefficient("w_m, the weight of modality m's uni-modal head loss (the weights of the fused and "
                              "uni-modal losses sum to 1; also logged as weight/<m>)", neutral=None)

    def __init__(self, mode: str = "offline", epochs: int = 10) -> None:
        if mode not in MODES:
            raise ValueError(f"Invalid mode {mode!r}; allowed values: {', '.join(MODES)}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Invalid epochs: {epochs!r} (must be an int >= 1)")
        self.mode, self.epochs = mode, epochs
        self._modalities: tuple[str, ...] | None = None
        self._weights: list[float] | None = None
        self._stats: dict[str, float] = {}
        self._estimate_stats: dict[str, float] = {}  # the last estimate's losses, for the logs

    def build_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return modality_heads(model, "G-Blending")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        require_encoder_parameters(model, "G-Blending")

    def weights(self) -> dict[str, float] | None:
        """The current branch weights ``{"fused": w, modality: w, ...}`` (None before any estimate)."""
        if self._weights is None or self._modalities is None:
            return None
        return dict(zip((FUSED, *self._modalities), self._weights))

    # -- the estimate ---------------------------------------------------------------------------
    def before_epoch(self, model: nn.Module, data: EpochData) -> None:
        inner = unwrap(model)
        self._modalities = bind_modalities(self._modalities, inner.modalities, "G-Blending")
        due = self._weights is None if self.mode == "offline" else data.epoch % self.epochs == 0
        if not due:
            return
        if data.optimizer is None or data.val_loader is None:
            raise ValueError("G-Blending's estimate trains copies of each branch and measures them on held-out "
                             "data: before_epoch needs EpochData.optimizer and EpochData.val_loader")
        raw: list[float] = []
        self._estimate_stats = {}
        for branch in (FUSED, *inner.modalities):
            start, end = self._estimate_branch(inner, branch, data)
            raw.append(ogr_weight(start[0], start[1], end[0], end[1]))
            self._estimate_stats.update({f"estimate/{branch}/train_start": start[0], f"estimate/{branch}/val_start":
                                         start[1], f"estimate/{branch}/train_end": end[0],
                                         f"estimate/{branch}/val_end": end[1]})
        self._weights = normalize_weights(raw) or self._weights or [1.0 / len(raw)] * len(raw)

    def _estimate_branch(self, inner: nn.Module, branch: str, data: EpochData
                         ) -> tuple[tuple[float, float], tuple[float, float]]:
        """(L^T, L^V) before and after training a copy of ``branch`` alone for n epochs."""
        net = copy.deepcopy(inner)
        forward, params = branch_network(net, branch, "G-Blending")
        optimizer = fresh_optimizer(data.optimizer, params)
        start = (mean_loss(net, forward, data, data.train_loader), mean_loss(net, forward, data, data.val_loader))
        net.train()
        for _ in range(self.epochs):
            for inputs, targets in data.batches(data.train_loader):
                loss = F.cross_entropy(at_least_float32(forward(inputs)), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(params)
                optimizer.step()
        end = (mean_loss(net, forward, data, data.train_loader), mean_loss(net, forward, data, data.val_loader))
        return start, end

    # -- per step -------------------------------------------------------------------------------
    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        names = unwrap(model).modalities
        self._modalities = bind_modalities(self._modalities, names, "G-Blending")
        weights = self._weights or [1.0 / (len(names) + 1)] * (len(names) + 1)
        logits, heads = forward_with_heads(model, inputs, "G-Blending")
        per_sample = branch_losses([logits, *heads], targets)
        self._stats = branch_statistics(per_sample, names)
        self._stats.update({f"weight/{k}": w for k, w in zip((FUSED, *names), weights)})
        self._stats.update(coefficient_statistics(dict(zip(names, weights[1:]))))
        return blended_loss(per_sample, weights)

    # -- bookkeeping ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        return {**self._stats, **self._estimate_stats}

    def state_dict(self) -> dict[str, Any]:
        return {"modalities": list(self._modalities) if self._modalities else None,
                "weights": None if self._weights is None else list(self._weights),
                "estimate": dict(self._estimate_stats)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"modalities", "weights", "estimate"}:
            raise ValueError(f"G-Blending state must have keys ['estimate', 'modalities', 'weights'], "
                             f"got {sorted(state)}")
        modalities = tuple(state["modalities"]) if state["modalities"] else None
        weights = None if state["weights"] is None else [float(w) for w in state["weights"]]
        if weights is not None and (modalities is None or len(weights) != len(modalities) + 1):
            raise ValueError(f"G-Blending state: {len(weights)} weights for modalities {modalities}")
        self._modalities, self._weights = modalities, weights
        self._estimate_stats = {str(k): float(v) for k, v in state["estimate"].items()}


def branch_network(net: nn.Module, branch: str, method: str
                   ) -> tuple[Callable[[Mapping[str, Tensor]], Tensor], list[nn.Parameter]]:
    """The forward of one branch of (a copy of) the model and the parameters it trains: the fused
    output over every encoder and the fusion, or one modality's encoder and its head."""
    if branch == FUSED:
        params = [p for name, p in net.named_parameters() if not name.startswith("method_modules.")]
        return (lambda inputs: net.fusion(net.encode(inputs))), [p for p in params if p.requires_grad]
    head = method_modules(net, method)[branch]
    params = [p for p in (*net.encoders[branch].parameters(), *head.parameters()) if p.requires_grad]
    return (lambda inputs: head(net.encoders[branch](inputs[branch]))), params


@torch.no_grad()
def mean_loss(net: nn.Module, forward: Callable[[Mapping[str, Tensor]], Tensor], data: EpochData,
              loader: Any) -> float:
    """Mean cross-entropy per sample of a branch over ``loader`` (evaluation mode, all ranks)."""
    total = torch.zeros(2, dtype=torch.float64)
    with eval_mode(net):
        for inputs, targets in data.batches(loader):
            loss = F.cross_entropy(at_least_float32(forward(inputs)), targets, reduction="sum")
            total += torch.stack([loss.double().cpu(), torch.tensor(float(targets.shape[0]), dtype=torch.float64)])
    device = next(net.parameters()).device
    total = all_reduce_sum(total.to(device)).cpu()
    if total[1] == 0:
        raise ValueError("G-Blending: a loader of the estimate yielded no batches")
    return float(total[0] / total[1])

