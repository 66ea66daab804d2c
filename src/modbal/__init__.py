"""modbal: modality balancing for multimodal learning in plain PyTorch.

Every balancing method (``modbal.AGM``, ``modbal.OGMGE``, … — all of :mod:`modbal.methods`),
the model protocol (:class:`MultimodalModel`, :func:`adapt` for a model of one's own), the run
logger for one's own training loop (:class:`RunLogger`) and the registries of parts by name.
"""
from . import datasets, encoders, fusions, methods  # noqa: F401  (fill the registries)
from .adapt import adapt
from .methods import *  # noqa: F403  (every method class: methods.__all__)
from .model import MultimodalModel, ShapleyOutput
from .registry import DATASETS, ENCODERS, FUSIONS, METHODS
from .train.logging import RunLogger

__all__ = [
    *methods.__all__, "MultimodalModel", "ShapleyOutput", "adapt", "RunLogger",
    "DATASETS", "ENCODERS", "FUSIONS", "METHODS",
]
__version__ = "0.1.0"
