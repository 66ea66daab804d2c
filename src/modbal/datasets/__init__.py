"""Datasets, registered by name in :data:`modbal.registry.DATASETS`; each returns DatasetSplits."""
from .base import DatasetSplits, TensorMultimodalDataset
from .synthetic import ModalitySpec, synthetic

__all__ = ["DatasetSplits", "ModalitySpec", "TensorMultimodalDataset", "synthetic"]
