"""The results page's verdict rule (issue 23): each outcome and verdict word from its definition, the minimum
detectable effect against the power of a paired t-test, the bootstrap ratio with seeds that never got there, a page
rendered from a small fixture cache whose verdicts follow the rule, and the committed page re-rendered byte for byte
from the committed runs."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from hf_comet import cli
from hf_comet.reproduce import CLAIMS, MissingRuns, RunCache, code_version, merging, replace_readme_results, reproduce
from hf_comet.reproduce.expert_merging import MERGING_FULL
from hf_comet.reproduce.stats import (
    Comparison,
    bootstrap_median,
    claim_verdict,
    comparison_outcome,
    holm_family,
    interval_mde,
    margin_verdict,
    mean_interval,
    minimum_detectable_effect,
    paired_comparison,
)

REPO = Path(__file__).resolve().parents[1]


def test_each_comparison_outcome_follows_its_definition():
    assert comparison_outcome(0.05, 0.02, 0.08, p_adjusted=0.01, claimed=0.01) == "for"
    assert comparison_outcome(-0.05, -0.08, -0.02, p_adjusted=0.01, claimed=0.01) == "against"
    # not significant, and the interval still reaches the claimed effect
    assert comparison_outcome(0.005, -0.01, 0.02, p_adjusted=0.3, claimed=0.01) == "open"
    # not significant, the interval excludes the claimed effect, but the seeds could not have detected it
    assert comparison_outcome(0.0, -0.005, 0.005, p_adjusted=0.9, claimed=0.01, mde=0.02) == "open"
    # not significant, the interval excludes it and the MDE is below it: a real absence
    assert comparison_outcome(0.0, -0.005, 0.005, p_adjusted=0.9, claimed=0.01, mde=0.008) == "absent"
    # significance is judged after Holm: a raw p under 0.05 whose adjusted p is not does not count
    assert comparison_outcome(0.05, -0.01, 0.11, p_adjusted=0.09, claimed=0.01) == "open"


def test_each_verdict_word_follows_from_the_outcomes():
    assert claim_verdict(["for", "for"]) == "reproduced"
    assert claim_verdict(["for", "open"]) == "partly reproduced"
    assert claim_verdict(["for", "against"]) == "partly reproduced"
    assert claim_verdict(["against", "open"]) == "contradicted"
    assert claim_verdict(["open", "absent"]) == "inconclusive"
    assert claim_verdict(["absent", "absent"]) == "not reproduced"
    with pytest.raises(ValueError, match="non-empty list"):
        claim_verdict([])
    with pytest.raises(ValueError, match="'maybe'"):
        claim_verdict(["maybe"])


def test_margins_are_judged_on_the_interval_s_worse_bound():
    assert margin_verdict(-0.4, 1.0, 0.5) == "met"  # accuracy: the low bound is within half a point
    assert margin_verdict(-2.6, 5.7, 0.5) == "inconclusive"  # the review's BERT case: far wider than the margin
    assert margin_verdict(-3.0, -1.0, 0.5) == "not met"
    assert margin_verdict(0.007, 0.015, 0.02, higher_is_better=False) == "met"  # a loss: the high bound decides
    assert margin_verdict(0.01, 0.03, 0.02, higher_is_better=False) == "inconclusive"
    assert margin_verdict(0.025, 0.03, 0.02, higher_is_better=False) == "not met"
    assert margin_verdict(math.nan, math.nan, 0.5) == "inconclusive"


@pytest.mark.parametrize("n", [5, 15])
def test_the_minimum_detectable_effect_has_the_power_it_claims(n):
    differences = np.random.default_rng(n).normal(0.0, 1.0, size=n)
    mde = minimum_detectable_effect(differences)
    sd = differences.std(ddof=1)
    # the exact power of a two-sided paired t-test at a true effect of the MDE (noncentral t)
    critical = scipy_stats.t.ppf(0.975, n - 1)
    noncentrality = mde / (sd / math.sqrt(n))
    power = scipy_stats.nct.sf(critical, n - 1, noncentrality) + scipy_stats.nct.cdf(-critical, n - 1, noncentrality)
    assert 0.78 < power < 0.83
    assert math.isnan(minimum_detectable_effect([1.0]))
    _, low, high = mean_interval(differences)  # the same MDE from the interval alone (the margin claims' tables)
    assert interval_mde(low, high, n) == pytest.approx(mde)


def test_intervals_are_clipped_to_the_quantity_s_range():
    mean, low, high = mean_interval([0.99, 1.0, 0.97], bounds=(0.0, 1.0))
    assert high == 1.0 and low < mean < 1.0
    assert mean_interval([0.01, 0.0, 0.03], bounds=(0.0, math.inf))[1] == 0.0


def test_the_bootstrap_median_keeps_seeds_that_never_got_there():
    point, low, high = bootstrap_median([0.5, 0.6, 0.55, 0.65, 0.7])
    assert point == 0.6 and 0.5 <= low < point < high <= 0.7
    # two of five seeds never got there: the median is finite, its upper bound is not
    point, low, high = bootstrap_median([0.5, 0.6, 0.55, math.inf, math.inf])
    assert point == 0.6 and low >= 0.5 and math.isinf(high)
    # most seeds never got there: no finite median
    assert math.isinf(bootstrap_median([0.5, math.inf, math.inf])[0])


def test_holm_family_adjusts_within_the_family_only():
    a = paired_comparison("a", {0: 1.0, 1: 1.1, 2: 0.9}, {0: 0.0, 1: 0.05, 2: 0.0}, +1, 0.1)
    b = paired_comparison("b", {0: 0.1, 1: -0.1, 2: 0.05}, {0: 0.0, 1: 0.0, 2: 0.0}, +1, 0.1)
    holm_family([a, b])
    assert a.p_holm == pytest.approx(min(1.0, 2 * a.p)) and b.p_holm == pytest.approx(max(a.p_holm, b.p))
    assert isinstance(a, Comparison) and a.seeds == 3


def _merging_cache(directory: Path, accuracy_gain: float, forgetting_gain: float, noise: float) -> None:
    """Synthetic finished runs of the merging claim: merging changes accuracy and forgetting by the given amounts,
    with per-seed noise (paired seeds share a base value)."""
    rng = np.random.default_rng(0)
    cache = RunCache(directory, "expert_merging", code_version(merging))
    for seed in MERGING_FULL.seeds:
        base_accuracy, base_forgetting = 0.7 + 0.05 * rng.standard_normal(), 0.3 + 0.05 * rng.standard_normal()
        for variant in merging.MERGING_VARIANTS:
            spec = dict(claim="expert_merging", variant=variant, seed=seed, steps_per_task=MERGING_FULL.steps_per_task,
                        hidden_size=MERGING_FULL.hidden_size, learning_rate=MERGING_FULL.learning_rate)
            merged = variant == "moe_merge"
            accuracy = base_accuracy + (accuracy_gain if merged else 0.0) + noise * rng.standard_normal()
            forgetting = base_forgetting - (forgetting_gain if merged else 0.0) + noise * rng.standard_normal()
            cache.put(spec, {"test": accuracy, "forgetting": forgetting, "seconds": 1.0,
                             "average_after_task": [accuracy] * len(merging.TASKS)})


@pytest.mark.parametrize(
    ("accuracy_gain", "forgetting_gain", "noise", "word"),
    [
        (0.10, 0.10, 0.005, "reproduced"),
        (0.10, 0.0, 0.005, "partly reproduced"),
        (-0.10, -0.10, 0.005, "contradicted"),  # merging significantly worse on both
        (0.0, 0.0, 0.2, "inconclusive"),  # noise far above the claimed point: intervals hold it
        (0.0, 0.0, 0.0005, "not reproduced"),  # precise zeros: the intervals exclude a point
    ],
)
def test_a_page_rendered_from_a_fixture_cache_states_the_rule_s_verdict(tmp_path, accuracy_gain, forgetting_gain,
                                                                         noise, word):
    _merging_cache(tmp_path / "full", accuracy_gain, forgetting_gain, noise)
    page = tmp_path / "page" / "results.md"
    [result] = reproduce(["expert_merging"], cache_dir=tmp_path, page=page, render=True)
    assert f"forgetting: **{word}**" in result.verdict
    text = page.read_text()
    assert f"Verdict: {result.verdict}." in text and "How verdicts are decided" in text
    assert "| final accuracy, merging − no merging |" in text and "MDE (80 %)" in text
    assert (page.parent / "results" / "expert_merging_curves.png").stat().st_size > 0


def test_render_refuses_missing_runs_before_writing_anything(tmp_path, capsys):
    page = tmp_path / "results.md"
    _merging_cache(tmp_path / "full", 0.1, 0.1, 0.005)  # merging's runs are there, attentive gating's are not
    with pytest.raises(MissingRuns, match="attentive_gating") as refused:
        reproduce(["expert_merging", "attentive_gating"], cache_dir=tmp_path, page=page, render=True)
    assert "expert_merging" not in str(refused.value)
    assert not page.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no plots, no scratch
    code = cli.main(["reproduce", "attentive_gating", "--render", "--cache", str(tmp_path), "--page", str(page)])
    assert code == 2 and "missing runs: attentive_gating" in capsys.readouterr().err and not page.exists()
    absent = tmp_path / "no-cache"
    code = cli.main(["reproduce", "--render", "--cache", str(absent), "--page", str(tmp_path / "out" / "page.md")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not absent.exists() and not (tmp_path / "out").exists()  # rendering creates no cache and no page folder


def test_the_committed_page_is_rendered_byte_for_byte_from_the_committed_runs(tmp_path):
    committed = REPO / "runs" / "reproduce" / "full"
    shutil.copytree(committed, tmp_path / "full", ignore=shutil.ignore_patterns("checkpoints"))
    page = tmp_path / "docs" / "results.md"
    results = reproduce(cache_dir=tmp_path, page=page, render=True)
    assert page.read_text() == (REPO / "docs" / "results.md").read_text()
    readme = (REPO / "README.md").read_text()  # and the README's list of verdicts is the page's
    assert replace_readme_results(readme, results) == readme
    assert {p.name for p in (page.parent / "results").glob("*.png")} >= {f"{name}_curves.png" for name in CLAIMS}
