"""The statistics of a leaderboard, as pure functions: t-intervals, paired t-tests, Holm's correction."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats as _st


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and the two-sided ``level`` t-interval of the mean (nan bounds for n < 2)."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float


def t_interval(values: Sequence[float], level: float = 0.95) -> Summary:
    """mean ± t_{(1+level)/2, n−1} · s / √n."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(vals) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(_st.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of mean(a − b) = 0 (nan for fewer than 2 pairs;
    1 when every difference is the same as its mean, 0 when that common difference is not 0)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return math.nan
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return float(2 * _st.t.sf(abs(t), n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone), in the input order; nan stays nan
    and does not count as a test."""
    idx = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def gap_closed(method: float, joint: float, ensemble: float, min_gap: float = 1e-9) -> float:
    """(method − joint) / (ensemble − joint): 0 = no better than joint training, 1 = as good as the
    uni-modal ensemble; nan when the ensemble is not above joint training."""
    gap = ensemble - joint
    return (method - joint) / gap if gap > min_gap else math.nan
