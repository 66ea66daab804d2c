"""Your own model with modbal's methods: the protocol, and a view that adapts a module to it.

Every balancing method needs two things from a model: each modality's encoder (whose parameters
it may scale, clip or freeze) and a fusion that turns the dict of features into logits (which it
calls on muted features to get each modality's output). A module that exposes them as attributes

* ``encoders``: a mapping modality → ``nn.Module`` (an ``nn.ModuleDict``), each seeing only its
  own modality's tensor, and
* ``fusion``: an ``nn.Module`` taking ``{modality: feature}`` and returning class logits,

with its ``forward(inputs)`` equal to ``fusion({m: encoders[m](inputs[m])})``, works with every
method as it is: the methods drive it through a :class:`~modbal.model.MultimodalModel` *view*
built from those same submodules (no weights are copied; the optimizer, ``state_dict`` and
checkpoints stay the module's own). :func:`adapt` builds that view explicitly, also for a module
whose parts have other names.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any, Mapping

from torch import Tensor, nn

from .model import MultimodalModel, ShapleyOutput

_views: weakref.WeakKeyDictionary[nn.Module, MultimodalModel] = weakref.WeakKeyDictionary()

PROTOCOL = ("modbal's methods need a model with `encoders` (a mapping modality -> module, each "
            "seeing only its own modality) and `fusion` (a module mapping {modality: feature} to logits)")


def _accepts_shapley(model: nn.Module) -> bool:
    try:
        return "shapley" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _check_coverage(module: nn.Module, view: MultimodalModel) -> None:
    """Every trainable parameter of ``module`` must live in an encoder or the fusion: the methods
    compute the logits as ``fusion(encoders)``, so any other parameter would never be trained."""
    inside = {id(p) for p in view.parameters()}
    outside = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        shown = ", ".join(outside[:4]) + (f" and {len(outside) - 4} more" if len(outside) > 4 else "")
        raise ValueError(f"{type(module).__name__}: parameters {shown} belong to neither the encoders nor the "
                         f"fusion; modbal's methods compute the logits as fusion({{m: encoders[m](x_m)}}), so they "
                         f"would never be trained (move them into the fusion module)")


def adapt(module: nn.Module, encoders: Mapping[str, nn.Module] | None = None,
          fusion: nn.Module | None = None) -> MultimodalModel:
    """A :class:`MultimodalModel` that shares ``module``'s encoders and fusion (no copy).

    Pass the result to any method, :func:`modbal.train.evaluate` or the training loop; training it
    trains ``module``. By default the parts are ``module.encoders`` and ``module.fusion``; name
    them explicitly when they are called otherwise:

    >>> model = adapt(net, encoders={"audio": net.audio_net, "image": net.image_net}, fusion=net.head)

    Raises:
        TypeError: a part is missing or is not a module (the message names it).
        ValueError: ``module`` has trainable parameters outside the encoders and the fusion.
    """
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise TypeError("adapt() the model before wrapping it in DistributedDataParallel, then wrap the result")
    if isinstance(module, MultimodalModel) and encoders is None and fusion is None:
        return module
    name = type(module).__name__
    encoders = getattr(module, "encoders", None) if encoders is None else encoders
    fusion = getattr(module, "fusion", None) if fusion is None else fusion
    missing = [what for what, part in (("`encoders`", encoders), ("`fusion`", fusion)) if part is None]
    if missing:
        raise TypeError(f"{name} has no {' and no '.join(missing)}: {PROTOCOL}; give them as "
                        f"modbal.adapt(model, encoders={{...}}, fusion=...) or build a modbal.MultimodalModel")
    is_mapping = isinstance(encoders, (Mapping, nn.ModuleDict))
    if not is_mapping or not all(isinstance(e, nn.Module) for e in encoders.values()):
        raise TypeError(f"{name}.encoders must be a mapping modality -> nn.Module (an nn.ModuleDict), "
                        f"got {type(encoders).__name__}")
    if not isinstance(fusion, nn.Module):
        raise TypeError(f"{name}.fusion must be an nn.Module mapping {{modality: feature}} to logits, "
                        f"got {type(fusion).__name__}")
    view = MultimodalModel(encoders, fusion)
    view.training = module.training  # the view's own flag; the shared submodules keep theirs
    _check_coverage(module, view)
    return view


def _is_current(view: MultimodalModel, module: nn.Module) -> bool:
    encoders = getattr(module, "encoders", None)
    return (getattr(module, "fusion", None) is view.fusion and isinstance(encoders, (Mapping, nn.ModuleDict))
            and tuple(encoders) == view.modalities
            and all(encoders[m] is view.encoders[m] for m in view.modalities))


def as_multimodal(model: nn.Module) -> nn.Module:
    """The model the methods act on: a :class:`MultimodalModel` (or a module implementing the
    protocol itself: ``encoders``, ``modalities`` and ``forward(inputs, shapley=...)``) as it is;
    a module exposing ``encoders`` and ``fusion`` as its (cached) view; otherwise a ``TypeError``
    naming what is missing."""
    if isinstance(model, MultimodalModel):
        return model
    if hasattr(model, "modalities") and hasattr(model, "encoders") and _accepts_shapley(model):
        return model
    view = _views.get(model)
    if view is None or not _is_current(view, model):
        view = _views[model] = adapt(model)
    return view


def protocol_forward(model: nn.Module, inputs: Mapping[str, Tensor], **options: Any) -> Any:
    """``model(inputs, **options)`` (``shapley=``, ``aux=`` of :meth:`MultimodalModel.forward`) for
    every model the methods accept: through a DistributedDataParallel wrapper (whose module must
    implement the protocol), or through the view of a module that only exposes ``encoders`` and
    ``fusion``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if not (isinstance(model.module, MultimodalModel) or _accepts_shapley(model.module)):
            raise TypeError(f"DistributedDataParallel wraps {type(model.module).__name__}, which has no "
                            f"shapley= passes: wrap modbal.adapt(model) instead")
        return model(inputs, **options)
    return as_multimodal(model)(inputs, **options)


def shapley_forward(model: nn.Module, inputs: Mapping[str, Tensor], muting: str) -> ShapleyOutput:
    """The :class:`ShapleyOutput` of ``model`` on ``inputs`` with ``muting`` (see :func:`protocol_forward`)."""
    return protocol_forward(model, inputs, shapley=muting)
