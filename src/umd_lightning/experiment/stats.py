"""Summary statistics of an experiment's results: mean and sample standard deviation over seeds, and the paired
comparison of two rows (the per-seed differences' mean with a Student-t 95% confidence interval).

The t quantile comes from a table rather than SciPy, which this package does not depend on: ``T_975`` holds
``t_{0.975, df}`` for df = 1..30 to four decimals (the standard table values; a grid has a handful of seeds, so
these are the quantiles in use), and above 30 degrees of freedom the Cornish-Fisher expansion of the t quantile
around the normal one (Abramowitz & Stegun 26.7.5), whose error there is below 1e-4.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
"""``T_975[df - 1]`` is the 97.5% quantile of Student's t with ``df`` degrees of freedom."""


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df >= 1`` degrees of freedom (two-sided 95% intervals)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (``n - 1`` in the denominator; ``None`` for one value) of ``n`` values."""

    n: int
    mean: float
    std: float | None


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarise")
    std = statistics.stdev(values) if len(values) > 1 else None
    return Summary(len(values), statistics.fmean(values), std)


@dataclass(frozen=True)
class Paired:
    """The per-seed differences ``with - without``: their mean, standard deviation and 95% t-interval
    ``mean +- t_{0.975, n-1} * std / sqrt(n)`` (``None`` with fewer than two pairs)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None


def paired_difference(with_: Sequence[float], without: Sequence[float]) -> Paired:
    """Compare two rows on the same seeds (``with_[i]`` and ``without[i]`` share a seed)."""
    if len(with_) != len(without) or not with_:
        raise ValueError(f"paired values must have the same, non-zero length: {len(with_)} vs {len(without)}")
    summary = summarize([a - b for a, b in zip(with_, without)])
    if summary.std is None:
        return Paired(summary.n, summary.mean, None, None, None)
    half = t_quantile_975(summary.n - 1) * summary.std / math.sqrt(summary.n)
    return Paired(summary.n, summary.mean, summary.std, summary.mean - half, summary.mean + half)
