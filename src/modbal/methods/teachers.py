"""Prior runs as inputs of a method: the uni-modal teachers of UMT and the members of UME.

A teacher is a finished (or interrupted) run of the ``unimodal`` method on one modality. It is read
from its run directory: ``config.yaml`` is checked against the run that uses it (the same dataset
and arguments, the same validation carve-out, the same modalities and classes, the right modality)
and the checkpoint is loaded safely (:func:`modbal.train.checkpoint.load_checkpoint`, tensors only).
Every mismatch is one line naming the teacher, the file and the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from ..config import diff, encoder_specs, load_yaml, resolve

CHECKPOINTS = ("best", "last")
#: the argument through which a method takes prior ``unimodal`` runs, ``{modality: run directory}``;
#: ``modbal bench`` fills it with the study's own uni-modal runs of the same seed
ARGUMENT = "teachers"


def check_teacher_paths(teachers: Any, method: str) -> dict[str, Any]:
    """``{modality: run directory (str) or module}`` as given (a clear error for anything else)."""
    if not isinstance(teachers, Mapping) or not teachers:
        raise ValueError(f"{method} needs teachers: {{modality: run directory of a 'unimodal' run}}, got {teachers!r}")
    for m, t in teachers.items():
        if not isinstance(m, str) or not isinstance(t, (str, Path, nn.Module)):
            raise ValueError(f"{method} teachers[{m!r}] must be a run directory (or a module), got {t!r}")
    return {m: (str(t) if isinstance(t, Path) else t) for m, t in teachers.items()}


def check_teacher_modalities(teachers: Mapping[str, Any], modalities: Sequence[str], method: str) -> None:
    unknown, missing = sorted(set(teachers) - set(modalities)), [m for m in modalities if m not in teachers]
    if unknown or missing:
        raise ValueError(f"{method} needs one teacher per modality of the model {list(modalities)}; "
                         f"unknown {unknown}, missing {missing}")


def _validation(config: Mapping[str, Any]) -> tuple[Any, Any]:
    train = config["train"]
    return train["val_fraction"], config["seed"] if train["val_seed"] is None else train["val_seed"]


def check_teacher_config(teacher: Mapping[str, Any], modality: str, config: Mapping[str, Any], where: str) -> None:
    """That the resolved ``teacher`` config is a ``unimodal`` run on ``modality`` with the data and the
    validation carve-out of the run ``config`` that uses it (``where`` opens the one-line error)."""
    spec = teacher["method"]
    if spec.get("name") != "unimodal" or spec.get("modality") != modality:
        raise ValueError(f"{where} is a {spec.get('name')!r} run"
                         + (f" on {spec.get('modality')!r}" if spec.get("name") == "unimodal" else "")
                         + f", not a 'unimodal' run on {modality!r}")
    changes = diff(teacher["dataset"], config["dataset"], prefix="dataset.")
    if changes:
        raise ValueError(f"{where} was trained on other data ({'; '.join(changes[:3])})")
    if _validation(teacher) != _validation(config):
        raise ValueError(f"{where} carved another validation split (train.val_fraction, val seed "
                         f"{_validation(teacher)} here {_validation(config)}): its training data would overlap "
                         f"this run's validation data")


def load_teacher_run(run_dir: str | Path, modality: str, config: Mapping[str, Any],
                     input_shapes: Mapping[str, Sequence[int]], num_classes: int, checkpoint: str = "best",
                     method: str = "method") -> nn.Module:
    """The model of the ``unimodal`` run in ``run_dir`` trained on ``modality``, its weights from
    ``checkpoints/<checkpoint>.pt``, after checking it against the run ``config`` that uses it."""
    from ..build import build_model
    from ..train.checkpoint import load_checkpoint  # the training package imports the methods

    where = f"{method} teacher for {modality!r}"
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{where}: {str(run_dir)!r} is not a run directory (no config.yaml)")
    try:
        teacher = resolve(load_yaml(path.read_text()), source=str(path))
    except Exception as e:  # unreadable YAML or an invalid recipe: one line naming the file
        raise ValueError(f"{where}: {str(path)!r} cannot be read as a run config ({e})") from None
    check_teacher_config(teacher, modality, config, f"{where}: {str(path)!r}")
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"Invalid teacher checkpoint {checkpoint!r}; allowed values: {', '.join(CHECKPOINTS)}")
    state = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt")
    modalities = list(input_shapes)
    try:
        model = build_model(input_shapes, num_classes, encoder_specs(teacher, modalities), teacher["model"]["fusion"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{where}: the checkpoint in {str(run_dir)!r} does not fit its own config ({first})") from None
    return model


def check_checkpoint(checkpoint: str) -> str:
    """The teachers' checkpoint to read: ``best`` or ``last`` (a one-line error otherwise)."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"Invalid checkpoint {checkpoint!r}; allowed values: {', '.join(CHECKPOINTS)}")
    return checkpoint


def resolve_teachers(teachers: Mapping[str, Any], modalities: Sequence[str], num_classes: int,
                     run: tuple[Mapping[str, Any], Mapping[str, Sequence[int]]] | None, checkpoint: str,
                     method: str) -> dict[str, nn.Module]:
    """Each modality's teacher: a module as given, or the model of its run directory loaded by
    :func:`load_teacher_run` against ``run`` = (config, input_shapes) of the run that uses it (what
    a method's ``configure`` receives; None outside a run, where only modules can be used)."""
    check_teacher_modalities(teachers, modalities, method)
    out = {}
    for m in modalities:
        teacher = teachers[m]
        if not isinstance(teacher, nn.Module):
            if run is None:
                raise ValueError(f"{method} reads its teachers from run directories only inside a run; in Python "
                                 f"call method.configure(config, input_shapes) first, or pass modules")
            teacher = load_teacher_run(teacher, m, *run, num_classes, checkpoint, method)
        out[m] = teacher
    return out


def frozen(module: nn.Module) -> nn.Module:
    """``module`` with every parameter's ``requires_grad`` off (a teacher is never trained)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
