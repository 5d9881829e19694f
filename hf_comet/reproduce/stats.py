"""Statistics of the results page: means with 95 % t-intervals over seeds, paired t-tests between variants (runs of
the same seed share the data order and the initial weights where the architectures allow), learning-curve summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

SIGNIFICANCE = 0.05
"""Two-sided level of every test on the page."""


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and the 95 % t-interval ``(mean, low, high)`` of ``values`` (NaN bounds for one value)."""
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.975, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return mean, mean - half, mean + half


def paired_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a - b`` and the two-sided p-value of a paired t-test (runs paired by seed); p = 1 when every
    difference is 0, NaN with fewer than two pairs."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.size < 2:
        return float(diff.mean()) if diff.size else math.nan, math.nan
    if np.allclose(diff, 0.0, rtol=0.0, atol=1e-12):  # no difference (up to float noise), whatever the order
        return float(diff.mean()), 1.0
    if np.ptp(diff) == 0:  # exactly the same non-zero difference in every pair: the t statistic is infinite
        return float(diff[0]), 0.0
    return float(diff.mean()), float(scipy_stats.ttest_rel(a, b).pvalue)


def gap_in_points(values: Sequence[float], reference: Sequence[float]) -> tuple[float, float, float, float]:
    """Paired accuracy gap of ``values`` over ``reference`` (runs paired by seed), in points: mean, 95 % interval
    bounds and the paired test's p-value."""
    diff, p = paired_test(values, reference)
    _, low, high = mean_interval([100 * (a - b) for a, b in zip(values, reference, strict=True)])
    return 100 * diff, low, high, p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error at the level compared against); NaN stays NaN."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (len(indexed) - rank) * p))
        adjusted[i] = running
    return adjusted


def area_under_curve(steps: Sequence[int], values: Sequence[float]) -> float:
    """Mean of a validation curve over its optimizer steps (trapezoidal area / span): higher means it learned faster
    per update, for curves on the same steps."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.size < 2:
        return float(values.mean())
    area = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)))
    return area / float(steps[-1] - steps[0])


def steps_to_reach(steps: Sequence[int], values: Sequence[float], threshold: float, higher_is_better: bool = True):
    """The first evaluated optimizer step at which the curve reaches ``threshold``, or ``None`` if it never does."""
    for step, value in zip(steps, values, strict=True):
        if (value >= threshold) if higher_is_better else (value <= threshold):
            return int(step)
    return None


def format_interval(values: Sequence[float], digits: int = 3) -> str:
    """``mean [low, high]`` for a table cell."""
    mean, low, high = mean_interval(values)
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


__all__ = [
    "SIGNIFICANCE", "area_under_curve", "format_interval", "gap_in_points", "holm", "mean_interval", "paired_test", "steps_to_reach",
]
