"""The Shapley module against permutation-based Shapley values computed naively here."""
import itertools
import math

import pytest
import torch

from modbal.shapley import mono_outputs, shapley_matrix, shapley_values


def naive_shapley(values: torch.Tensor, m_total: int) -> torch.Tensor:
    """Average marginal contribution over all M! orderings (independent of the weight formula)."""
    phi = torch.zeros(m_total, *values.shape[1:], dtype=values.dtype)
    for order in itertools.permutations(range(m_total)):
        mask = 0
        for m in order:
            phi[m] += values[mask | 1 << m] - values[mask]
            mask |= 1 << m
    return phi / math.factorial(m_total)


@pytest.mark.parametrize("m_total", [2, 3, 4, 5])
def test_matches_permutation_definition(m_total):
    values = torch.randn(2 ** m_total, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(shapley_values(values, m_total), naive_shapley(values, m_total))


@pytest.mark.parametrize("m_total", [2, 3, 4, 6, 8])
def test_efficiency_of_mono_outputs(m_total):
    values = torch.randn(2 ** m_total, 5, 4, dtype=torch.float64)
    mono = mono_outputs(values, m_total)
    torch.testing.assert_close(mono.sum(0), values[-1])
    torch.testing.assert_close(shapley_values(values, m_total).sum(0), values[-1] - values[0])


def test_paper_formulas_for_two_and_three_modalities():
    f = torch.randn(4, 7, dtype=torch.float64)  # masks: bit0 = a, bit1 = v
    o = mono_outputs(f, 2)
    torch.testing.assert_close(o[0], 0.5 * (f[3] - f[2] + f[1]))  # ½[f(a,v) − f(0,v) + f(a,0)]
    torch.testing.assert_close(o[1], 0.5 * (f[3] - f[1] + f[2]))
    g = torch.randn(8, 5, dtype=torch.float64)  # bits: a=1, v=2, t=4
    a, v, t = 1, 2, 4
    o3 = mono_outputs(g, 3)
    expected_t = (g[a | v | t] - g[a | v] + g[t]) / 3 + (g[a | t] - g[a] + g[v | t] - g[v]) / 6
    torch.testing.assert_close(o3[2], expected_t)


def test_symmetric_game_and_dummy_player():
    m_total = 4
    sizes = torch.tensor([bin(s).count("1") for s in range(16)], dtype=torch.float64)
    symmetric = sizes ** 2  # v(S) depends only on |S|
    phi = shapley_values(symmetric, m_total)
    torch.testing.assert_close(phi, torch.full((4,), 16.0 / 4, dtype=torch.float64))
    weights = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float64)  # player 2 is a dummy
    additive = torch.tensor([sum(weights[i] for i in range(4) if s >> i & 1) for s in range(16)], dtype=torch.float64)
    additive = additive + torch.where(torch.tensor([s & 0b1001 == 0b1001 for s in range(16)]), 5.0, 0.0)
    phi = shapley_values(additive, m_total)
    assert abs(float(phi[2])) < 1e-12
    torch.testing.assert_close(phi, torch.tensor([3.5, 2.0, 0.0, 5.5], dtype=torch.float64))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="expected 8 coalition values"):
        mono_outputs(torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match="num_modalities"):
        shapley_matrix(0)
