"""The runs two claims share (`models`, one sweep per family): `comet_transformers` (COMET on ViT and GPT-2 against
the paper's baselines, issue 14 §1) and `time_to_quality` (time to the dense model's quality, issue 14 §5) each render
them in their own module.

The settings and the sweep live here, apart from `models` (whose source hash keys the cached runs), so the pages'
wording can change without rerunning anything.
"""

from __future__ import annotations

from pathlib import Path

from . import models
from .core import RunCache, code_version, one_thread, run_all
from .stats import area_under_curve

SEEDS = (0, 1, 2, 3, 4)
FULL = {
    "vit": models.FamilySettings(
        family="vit", hidden_size=32, layers=2, steps=300, eval_every=25, batch_size=32,
        learning_rates=(3e-4, 1e-3, 3e-3), keep_rates=(0.1, 0.5, 0.9), seeds=SEEDS,
        sweep_variants=("smaller", "dropout", "comet", "block_comet"), extra=(("comet", 0.25), ("block_comet", 0.25)),
        eval_items=359,
    ),
    "gpt2": models.FamilySettings(
        family="gpt2", hidden_size=64, layers=2, steps=300, eval_every=25, batch_size=16,
        learning_rates=(1e-3, 3e-3, 1e-2), keep_rates=(0.1, 0.5, 0.9), seeds=SEEDS,
        sweep_variants=("smaller", "dropout", "comet"), extra=(("comet", 0.25), ("block_comet", 0.25)), seq_len=32,
        eval_items=128,
    ),
}  # fmt: skip
"""Every variant at keep 0.5; at keep 0.1 and 0.9 the unit-count baselines (smaller, dropout) and COMET (and
block-COMET on ViT) only, which keeps the two families within ~70 minutes of one core each. Both add COMET and
block-COMET at keep 0.25 for §5."""
EXTRA_SEEDS = tuple(range(5, 15))
"""More seeds for the comparison the verdicts rest on (dense, and COMET at the middle keep rate), which 5 seeds left
underpowered (issue 23): 15 in all."""
QUICK = {
    "vit": models.FamilySettings(
        family="vit", hidden_size=16, layers=1, steps=3, eval_every=1, batch_size=8, learning_rates=(1e-3,),
        keep_rates=(0.5,), seeds=(0, 1), variants=("dense", "comet", "learned_top2"),
        extra=(("block_comet", 0.25),), eval_items=16,
    ),
    "gpt2": models.FamilySettings(
        family="gpt2", hidden_size=16, layers=1, steps=3, eval_every=1, batch_size=4, learning_rates=(1e-3,),
        keep_rates=(0.5,), seeds=(0, 1), variants=("dense", "comet", "learned_top2"),
        extra=(("block_comet", 0.25),), seq_len=16, eval_items=8,
    ),
}  # fmt: skip
NAMES = {"vit": "ViT (digits)", "gpt2": "GPT-2 (bundled text, bytes)"}


def run_spec(settings: models.FamilySettings, variant: str, keep: float, seed: int, lr: float) -> dict:
    return dict(claim="comet_transformers", family=settings.family, variant=variant, keep_rate=keep, seed=seed,
                hidden_size=settings.hidden_size, layers=settings.layers, steps=settings.steps,
                eval_every=settings.eval_every, batch_size=settings.batch_size, seq_len=settings.seq_len,
                eval_items=settings.eval_items, learning_rate=lr)  # fmt: skip


def _settings_of(spec: dict) -> models.FamilySettings:
    return models.FamilySettings(
        family=spec["family"], hidden_size=spec["hidden_size"], layers=spec["layers"], steps=spec["steps"],
        eval_every=spec["eval_every"], batch_size=spec["batch_size"], learning_rates=(spec["learning_rate"],),
        keep_rates=(spec["keep_rate"],), seeds=(spec["seed"],), seq_len=spec["seq_len"], eval_items=spec["eval_items"],
    )  # fmt: skip


def _run(spec: dict) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    with one_thread():
        return models.train_one(_settings_of(spec), spec["variant"], spec["keep_rate"], spec["seed"],
                                spec["learning_rate"])  # fmt: skip


def _grid(settings: models.FamilySettings) -> list[tuple[str, float]]:
    """(variant, keep) pairs of a family's sweep: dense once, the rest per keep rate, then the extras."""
    middle = settings.keep_rates[len(settings.keep_rates) // 2]
    pairs = [("dense", 1.0)] if "dense" in settings.variants else []
    for keep in settings.keep_rates:
        pairs += [(v, keep) for v in settings.variants if v != "dense" and (keep == middle or v in settings.sweep_variants)]
    return pairs + [pair for pair in settings.extra if pair not in pairs]


def tuning_score(record: dict) -> float:
    """What a learning rate is chosen by: the mean of the last three validation losses of its seed-0 run (less noisy
    than the last point alone)."""
    return sum(record["curve"][-3:]) / len(record["curve"][-3:])


def family_runs(family: str, cache_dir: Path, quick: bool, cached_only: bool
                ) -> tuple[dict[str, float], list[dict], list[dict]]:  # fmt: skip
    """Each variant's learning rate, tuned on the validation loss (`tuning_score`, seed 0, at the middle keep rate;
    dense at 1), the tuning runs, and every run of the family's sweep at those rates, seed-major (so variants
    interleave in time on the machine); the extra seeds (`EXTRA_SEEDS`) of dense and COMET come last."""
    settings = (QUICK if quick else FULL)[family]
    cache = RunCache(cache_dir, f"comet_transformers_{family}", code_version(models))
    middle = settings.keep_rates[len(settings.keep_rates) // 2]
    tuned = [(v, 1.0 if v == "dense" else middle) for v in settings.variants]
    tuned += [(v, k) for v, k in settings.extra if v not in settings.variants]  # an extra's own keep rate
    tuning = run_all([run_spec(settings, v, k, 0, lr) for v, k in tuned for lr in settings.learning_rates], cache, _run,
                     f"{family}: tuning the learning rate of {len(tuned)} variants", cached_only)  # fmt: skip
    rates = {v: min((r for r in tuning if r["spec"]["variant"] == v), key=tuning_score)["spec"]["learning_rate"]
             for v, _ in tuned}  # fmt: skip
    specs = [run_spec(settings, v, k, seed, rates[v]) for seed in settings.seeds for v, k in _grid(settings)]
    if not quick:
        specs += [run_spec(settings, v, k, seed, rates[v]) for seed in EXTRA_SEEDS for v, k in (("dense", 1.0), ("comet", middle))]
    return rates, tuning, run_all(specs, cache, _run, f"{family}: {len(specs)} runs", cached_only)


def runs_of(records: list[dict], variant: str, keep: float) -> list[dict]:
    found = [r for r in records if (r["spec"]["variant"], r["spec"]["keep_rate"]) == (variant, keep)]
    return sorted(found, key=lambda r: r["spec"]["seed"])


def auc(record: dict) -> float:
    return area_under_curve(record["curve_steps"], record["curve"])


def describe(settings: models.FamilySettings, rates: dict[str, float]) -> str:
    if settings.family == "vit":
        what = (f"ViT (d = {settings.hidden_size}, {settings.layers} layer{'s' * (settings.layers > 1)}, 4 heads, FFN "
                f"{4 * settings.hidden_size}, 2×2 patches of the 8×8 image) on scikit-learn's digits, fixed 60/20/20 train/validation/test split; "
                f"batch {settings.batch_size}; test metric: accuracy")  # fmt: skip
    else:
        what = (f"byte-level GPT-2 (d = {settings.hidden_size}, {settings.layers} layer{'s' * (settings.layers > 1)}, 4 heads, "
                f"FFN {4 * settings.hidden_size}, {settings.seq_len}-byte windows) on the bundled documentation text, "
                f"contiguous 80/10/10 split ({settings.eval_items} fixed validation and test windows); batch "
                f"{settings.batch_size}; test metric: next-byte loss")  # fmt: skip
    chosen = ", ".join(f"{v} {lr:g}" for v, lr in rates.items())
    seeds = list(settings.seeds)
    return (f"{what}. AdamW (weight decay 0.01), {settings.steps} steps, constant learning rate per variant, each "
            f"chosen on the validation loss (mean of the last three evaluations, seed 0) from "
            f"{list(settings.learning_rates)}: {chosen}. Validation loss every {settings.eval_every} steps; seeds "
            f"{seeds[0]}–{seeds[-1]} (initial weights, COMET projections and batch order; runs pair by seed), and for "
            f"dense and COMET at the middle keep rate also seeds {EXTRA_SEEDS[0]}–{EXTRA_SEEDS[-1]} when present.")  # fmt: skip


__all__ = ["EXTRA_SEEDS", "FULL", "NAMES", "QUICK", "SEEDS", "tuning_score", "auc", "describe", "family_runs", "run_spec", "runs_of"]
