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


__all__ = ["Measured", "interleaved"]
