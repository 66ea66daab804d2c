"""Encoders, one family per file, registered by name in :data:`modbal.registry.ENCODERS`.

Every encoder takes ``input_shape`` (one sample, no batch axis) and exposes ``out_shape``.
"""
from .cnn import CNNEncoder
from .identity import IdentityEncoder
from .lstm import LSTMEncoder
from .mlp import MLPEncoder
from .resnet import BasicBlock, ResNet18Encoder
from .transformer_seq import TransformerSeqEncoder

__all__ = ["BasicBlock", "CNNEncoder", "IdentityEncoder", "LSTMEncoder", "MLPEncoder", "ResNet18Encoder",
           "TransformerSeqEncoder"]
