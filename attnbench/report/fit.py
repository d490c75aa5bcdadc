"""Power laws fitted on log–log axes: cost ≈ a · N^b, with the exponent b's confidence interval.

Least squares of log y on log x (natural logs) over n points gives the slope b and intercept log a. Its
standard error is s / sqrt(Σ(log x − mean log x)²) with s² the residual sum of squares over n − 2, and the
interval b ± t(n − 2) · se is Student's t-interval. With n = 2 the line passes through both points: the
slope is exact for those points and no interval can be estimated (``ci`` is None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class SlopeFit:
    """y ≈ prefactor · x^slope, fitted on ``n`` points; ``ci`` is the slope's interval at ``confidence``."""

    slope: float
    intercept: float  # natural log of the prefactor
    n: int
    ci: tuple[float, float] | None
    confidence: float
    r_squared: float

    @property
    def prefactor(self) -> float:
        return math.exp(self.intercept)

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.prefactor * np.asarray(x, dtype=float) ** self.slope

    def ci_contains(self, value: float) -> bool | None:
        """Whether ``value`` lies in the slope's interval; None when there is no interval (n = 2)."""
        return None if self.ci is None else self.ci[0] <= value <= self.ci[1]

    def describe(self, digits: int = 3) -> str:
        """``1.333 [1.301, 1.365] (n=4, 95% CI)``, or ``1.333 (n=2, no CI)``."""
        if self.ci is None:
            return f"{self.slope:.{digits}f} (n={self.n}, no CI)"
        low, high = self.ci
        return f"{self.slope:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] (n={self.n}, {self.confidence:.0%} CI)"


def fit_loglog_slope(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> SlopeFit:
    """Least-squares line through (log x, log y); x and y positive and finite, at least two distinct x."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-d and of equal length, got shapes {xs.shape} and {ys.shape}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)) and np.all(xs > 0) and np.all(ys > 0)):
        raise ValueError("x and y must be positive and finite to be fitted on log–log axes")
    log_x, log_y = np.log(xs), np.log(ys)
    n = len(xs)
    centred_x = log_x - log_x.mean()
    sxx = float(centred_x @ centred_x)
    if n < 2 or sxx == 0:
        raise ValueError("a slope needs at least two distinct x values")
    slope = float(centred_x @ (log_y - log_y.mean())) / sxx
    intercept = float(log_y.mean() - slope * log_x.mean())
    residuals = log_y - (intercept + slope * log_x)
    ssr = float(residuals @ residuals)
    centred_y = log_y - log_y.mean()
    syy = float(centred_y @ centred_y)
    r_squared = 1.0 - ssr / syy if syy > 0 else 1.0
    ci = None
    if n > 2:
        standard_error = math.sqrt(ssr / (n - 2) / sxx)
        half_width = float(stats.t.ppf(0.5 + confidence / 2, n - 2)) * standard_error
        ci = (slope - half_width, slope + half_width)
    return SlopeFit(slope=slope, intercept=intercept, n=n, ci=ci, confidence=confidence, r_squared=r_squared)


def reference_line(x: Sequence[float], exponent: float, through: tuple[float, float]) -> np.ndarray:
    """y = c · x^exponent through the point ``through`` (x0, y0): O(N), O(N^{4/3}), O(N²) guides for plots."""
    x0, y0 = through
    return y0 * (np.asarray(x, dtype=float) / x0) ** exponent
