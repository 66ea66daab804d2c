"""A Transformer sequence encoder for (T, F) inputs (e.g. per-frame audio or text features).

Padding: trailing all-zero time steps are padding (see ``modbal.encoders._sequence``) and are
masked as attention keys. A learned CLS token is always present and never masked, so a sample
whose every step is padding (AGM's muted all-zero sample) still gives a finite output.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..registry import ENCODERS
from ._sequence import check_sequence_batch, check_sequence_shape, sequence_lengths

POOLS = ("cls", "mean")


@ENCODERS.register("transformer_seq")
class TransformerSeqEncoder(nn.Module):
    """Linear(F → dim) + learned positions, after a CLS token → pre-norm ``nn.TransformerEncoder``
    (key padding mask) → LayerNorm → pooled vector (dim,) or, with ``tokens=True``, tokens (T, dim).

    Args:
        input_shape: (T, F): the longest sequence T (batches may be shorter) and F features per step.
        dim: model width. Default 64.
        depth: encoder layers. Default 2.
        heads: attention heads (must divide ``dim``). Default 4.
        ff_dim: feed-forward width. Default 2 × dim.
        dropout: dropout inside the layers. Default 0.1.
        pool: "cls" (the CLS token's output) or "mean" (mean over valid steps; the CLS output
            when there are none). Default "cls".
        tokens: output the per-step outputs (T, dim) instead, padded steps (and steps past a
            batch's length, up to T) set to zero; ``pool`` is then unused. Default False.
    """

    def __init__(self, input_shape: Sequence[int], dim: int = 64, depth: int = 2, heads: int = 4,
                 ff_dim: int | None = None, dropout: float = 0.1, pool: str = "cls",
                 tokens: bool = False) -> None:
        super().__init__()
        self.max_len, self.features = check_sequence_shape(input_shape, "transformer_seq encoder")
        if pool not in POOLS:
            raise ValueError(f"transformer_seq encoder: unknown pool {pool!r}; allowed values: {', '.join(POOLS)}")
        if dim < 1 or heads < 1 or depth < 1 or dim % heads:
            raise ValueError(f"transformer_seq encoder: need positive dim, heads, depth with dim divisible "
                             f"by heads; got dim={dim}, heads={heads}, depth={depth}")
        self.pool, self.tokens = pool, tokens
        self.project = nn.Linear(self.features, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, self.max_len + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff_dim or 2 * dim, dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.out_shape = (self.max_len, dim) if tokens else (dim,)

    def forward(self, x: Tensor) -> Tensor:
        check_sequence_batch(x, self.features, "transformer_seq encoder")
        batch, steps = x.shape[:2]
        if steps > self.max_len:
            raise ValueError(f"transformer_seq encoder: got {steps} time steps, more than the "
                             f"{self.max_len} of its input_shape")
        valid = torch.arange(steps, device=x.device) < sequence_lengths(x).unsqueeze(1)  # (B, T)
        h = torch.cat([self.cls.expand(batch, -1, -1), self.project(x)], dim=1) + self.position[:, :steps + 1]
        padding = torch.cat([valid.new_zeros(batch, 1), ~valid], dim=1)  # CLS never masked
        out = self.encoder(h, src_key_padding_mask=padding)
        steps_out = out[:, 1:] * valid.unsqueeze(2).to(out.dtype)
        if self.tokens:
            return nn.functional.pad(steps_out, (0, 0, 0, self.max_len - steps))
        if self.pool == "cls":
            return out[:, 0]
        count = valid.sum(dim=1, keepdim=True)
        mean = steps_out.sum(dim=1) / count.clamp_min(1).to(out.dtype)
        return torch.where(count > 0, mean, out[:, 0])
