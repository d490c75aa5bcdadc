"""Intervals for the accuracy tables: pure functions, no I/O, deterministic.

* ``bootstrap_mean``: mean over seeds with a percentile-bootstrap confidence interval (Efron & Tibshirani 1993,
  ch. 13): resample the seeds with replacement, take the mean of each resample, read the interval from the
  quantiles of those means. A fixed generator seed makes the interval reproducible.
* ``wilson``: the Wilson score interval of one proportion (Wilson 1927), e.g. one run's top-1 on n images.
* ``compare_means``: the difference of two mechanisms' seed means, with a bootstrap interval (each group
  resampled on its own: different mechanisms' runs are independent) and a verdict: "separated" when the
  interval excludes 0, "not separated" when it contains 0.

With fewer than two values a bootstrap has nothing to resample: the interval is (nan, nan), not a zero-width
interval that would look certain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

RESAMPLES = 10_000
RNG_SEED = 0
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
    """Mean of ``a`` minus mean of ``b`` with its bootstrap interval, and whether the interval excludes 0."""

    difference: Interval
    verdict: str  # SEPARATED or NOT_SEPARATED


def _values(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what}: need a non-empty list of numbers, got {values!r}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: values must be finite, got {values!r}")
    return array


def _bootstrap_means(array: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """(resamples,) means of resamples of ``array`` drawn with replacement."""
    picks = rng.integers(0, array.size, size=(resamples, array.size))
    return array[picks].mean(axis=1)


def _quantiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(low), float(high)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, resamples: int = RESAMPLES,
                   seed: int = RNG_SEED) -> Interval:
    """Mean of ``values`` (one per seed) with its percentile-bootstrap interval."""
    _check_confidence(confidence)
    array = _values(values, "bootstrap_mean")
    mean = float(array.mean())
    if array.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    low, high = _quantiles(_bootstrap_means(array, np.random.default_rng(seed), resamples), confidence)
    return Interval(mean, low, high, int(array.size))


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


def compare_means(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = RESAMPLES,
                  seed: int = RNG_SEED) -> Comparison:
    """mean(a) - mean(b) (e.g. two mechanisms' far-bin accuracy over seeds) with a bootstrap interval and the
    verdict "separated" (interval excludes 0) or "not separated" (contains 0, or fewer than 2 values a side)."""
    _check_confidence(confidence)
    first, second = _values(a, "compare_means a"), _values(b, "compare_means b")
    difference = float(first.mean() - second.mean())
    if first.size < 2 or second.size < 2:
        return Comparison(Interval(difference, math.nan, math.nan, min(first.size, second.size)), NOT_SEPARATED)
    rng = np.random.default_rng(seed)
    samples = _bootstrap_means(first, rng, resamples) - _bootstrap_means(second, rng, resamples)
    low, high = _quantiles(samples, confidence)
    interval = Interval(difference, low, high, min(first.size, second.size))
    return Comparison(interval, NOT_SEPARATED if interval.contains(0.0) else SEPARATED)
