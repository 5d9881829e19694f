"""Timing candidates side by side in one process (`interleaved`): what ``hf-comet bench`` and ``hf-comet sparsify``
report, as ratios to a baseline timed in the same rounds."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Measured:
    """One candidate of a section: per-round seconds and ratios to the baseline."""

    name: str
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    def ratio_range(self) -> str:
        if not self.ratios:
            return "-"
        return f"{min(self.ratios):.2f}-{max(self.ratios):.2f}"


def interleaved(
    candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, repeat: int = 1
) -> dict[str, Measured]:
    """Time each candidate once per round, in turn (the first is the baseline); ``repeat`` calls per timing."""
    results = {name: Measured(name) for name in candidates}
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    names = list(candidates)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]  # alternate the order: no fixed neighbour
        for name in order:
            gc.collect()
            start = time.perf_counter()
            for _ in range(repeat):
                candidates[name]()
            results[name].seconds.append((time.perf_counter() - start) / repeat)
    baseline = results[names[0]].seconds
    for measured in results.values():
        measured.ratios = [s / b for s, b in zip(measured.seconds, baseline, strict=True)]
    return results


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median that ``values`` (independent draws, e.g. per-round ratios) come
    from: the order statistics x_(j) and x_(n+1-j) for the largest j whose coverage, 1 - 2 P(Binomial(n, 1/2) < j),
    is at least ``level``. NaN bounds when even the minimum and maximum cover less (fewer than 6 values at 95 %)."""
    import math

    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: a coverage strictly between 0 and 1 is allowed")
    if any(value != value for value in values):
        raise ValueError(f"values={list(values)!r}: a NaN has no rank; only numbers are allowed")
    ordered, n = sorted(values), len(values)
    chosen, below = 0, 0.0  # below: P(Binomial(n, 1/2) < j) for the j being tried
    for j in range(1, n // 2 + 1):
        below += math.comb(n, j - 1) / 2**n
        if 1.0 - 2.0 * below < level:
            break
        chosen = j
    if not chosen:
        return math.nan, math.nan
    return ordered[chosen - 1], ordered[n - chosen]


__all__ = ["Measured", "interleaved", "median_interval"]
