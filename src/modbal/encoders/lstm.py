"""An LSTM sequence encoder for (T, F) inputs: the last valid hidden state of each sequence.

Padding: trailing all-zero time steps are padding (see ``modbal.encoders._sequence``); sequences
are packed so the LSTM stops at each one's last valid step. An all-zero sequence (AGM's muted
sample) is run as one zero step, so its output is finite.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..registry import ENCODERS
from ._sequence import check_sequence_batch, check_sequence_shape, sequence_lengths


@ENCODERS.register("lstm")
class LSTMEncoder(nn.Module):
    """Packed ``nn.LSTM`` → final hidden state of the last layer (both directions concatenated
    when bidirectional) (→ Linear → ReLU to ``out_dim``).

    Args:
        input_shape: (T, F); batches may have any number of steps, F must match.
        hidden: LSTM hidden size. Default 64.
        layers: stacked LSTM layers. Default 1.
        bidirectional: run both directions. Default False.
        dropout: dropout between stacked layers (only with layers > 1). Default 0.
        out_dim: optional projection size; None keeps hidden (× 2 if bidirectional). Default None.
    """

    def __init__(self, input_shape: Sequence[int], hidden: int = 64, layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0, out_dim: int | None = None) -> None:
        super().__init__()
        _, self.features = check_sequence_shape(input_shape, "lstm encoder")
        if hidden < 1 or layers < 1:
            raise ValueError(f"lstm encoder: hidden and layers must be positive, got {hidden}, {layers}")
        self.directions = 2 if bidirectional else 1
        self.lstm = nn.LSTM(self.features, hidden, layers, batch_first=True, bidirectional=bidirectional,
                            dropout=dropout if layers > 1 else 0.0)
        width = hidden * self.directions
        self.project = None
        if out_dim is not None:
            self.project = nn.Sequential(nn.Linear(width, out_dim), nn.ReLU())
            width = out_dim
        self.out_shape = (width,)

    def forward(self, x: Tensor) -> Tensor:
        check_sequence_batch(x, self.features, "lstm encoder")
        lengths = sequence_lengths(x).clamp_min(1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # (layers × directions, B, hidden), in input order
        out = torch.cat(list(h_n[-self.directions:]), dim=1)
        return out if self.project is None else self.project(out)
