"""Claim: COMET on a regression task (the paper's SARCOS regression; here the 4-layer MLP on scikit-learn's diabetes),
with the MLP claim's pipeline (`comet_mlp.mlp_claim`)."""

from __future__ import annotations

from pathlib import Path

from .comet_mlp import MLPSettings, mlp_claim
from .core import ClaimResult, register_claim

REGRESSION_FULL = MLPSettings(
    widths=(128, 512), keep_rates=(0.5,), seeds=(0, 1, 2, 3, 4), steps=600, eval_every=25,
    learning_rates=(3e-4, 1e-3, 3e-3), tune_width=128, variants=("dense", "smaller", "dropout", "comet", "block_comet"),
)  # fmt: skip
REGRESSION_QUICK = MLPSettings(
    widths=(32,), keep_rates=(0.5,), seeds=(0, 1), steps=20, eval_every=10, learning_rates=(1e-3,), tune_width=32,
    variants=("dense", "comet"),
)  # fmt: skip


@register_claim(
    "comet_regression",
    "COMET on a regression task (4-layer MLP, diabetes)",
    "Shaier et al., ICLR 2025 (the paper's SARCOS regression; methods.md §1.4)",
    "the paper's regression is SARCOS (a download) at widths up to 3000 with SGD; here bundled diabetes (442 patients), which is far smaller and noisier.",
)
def claim(cache_dir: Path, plots: Path, quick: bool, cached_only: bool = False) -> ClaimResult:
    settings = REGRESSION_QUICK if quick else REGRESSION_FULL
    return mlp_claim("comet_regression", "diabetes", settings, cache_dir, plots, quick, cached_only)


__all__ = ["REGRESSION_FULL", "REGRESSION_QUICK", "claim"]
