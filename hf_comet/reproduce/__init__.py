"""``hf-comet reproduce``: the papers' claims, run over seeds, summarised with intervals and tests, and written to one
results page (``docs/results.md``) with a plot per claim.

Every run is a pure function of its spec (claim, variant, sizes, seed, steps, learning rate). Its record is appended
to a JSON-lines cache as soon as it finishes (one line, flushed and fsynced), so an interrupted run continues where it
stopped and a finished one is never repeated; a half-written last line is ignored. ``--quick`` runs the same pipeline
on tiny settings (the tests run it), into its own cache, and says on the page that its numbers are not results.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..io import staged_path
from . import attentive_gating, convert_finetune_bert, deep_moe, finetune, merging, mlp, transformer_claims
from .core import ClaimResult, MissingRuns, RunCache, code_version, plot_curves, run_all
from .stats import SIGNIFICANCE, area_under_curve, format_interval, holm, mean_interval, paired_test, steps_to_reach


# -- claim: COMET on the paper's MLP ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLPSettings:
    widths: tuple[int, ...]
    keep_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    steps: int
    eval_every: int
    learning_rates: tuple[float, ...]
    tune_width: int
    variants: tuple[str, ...] = mlp.MLP_VARIANTS


MLP_FULL = MLPSettings(
    widths=(128, 256, 512), keep_rates=(0.1, 0.5, 0.9), seeds=(0, 1, 2, 3, 4), steps=600, eval_every=25,
    learning_rates=(3e-4, 1e-3, 3e-3), tune_width=256,
)  # fmt: skip
"""Widths stop at 512: a width-1024 run takes ~15 s here, and the 110 runs of one width would double the claim's time."""
MLP_QUICK = MLPSettings(
    widths=(32,), keep_rates=(0.5,), seeds=(0, 1), steps=20, eval_every=10, learning_rates=(1e-3, 3e-3),
    tune_width=32, variants=("dense", "smaller", "comet", "learned_top1"),
)  # fmt: skip
REGRESSION_FULL = MLPSettings(
    widths=(128, 512), keep_rates=(0.5,), seeds=(0, 1, 2, 3, 4), steps=600, eval_every=25,
    learning_rates=(3e-4, 1e-3, 3e-3), tune_width=128, variants=("dense", "smaller", "dropout", "comet", "block_comet"),
)  # fmt: skip
REGRESSION_QUICK = MLPSettings(
    widths=(32,), keep_rates=(0.5,), seeds=(0, 1), steps=20, eval_every=10, learning_rates=(1e-3,), tune_width=32,
    variants=("dense", "comet"),
)  # fmt: skip


def _mlp_spec(claim: str, dataset: str, variant: str, width: int, keep: float, seed: int, settings: MLPSettings,
              lr: float) -> dict:  # fmt: skip
    return dict(claim=claim, dataset=dataset, variant=variant, width=width, keep_rate=keep, seed=seed,
                steps=settings.steps, eval_every=settings.eval_every, learning_rate=lr)  # fmt: skip


def _run_mlp(spec: dict) -> dict:
    return mlp.train_one(
        spec["variant"], spec["dataset"], spec["width"], spec["keep_rate"], spec["seed"], spec["steps"],
        spec["learning_rate"], eval_every=spec["eval_every"],
    )  # fmt: skip


def _tune(claim: str, dataset: str, settings: MLPSettings, cache: RunCache, higher: bool,
          cached_only: bool = False) -> tuple[float, list]:  # fmt: skip
    """The dense model's best learning rate on the validation split (seed 0, ``tune_width``), used by every variant."""
    specs = [_mlp_spec(claim, dataset, "dense", settings.tune_width, 1.0, 0, settings, lr)
             for lr in settings.learning_rates]  # fmt: skip
    records = run_all(specs, cache, _run_mlp, f"{claim}: tuning the learning rate", cached_only)
    best = (max if higher else min)(records, key=lambda r: r["curve"][-1])
    return best["spec"]["learning_rate"], records


def _mlp_claim(claim: str, dataset: str, settings: MLPSettings, cache_dir: Path, plots: Path, quick: bool,
               cached_only: bool = False) -> ClaimResult:  # fmt: skip
    started = time.perf_counter()
    higher = dataset == "digits"
    metric = "accuracy" if higher else "MSE (target s.d.²)"
    cache = RunCache(cache_dir, claim, code_version(mlp))
    lr, tuning = _tune(claim, dataset, settings, cache, higher, cached_only)
    specs = []
    for width in settings.widths:
        for keep in settings.keep_rates:
            for variant in settings.variants:
                if variant == "dense" and keep != settings.keep_rates[0]:
                    continue  # the dense model does not depend on the keep rate
                specs += [_mlp_spec(claim, dataset, variant, width, 1.0 if variant == "dense" else keep, seed,
                                    settings, lr) for seed in settings.seeds]  # fmt: skip
    records = run_all(specs, cache, _run_mlp, f"{claim}: {len(specs)} runs", cached_only)

    def runs(variant: str, width: int, keep: float) -> list[dict]:
        keep = 1.0 if variant == "dense" else keep
        found = [r for r in records if (r["spec"]["variant"], r["spec"]["width"], r["spec"]["keep_rate"]) ==
                 (variant, width, keep)]  # fmt: skip
        return sorted(found, key=lambda r: r["spec"]["seed"])

    def auc(record: dict) -> float:
        return area_under_curve(record["curve_steps"], record["curve"])

    sign = 1 if higher else -1
    lines = [f"Data: scikit-learn's {dataset} (bundled), fixed 60/20/20 train/validation/test split (seed 0); "
             f"seeds {list(settings.seeds)} (initial weights and batch order; runs pair by seed). Adam, batch 32, "
             f"{settings.steps} steps, validation every {settings.eval_every}; learning rate {lr:g}, tuned on the "
             f"validation split for the dense model (width {settings.tune_width}, seed 0, from "
             f"{list(settings.learning_rates)}) and used by every variant. Test {metric} is read once per run.", ""]  # fmt: skip
    # the sweep: COMET against each baseline, per width and keep rate; significance after Holm's correction over the
    # settings of each comparison (9 uncorrected tests would call ~1 in 5 null comparisons significant somewhere)
    comparisons = [v for v in settings.variants if v != "comet"]
    grid = [(w, k) for w in settings.widths for k in settings.keep_rates if runs("comet", w, k)]
    tests = {}  # (variant, metric kind) -> [(diff, p)] over grid
    for variant in comparisons:
        for kind, value in (("test", lambda r: r["test"]), ("auc", auc)):
            tests[variant, kind] = [paired_test([value(r) for r in runs("comet", w, k)],
                                                [value(r) for r in runs(variant, w, k)]) for w, k in grid]  # fmt: skip
    adjusted = {key: holm([p for _, p in pairs]) for key, pairs in tests.items()}

    def count(variant: str, kind: str, direction: int) -> int:
        return sum(q < SIGNIFICANCE and direction * sign * diff > 0
                   for (diff, _), q in zip(tests[variant, kind], adjusted[variant, kind], strict=True))  # fmt: skip

    better = {v: count(v, "test", 1) for v in comparisons}
    worse = {v: count(v, "test", -1) for v in comparisons}
    faster = {v: count(v, "auc", 1) for v in comparisons}
    slower = {v: count(v, "auc", -1) for v in comparisons}
    settings_count = len(grid)
    header = "| width | keep | COMET test | " + " | ".join(f"Δ vs {v} (p)" for v in comparisons) + " |"
    table = [header, "|" + "---|" * (3 + len(comparisons))]
    auc_table = ["| width | keep | COMET val AUC | " + " | ".join(f"Δ vs {v} (p)" for v in comparisons) + " |",
                 "|" + "---|" * (3 + len(comparisons))]  # fmt: skip
    for index, (width, keep) in enumerate(grid):
        comet = runs("comet", width, keep)
        cells, auc_cells = [], []
        for variant in comparisons:
            for kind, row in (("test", cells), ("auc", auc_cells)):
                diff, p = tests[variant, kind][index]
                star = " *" if adjusted[variant, kind][index] < SIGNIFICANCE else ""
                row.append(f"{diff:+.3f} ({p:.2g}){star}")
        table.append(f"| {width} | {keep:g} | {format_interval([r['test'] for r in comet])} | " + " | ".join(cells) + " |")
        auc_table.append(f"| {width} | {keep:g} | {format_interval([auc(r) for r in comet])} | " + " | ".join(auc_cells)
                         + " |")  # fmt: skip
    lines += [f"**Final test {metric}**: COMET's mean [95 % interval] and COMET minus each baseline (paired t-test p "
              f"over seeds, uncorrected; * = significant at {SIGNIFICANCE} after Holm's correction over the "
              f"{settings_count} settings of that column).", "", *table, "",
              f"**Learning speed per update**: mean validation {metric} over the curve (area under the curve / steps); "
              "COMET minus each baseline.", "", *auc_table, ""]  # fmt: skip
    # one setting in full: every variant's numbers and the steps to reach the dense model's quality
    width, keep = settings.widths[len(settings.widths) // 2], settings.keep_rates[len(settings.keep_rates) // 2]
    dense = runs("dense", width, keep)
    if dense:
        threshold = mean_interval([r["curve"][-1] for r in dense])[0] * (0.97 if higher else 1.03)
        lines += [f"**Width {width}, keep {keep:g}, every variant** (steps to reach 97 % of the dense model's final "
                  f"validation {metric}, {'≥' if higher else '≤'} {threshold:.3f}: median over the seeds that reached "
                  "it, and how many did):", "",
                  f"| variant | trainable params | test {metric} | val AUC | steps to dense quality | seconds |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for variant in settings.variants:
            group = runs(variant, width, keep)
            if not group:
                continue
            reached = [steps_to_reach(r["curve_steps"], r["curve"], threshold, higher) for r in group]
            hits = sorted(s for s in reached if s is not None)
            median = f"{hits[len(hits) // 2]} ({len(hits)}/{len(group)})" if hits else f"not reached (0/{len(group)})"
            lines.append(
                f"| {variant} | {group[0]['trainable_parameters']:,} | {format_interval([r['test'] for r in group])} | "
                f"{format_interval([auc(r) for r in group])} | {median} | "
                f"{mean_interval([r['seconds'] for r in group])[0]:.1f} |"
            )
        lines.append("")
        plot = plots / f"{claim}_curves.png"
        plot_curves({v: runs(v, width, keep) for v in settings.variants}, plot, f"{dataset}, width {width}, keep {keep:g}",
                     metric)  # fmt: skip
        lines += [f"![validation curves]({os.path.relpath(plot, plots.parent)})", ""]
    # the mechanism
    mechanism = [r for r in records if r["spec"]["variant"] == "comet" and "overlap_r_init" in r]
    if mechanism:
        lines += ["**Mechanism** (Pearson r between two inputs' cosine similarity and their masks' Jaccard overlap, "
                  "test inputs, per hidden layer; mean over seeds). The official MLP's router chain reads only the "
                  "input, never the trained weights, so its masks and r are the same before and after training.", "",
                  "| width | keep | r layer 1 | r layer 2 | r layer 3 | after training |", "|---|---|---|---|---|---|"]  # fmt: skip
        for width in settings.widths:
            for keep in settings.keep_rates:
                group = [r for r in mechanism if (r["spec"]["width"], r["spec"]["keep_rate"]) == (width, keep)]
                if group:
                    init = [sum(r["overlap_r_init"][i] for r in group) / len(group) for i in range(3)]
                    same = all(r["overlap_r_init"] == r["overlap_r_trained"] for r in group)
                    lines.append(f"| {width} | {keep:g} | " + " | ".join(f"{v:.2f}" for v in init) +
                                 f" | {'unchanged' if same else 'changed'} |")  # fmt: skip
        lines.append("")
    by_keep = []
    for keep in settings.keep_rates:
        columns = [i for i, (_, k) in enumerate(grid) if k == keep]
        if "dense" in comparisons and columns:
            def pick(kind: str, direction: int, columns: list[int] = columns) -> int:
                return sum(
                    adjusted["dense", kind][i] < SIGNIFICANCE and direction * sign * tests["dense", kind][i][0] > 0
                    for i in columns
                )

            by_keep.append(f"keep {keep:g}: faster in {pick('auc', 1)}, slower in {pick('auc', -1)}, better test in "
                           f"{pick('test', 1)}, worse in {pick('test', -1)} of {len(columns)} widths")  # fmt: skip
    if by_keep:
        lines += ["COMET against dense by keep rate (Holm-corrected): " + "; ".join(by_keep) + ".", ""]
    # verdicts: counted on Holm-corrected tests, and a setting where COMET is significantly worse counts against
    n = settings_count

    def word(good: int, bad: int) -> str:
        if n and good * 3 >= 2 * n and bad == 0:
            return "reproduced"
        if good > bad:
            return "partly reproduced"
        return "contradicted" if bad > good else "not reproduced"

    learns, learns_worse = faster.get("dense", 0), slower.get("dense", 0)
    generalises, generalises_worse = better.get("dense", 0), worse.get("dense", 0)
    verdict = (f"faster learning per update than dense: **{word(learns, learns_worse)}** (significantly faster in "
               f"{learns} of {n} settings, slower in {learns_worse}); better generalisation than dense: "
               f"**{word(generalises, generalises_worse)}** (significantly better test {metric} in {generalises} of "
               f"{n}, worse in {generalises_worse})")  # fmt: skip
    others = ", ".join(f"{v}: better in {better[v]}, worse in {worse[v]}" for v in comparisons if v != "dense")
    lines += [f"Against the other baselines (Holm-corrected significant test differences, of {n} settings): {others}.",
              "", "Read with care: the learning rate was tuned for the dense model, on the validation split the curves "
              "use, which favours dense slightly; at keep 0.9 the top-1 mixtures have one expert (`int(1 / 0.9)`), so "
              "they are the `smaller` model; block-COMET keeps whole blocks of 16 units, so at keep 0.1 its active "
              "units differ from COMET's (e.g. 16 vs 12 at width 128).", ""]  # fmt: skip
    lines.append("Tuning runs: " + ", ".join(f"lr {r['spec']['learning_rate']:g} → val {r['curve'][-1]:.3f}"
                                              for r in tuning) + ".")  # fmt: skip
    del started
    return ClaimResult(claim, "", verdict, "\n".join(lines), sum(r["seconds"] for r in records + tuning))


FINETUNE_FULL = finetune.FinetuneSettings(
    hidden_size=64, layers=2, seq_len=64, pretrain_steps=600, finetune_steps=300, eval_every=50, seeds=(0, 1, 2, 3, 4)
)
FINETUNE_QUICK = finetune.FinetuneSettings(
    hidden_size=32, layers=1, seq_len=32, pretrain_steps=4, finetune_steps=4, eval_every=2, seeds=(0, 1),
    variants=("dense", "comet", "comet_schedule"), eval_windows=8,
)  # fmt: skip
FINETUNE_GOAL = 0.02
"""Issue 14 §6's goal: the converted COMET model's test loss within 2 % of the dense fine-tune's."""


def gaps_at_start(groups: dict[str, list[dict]]) -> float:
    """Unscheduled COMET's validation loss at step 0 relative to the dense model's (the damage of converting)."""
    dense, comet = (mean_interval([r["curve"][0] for r in groups[v]])[0] for v in ("dense", "comet"))
    return comet / dense - 1


def _finetune_claim(cache_dir: Path, plots: Path, quick: bool, cached_only: bool = False) -> ClaimResult:
    started = time.perf_counter()
    settings = FINETUNE_QUICK if quick else FINETUNE_FULL
    cache = RunCache(cache_dir, "convert_finetune", code_version(finetune))
    specs = [dict(claim="convert_finetune", variant=variant, seed=seed, **{k: getattr(settings, k) for k in (
        "hidden_size", "layers", "seq_len", "pretrain_steps", "finetune_steps", "eval_every", "eval_windows")})
        for variant in settings.variants for seed in settings.seeds]  # fmt: skip
    checkpoints = cache_dir / "checkpoints"
    records = run_all(specs, cache, lambda spec: finetune.finetune_one(spec["variant"], settings, spec["seed"],
                                                                       checkpoints), "convert_finetune",
                      cached_only)  # fmt: skip
    groups = {v: sorted((r for r in records if r["spec"]["variant"] == v), key=lambda r: r["spec"]["seed"])
              for v in settings.variants}  # fmt: skip
    dense = [r["test"] for r in groups["dense"]]
    lines = [f"A GPT-2 (d = {settings.hidden_size}, {settings.layers} layer{'s' * (settings.layers > 1)}, bytes, {settings.seq_len}-byte windows) "
             f"pre-trained densely for {settings.pretrain_steps} steps on 9 of every 10 documentation topics (seed 0), "
             f"then fine-tuned for {settings.finetune_steps} steps on the 10th topics (AdamW 5e-4, batch 16, seeds "
             f"{list(settings.seeds)}: data order and dropout) as each variant. Metric: mean next-byte loss on "
             "held-out bytes of the fine-tune topics (validation curve; test bytes read once at the end).", "",
             "| variant | loss at step 0 (validation) | final test loss | Δ vs dense (p) | relative | seconds |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    gaps = {}
    for variant, group in groups.items():
        tests = [r["test"] for r in group]
        diff, p = paired_test(tests, dense)
        gaps[variant] = diff / mean_interval(dense)[0]
        start = format_interval([r["curve"][0] for r in group])
        lines.append(f"| {variant} | {start} | {format_interval(tests)} | {diff:+.4f} ({p:.2g}) | "
                     f"{gaps[variant]:+.1%} | {mean_interval([r['seconds'] for r in group])[0]:.0f} |")  # fmt: skip
    lines.append("")
    plot = plots / "convert_finetune_curves.png"
    plot_curves(groups, plot, "convert, then fine-tune (GPT-2, held-out topics)", "loss")
    lines += [f"![fine-tune curves]({os.path.relpath(plot, plots.parent)})", ""]
    comet_like = {v: g for v, g in gaps.items() if "comet" in v}
    best = min(comet_like, key=comet_like.get) if comet_like else None
    met = best is not None and comet_like[best] <= FINETUNE_GOAL
    verdict = (f"goal (converted COMET within {FINETUNE_GOAL:.0%} of the dense fine-tune's loss): "
               f"**{'met' if met else 'not met'}**" + (f", best {best} {comet_like[best]:+.1%}" if best else ""))
    if "comet" in groups and "comet_schedule" in groups:
        diff, p = paired_test([r["test"] for r in groups["comet_schedule"]], [r["test"] for r in groups["comet"]])
        helps = "helps" if p < SIGNIFICANCE and diff < 0 else "hurts" if p < SIGNIFICANCE else "makes no significant difference"
        verdict += (f"; the keep-rate schedule {helps} (scheduled minus unscheduled COMET {diff:+.4f}, p {p:.2g}), "
                    f"though it starts at the dense model's loss where unscheduled COMET starts "
                    f"{gaps_at_start(groups):+.1%} above it")  # fmt: skip
    del started
    return ClaimResult("convert_finetune", "", verdict, "\n".join(lines), sum(r["seconds"] for r in records))


MERGING_FULL = merging.MergingSettings(steps_per_task=60, seeds=(0, 1, 2, 3, 4))
MERGING_QUICK = merging.MergingSettings(steps_per_task=2, seeds=(0, 1), hidden_size=16)


def _merging_claim(cache_dir: Path, plots: Path, quick: bool, cached_only: bool = False) -> ClaimResult:
    settings = MERGING_QUICK if quick else MERGING_FULL
    cache = RunCache(cache_dir, "expert_merging", code_version(merging))
    specs = [dict(claim="expert_merging", variant=variant, seed=seed, steps_per_task=settings.steps_per_task,
                  hidden_size=settings.hidden_size, learning_rate=settings.learning_rate)
             for variant in merging.MERGING_VARIANTS for seed in settings.seeds]  # fmt: skip
    records = run_all(specs, cache, lambda spec: merging.train_sequence(spec["variant"], settings, spec["seed"]),
                      "expert_merging", cached_only)  # fmt: skip
    groups = {v: sorted((r for r in records if r["spec"]["variant"] == v), key=lambda r: r["spec"]["seed"])
              for v in merging.MERGING_VARIANTS}  # fmt: skip
    lines = [f"scikit-learn's digits in 5 tasks of 2 classes (0/1, 2/3, ...), learned in order for "
             f"{settings.steps_per_task} AdamW steps each (lr {settings.learning_rate:g}, batch {settings.batch_size}) "
             f"by a ViT (d = {settings.hidden_size}, 2 layers; patches 2×2); MoE variants: top-2 of 8 experts in both "
             f"FFNs. Task-incremental: scored within each task's two classes. Fixed 80/20 split; seeds "
             f"{list(settings.seeds)}.", "",
             "| variant | accuracy after each task (mean over tasks so far) | final accuracy | forgetting | seconds |",
             "|---|---|---|---|---|"]  # fmt: skip
    for variant, group in groups.items():
        after = " → ".join(f"{mean_interval([r['average_after_task'][t] for r in group])[0]:.3f}"
                           for t in range(len(merging.TASKS)))  # fmt: skip
        lines.append(f"| {variant} | {after} | {format_interval([r['test'] for r in group])} | "
                     f"{format_interval([r['forgetting'] for r in group])} | "
                     f"{mean_interval([r['seconds'] for r in group])[0]:.0f} |")  # fmt: skip
    merge, plain = groups["moe_merge"], groups["moe"]
    acc_diff, acc_p = paired_test([r["test"] for r in merge], [r["test"] for r in plain])
    forget_diff, forget_p = paired_test([r["forgetting"] for r in merge], [r["forgetting"] for r in plain])
    lines += ["", f"Merging minus no merging (paired over seeds): final accuracy {acc_diff:+.3f} (p {acc_p:.2g}), "
              f"forgetting {forget_diff:+.3f} (p {forget_p:.2g}).", "",
              "Where our setting differs from the paper's: Park merges experts of MoE-Adapters on a frozen CLIP "
              "(adapters only are trained, on larger image benchmarks); here the whole small ViT trains, so the "
              "merged-into expert is one earlier tasks may still route to, and no replay protects them.", ""]  # fmt: skip
    better = acc_p < SIGNIFICANCE and acc_diff > 0
    less = forget_p < SIGNIFICANCE and forget_diff < 0
    harmed = (acc_p < SIGNIFICANCE and acc_diff < 0) or (forget_p < SIGNIFICANCE and forget_diff > 0)
    word = ("reproduced" if better and less else "partly reproduced" if (better or less) and not harmed
            else "contradicted" if harmed else "not reproduced")  # fmt: skip
    verdict = (f"merging at task boundaries gives higher final accuracy and less forgetting: **{word}** (accuracy "
               f"{acc_diff:+.3f}, p {acc_p:.2g}; forgetting {forget_diff:+.3f}, p {forget_p:.2g})")  # fmt: skip
    plot = plots / "expert_merging_curves.png"
    curves = {v: [{"curve_steps": list(range(1, len(merging.TASKS) + 1)), "curve": r["average_after_task"]}
                  for r in g] for v, g in groups.items()}  # fmt: skip
    plot_curves(curves, plot, "task-incremental digits: mean accuracy over the tasks so far", "accuracy")
    lines += [f"![accuracy after each task]({os.path.relpath(plot, plots.parent)})", ""]
    return ClaimResult("expert_merging", "", verdict, "\n".join(lines), sum(r["seconds"] for r in records))


# -- the registry and the page --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    name: str
    title: str
    source: str
    run: Callable[[Path, Path, bool, bool], ClaimResult]
    """``run(cache folder, plots folder, quick, cached_only)``; ``cached_only`` raises `MissingRuns` rather than run."""


CLAIMS: dict[str, Claim] = {
    claim.name: claim
    for claim in (
        Claim(
            "comet_mlp", "COMET learns faster per update and generalises better (4-layer MLP, digits)",
            "Shaier et al., ICLR 2025 (methods.md §1.6–1.7)",
            lambda cache, plots, quick, cached: _mlp_claim("comet_mlp", "digits", MLP_QUICK if quick else MLP_FULL,
                                                           cache, plots, quick, cached),
        ),
        Claim(
            "convert_finetune", "Convert a dense checkpoint, then fine-tune, without losing its quality",
            "ours (issue 14 §6; keep-rate schedule after Zhu & Gupta 2017)",
            _finetune_claim,
        ),
        Claim(
            "expert_merging", "Merging the most used experts at task boundaries: accuracy and forgetting",
            "Park 2024 (methods.md §3.5)",
            _merging_claim,
        ),
        Claim(
            "comet_regression", "COMET on a regression task (4-layer MLP, diabetes)",
            "Shaier et al., ICLR 2025 (the paper's SARCOS regression; methods.md §1.4)",
            lambda cache, plots, quick, cached: _mlp_claim("comet_regression", "diabetes",
                                                           REGRESSION_QUICK if quick else REGRESSION_FULL, cache, plots,
                                                           quick, cached),
        ),
        Claim(
            "comet_transformers", "COMET on ViT (digits) and GPT-2 (bundled text) against the paper's baselines",
            "Shaier et al., ICLR 2025 (methods.md §1.5–1.7)",
            transformer_claims.transformers_claim,
        ),
        Claim(
            "time_to_quality", "Time to the dense model's quality in wall-clock seconds",
            "ours (issue 14 §5; no paper claims it)",
            transformer_claims.time_claim,
        ),
        Claim(
            "deep_moe", "Deep MoE on jittered digits: position then class specialisation",
            "Eigen, Ranzato & Sutskever 2013 (methods.md §4)",
            deep_moe.claim,
        ),
        Claim(
            "attentive_gating", "Attentive gating and the sample-similarity regulariser: decomposition entropy and error",
            "Krishnamurthy, Watkins & Gärtner 2023 (methods.md §2.2–2.8)",
            attentive_gating.claim,
        ),
        Claim(
            "convert_finetune_bert", "Convert a dense BERT checkpoint, then fine-tune it on a topic task, without losing its accuracy",
            "ours (issue 14 §6, BERT; keep-rate schedule after Zhu & Gupta 2017)",
            convert_finetune_bert.claim,
        ),
    )
}  # fmt: skip
"""Claims ``hf-comet reproduce`` runs, in page order."""


def reproduce(
    claims: list[str] | None = None,
    quick: bool = False,
    cache_dir: str | os.PathLike = "runs/reproduce",
    page: str | os.PathLike | None = None,
) -> list[ClaimResult]:
    """Run ``claims`` (default: all of `CLAIMS`) from the cache onwards and write the results page and its plots
    (``<page folder>/results/``). Claims not asked for are rendered from the cache when all their runs are there, so
    running one claim keeps the others' sections. ``quick`` uses tiny settings, a separate cache and by default a page
    under the cache (``<cache>/quick/results.md``), never ``docs/results.md``; the page says its numbers are not
    results. Returns the claims run."""
    names = list(CLAIMS) if not claims else claims
    unknown = [name for name in names if name not in CLAIMS]
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; choose from {', '.join(CLAIMS)}.")
    cache = Path(cache_dir) / ("quick" if quick else "full")
    page = Path(page) if page is not None else (cache / "results.md" if quick else Path("docs/results.md"))
    plots = page.parent / "results"
    results, rendered = [], []
    for name, claim in CLAIMS.items():
        try:
            result = claim.run(cache, plots, quick, name not in names)
        except MissingRuns:
            continue  # not asked for and not finished: listed as not run yet
        result.title = claim.title
        rendered.append(result)
        if name in names:
            results.append(result)
    write_page(rendered, page, quick)
    return results


def _slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def write_page(results: list[ClaimResult], page: Path, quick: bool) -> None:
    """The results page, written atomically."""
    lines = ["# Results: the papers' claims, reproduced or not", ""]
    if quick:
        lines += ["> **Quick mode**: tiny settings that check the pipeline. These numbers are not results.", ""]
    lines += ["Regenerate with `hf-comet reproduce` (about the time below per claim on a 2-core CPU; finished runs are "
              "cached in `runs/reproduce/`, so an interrupted run continues). Choices are made on validation splits; "
              "each run reads its test split once. How the tests and intervals are computed: `hf_comet/reproduce/"
              "stats.py`.", "", "| claim | source | verdict | time |", "|---|---|---|---|"]  # fmt: skip
    for result in results:
        claim = CLAIMS[result.name]
        lines.append(f"| [{claim.title}](#{_slug(claim.title)}) | {claim.source} | {result.verdict} | "
                     f"{result.seconds / 60:.1f} min |")  # fmt: skip
    done = {result.name for result in results}
    for claim in CLAIMS.values():
        if claim.name not in done:
            lines.append(f"| {claim.title} | {claim.source} | not run yet (`hf-comet reproduce {claim.name}`) | – |")
    lines.append("")
    for result in results:
        claim = CLAIMS[result.name]
        lines += [f"## {claim.title}", "", f"Source: {claim.source}. Command: "
                  f"`hf-comet reproduce {result.name}`. Verdict: {result.verdict}.", "", result.markdown, ""]  # fmt: skip
    with staged_path(page) as staging:  # a kill mid-write leaves the previous page
        staging.write_text("\n".join(lines))


__all__ = ["CLAIMS", "Claim", "ClaimResult", "MissingRuns", "RunCache", "code_version", "reproduce", "run_all", "write_page"]
