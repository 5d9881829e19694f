"""Metric modules in `evaluate`'s format, shipped inside hf_comet so that they load offline.

``evaluate.load("accuracy")`` fetches its script from the Hub; ``evaluate.load(str(metric_path("accuracy")))`` loads
the copy in this package (an `evaluate.Metric` subclass in ``hf_comet/metrics/accuracy/accuracy.py``) without any
network access. `load_metric` does that once per process, keeping predictions in memory (no cache files).
"""

from __future__ import annotations

import functools
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
"""The folder holding one `evaluate` module folder per metric."""

METRICS = ("accuracy",)
"""The metric modules shipped here."""


def metric_path(name: str) -> Path:
    """The module folder of the shipped metric ``name`` (what ``evaluate.load`` takes)."""
    if name not in METRICS:
        raise ValueError(f"metric {name!r} is not shipped with hf_comet; choose one of {', '.join(METRICS)}.")
    return METRICS_DIR / name


@functools.cache
def load_metric(name: str):
    """``evaluate.load`` of the shipped metric ``name`` (offline; cached per process, kept in memory)."""
    import evaluate

    return evaluate.load(str(metric_path(name)), keep_in_memory=True)


__all__ = ["METRICS", "METRICS_DIR", "load_metric", "metric_path"]
