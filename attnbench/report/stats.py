"""Intervals and verdicts for the accuracy tables: pure functions, no I/O, deterministic.

* ``mean_interval``: the mean over seeds with its Student-t interval, mean ± t(n-1) · s / √n.
* ``wilson``: the Wilson score interval of one proportion (Wilson 1927), e.g. one run's top-1 on n images.
* ``compare_means``: the difference of two mechanisms' seed means with its Welch interval and the two-sided
  Welch t-test's p-value (unequal variances, Welch-Satterthwaite degrees of freedom; different mechanisms' runs
  are independent, so unpaired).
* ``holm``: the verdicts of a family of comparisons (every pair of a table) by Holm's step-down procedure
  (Holm 1979): "separated" only while the family's chance of one false "separated" stays below 5%.

Why t and not the percentile bootstrap, which the first version used: with the five seeds a suite runs, a
percentile bootstrap of the mean is too narrow (it resamples the five values, so it knows no spread beyond
theirs: about 83% coverage for a nominal 95% on normal data; tests/test_stats.py measures both), and eight
mechanisms give 28 pairs per quantity, so per-pair 95% intervals alone would call about one pair in twenty
"separated" by chance.

With fewer than two values there is no spread to estimate: the interval is (nan, nan) and the pair is never
separated, not a zero-width interval that would look certain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.05
SEPARATED, NOT_SEPARATED = "separated", "not separated"


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval [low, high] and the number of values (or trials) behind it."""

    estimate: float
    low: float
    high: float
    n: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Comparison:
    """Mean of ``a`` minus mean of ``b`` with its 95% Welch interval, the Welch test's p-value, and the verdict:
    by the pair's own interval from ``compare_means``, by the family's Holm procedure after ``holm``."""

    difference: Interval
    p_value: float
    verdict: str  # SEPARATED or NOT_SEPARATED
    adjusted_p: float | None = None  # Holm-adjusted p-value, once ``holm`` has judged the family


def _values(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what}: need a non-empty list of numbers, got {values!r}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: values must be finite, got {values!r}")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` (one per seed) with its Student-t interval: mean ± t_{(1+c)/2}(n-1) · s / √n."""
    _check_confidence(confidence)
    array = _values(values, "mean_interval")
    mean = float(array.mean())
    if array.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, array.size - 1)) * array.std(ddof=1) / math.sqrt(array.size)
    return Interval(mean, mean - half, mean + half, int(array.size))


def wilson(successes: int, trials: int, confidence: float = 0.95) -> Interval:
    """Proportion ``successes / trials`` (in [0, 1]) with its Wilson score interval:

        centre = (p + z²/2n) / (1 + z²/n),   half-width = z / (1 + z²/n) · √(p(1-p)/n + z²/4n²)
    """
    _check_confidence(confidence)
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"wilson: need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges, not 1e-17 off
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return Interval(p, low, high, trials)


def compare_means(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Comparison:
    """mean(a) - mean(b) (e.g. two mechanisms' far-bin accuracy over seeds) with its Welch interval,

        se = √(s_a²/n_a + s_b²/n_b),   df = se⁴ / ((s_a²/n_a)²/(n_a-1) + (s_b²/n_b)²/(n_b-1)),

    the two-sided Welch t-test's p-value, and the verdict of this pair alone: "separated" when the interval
    excludes 0, "not separated" when it contains 0 or a side has fewer than 2 values. A table of many pairs
    judges them together with ``holm``."""
    _check_confidence(confidence)
    first, second = _values(a, "compare_means a"), _values(b, "compare_means b")
    difference = float(first.mean() - second.mean())
    if first.size < 2 or second.size < 2:
        return Comparison(Interval(difference, math.nan, math.nan, min(first.size, second.size)), 1.0, NOT_SEPARATED)
    var_a, var_b = first.var(ddof=1) / first.size, second.var(ddof=1) / second.size
    se = math.sqrt(var_a + var_b)
    n = min(first.size, second.size)
    if se == 0:  # every seed of both sides scored the same: the difference is exact
        p_value = 1.0 if difference == 0 else 0.0
        interval = Interval(difference, difference, difference, n)
    else:
        df = (var_a + var_b) ** 2 / (var_a**2 / (first.size - 1) + var_b**2 / (second.size - 1))
        half = float(scipy_stats.t.ppf((1 + confidence) / 2, df)) * se
        p_value = float(2 * scipy_stats.t.sf(abs(difference) / se, df))
        interval = Interval(difference, difference - half, difference + half, n)
    return Comparison(interval, p_value, NOT_SEPARATED if interval.contains(0.0) else SEPARATED)


def holm(comparisons: Sequence[Comparison], alpha: float = ALPHA) -> list[Comparison]:
    """The comparisons (in their order) with Holm-adjusted p-values and the family's verdicts: sorted by p, the
    i-th smallest (from 0) is separated while every p up to it is at most alpha / (m - i); the first that is not
    stops the procedure, and it and every larger p are not separated. Adjusted p = the running maximum of
    (m - i) · p_(i), capped at 1, so "separated" ⇔ adjusted p ≤ alpha."""
    m = len(comparisons)
    order = sorted(range(m), key=lambda index: comparisons[index].p_value)
    adjusted, running = [1.0] * m, 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * comparisons[index].p_value))
        adjusted[index] = running
    return [replace(comparison, adjusted_p=adjusted[index],
                    verdict=SEPARATED if adjusted[index] <= alpha and comparison.difference.n >= 2 else NOT_SEPARATED)
            for index, comparison in enumerate(comparisons)]
