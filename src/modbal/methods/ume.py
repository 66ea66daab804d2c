"""UME, the uni-modal ensemble (Du et al., ICML 2023): average independently trained uni-modal models.

Each member is a ``unimodal`` run on one modality (the whole network, the other inputs zeroed, as it
was trained and evaluated); the prediction is the mean of their logits. There is no joint
training: the method's step updates nothing (it logs the ensemble's training loss), so a run of it
needs one epoch, which only evaluates the ensemble on the run's splits.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import unwrap
from ..model import eval_mode, mute_inputs
from ..registry import METHODS
from .base import Method, Prediction, StepContext, at_least_float32, method_modules
from .teachers import check_checkpoint, check_teacher_paths, frozen, resolve_teachers


def ensemble_outputs(members: Mapping[str, nn.Module], inputs: Mapping[str, Tensor],
                     modalities: Sequence[str]) -> Tensor:
    """Each member's logits on its own modality (the others zeroed), divided by M (M×B×C)."""
    return torch.stack([at_least_float32(members[m](mute_inputs(inputs, [m]))) for m in modalities]) / len(modalities)


@METHODS.register("ume")
class UME(Method):
    """The mean of the logits of one uni-modal model per modality; no training.

    Args:
        teachers (dict): ``{modality: run directory}`` of ``unimodal`` runs on the same dataset,
            arguments and validation carve-out (checked), or, in Python, ``{modality: model}``
            (a multimodal model trained on that modality alone, called with the others zeroed).
        checkpoint (str): ``best`` (default) or ``last``: the members' checkpoint to read.

    The members become ``model.method_modules.members`` (frozen; checkpoints carry them); the
    model's own encoders and fusion are not used. Set ``train.epochs: 1``.
    """

    name = "ume"
    owns_step = True
    predicts = True
    trains = False

    def __init__(self, teachers: Mapping[str, Any], checkpoint: str = "best") -> None:
        self.teachers = check_teacher_paths(teachers, self.name)
        self.checkpoint = check_checkpoint(checkpoint)
        self._run: tuple[Mapping[str, Any], Mapping[str, Sequence[int]]] | None = None

    def configure(self, config: Mapping[str, Any], input_shapes: Mapping[str, Sequence[int]]) -> None:
        self._run = (config, input_shapes)

    def build_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        inner = unwrap(model)
        members = resolve_teachers(self.teachers, inner.modalities, inner.fusion.num_classes, self._run,
                                   self.checkpoint, self.name)
        return {"members": nn.ModuleDict({m: frozen(member) for m, member in members.items()})}

    def train_step(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor, step: StepContext,
                   substep: int) -> Tensor:
        members = method_modules(model, self.name)["members"]
        with torch.no_grad(), eval_mode(members), step.autocast():
            logits = ensemble_outputs(members, inputs, unwrap(model).modalities).sum(0)
        return F.cross_entropy(at_least_float32(logits), targets)

    def predict(self, model: nn.Module, inputs: Mapping[str, Tensor]) -> Prediction:
        members = method_modules(model, self.name)["members"]
        with eval_mode(members):
            mono = ensemble_outputs(members, inputs, unwrap(model).modalities)
        return Prediction(mono.sum(0), mono)
