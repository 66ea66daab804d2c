"""UMT, the uni-modal teacher (Du et al., ICML 2023): distil uni-modal encoders into the multimodal one.

Per step: L = CE(f(x), y) + α Σ_m MSE(t_m(x_m), h_m(x_m)), where h_m is the multimodal model's
encoder feature of modality m and t_m the encoder of a model trained on modality m alone (a
``unimodal`` run), run without gradients and in eval mode. The teachers make each encoder learn the
uni-modal features that joint training leaves under-trained; the fused loss trains the rest.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt import protocol_forward
from ..distributed import batch_means, unwrap
from ..model import eval_mode
from ..registry import METHODS
from .base import Method, at_least_float32, method_modules
from .teachers import check_checkpoint, check_teacher_paths, frozen, resolve_teachers
from .unimodal_assist import check_weight


def distillation_losses(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """Per-sample mean squared error between each teacher and student feature (M × B)."""
    return torch.stack([(at_least_float32(s) - at_least_float32(t)).pow(2).flatten(1).mean(1)
                        for t, s in zip(teacher, student)])


@METHODS.register("umt")
class UMT(Method):
    """Joint cross-entropy plus feature distillation from one uni-modal teacher per modality.

    Args:
        teachers (dict): ``{modality: run directory}`` of finished ``unimodal`` runs on the same
            dataset, arguments and validation carve-out (checked; a clear error otherwise), or, in
            Python, ``{modality: encoder module}`` (used as given).
        alpha (float): weight α of the distillation terms (>= 0). Default 1 (BalanceBenchmark's).
        checkpoint (str): ``best`` (default) or ``last``: the teachers' checkpoint to read.

    The teachers' encoders become ``model.method_modules.teachers`` (frozen), so checkpoints carry
    them; every encoder's feature must have the teacher's shape. Statistics: ``distill/<m>`` (the
    global batch mean of each MSE term).
    """

    name = "umt"
    acts_on_encoders = True

    def __init__(self, teachers: Mapping[str, Any], alpha: float = 1.0, checkpoint: str = "best") -> None:
        self.teachers = check_teacher_paths(teachers, self.name)
        self.alpha = check_weight(alpha, "alpha")
        self.checkpoint = check_checkpoint(checkpoint)
        self._run: tuple[Mapping[str, Any], Mapping[str, Sequence[int]]] | None = None
        self._stats: dict[str, float] = {}

    def configure(self, config: Mapping[str, Any], input_shapes: Mapping[str, Sequence[int]]) -> None:
        self._run = (config, input_shapes)

    def teacher_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """Each modality's teacher run's model (modules given in Python: as given)."""
        inner = unwrap(model)
        return resolve_teachers(self.teachers, inner.modalities, inner.fusion.num_classes, self._run, self.checkpoint,
                                self.name)

    def build_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        inner = unwrap(model)
        encoders = {}
        for m, teacher in self.teacher_models(model).items():
            encoder = teacher.encoders[m] if hasattr(teacher, "encoders") else teacher
            want = tuple(inner.fusion.feature_shapes[m])
            got = tuple(getattr(encoder, "out_shape", want))
            if want != got:
                raise ValueError(f"{self.name}: the teacher of {m!r} gives features of shape {got}, the model's "
                                 f"encoder {want}; distillation needs the same shape")
            encoders[m] = frozen(encoder)
        return {"teachers": nn.ModuleDict(encoders)}

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        names = unwrap(model).modalities
        teachers = method_modules(model, self.name)["teachers"]
        logits, features = protocol_forward(model, inputs, aux=lambda f: [f[m] for m in names])
        with torch.no_grad(), eval_mode(teachers):
            targets_features = [teachers[m](inputs[m]) for m in names]
        distill = distillation_losses(targets_features, features)
        self._stats = {f"distill/{m}": v for m, v in zip(names, batch_means(distill.detach()).tolist())}
        return F.cross_entropy(at_least_float32(logits), targets) + self.alpha * distill.mean(-1).sum()

    def statistics(self) -> dict[str, float]:
        return dict(self._stats)
