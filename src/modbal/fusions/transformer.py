"""Token-level fusion: every modality's tokens, in one sequence, through a small Transformer encoder."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..registry import FUSIONS
from ._common import positive_int
from .base import Fusion

POOLS = ("cls", "mean")


@FUSIONS.register("transformer")
class TransformerFusion(Fusion):
    """Per-modality tokens → Linear_m to ``dim`` + learned modality embedding → concatenated
    (after an optional CLS token) → ``nn.TransformerEncoder`` → pooled → LayerNorm → Linear head.

    A feature of shape (T, D) is T tokens, one of shape (D,) is a single token; T may differ
    between batches (no positional embedding is added here: sequence encoders add their own).
    All tokens are attended to, including zero tokens from padded steps or muted modalities.

    Args:
        dim: common token width. Default 64.
        depth: number of encoder layers. Default 1.
        heads: attention heads (must divide ``dim``). Default 4.
        ff_dim: feed-forward width. Default 2 × dim.
        dropout: dropout inside the encoder layers. Default 0.1.
        pool: "cls" (a learned CLS token's output) or "mean" (mean over all tokens). Default "cls".
    """

    def __init__(self, feature_shapes: Mapping[str, tuple[int, ...]], num_classes: int,
                 dim: int = 64, depth: int = 1, heads: int = 4, ff_dim: int | None = None,
                 dropout: float = 0.1, pool: str = "cls") -> None:
        super().__init__(feature_shapes, num_classes)
        for value, name in ((dim, "dim"), (depth, "depth"), (heads, "heads")):
            positive_int(value, name, "transformer fusion")
        if dim % heads:
            raise ValueError(f"transformer fusion: dim={dim} is not divisible by heads={heads}")
        if pool not in POOLS:
            raise ValueError(f"transformer fusion: unknown pool {pool!r}; allowed values: {', '.join(POOLS)}")
        for m, s in self.feature_shapes.items():
            if len(s) not in (1, 2):
                raise ValueError(f"transformer fusion: modality {m!r} has feature shape {s}; expected "
                                 f"(D,) (one token) or (T, D) (T tokens)")
        self.pool = pool
        self.project = nn.ModuleDict({m: nn.Linear(s[-1], dim) for m, s in self.feature_shapes.items()})
        self.modality_embedding = nn.Parameter(torch.randn(len(self.modalities), dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pool == "cls" else None
        layer = nn.TransformerEncoderLayer(dim, heads, ff_dim or 2 * dim, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def _tokens(self, m: str, x: Tensor) -> Tensor:
        expected = self.feature_shapes[m]
        shape = tuple(x.shape[1:])
        ok = shape == expected if len(expected) == 1 else (len(shape) == 2 and shape[1] == expected[1])
        if not ok:
            raise ValueError(f"TransformerFusion: modality {m!r} feature has per-sample shape {shape}, "
                             f"expected {expected} (the token count may vary)")
        return x.unsqueeze(1) if x.dim() == 2 else x

    def represent(self, features: Mapping[str, Tensor]) -> Tensor:
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise KeyError(f"TransformerFusion expects features for {list(self.modalities)}; missing {missing}")
        tokens = [self.project[m](self._tokens(m, features[m])) + self.modality_embedding[i]
                  for i, m in enumerate(self.modalities)]
        batch = tokens[0].shape[0]
        if self.cls is not None:
            tokens.insert(0, self.cls.expand(batch, -1, -1))
        out = self.encoder(torch.cat(tokens, dim=1))
        pooled = out[:, 0] if self.pool == "cls" else out.mean(dim=1)
        return self.norm(pooled)
