"""``hf-comet bench``: the smoke run of every section (no timing assertions: timing belongs to the benchmark) and its
argument errors."""

from __future__ import annotations

import json
import math

import pytest

from hf_comet import bench, bench_sparse, cli
from hf_comet.modeling.execution import ExecutionThresholds, thresholds


@pytest.fixture
def child(monkeypatch):
    """Run in this process (the CLI otherwise re-executes itself under ``OMP_WAIT_POLICY=PASSIVE``)."""
    monkeypatch.setenv("HF_COMET_BENCH_CHILD", "1")


def test_quick_run_reports_every_section_and_regenerates_the_readme_section(child, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{bench.README_START}\nold numbers\n{bench.README_END}\nafter\n")
    report_path = tmp_path / "report.json"
    assert cli.main(["bench", "--quick", "--json", str(report_path), "--readme", str(readme)]) == 0
    report = json.loads(report_path.read_text())
    assert report["meta"]["quick"] is True and report["sgemm"]["gflops"] > 0
    assert len(report["blocks"]) == 2  # --quick: one top-k shape and the COMET shape
    for case in report["blocks"]:
        baseline = next(iter(case["rows"].values()))
        assert baseline["forward"]["ratio"] == 1.0 and baseline["forward+backward"]["ratio"] == 1.0
        for row in case["rows"].values():
            assert row["saved_mib"] >= 0 and row["forward+backward"]["sgemm_fraction"] > 0
    names = next(iter(report["blocks"][0]["rows"]))
    assert "dense" in names
    assert any(name.startswith("transformers Qwen3-MoE") for name in report["blocks"][0]["rows"])
    assert {family["family"] for family in report["training"]} == {"gpt2", "vit", "bert"}
    assert [gen["batch"] for gen in report["generation"]] == [1, 8]
    assert {row["router"] for row in report["router"]} >= {"full", "structured, rank 64"}
    assert {row["name"] for row in report["selection"]} >= {"topk (sorted=False) + scatter: ours, exact"}
    assert [case["workload"] for case in report["sparse"]] == list(bench_sparse.SPARSE_WORKLOADS)
    for case in report["sparse"]:  # the stock source first (the baseline), then every conversion
        assert [row["name"] for row in case["rows"]][1:] == list(bench_sparse.candidates(256))
        assert case["rows"][0]["speedup"] == 1.0 and all(row["seconds"] > 0 for row in case["rows"])
        # a timing of tiny models, one round: any value below 1 (both times are positive), however loaded the machine
        assert math.isfinite(case["ffn_share"]) and case["ffn_share"] < 1
    thresholds = ExecutionThresholds(**report["execution"]["thresholds"])  # what --calibrate would save is valid
    measured_pairs = {row["pairs_per_expert"] for row in report["execution"]["slabs"]} | {0}
    assert {thresholds.slab_max_pairs_per_expert, thresholds.loop_slab_max_pairs_per_expert} <= measured_pairs
    targets = {t["target"] for t in report["targets"]}
    assert any("unit COMET" in t for t in targets) and any("training" in t for t in targets)
    for target in report["targets"]:
        assert "stock" in target and isinstance(target["stock"]["met"], bool)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{bench.README_END}\nafter\n")
    assert "old numbers" not in text and "**Targets of issue 12**" in text
    assert "hf-comet bench --quick" in text  # the command that made the numbers
    assert "**What the FFN's share allows**" in text
    assert "**Against issue 20's goals**" in text  # one quick round decides no goal:
    assert "| **inconclusive** | " in text and "| **met** |" not in text and "| **not met** |" not in text
    assert "**Targets of issue 12**" in capsys.readouterr().out


def test_an_unknown_section_is_refused_before_anything_runs(child, capsys):
    assert cli.main(["bench", "blocks", "speed"]) == 2
    err = capsys.readouterr().err
    assert "'speed'" in err and "generation" in err  # names the bad value and the allowed ones


@pytest.mark.parametrize("flags", [["--rounds", "0"], ["--threads", "0"]])
def test_bad_counts_are_refused(child, capsys, flags):
    assert cli.main(["bench", "--quick", *flags]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_a_readme_without_the_bench_markers_is_refused_before_the_run(child, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert cli.main(["bench", "--quick", "--readme", str(readme)]) == 2
    assert bench.README_START in capsys.readouterr().err
    assert readme.read_text() == "no markers here\n"


@pytest.mark.parametrize("where", ["missing-folder/report.json", "."])
def test_a_json_path_that_cannot_be_written_is_refused_before_the_run(child, tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--quick", "--json", where]) == 2
    assert "--json" in capsys.readouterr().err


def test_calibrate_saves_the_measured_thresholds_that_later_choices_read(child, tmp_path, monkeypatch):
    path = tmp_path / "cache" / "execution.json"
    monkeypatch.setenv("HF_COMET_EXECUTION", str(path))
    measured = {"thresholds": {"dense_block_fraction": 0.625, "slab_max_pairs_per_expert": 2.0}, "slabs": [],
                "fractions": [], "shape": {"hidden": 768, "width": 3072}}  # fmt: skip
    monkeypatch.setattr(bench_sparse, "section_execution", lambda quick, rounds: measured)
    thresholds.cache_clear()
    try:
        assert cli.main(["bench", "execution", "--calibrate"]) == 0
        assert thresholds() == ExecutionThresholds(dense_block_fraction=0.625, slab_max_pairs_per_expert=2.0)
    finally:
        thresholds.cache_clear()


@pytest.mark.parametrize(
    "flags, message",
    [(["blocks", "--calibrate"], "add the section `execution`"), (["--quick", "--calibrate"], "toy-size thresholds")],
)
def test_calibrate_without_the_execution_section_or_with_quick_is_refused(child, capsys, flags, message):
    assert cli.main(["bench", *flags]) == 2
    assert message in capsys.readouterr().err


def test_sections_with_their_own_markers_are_regenerated_there_and_leave_the_rest_alone():
    start, end = bench.section_markers("sparse")
    page = f"# speed\n{bench.README_START}\nmain numbers\n{bench.README_END}\n\n{start}\nold sparse\n{end}\ntail\n"
    meta = {"date": "2026-12-07", "machine": "x86_64", "threads": 2, "torch": "2", "transformers": "5", "rounds": 3,
            "quick": False, "command": "hf-comet bench sparse"}  # fmt: skip
    rows = [{"name": "dense (transformers)", "speedup": 1.0, "range": "1.00-1.00", "seconds": 1.0},
            {"name": "block-COMET keep 0.5, b 384", "speedup": 1.4, "range": "1.30-1.50", "seconds": 0.7}]  # fmt: skip
    report = {"meta": meta, "sgemm": {"gflops": 100.0}, "sparse": [{"workload": "bert_forward", "rows": rows}]}
    updated = bench.replace_readme_sections(page, report)
    assert "main numbers" in updated and "old sparse" not in updated and updated.endswith(f"{end}\ntail\n")
    assert "| BERT-base encoder forward, batch 8 x 128 tokens, eval | 1.40 (1.30-1.50) |" in updated
    assert "by `hf-comet bench sparse`" in updated  # the measurement line goes with the section
    without = bench.replace_readme_sections(page.replace(start, "").replace(end, ""), report)
    assert "main numbers" not in without and "| BERT-base encoder forward" in without  # no own markers: main region


def test_a_section_without_markers_of_its_own_goes_to_the_main_region_beside_one_that_has_them():
    start, end = bench.section_markers("sparse")
    page = f"{bench.README_START}\nmain numbers\n{bench.README_END}\n{start}\nold sparse\n{end}\n"
    meta = {"date": "d", "machine": "m", "threads": 2, "torch": "2", "transformers": "5", "rounds": 1, "quick": False,
            "command": "hf-comet bench sparse execution"}  # fmt: skip
    execution = {"thresholds": {"dense_block_fraction": 0.875, "slab_max_pairs_per_expert": 2.0}, "slabs": [],
                 "fractions": [], "shape": {"hidden": 768, "width": 3072}}  # fmt: skip
    rows = [{"name": "dense (transformers)", "speedup": 1.0, "range": "1.00-1.00", "seconds": 1.0}]
    report = {"meta": meta, "sgemm": {"gflops": 1.0}, "sparse": [{"workload": "bert_forward", "rows": rows}],
              "execution": execution}  # fmt: skip
    updated = bench.replace_readme_sections(page, report)
    main = updated[updated.index(bench.README_START) : updated.index(bench.README_END)]
    assert "**Execution thresholds**" in main and "Converted models" not in main and "main numbers" not in main
    assert "Converted models" in updated[updated.index(start) :]


@pytest.mark.parametrize("workload", ["bert_forward", "vit_forward", "gpt2_train"])
def test_skipping_the_ffn_zeroes_exactly_its_modules_and_still_updates_its_parameters(workload):
    """`ffn_share` times the run with the FFN skipped: each FFN module must give zeros of its own output's shape
    (BERT's intermediate is F wide), the rest of the model must still run, the optimizer must still update the FFN's
    parameters (a converted model's step does), and everything must be as before afterwards."""
    import torch

    s = bench_sparse._shapes(quick=True)
    torch.manual_seed(0)
    dense = bench_sparse._dense(workload, s)
    modules = bench_sparse._ffn_modules(dense)
    assert len(modules) == (4 if workload == "bert_forward" else 2)  # 2 layers; BERT's FFN sits in two modules
    outputs = []
    for module, _ in modules:
        module.register_forward_hook(lambda m, args, out: outputs.append((args[0], out)))
    run = bench_sparse._runner(workload, dense, s)
    with bench_sparse.ffn_skipped(modules, getattr(run, "optimizer", None)):
        run()
    assert len(outputs) == len(modules)
    for (hidden, out), (_, width) in zip(outputs, modules, strict=True):
        assert out.shape == (*hidden.shape[:-1], width) and not out.any()
    if workload == "gpt2_train":  # AdamW took a step on every FFN parameter (zero gradients), as on the others
        assert all(p in run.optimizer.state for module, _ in modules for p in module.parameters())
    outputs.clear()
    run()  # restored: the FFN computes again
    assert any(out.any() for _, out in outputs)


def test_skipping_the_ffn_restores_a_forward_the_module_already_had_and_takes_a_module_twice():
    import torch

    module = torch.nn.Linear(4, 4)
    own = lambda hidden: hidden + 1  # noqa: E731  (an instance-level forward, as hooks of other libraries set)
    module.forward = own
    with bench_sparse.ffn_skipped([(module, 3), (module, 3)]):
        assert module(torch.ones(2, 4)).shape == (2, 3)
    assert module.forward is own


def test_the_limits_table_follows_from_the_share_and_the_best_conversion_at_each_width():
    assert bench_sparse.speedup_limit(0.5, 0.5) == pytest.approx(1 / 0.75)
    assert bench_sparse.speedup_limit(0.0, 0.25) == 1.0
    rows = [{"name": "dense (transformers)", "speedup": 1.0, "range": "1.00-1.00", "seconds": 1.0, "kept": None},
            {"name": "a", "speedup": 1.2, "range": "1.1-1.3", "seconds": 0.8, "kept": 0.5},
            {"name": "b", "speedup": 1.3, "range": "1.2-1.4", "seconds": 0.7, "kept": 0.5},
            {"name": "c", "speedup": 1.5, "range": "1.4-1.6", "seconds": 0.6, "kept": 0.25}]  # fmt: skip
    section = [{"workload": "bert_forward", "rows": rows, "ffn_share": 0.6},
               {"workload": "gpt2_train", "rows": rows, "ffn_share": None}]  # fmt: skip
    text = "\n".join(bench_sparse.markdown_sparse(section))
    limit_half, limit_quarter = 1 / (1 - 0.6 * 0.5), 1 / (1 - 0.6 * 0.75)
    expected = (f"| {bench_sparse.WORKLOAD_TITLES['bert_forward']} | 60% | {limit_half:.2f} | 1.30 | "
                f"{1.3 / limit_half:.0%} | {limit_quarter:.2f} | 1.50 | {1.5 / limit_quarter:.0%} |")  # fmt: skip
    assert expected in text
    assert text.count(bench_sparse.WORKLOAD_TITLES["gpt2_train"]) == 1  # speeds only: its share is not measured


def test_the_median_interval_covers_at_least_its_level_and_needs_enough_values():
    import math

    from hf_comet.timing import median_interval

    for n in range(6, 25):
        low, high = median_interval(list(range(n)))
        j = low + 1  # 1-based rank of the lower bound; the interval is symmetric in rank
        assert high == n - j
        coverage = 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n
        next_narrower = 1 - 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2**n
        assert coverage >= 0.95 > next_narrower  # the narrowest interval of at least 95 % coverage
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0, 0.0, 6.0]) == (0.0, 6.0)  # order statistics of unsorted input
    assert all(math.isnan(bound) for bound in median_interval([1.0, 2.0, 3.0, 4.0, 5.0]))  # min-max covers 94 %
    assert median_interval(list(range(15)), level=0.99) == (2, 12)  # P(Bin(15, 1/2) <= 2) = 0.0037: coverage 0.993
    assert median_interval(list(range(7)), level=1 - 0.05 / 3) == (0, 6)  # 0.984 covers a 3-way Bonferroni level
    assert all(math.isnan(bound) for bound in median_interval(list(range(6)), level=0.975))  # 0.969 does not
    for few in ([], [1.0]):
        assert all(math.isnan(bound) for bound in median_interval(few))
    with pytest.raises(ValueError, match="level=1.5"):
        median_interval([1.0] * 8, level=1.5)
    with pytest.raises(ValueError, match="NaN"):
        median_interval([1.0, float("nan"), 2.0, 3.0, 4.0, 5.0, 6.0])


def test_goal_verdicts_follow_from_the_intervals_of_every_conversion_at_the_width():
    def row(name, kept, speedups):
        return {"name": name, "kept": kept, "speedup": sorted(speedups)[len(speedups) // 2], "speedups": speedups,
                "range": f"{min(speedups):.2f}-{max(speedups):.2f}"}  # fmt: skip

    dense = row("dense (transformers)", None, [1.0] * 7)
    above, below = [1.5, 1.6, 1.55, 1.7, 1.52, 1.58, 1.62], [1.1, 1.2, 1.15, 1.0, 1.18, 1.12, 1.05]
    straddle = [1.3, 1.5, 1.45, 1.2, 1.42, 1.38, 1.6]
    section = [{"workload": "bert_forward", "ffn_share": None,
                "rows": [dense, row("a", 0.5, below), row("b", 0.5, above),  # one conversion clears 1.4: met
                         row("c", 0.25, straddle), row("d", 0.25, below)]},  # 1.85 not reached by any: not met
               {"workload": "vit_forward", "ffn_share": None,
                "rows": [dense, row("e", 0.5, straddle), row("f", 0.25, above[:5])]},  # straddles; too few rounds
               {"workload": "gpt2_decode_8", "ffn_share": None, "rows": [dense, row("g", 0.5, above)]}]  # no goal
    verdicts = {(v["workload"], v["keep"]): v for v in bench_sparse.goal_verdicts(section)}
    assert set(verdicts) == {("bert_forward", 0.5), ("bert_forward", 0.25), ("vit_forward", 0.5), ("vit_forward", 0.25)}
    assert verdicts["bert_forward", 0.5]["verdict"] == "met" and verdicts["bert_forward", 0.5]["name"] == "b"
    assert (verdicts["bert_forward", 0.5]["low"], verdicts["bert_forward", 0.5]["high"]) == (1.5, 1.7)
    assert verdicts["bert_forward", 0.5]["level"] == pytest.approx(0.975)  # Bonferroni over the 2 conversions
    assert verdicts["bert_forward", 0.25]["verdict"] == "not met"
    assert verdicts["vit_forward", 0.5]["verdict"] == "inconclusive"  # [1.2, 1.6] holds the goal 1.4
    assert verdicts["vit_forward", 0.25]["verdict"] == "inconclusive"  # 5 rounds: no 95 % interval, whatever the median
    # a median above the goal is not enough when the interval reaches below it
    lucky = [{"workload": "bert_forward", "rows": [dense, row("h", 0.5, [1.45, 1.5, 1.48, 1.1, 1.46, 1.47, 1.2])]}]
    assert bench_sparse.goal_verdicts(lucky)[0]["verdict"] == "inconclusive"
    # not met needs every conversion below: one that straddles keeps it open, and it is the one shown
    mixed = [{"workload": "bert_forward", "rows": [dense, row("i", 0.5, below), row("j", 0.5, straddle)]}]
    assert (bench_sparse.goal_verdicts(mixed)[0]["verdict"], bench_sparse.goal_verdicts(mixed)[0]["name"]) == (
        "inconclusive", "j")
    # a lower bound exactly at the goal meets it
    exact = [{"workload": "bert_forward", "rows": [dense, row("k", 0.5, [1.4, 1.41, 1.42, 1.43, 1.44, 1.45, 1.46])]}]
    assert bench_sparse.goal_verdicts(exact)[0]["verdict"] == "met"
    text = "\n".join(bench_sparse.markdown_sparse(section))
    assert f"| {bench_sparse.WORKLOAD_TITLES['bert_forward']} | keep 0.5 | 1.40 | **met** | b: 1.58 [1.500, 1.700] |" in text
    assert f"| {bench_sparse.WORKLOAD_TITLES['vit_forward']} | keep 0.25 | 1.85 | **inconclusive** | f: " in text
