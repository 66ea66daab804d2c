"""Small fusions shared by method tests (kept here so tests need not depend on modbal.fusions)."""
import torch
from torch import nn

from modbal.fusions.base import Fusion


class MLPFusion(Fusion):
    """A one-hidden-layer MLP over the concatenated features: a non-linear fusion."""

    def __init__(self, feature_shapes, num_classes, hidden: int = 16):
        super().__init__(feature_shapes, num_classes)
        width = sum(s[0] for s in self.feature_shapes.values())
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def represent(self, features):
        return self.body(torch.cat([features[m] for m in self.modalities], 1))
