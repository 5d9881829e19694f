"""Claim: time to the dense model's quality in optimizer steps and wall-clock seconds (ours, issue 14 §5), from the
family sweeps of `transformer_claims`.

Wall-clock seconds per step come from an interleaved benchmark in one process (`step_times`: every variant's training
step in turn, over rounds, medians), so a neighbour's load on the shared machine during one run cannot decide a
ratio; each run's own measured seconds are reported beside it as a check.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from . import models
from .core import ClaimResult, RunCache, code_version, one_thread, plot_curves, register_claim, run_all
from .stats import mean_interval, steps_to_reach
from .transformer_claims import FULL, NAMES, QUICK, describe, family_runs, run_spec, runs_of

TIME_VARIANTS = (("dense", 1.0), ("comet", 0.5), ("comet", 0.25), ("block_comet", 0.5), ("block_comet", 0.25),
                 ("learned_top2", 0.5))  # fmt: skip
"""§5's candidates: dense, COMET and block-COMET at keep 0.5 and 0.25, and learned top-2 (top-k) at keep 0.5."""
TIME_GOAL = 0.75
"""Issue 14 §5's goal: a COMET variant reaching the dense model's final validation loss in <= 0.75× its seconds."""


def step_times(settings: models.FamilySettings, pairs: list[tuple[str, float]], rounds: int, steps: int,
               learning_rate: float) -> dict:  # fmt: skip
    """Seconds per training step of each (variant, keep), interleaved over ``rounds`` in this process after a
    warm-up: ``{"variant@keep": [per-round mean seconds per step]}``."""
    import transformers

    transformers.logging.set_verbosity_error()
    data = models._Data(settings, seed=0)
    batches = [data.batch() for _ in range(steps)]
    built = {}
    for variant, keep in pairs:
        model = models.build(settings, variant, keep, seed=0).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
        built[f"{variant}@{keep:g}"] = (model, optimizer)

    def one(model, optimizer) -> float:
        started = time.perf_counter()
        for batch in batches:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - started) / len(batches)

    for model, optimizer in built.values():  # warm-up
        one(model, optimizer)
    times = {name: [] for name in built}
    for _ in range(rounds):
        for name, (model, optimizer) in built.items():
            times[name].append(one(model, optimizer))
    return times


@register_claim(
    "time_to_quality",
    "Time to the dense model's quality in wall-clock seconds",
    "ours (issue 14 §5; no paper claims it)",
)
def claim(cache_dir: Path, plots: Path, quick: bool, cached_only: bool = False) -> ClaimResult:
    """Issue 14 §5: optimizer steps and seconds for each candidate to reach the dense model's final validation loss."""
    lines, best_overall, seconds = [], None, 0.0
    all_curves = {}
    cache = RunCache(cache_dir, "time_to_quality", code_version(models))
    for family in ("vit", "gpt2"):
        settings = (QUICK if quick else FULL)[family]
        lr, _, records = family_runs(family, cache_dir, quick, cached_only)
        pairs = [(v, k) for v, k in TIME_VARIANTS if runs_of(records, v, k)]
        rounds, steps = (2, 2) if quick else (7, 20)
        spec = dict(claim="time_to_quality", family=family, pairs=pairs, rounds=rounds, steps=steps,
                    settings={k: v for k, v in run_spec(settings, "", 0, 0, lr).items() if k not in ("variant", "seed")})  # fmt: skip
        def benchmark(spec: dict, settings: models.FamilySettings = settings, lr: float = lr) -> dict:
            started = time.perf_counter()
            with one_thread():
                times = step_times(settings, [tuple(p) for p in spec["pairs"]], spec["rounds"], spec["steps"], lr)
            return {"times": times, "seconds": time.perf_counter() - started}

        bench = run_all([spec], cache, benchmark, f"{family}: step-time benchmark", cached_only)[0]
        times = {name: statistics.median(values) for name, values in bench["times"].items()}
        ranges = {name: (min(values), max(values)) for name, values in bench["times"].items()}
        dense = runs_of(records, "dense", 1.0)
        target = mean_interval([r["curve"][-1] for r in dense])[0]
        lines += [f"### {NAMES[family]}", "", describe(settings, lr), "",
                  f"Target: the dense model's final validation loss, mean over seeds, **{target:.4f}**; the dense model "
                  f"itself is counted at its last step ({settings.steps}), others at the first validation (every "
                  f"{settings.eval_every} steps) at or below the target. Seconds = "
                  f"steps × the median seconds per training step of an interleaved benchmark in one process ({rounds} "
                  f"rounds × {steps} steps per variant after a warm-up); the runs' own measured seconds are the "
                  "check column (they share the machine with whatever else ran).", "",
                  "| variant | keep | ms / step (range) | vs dense | seeds reaching the target | median steps | "
                  f"median seconds | vs dense (seconds) | steps the goal allows ({TIME_GOAL}× dense's seconds) | "
                  "final val loss vs target | in-run seconds to target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        dense_seconds = settings.steps * times["dense@1"]  # the dense model reaches its final loss at its last step
        for variant, keep in pairs:
            group = runs_of(records, variant, keep)
            name = f"{variant}@{keep:g}"
            if variant == "dense":
                reached = [settings.steps] * len(group)
            else:
                reached = [steps_to_reach(r["curve_steps"], r["curve"], target, False) for r in group]
            hits = sorted(s for s in reached if s is not None)
            in_run = [r["curve_seconds"][r["curve_steps"].index(s)] for r, s in zip(group, reached, strict=True)
                      if s is not None]  # fmt: skip
            median_steps = statistics.median(hits) if len(hits) * 2 > len(group) else None  # most seeds got there
            secs = median_steps * times[name] if median_steps is not None else None
            ratio = secs / dense_seconds if secs is not None else None
            needed = TIME_GOAL * dense_seconds / times[name]  # the steps this variant would have to get there in
            final = mean_interval([r["curve"][-1] for r in group])[0]
            lines.append(
                f"| {variant} | {keep:g} | {times[name] * 1e3:.1f} ({ranges[name][0] * 1e3:.1f}–{ranges[name][1] * 1e3:.1f}) "
                f"| {times[name] / times['dense@1']:.2f}× | {len(hits)}/{len(group)} | "
                f"{f'{median_steps:g}' if median_steps is not None else 'not reached'} | "
                f"{f'{secs:.1f}' if secs is not None else '–'} | {f'**{ratio:.2f}×**' if ratio is not None else '–'} | "
                f"{'–' if variant == 'dense' else f'{needed:.0f}'} | {final / target - 1:+.1%} | "
                f"{f'{statistics.median(in_run):.1f}' if in_run else '–'} |"
            )  # fmt: skip
            if variant != "dense" and "comet" in variant and ratio is not None:
                if best_overall is None or ratio < best_overall[0]:
                    best_overall = (ratio, family, name)
            all_curves.setdefault(family, {})[name] = [
                {"curve_steps": [s * times[name] for s in r["curve_steps"]], "curve": r["curve"]} for r in group]  # fmt: skip
        lines.append("")
        seconds += bench["seconds"]
    plot = plots / "time_to_quality_curves.png"
    first = next(iter(all_curves))
    plot_curves(all_curves[first], plot, f"{NAMES[first]}: validation loss against benchmarked seconds", "loss",
                xlabel="seconds (steps × benchmarked seconds per step)")
    lines += [f"![loss against seconds]({os.path.relpath(plot, plots.parent)}) (x axis: seconds, not steps)", "",
              "Hyperparameters are equal for every variant (the dense model's tuned learning rate), the same steps "
              "for all; a variant that is slower per update can only reach the dense model's final loss sooner in "
              "seconds if its steps are cheaper. On these tiny models the routing work (scores, top-k, gathers) is "
              "not small against the FFN's, which is what decides the seconds per step.", ""]  # fmt: skip
    met = best_overall is not None and best_overall[0] <= TIME_GOAL
    verdict = (f"goal (a COMET variant at the dense model's final validation loss in ≤ {TIME_GOAL}× its wall-clock): "
               f"**{'met' if met else 'not met'}**")
    verdict += (f", best {best_overall[2]} on {best_overall[1]} at {best_overall[0]:.2f}×" if best_overall else
                ", no COMET variant reached the dense model's final loss in most seeds")  # fmt: skip
    return ClaimResult("time_to_quality", "", verdict, "\n".join(lines), seconds)


__all__ = ["TIME_GOAL", "TIME_VARIANTS", "claim", "step_times"]
