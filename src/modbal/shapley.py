"""Exact Shapley values over coalitions of modalities.

Coalitions are integer bitmasks over the modality order: bit ``i`` set means modality ``i`` is
present (not muted). A tensor of coalition outputs has the coalition index as its first axis,
``values[mask]`` = f(S). Everything here is a pure function of those values.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def num_coalitions(num_modalities: int) -> int:
    """2^M: every subset of M modalities, the empty one included (coalition S is a bitmask)."""
    return 1 << num_modalities


def full_coalition(num_modalities: int) -> int:
    """The bitmask of the coalition of all M modalities."""
    return num_coalitions(num_modalities) - 1


@lru_cache(maxsize=None)
def _weights(num_modalities: int, empty_share: bool) -> tuple[tuple[float, ...], ...]:
    m_total = num_modalities
    rows = []
    for m in range(m_total):
        row = [0.0] * num_coalitions(m_total)
        bit = 1 << m
        for mask in range(num_coalitions(m_total)):
            if mask & bit:
                continue
            size = bin(mask).count("1")
            w = math.factorial(size) * math.factorial(m_total - size - 1) / math.factorial(m_total)
            row[mask | bit] += w
            row[mask] -= w
        if empty_share:
            row[0] += 1.0 / m_total
        rows.append(tuple(row))
    return tuple(rows)


def shapley_matrix(
    num_modalities: int, *, empty_share: bool = False, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Matrix ``W`` (M × 2^M) with ``φ = W @ values`` the Shapley values of each modality.

    With ``empty_share=True`` each row also takes ``f(∅)/M``, giving AGM's mono-modal outputs
    ``o_m = φ_m + f(∅)/M`` whose sum is exactly ``f(all)``.
    """
    if not 1 <= num_modalities <= 16:
        raise ValueError(f"num_modalities must be in [1, 16], got {num_modalities}")
    return torch.tensor(_weights(num_modalities, empty_share), dtype=dtype, device=device)


def _combine(values: Tensor, num_modalities: int, empty_share: bool) -> Tensor:
    expected = num_coalitions(num_modalities)
    if values.shape[0] != expected:
        raise ValueError(
            f"expected {expected} coalition values on axis 0 for {num_modalities} modalities, "
            f"got shape {tuple(values.shape)}"
        )
    w = shapley_matrix(num_modalities, empty_share=empty_share, dtype=values.dtype, device=values.device)
    return torch.tensordot(w, values, dims=([1], [0]))


def shapley_values(values: Tensor, num_modalities: int) -> Tensor:
    """Exact Shapley values φ (M × ...) from coalition values f(S) (2^M × ...)."""
    return _combine(values, num_modalities, empty_share=False)


def mono_outputs(values: Tensor, num_modalities: int) -> Tensor:
    """AGM's mono-modal outputs ``o_m = φ_m + f(∅)/M`` (M × ...); they sum to ``f(all)``."""
    return _combine(values, num_modalities, empty_share=True)
