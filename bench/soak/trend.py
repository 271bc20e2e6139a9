"""
Whether a sampled figure grows: a least-squares line through the samples,
its slope per hour, and the noise that slope would show without any trend.

Samples taken every few seconds of a figure that moves slowly (RSS above
all) are not independent: each is close to the one before. The textbook
standard error of a slope assumes they are, and then calls any wander a
trend. The noise here counts the samples as fewer when their residuals are
correlated: n (1 - r) / (1 + r) for the lag-1 autocorrelation r of the
residuals (Santer et al., 2000), never more than n.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

__all__ = ["Trend", "fit"]


@dataclass(frozen=True, slots=True)
class Trend:
    """
    ``slope_per_h`` in the figure's unit per hour; ``noise_per_h`` is twice
    the slope's standard error, for the samples' effective number
    (a slope inside ±noise is what the scatter alone would give about 95 %
    of the time); ``lag1`` is the residuals' lag-1 autocorrelation.
    """

    samples: int
    first: float
    last: float
    low: float
    high: float
    mean: float
    slope_per_h: float
    noise_per_h: float
    lag1: float = 0.0

    @property
    def beyond_noise(self) -> bool:
        return abs(self.slope_per_h) > self.noise_per_h

    @property
    def relative_per_h(self) -> float:
        """
        The slope as a share of the mean, per hour (0 for a zero mean).
        """
        return self.slope_per_h / self.mean if self.mean else 0.0


def fit(points: list[tuple[float, float]]) -> Trend:
    """
    The trend of ``(seconds, value)`` points; at least three, over some time.
    """
    if len(points) < 3:
        raise ValueError("a trend needs at least three samples")
    n = len(points)
    ts = [t for t, _ in points]
    vs = [v for _, v in points]
    t_mean = sum(ts) / n
    v_mean = sum(vs) / n
    spread = sum((t - t_mean) ** 2 for t in ts)
    if spread == 0:
        raise ValueError("the samples must span some time")
    slope = sum((t - t_mean) * (v - v_mean) for t, v in points) / spread
    intercept = v_mean - slope * t_mean
    residuals = [v - (intercept + slope * t) for t, v in points]
    residual = sum(r * r for r in residuals)
    # A line the samples lie on (to rounding) has no scatter to correlate.
    exact = residual <= 1e-12 * sum(v * v for v in vs)
    lag1 = 0.0 if exact else sum(a * b for a, b in itertools.pairwise(residuals)) / residual
    # Negative correlation would count more samples than were taken: never.
    # Fewer than three effective samples leave one degree of freedom: the
    # noise is then as wide as three give, not infinite.
    effective = max(3.0, n * (1 - max(lag1, 0.0)) / (1 + max(lag1, 0.0)))
    standard_error = math.sqrt(residual / (effective - 2) / spread)
    return Trend(
        samples=n,
        first=vs[0],
        last=vs[-1],
        low=min(vs),
        high=max(vs),
        mean=v_mean,
        slope_per_h=slope * 3600,
        noise_per_h=2 * standard_error * 3600,
        lag1=lag1,
    )
