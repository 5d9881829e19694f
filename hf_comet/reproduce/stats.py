"""Statistics of the results page: means with 95 % t-intervals over seeds, paired t-tests between variants (runs of
the same seed share the data order and the initial weights where the architectures allow), learning-curve summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

SIGNIFICANCE = 0.05
"""Two-sided level of every test on the page."""


def mean_interval(values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf)
                  ) -> tuple[float, float, float]:  # fmt: skip
    """Mean and the 95 % t-interval ``(mean, low, high)`` of ``values`` (NaN bounds for one value), clipped to the
    quantity's range ``bounds`` (an accuracy cannot exceed 1, a loss or an entropy cannot go below 0)."""
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.975, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return mean, max(mean - half, bounds[0]), min(mean + half, bounds[1])


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


def steps_to_seed_target(runs: Sequence[dict], reference: dict[int, dict], tolerance: float,
                         higher_is_better: bool = False) -> list[float]:  # fmt: skip
    """Per run, the first evaluated step its curve is within ``tolerance`` (relative) of the final value of the
    ``reference`` run of the same seed (``{seed: run}``; the dense model), ``inf`` when it never is: every seed counted,
    each against its own pair (seeds' final values vary as much as variants differ). The evaluation at step 0 (before
    any update) does not count, so a time is never 0."""
    steps = []
    for run in runs:
        final = reference[run["spec"]["seed"]]["curve"][-1]
        target = final * (1 - tolerance) if higher_is_better else final * (1 + tolerance)
        trained = [(s, v) for s, v in zip(run["curve_steps"], run["curve"], strict=True) if s > 0]
        step = steps_to_reach([s for s, _ in trained], [v for _, v in trained], target, higher_is_better)
        steps.append(math.inf if step is None else float(step))
    return steps


def format_interval(values: Sequence[float], digits: int = 3, bounds: tuple[float, float] = (-math.inf, math.inf)) -> str:
    """``mean [low, high]`` for a table cell, the interval clipped to ``bounds``."""
    mean, low, high = mean_interval(values, bounds)
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


POWER = 0.8
"""The power at which each section's minimum detectable effect is given."""
CLAIMED_ACCURACY = 0.01
"""The claimed effect of COMET's claims on an accuracy (or its validation curve's mean): 1 point. The paper gives no
size; a smaller gain would not be a reason to switch."""
CLAIMED_RELATIVE = 0.01
"""The claimed effect of COMET's claims on a loss or an MSE (or its curve's mean): 1 % of the dense model's mean."""
DENSE_QUALITY = 0.03
"""Reaching the dense model's quality: within 3 % of the final validation value of the dense run of the same seed
(`steps_to_seed_target`)."""


def _mde_factor(n: int, power: float, level: float) -> float:
    """``t_{1-level/2} + t_{power}`` with n - 1 degrees of freedom: the MDE in units of the standard error."""
    return float(scipy_stats.t.ppf(1 - level / 2, n - 1) + scipy_stats.t.ppf(power, n - 1))


def minimum_detectable_effect(differences: Sequence[float], power: float = POWER, level: float = SIGNIFICANCE) -> float:
    """The smallest true mean paired difference a two-sided paired t-test at ``level`` detects with probability
    ``power``, given the spread of the observed ``differences`` and their number (the usual approximation
    ``(t_{1-level/2} + t_{power}) * sd / sqrt(n)``, both quantiles with n - 1 degrees of freedom); NaN below 2 pairs."""
    array = np.asarray(differences, dtype=float)
    if array.size < 2:
        return math.nan
    return _mde_factor(array.size, power, level) * float(array.std(ddof=1)) / math.sqrt(array.size)


def interval_mde(low: float, high: float, n: int, power: float = POWER, level: float = SIGNIFICANCE) -> float:
    """`minimum_detectable_effect` recovered from a paired difference's 95 % t-interval ``[low, high]`` over ``n``
    pairs (its half-width is t_{0.975} times the standard error); NaN without an interval."""
    if n < 2 or math.isnan(low) or math.isnan(high):
        return math.nan
    standard_error = (high - low) / 2 / float(scipy_stats.t.ppf(0.975, n - 1))
    return _mde_factor(n, power, level) * standard_error


# -- the verdict rule ----------------------------------------------------------------------------------------------
REPRODUCED, PARTLY, INCONCLUSIVE, NOT_REPRODUCED, CONTRADICTED = (
    "reproduced", "partly reproduced", "inconclusive", "not reproduced", "contradicted")  # fmt: skip
MET, NOT_MET = "met", "not met"
VERDICT_RULE = f"""\
**How verdicts are decided** (one rule for every claim, `hf_comet/reproduce/stats.py`). Each claim rests on a family of
paired comparisons (runs pair by seed); every p-value is Holm-corrected over its family at {SIGNIFICANCE}, and each
comparison has a *claimed effect*, the smallest difference the claim would mean (given per section). A comparison is
*for* the claim when it is significant in the claimed direction, *against* it when significant in the opposite one,
*open* when not significant while its 95 % interval still reaches the claimed effect or the minimum detectable effect
(at {POWER:.0%} power for its seeds) is above it, and *absent* when not significant and the interval excludes an
effect of the claimed size. The claim is then **{REPRODUCED}** when every comparison is for it, **{PARTLY}** when some
are for it (the counts say how many and whether any are against), **{CONTRADICTED}** when some are against and none
for, **{INCONCLUSIVE}** when none is significant and some are open, and **{NOT_REPRODUCED}** when every comparison is
absent. Goals of ours that are non-inferiority margins ("within 2 % of dense") are judged on the interval's bound:
**{MET}** when the worse bound is within the margin, **{NOT_MET}** when even the better bound is beyond it,
**{INCONCLUSIVE}** otherwise. Every choice a verdict depends on (learning rates, the "best" variant, steps) is made on
validation data; test data is read once per run. Intervals are clipped to the quantity's range."""


def comparison_outcome(estimate: float, low: float, high: float, p_adjusted: float, claimed: float,
                       mde: float = math.nan) -> str:  # fmt: skip
    """One comparison under `VERDICT_RULE`: ``"for"``, ``"against"``, ``"open"`` or ``"absent"``. ``estimate``,
    ``low`` and ``high`` are signed so that positive is the claimed direction; ``claimed`` (> 0) is the claimed
    effect; ``mde`` the minimum detectable effect."""
    if not math.isnan(p_adjusted) and p_adjusted < SIGNIFICANCE:
        return "for" if estimate > 0 else "against"
    if math.isnan(high) or high >= claimed or (not math.isnan(mde) and mde > claimed):
        return "open"
    return "absent"


def claim_verdict(outcomes: Sequence[str]) -> str:
    """The claim's verdict from its comparisons' outcomes (`comparison_outcome`), by `VERDICT_RULE`."""
    count = {kind: sum(o == kind for o in outcomes) for kind in ("for", "against", "open", "absent")}
    unknown = set(outcomes) - set(count)
    if unknown or not outcomes:
        raise ValueError(f"outcomes {list(outcomes)} must be a non-empty list of {list(count)}.")
    if count["for"] == len(outcomes):
        return REPRODUCED
    if count["for"]:
        return PARTLY
    if count["against"]:
        return CONTRADICTED
    return INCONCLUSIVE if count["open"] else NOT_REPRODUCED


def margin_verdict(low: float, high: float, margin: float, higher_is_better: bool = True) -> str:
    """A non-inferiority goal on the 95 % interval ``[low, high]`` of (variant − reference): `MET` when the worse
    bound is within ``margin`` of no difference, `NOT_MET` when even the better bound is beyond it, otherwise
    `INCONCLUSIVE`. ``higher_is_better`` says which bound is the worse one (accuracy: the low one; loss: the high one)."""
    worse, better = (low, high) if higher_is_better else (-high, -low)
    if math.isnan(worse):
        return INCONCLUSIVE
    if worse >= -margin:
        return MET
    if better < -margin:
        return NOT_MET
    return INCONCLUSIVE


@dataclass
class Comparison:
    """One paired comparison a verdict rests on: ``a - b`` over the seeds both have, its 95 % interval, raw and
    Holm-adjusted p-values (`holm_family`), minimum detectable effect, and the claim's direction (+1: the claim says
    ``a - b > 0``) and claimed effect (> 0, in the units of the difference)."""

    label: str
    estimate: float
    low: float
    high: float
    p: float
    mde: float
    direction: int
    claimed: float
    seeds: int
    p_holm: float = math.nan

    @property
    def outcome(self) -> str:
        """`comparison_outcome` in the claimed direction."""
        if self.direction > 0:
            return comparison_outcome(self.estimate, self.low, self.high, self.p_holm, self.claimed, self.mde)
        return comparison_outcome(-self.estimate, -self.high, -self.low, self.p_holm, self.claimed, self.mde)


def paired_comparison(label: str, a: dict[int, float], b: dict[int, float], direction: int, claimed: float
                      ) -> Comparison:  # fmt: skip
    """`Comparison` of per-seed values ``a`` and ``b`` (``{seed: value}``) over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    x, y = [a[s] for s in seeds], [b[s] for s in seeds]
    diffs = [u - v for u, v in zip(x, y, strict=True)]
    estimate, p = paired_test(x, y)
    _, low, high = mean_interval(diffs) if len(diffs) > 1 else (math.nan, math.nan, math.nan)
    return Comparison(label, estimate, low, high, p, minimum_detectable_effect(diffs), direction, claimed, len(seeds))


def holm_family(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Set each comparison's ``p_holm`` by Holm's correction over ``comparisons`` (one family); returns them."""
    for comparison, adjusted in zip(comparisons, holm([c.p for c in comparisons]), strict=True):
        comparison.p_holm = adjusted
    return list(comparisons)


def comparisons_table(comparisons: Sequence[Comparison], digits: int = 3) -> list[str]:
    """Markdown rows of a verdict's comparisons: estimate and interval, p (raw, Holm), MDE, claimed effect, seeds,
    outcome."""
    lines = ["| comparison | Δ [95 % interval] | p (Holm) | MDE (80 %) | claimed effect | seeds | outcome |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in comparisons:
        lines.append(f"| {c.label} | {c.estimate:+.{digits}f} [{c.low:+.{digits}f}, {c.high:+.{digits}f}] | "
                     f"{c.p:.2g} ({c.p_holm:.2g}) | {c.mde:.{digits}f} | {'+' if c.direction > 0 else '−'}"
                     f"{c.claimed:.{digits}f} | {c.seeds} | {c.outcome} |")  # fmt: skip
    return lines


def verdict_text(comparisons: Sequence[Comparison], settings: str = "settings") -> str:
    """``**verdict** (for the claim in a of n settings, against in b, open in c)``."""
    outcomes = [c.outcome for c in comparisons]
    count = {kind: sum(o == kind for o in outcomes) for kind in ("for", "against", "open")}
    return (f"**{claim_verdict(outcomes)}** (significantly for the claim in {count['for']} of {len(outcomes)} "
            f"{settings}, against in {count['against']}, open in {count['open']})")


def bootstrap_median(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The median of ``values`` and its 95 % percentile-bootstrap interval (resampling the values, i.e. the seeds);
    values may be ``inf`` (a seed that never got there), and so may the median and the bounds (order statistics, not
    interpolation, so an infinite value stays an unbounded bound rather than a NaN)."""
    array = np.asarray(values, dtype=float)
    index = np.random.default_rng(seed).integers(0, len(array), size=(resamples, len(array)))
    medians = np.median(array[index], axis=1)  # inf when the middle value(s) are: most seeds never got there
    return (float(np.median(array)), float(np.quantile(medians, 0.025, method="lower")),
            float(np.quantile(medians, 0.975, method="higher")))  # fmt: skip


__all__ = [
    "CLAIMED_ACCURACY", "CLAIMED_RELATIVE", "CONTRADICTED", "DENSE_QUALITY", "INCONCLUSIVE", "MET", "NOT_MET", "NOT_REPRODUCED", "PARTLY", "POWER", "REPRODUCED", "VERDICT_RULE",
    "Comparison", "bootstrap_median", "claim_verdict", "comparison_outcome", "comparisons_table", "holm_family",
    "interval_mde", "margin_verdict", "minimum_detectable_effect", "paired_comparison", "steps_to_seed_target", "verdict_text",
    "SIGNIFICANCE", "area_under_curve", "format_interval", "gap_in_points", "holm", "mean_interval", "paired_test", "steps_to_reach",
]
