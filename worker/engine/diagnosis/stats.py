"""Robust statistics for noisy training curves (standard library only).

Loss and grad-norm series are noisy, heavy-tailed and autocorrelated, so
trends are judged on bin medians with rank-based tests: the Theil-Sen slope
(median of pairwise slopes) ignores outliers, and the Mann-Kendall statistic
counts how often later values exceed earlier ones, whatever the curve's shape.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Pairwise methods are O(n^2): longer series are thinned evenly to this many points first.
MAX_PAIRWISE_POINTS = 200


def finite(x: object) -> bool:
    """A real, finite number (bools are flags, not numbers)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def thin(values: Sequence, limit: int = MAX_PAIRWISE_POINTS) -> list:
    """At most `limit` evenly spaced items, first and last kept."""
    n = len(values)
    if n <= limit:
        return list(values)
    return [values[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


def theil_sen_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Median of the pairwise slopes (ys per unit of xs); 0 with fewer than two distinct xs."""
    pts = thin(list(zip(xs, ys, strict=True)))
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(pts) for x2, y2 in pts[i + 1:] if x2 != x1]
    return statistics.median(slopes) if slopes else 0.0


def mann_kendall_z(ys: Sequence[float]) -> float:
    """Mann-Kendall trend z-score: > 0 rising, < 0 falling; |z| > 3 is p < 0.003 (no tie correction)."""
    vals = thin(list(ys))
    n = len(vals)
    if n < 3:
        return 0.0
    s = sum((b > a) - (b < a) for i, a in enumerate(vals) for b in vals[i + 1:])
    var = n * (n - 1) * (2 * n + 5) / 18
    if s == 0:
        return 0.0
    return (s - math.copysign(1, s)) / math.sqrt(var)


def bin_medians(points: Sequence[tuple[int, float]], n_bins: int) -> list[tuple[int, float]]:
    """(median step, median value) of consecutive equal-sized chunks; the points themselves when few."""
    n = len(points)
    if n <= n_bins:
        return list(points)
    width = math.ceil(n / n_bins)
    out = []
    for start in range(0, n, width):
        chunk = points[start:start + width]
        out.append((chunk[len(chunk) // 2][0], statistics.median(v for _, v in chunk)))
    return out


def rolling_median(values: Sequence[float], k: int) -> list[float]:
    """Centered rolling median over k items (fewer at the edges)."""
    half = k // 2
    return [statistics.median(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def log_or_none(x: float) -> float | None:
    """Natural log of a positive finite number, else None."""
    return math.log(x) if finite(x) and x > 0 else None
