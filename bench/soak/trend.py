"""
Whether a sampled figure grows: a least-squares line through the samples,
its slope per hour, and the noise that slope would show without any trend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Trend", "fit"]


@dataclass(frozen=True, slots=True)
class Trend:
    """
    ``slope_per_h`` in the figure's unit per hour; ``noise_per_h`` is twice
    the slope's standard error (a slope inside ±noise is what the scatter
    alone would give about 95 % of the time).
    """

    samples: int
    first: float
    last: float
    low: float
    high: float
    mean: float
    slope_per_h: float
    noise_per_h: float

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
    residual = sum((v - (intercept + slope * t)) ** 2 for t, v in points)
    standard_error = math.sqrt(residual / (n - 2) / spread)
    return Trend(
        samples=n,
        first=vs[0],
        last=vs[-1],
        low=min(vs),
        high=max(vs),
        mean=v_mean,
        slope_per_h=slope * 3600,
        noise_per_h=2 * standard_error * 3600,
    )
