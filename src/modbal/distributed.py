"""Process-group helpers that are no-ops in a single process.

Balancing methods reduce the statistics that decide their coefficients with :func:`all_reduce_sum`,
so every rank applies the same coefficients (the method sees the global batch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .adapt import as_multimodal


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over all ranks (a detached copy; the input is left untouched)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The multimodal model behind a DistributedDataParallel wrapper: the model itself when it is
    a :class:`~modbal.model.MultimodalModel`, the view of a module exposing ``encoders`` and
    ``fusion`` (:func:`modbal.adapt.as_multimodal`), a ``TypeError`` naming what is missing otherwise."""
    return as_multimodal(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)


def batch_means(per_sample: Tensor) -> Tensor:
    """Global means over the batch axis (last) of ``per_sample`` (rows × B), across ranks."""
    rows = per_sample.detach().double()
    sums = all_reduce_sum(torch.cat([rows.sum(-1), rows.new_tensor([rows.shape[-1]])]))
    return sums[:-1] / sums[-1]
