"""Assemble a :class:`MultimodalModel` from registry names (what recipes describe)."""
from __future__ import annotations

from typing import Any, Mapping

from .model import MultimodalModel
from .registry import ENCODERS, FUSIONS


def _split(spec: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    if "name" not in spec:
        raise KeyError(f"{where} needs a 'name' key; got keys {sorted(spec)}")
    rest = dict(spec)
    return rest.pop("name"), rest


def build_model(input_shapes: Mapping[str, tuple[int, ...]], num_classes: int,
                encoders: Mapping[str, Mapping[str, Any]], fusion: Mapping[str, Any]) -> MultimodalModel:
    """Build encoders (``{modality: {"name": ..., **kwargs}}``) and a fusion (``{"name": ..., **kwargs}``).

    Each encoder gets ``input_shape=`` its modality's sample shape and must expose ``out_shape``;
    the fusion gets ``feature_shapes=`` those and ``num_classes=``.
    """
    unknown = sorted(set(encoders) - set(input_shapes))
    missing = sorted(set(input_shapes) - set(encoders))
    if unknown or missing:
        raise KeyError(f"encoders must be given for exactly the modalities {list(input_shapes)}; "
                       f"missing {missing}, unknown {unknown}")
    built = {}
    for m in input_shapes:
        name, kwargs = _split(encoders[m], f"encoders.{m}")
        built[m] = ENCODERS.create(name, input_shape=tuple(input_shapes[m]), **kwargs)
    name, kwargs = _split(fusion, "fusion")
    feature_shapes = {m: tuple(e.out_shape) for m, e in built.items()}
    return MultimodalModel(built, FUSIONS.create(name, feature_shapes=feature_shapes,
                                                 num_classes=num_classes, **kwargs))
