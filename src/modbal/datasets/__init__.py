"""Datasets, registered by name in :data:`modbal.registry.DATASETS`; each returns DatasetSplits."""
from . import audio, espeak
from .avdigits import avdigits, avmnist_fsdd
from .avmnist import avmnist
from .mfeat import mfeat
from .base import DatasetSplits, TensorMultimodalDataset
from .io import DatasetFormatError, cache_dir
from .synthetic import ModalitySpec, synthetic

__all__ = ["DatasetFormatError", "DatasetSplits", "ModalitySpec", "TensorMultimodalDataset", "avdigits",
           "avmnist", "avmnist_fsdd", "cache_dir", "mfeat", "synthetic"]
