"""Fusion strategies, one per file, registered by name in :data:`modbal.registry.FUSIONS`."""
from .base import Fusion
from .concat import ConcatFusion

__all__ = ["ConcatFusion", "Fusion"]
