"""Encoders, one family per file, registered by name in :data:`modbal.registry.ENCODERS`.

Every encoder takes ``input_shape`` (one sample, no batch axis) and exposes ``out_shape``.
"""
from .mlp import MLPEncoder

__all__ = ["MLPEncoder"]
