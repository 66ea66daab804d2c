"""ReconBoost (Hua et al., ICML 2024): modalities trained in turn as boosting stages, then reconciled.

The ensemble is F(x) = η Σ_{m ∈ members} head(h_m), one head shared by every modality and η a learnt
boost rate. Stage s trains modality m = order[s mod M] for ``epochs_per_stage`` epochs with the
boosting loss (−w₁ + w₂ q_y) log p_y / C per sample, p = softmax(head(h_m)), q = softmax(η Σ_{j≠m}
head(h_j)) of the members already trained, so samples the others get right weigh less; from stage 1
on a reconcilement term α·MSE(softmax(head(h_m)), softmax(head(h_prev))) with the previous stage's
modality is added. Then ``correct_epochs`` epochs of global rectification train every member, the
head and η on CE(F(x), y). Each phase starts with fresh optimizer state, as the released code
builds a new optimizer for each.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import batch_means, unwrap
from ..registry import METHODS
from .base import Method, Prediction, StepContext, at_least_float32, method_modules, pool_feature
from .mla import check_shared_head
from .unimodal_assist import check_weight

#: the reconcilement term: the released code detaches both sides (no gradient), or the paper's live term
RECONCILE = ("detached", "live")


# -- the formulas, as pure functions ---------------------------------------------------------
def boosting_loss(logits: Tensor, others: Tensor | None, targets: Tensor, w1: float, w2: float) -> Tensor:
    """Per-sample −w₁ mean_c(t_c log p_c) + w₂ mean_c(t_c q_c log p_c), t the one-hot target, p =
    softmax(``logits``), q = softmax(``others``) (q_y = 1 when no other modality is a member yet:
    the released code's constant initial learner)."""
    logp = F.log_softmax(at_least_float32(logits), dim=1)
    target = F.one_hot(targets, logp.shape[1]).to(logp.dtype)
    q = target if others is None else torch.softmax(at_least_float32(others).detach(), dim=1)
    return (-w1 * target * logp + w2 * target * q * logp).mean(-1)


def reconcile_loss(logits: Tensor, previous: Tensor, live: bool) -> Tensor:
    """α-free MSE between softmax(``logits``) and softmax(``previous``) (detached); ``logits`` too
    unless ``live``."""
    current = at_least_float32(logits) if live else at_least_float32(logits).detach()
    return F.mse_loss(torch.softmax(current, dim=1), torch.softmax(at_least_float32(previous).detach(), dim=1))


class BoostHead(nn.Module):
    """The shared head (Linear D→hidden, ReLU, Linear hidden→C) and the boost rate η."""

    def __init__(self, feature_size: int, num_classes: int, hidden: int, boost_rate: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(feature_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.boost_rate = nn.Parameter(torch.tensor(float(boost_rate)))

    def forward(self, feature: Tensor) -> Tensor:
        return self.mlp(pool_feature(feature))


# -- the method --------------------------------------------------------------------------------
@METHODS.register("reconboost")
class ReconBoost(Method):
    """Alternating boosting stages with a reconcilement term and global rectification.

    Args:
        epochs_per_stage (int): epochs of one modality's boosting training per stage (>= 1). Default 4.
        correct_epochs (int): epochs of global rectification per stage (>= 0). Default 4.
        w1, w2 (float): the boosting loss weights (>= 0). Defaults 5 and 1.
        alpha (float): weight of the reconcilement term (>= 0). Default 0.5.
        reconcile (str): ``detached`` (default; the released code detaches both sides, so the term
            changes the logged loss but no gradient) or ``live`` (the paper's: the gradient reaches
            the trained modality's encoder and the head).
        hidden (int): the shared head's hidden width. Default 256.
        boost_rate (float): η's initial value. Default 1.
        reset_optimizer (bool): clear the optimizer state (momentum) when a phase starts, as the
            released code's fresh optimizers do. Default True.

    The model's fusion is not used: ``model.method_modules.head`` holds the shared head and η, so
    every encoder must give features of the same size. A stage is ``epochs_per_stage +
    correct_epochs`` epochs; ``train.epochs`` sets how many stages run. Evaluation scores F(x) over
    the modalities trained so far. Statistics: ``stage``, ``rectify`` (0/1), ``loss/boost``,
    ``loss/reconcile``, ``boost_rate``.
    """

    name = "reconboost"
    acts_on_encoders = True
    owns_step = True
    predicts = True

    def __init__(self, epochs_per_stage: int = 4, correct_epochs: int = 4, w1: float = 5.0, w2: float = 1.0,
                 alpha: float = 0.5, reconcile: str = "detached", hidden: int = 256, boost_rate: float = 1.0,
                 reset_optimizer: bool = True) -> None:
        for key, value, low in (("epochs_per_stage", epochs_per_stage, 1), ("correct_epochs", correct_epochs, 0),
                                ("hidden", hidden, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {key}: {value!r} (must be an integer >= {low})")
        if reconcile not in RECONCILE:
            raise ValueError(f"Invalid reconcile {reconcile!r}; allowed values: {', '.join(RECONCILE)}")
        if not isinstance(reset_optimizer, bool):
            raise ValueError(f"Invalid reset_optimizer: {reset_optimizer!r} (must be true or false)")
        self.epochs_per_stage, self.correct_epochs, self.hidden = epochs_per_stage, correct_epochs, hidden
        self.w1, self.w2, self.alpha = check_weight(w1, "w1"), check_weight(w2, "w2"), check_weight(alpha, "alpha")
        self.boost_rate = check_weight(boost_rate, "boost_rate")
        self.reconcile, self.reset_optimizer = reconcile, reset_optimizer
        self.epoch = 0
        self._stats: dict[str, float] = {}

    # -- the schedule: a pure function of the epoch --
    def stage_of(self, epoch: int) -> tuple[int, bool]:
        """(stage, whether ``epoch`` is a rectification epoch)."""
        stage, offset = divmod(epoch, self.epochs_per_stage + self.correct_epochs)
        return stage, offset >= self.epochs_per_stage

    def members(self, modalities: Sequence[str], epoch: int) -> list[str]:
        """The modalities in the ensemble while ``epoch`` trains: those of the stages before, and,
        in rectification, this stage's (in modality order)."""
        stage, rectify = self.stage_of(epoch)
        trained = {modalities[s % len(modalities)] for s in range(stage + (1 if rectify else 0))}
        return [m for m in modalities if m in trained]

    def build_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        size = check_shared_head(model, self.name)
        return {"head": BoostHead(size, unwrap(model).fusion.num_classes, self.hidden, self.boost_rate)}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        check_shared_head(model, self.name)
        return super().param_groups(model)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def train_step(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor, step: StepContext,
                   substep: int) -> Tensor:
        inner = unwrap(model)
        head = method_modules(model, self.name)["head"]
        names = inner.modalities
        self.epoch = step.epoch
        stage, rectify = self.stage_of(step.epoch)
        if self.reset_optimizer and step.step_in_epoch == 0 and self._phase_starts(step.epoch):
            step.optimizer.state.clear()
        members = self.members(names, step.epoch)
        with step.autocast():
            if rectify:
                logits = head.boost_rate * sum(head(inner.encoders[m](inputs[m])) for m in members)
                loss = F.cross_entropy(at_least_float32(logits), targets)
                stats = {"loss/ce": loss}
            else:
                modality = names[stage % len(names)]
                others = [m for m in members if m != modality]
                with torch.no_grad():
                    ensemble = (head.boost_rate * sum(head(inner.encoders[m](inputs[m])) for m in others)
                                if others else None)
                logits = head(inner.encoders[modality](inputs[modality]))
                per_sample = boosting_loss(logits, ensemble, targets, self.w1, self.w2)
                stats = {"loss/boost": per_sample}
                loss = per_sample.mean()
                if stage >= 1 and self.alpha > 0:
                    previous = names[(stage - 1) % len(names)]
                    with torch.no_grad():
                        before = head(inner.encoders[previous](inputs[previous]))
                    ga = reconcile_loss(logits, before, self.reconcile == "live")
                    loss = loss + self.alpha * ga
                    stats["loss/reconcile"] = ga
        step.backward(loss)
        step.step()
        means = batch_means(torch.stack([v.detach().double().expand(targets.shape[0]) if v.dim() == 0
                                         else v.detach().double() for v in stats.values()]))
        self._stats = {"stage": float(stage), "rectify": float(rectify), "boost_rate": float(head.boost_rate.detach()),
                       **dict(zip(stats, means.tolist()))}
        return loss

    def _phase_starts(self, epoch: int) -> bool:
        stage, _ = self.stage_of(epoch)
        offset = epoch - stage * (self.epochs_per_stage + self.correct_epochs)
        return offset in (0, self.epochs_per_stage)

    def predict(self, model: nn.Module, inputs: Mapping[str, Tensor]) -> Prediction:
        inner = unwrap(model)
        head = method_modules(model, self.name)["head"]
        stage, rectify = self.stage_of(self.epoch)
        trained = set(self.members(inner.modalities, self.epoch)) | (
            set() if rectify else {inner.modalities[stage % len(inner.modalities)]})
        parts = []
        for m in inner.modalities:
            out = at_least_float32(head.boost_rate * head(inner.encoders[m](inputs[m])))
            parts.append(out if m in trained else torch.zeros_like(out))
        mono = torch.stack(parts)
        return Prediction(mono.sum(0), mono)

    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"epoch"})
        epoch = state.get("epoch", 0)
        if unknown or isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"{self.name} state must be {{'epoch': integer >= 0}}, got {dict(state)!r}")
        self.epoch = epoch
