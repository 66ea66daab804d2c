"""Fusion strategies, one per file, registered by name in :data:`modbal.registry.FUSIONS`."""
from .base import Fusion
from .concat import ConcatFusion
from .cosine import CosineFusion
from .early import EarlyFusion
from .film import FiLMFusion
from .gated import GatedFusion
from .lowrank import LowRankFusion
from .maxout import MaxOut, MaxOutFusion
from .sum import SumFusion
from .tensor import TensorFusion
from .transformer import TransformerFusion

__all__ = [
    "ConcatFusion", "CosineFusion", "EarlyFusion", "FiLMFusion", "Fusion", "GatedFusion", "LowRankFusion", "MaxOut",
    "MaxOutFusion", "SumFusion", "TensorFusion", "TransformerFusion",
]
