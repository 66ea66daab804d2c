"""Datasets, registered by name in :data:`modbal.registry.DATASETS`; each returns DatasetSplits."""
from . import audio, espeak  # noqa: F401  (submodules exposed as modbal.datasets.audio / .espeak)
from .affect import AffectSequences, mosei, pad_collate, urfunny
from .avdigits import avdigits, avmnist_fsdd
from .ave import AVE, ave
from .avmnist import avmnist
from .base import DatasetSplits, TensorMultimodalDataset
from .cremad import CremaD, cremad
from .io import DatasetFormatError, cache_dir
from .mfeat import mfeat
from .synthetic import ModalitySpec, synthetic

__all__ = ["AVE", "AffectSequences", "CremaD", "DatasetFormatError", "DatasetSplits", "ModalitySpec",
           "TensorMultimodalDataset", "ave", "avdigits", "avmnist", "avmnist_fsdd", "cache_dir", "cremad", "mfeat",
           "mosei", "pad_collate", "synthetic", "urfunny"]
