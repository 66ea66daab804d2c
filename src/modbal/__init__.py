"""modbal: modality balancing for multimodal learning in plain PyTorch."""
from . import datasets, encoders, fusions, methods  # noqa: F401  (fill the registries)
from .methods import AGM, Joint, Method
from .model import MultimodalModel, ShapleyOutput
from .registry import DATASETS, ENCODERS, FUSIONS, METHODS

__all__ = [
    "AGM", "Joint", "Method", "MultimodalModel", "ShapleyOutput",
    "DATASETS", "ENCODERS", "FUSIONS", "METHODS",
]
__version__ = "0.1.0"
