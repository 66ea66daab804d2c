"""The permutation definition of the Shapley mono-modal outputs, for tests that write a method's
original procedure out: o_m = average over all orders of m's marginal contribution + f(∅)/M."""
from __future__ import annotations

import itertools
import math


def permutation_mono(values: dict, n: int) -> list:
    """``values[mask]`` = f(coalition ``mask``); returns [o_0, …, o_{n−1}]."""
    mono = []
    for i in range(n):
        total = 0
        for order in itertools.permutations(range(n)):
            before = 0
            for k in order:
                if k == i:
                    break
                before |= 1 << k
            total = total + values[before | 1 << i] - values[before]
        mono.append(total / math.factorial(n) + values[0] / n)
    return mono
