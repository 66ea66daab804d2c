"""Balancing methods, one per file, registered by name in :data:`modbal.registry.METHODS`."""
from .agm import AGM
from .base import Method
from .joint import Joint

__all__ = ["AGM", "Joint", "Method"]
