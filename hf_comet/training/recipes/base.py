"""What every recipe shares: the `Recipe` object and its registry, argument checks, the training-loop helper, and
`run_recipe` (train each variant, then write checkpoints, plots, model cards and ``metrics.json``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from ...cards import card_text, write_model_card
from ...io import (
    UserError,
    atomic_save_pretrained,
    atomic_write_bytes,
    atomic_write_text,
    destination_lock,
    identity,
    recover,
    recover_folder,
    run_folder,
    scratch_directory,
    staged_path,
    write_failures,
)
from ...limits import check_memory
from ...modeling import FAMILY_ADAPTERS, configuration_comet
from ...names import PROVENANCE_FIELDS
from ..callbacks import DeepConstraintCallback
from ..plots import plot_expert_load, plot_loss_curves, plot_overlap_vs_similarity
from ..statistics import statistics_paused
from ..trainer import ROUTING_LOGGING, CometTrainer, is_causal_lm


@dataclass
class Settings:
    """Size and budget of a recipe run (``fast`` and ``full`` presets per recipe; any field can be overridden)."""

    steps: int
    batch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    learning_rate: float
    eval_steps: int
    logging_steps: int
    seq_len: int = 128
    finetune_steps: int = 0
    num_train: int = 0
    num_eval: int = 256


MIN_SETTINGS = {"steps": 1, "batch_size": 1, "hidden_size": 8, "num_layers": 1, "num_heads": 1, "eval_steps": 1}
MIN_SETTINGS |= {"logging_steps": 1, "seq_len": 8, "num_eval": 1}
"""Lower bounds of every recipe's settings; a recipe adds its own in `Recipe.min_settings`."""


def variant_names() -> tuple[str, ...]:
    """Every variant a recipe can train: ``"dense"`` (the upstream model), each routing of
    `hf_comet.modeling.configuration_comet.ROUTINGS`, and ``"block_comet"`` (COMET over blocks of 32 units)."""
    return ("dense", "block_comet", *configuration_comet.ROUTINGS)


def variant_config_fields(variant: str) -> dict[str, Any]:
    """The MoE config fields that make ``variant`` (a routing name or ``"block_comet"``), before overrides."""
    fields: dict[str, Any] = {"routing": "comet" if variant == "block_comet" else variant}
    reads = configuration_comet.ROUTER_CLASSES[fields["routing"]].config_fields  # a field a routing ignores is refused
    fields |= {k: v for k, v in {"num_experts": 4, "num_experts_per_tok": 2}.items() if k in reads}
    if variant == "block_comet":
        fields["comet_block_size"] = 32
    return fields


class VariantRun(NamedTuple):
    """What a recipe's runner returns for one variant."""

    trainer: CometTrainer
    """The trainer of the last phase: its model is saved, its ``state.log_history`` and ``routing_history`` are the
    curves (a runner with several phases concatenates them here)."""
    metrics: dict[str, float]
    """The recipe's result metrics (the keys of ``metrics.json``)."""
    seconds: float
    """Training wall time (all phases)."""
    sample: dict[str, torch.Tensor]
    """Model inputs of held-out data for the overlap-vs-similarity plot."""


class ReloadCheck(NamedTuple):
    """One saved checkpoint, reloaded and scored again by `Recipe.check_reload`."""

    variant: str
    auto_class: str
    model_class: str
    metric: str
    trained: float
    reloaded: float

    @property
    def matches(self) -> bool:
        return abs(self.reloaded - self.trained) < 1e-6


@dataclass(frozen=True)
class DatasetSource:
    """Where a user's data is (``path``) and which columns hold what; a column left ``None`` takes the recipe's
    default (``text``, ``image``, ``label``)."""

    path: str
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None


@dataclass
class RecipeData:
    """A user's data, checked and converted for one recipe."""

    train: datasets.Dataset
    test: datasets.Dataset
    config: dict[str, Any] = field(default_factory=dict)
    """Config fields the data decides (e.g. ViT's ``image_size``, ``num_channels``, ``num_labels``), shared by every
    variant on top of `Recipe.shared_config`."""
    label_names: list[str] | None = None
    description: str = ""
    """The model card's training-data text and ``metrics.json``'s ``dataset`` entry."""


@dataclass(frozen=True)
class Recipe:
    """One recipe: its presets, variants, model family, data and runner. Register it with `register_recipe`; then
    `run_recipe(name, ...)` and ``hf-comet train NAME`` run it."""

    name: str
    family: str
    """``model_type`` of the MoE variants (``comet_vit``, ``comet_gpt2``, ``comet_bert``)."""
    fast: Settings
    """The seconds-long preset (tests)."""
    full: Settings
    """The minutes-long preset (README results)."""
    default_variants: tuple[str, ...]
    shared_config: Callable[[Settings], dict[str, Any]]
    """Config fields of the upstream family shared by the dense baseline and every MoE variant."""
    run: Callable[[VariantJob], VariantRun]
    """Loads the data, builds (`VariantJob.build_model`) and trains (`VariantJob.train`) one variant."""
    data_description: str
    """The model card's training-data text."""
    dataset_name: str
    """The dataset name of the model card's evaluation results."""
    min_settings: Mapping[str, int] = field(default_factory=dict)
    """Lower bounds on top of `MIN_SETTINGS` (e.g. ``num_train`` for recipes that sample windows)."""
    check_settings: Callable[[Settings], None] | None = None
    """Raises `RecipeArgumentError` for settings this recipe cannot run with (beyond the lower bounds)."""
    check_reload: Callable[[dict[str, Any]], list[ReloadCheck]] | None = None
    """Reloads each checkpoint of a run summary and scores it again (the demo shows the saved models work)."""
    load_data: Callable[[DatasetSource, int], RecipeData] | None = None
    """Reads a user's data (``--dataset``; its second argument is the seed of the split) into `RecipeData`, raising
    `RecipeArgumentError` for data this recipe cannot train on; ``None``: the recipe trains on its own data only."""

    def settings(self, fast: bool) -> Settings:
        return self.fast if fast else self.full


RECIPES: dict[str, Recipe] = {}
"""Every registered recipe by name (the built-in ones register on import of `hf_comet.training.recipes`)."""


def register_recipe(recipe: Recipe, *, replace: bool = False) -> Recipe:
    """Add ``recipe`` to `RECIPES` (refusing a name already taken unless ``replace``) and return it."""
    if recipe.name in RECIPES and not replace:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered (pass replace=True to replace it).")
    if not isinstance(recipe.fast, Settings) or not isinstance(recipe.full, Settings):
        raise TypeError(f"recipe {recipe.name!r}: the fast and full presets must be Settings.")
    RECIPES[recipe.name] = recipe
    return recipe


class RecipeArgumentError(UserError):
    """A recipe argument is out of range; raised before any training starts (a `~hf_comet.io.UserError`, so a
    ``ValueError``)."""


def _moe_config(family: str, variant: str, shared: dict, overrides: dict):
    return AutoConfig.for_model(family, **{**shared, **variant_config_fields(variant), **overrides})


def build_model(family: str, head: str, variant: str, shared: dict, overrides: dict, seed: int):
    """The dense upstream model (``variant="dense"``) or our MoE model with ``routing=variant`` and ``overrides``."""
    torch.manual_seed(seed)
    if variant == "dense":
        config = FAMILY_ADAPTERS[family].stock_config_class(**shared)  # the upstream family's config
        return getattr(transformers, head).from_config(config)
    return getattr(transformers, head).from_config(_moe_config(family, variant, shared, overrides))


def validate_recipe_arguments(
    name: str,
    fast: bool,
    variants: list[str] | None,
    overrides: dict | None,
    settings: dict | None,
    data: RecipeData | None = None,
) -> tuple[list[str], Settings, dict]:
    """Check every argument of `run_recipe` (and build each MoE config at the recipe's real sizes, with the config
    fields ``data`` decides) before any work.

    Returns the variants, the chosen `Settings` and each MoE variant's overrides (`variant_overrides`). Raises
    `RecipeArgumentError` naming the bad value and what is allowed.
    """
    if name not in RECIPES:
        raise RecipeArgumentError(f"recipe {name!r} does not exist; choose one of {', '.join(RECIPES)}.")
    recipe = RECIPES[name]
    variants = list(variants or recipe.default_variants)
    allowed = variant_names()
    bad = [v for v in variants if v not in allowed]
    if bad or not variants or len(set(variants)) != len(variants):
        raise RecipeArgumentError(
            f"variants {bad or variants} are not allowed; choose distinct ones from {', '.join(allowed)}."
        )
    preset = recipe.settings(fast)
    known = asdict(preset)
    for key, value in (settings or {}).items():
        if key not in known:
            raise RecipeArgumentError(f"setting {key!r} does not exist; known: {', '.join(known)}.")
        expected = type(known[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeArgumentError(f"setting {key}={value!r} must be a finite {expected.__name__}.")
        if expected is int and (value != int(value) or not 0 <= value <= MAX_INT_SETTING):
            raise RecipeArgumentError(
                f"setting {key}={value!r} must be a whole number in [0, {MAX_INT_SETTING}] (a run that could finish)."
            )
    chosen = replace(preset, **{k: type(known[k])(v) for k, v in (settings or {}).items()})
    for key, low in {**MIN_SETTINGS, **recipe.min_settings}.items():
        if getattr(chosen, key) < low:
            raise RecipeArgumentError(f"setting {key}={getattr(chosen, key)} must be >= {low}.")
    if chosen.learning_rate <= 0:
        raise RecipeArgumentError(f"setting learning_rate={chosen.learning_rate} must be > 0.")
    if recipe.check_settings is not None:
        recipe.check_settings(chosen)
    per_variant = variant_overrides(recipe.family, variants, overrides or {})
    shared = shared_config(recipe, chosen, data)
    for variant, fields in per_variant.items():
        try:
            _moe_config(recipe.family, variant, shared, fields)
        except (ValueError, TypeError, StrictDataclassError) as error:  # typed-config errors of huggingface_hub
            raise RecipeArgumentError(f"variant {variant!r}: {error}") from error
    return variants, chosen, per_variant


def _routing(variant: str) -> str:
    return "comet" if variant == "block_comet" else variant


def variant_overrides(family: str, variants: list[str], overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The config overrides of each MoE variant in ``variants``, from ``overrides`` as ``hf-comet train --set`` gives
    them: ``"switch.capacity_factor"`` applies to the ``switch`` variant only (refused when ``switch`` is not in
    ``variants``); an unprefixed MoE field (``"capacity_factor"``) applies to every variant whose routing reads it
    (refused when none does); any other config field of ``family`` (e.g. ``"hidden_dropout_prob"``) to every MoE
    variant. A prefixed value wins over an unprefixed one. ``routing`` (a variant's name is its routing) and the
    conversion provenance fields are refused; so are names that are not fields of ``family``'s config. transformers'
    names of our fields (`configuration_comet.MOE_FIELD_ALIASES`, e.g. ``num_local_experts``) are accepted as ours.
    Raises `RecipeArgumentError` naming the key and what is allowed."""
    moe = [v for v in variants if v != "dense"]
    per_variant: dict[str, dict[str, Any]] = {v: {} for v in moe}
    fields = {f.name for f in dataclasses.fields(AutoConfig.for_model(family).__class__)}
    rules = configuration_comet.MOE_FIELD_RULES
    prefixed = []
    for key, value in overrides.items():
        prefix, _, name = key.rpartition(".")
        name = configuration_comet.MOE_FIELD_ALIASES.get(name, name)  # Mixtral's num_local_experts is num_experts
        if name == "routing":
            raise RecipeArgumentError(
                f"override {key}={value!r}: a variant's name is its routing (block_comet is comet over blocks of "
                "units), so the routing is not a field to set; choose it with the variants, e.g. --variants topk."
            )
        if name in PROVENANCE_FIELDS:
            raise RecipeArgumentError(
                f"override {key}={value!r}: {name} is conversion provenance, recorded by hf-comet convert."
            )
        if name not in fields:
            raise RecipeArgumentError(f"override {key!r}: {name!r} is not a {family} config field (misspelt?); "
                                      "e.g. comet_keep_rate.")  # fmt: skip
        if prefix:
            if prefix not in variants:
                known = (
                    "" if prefix in variant_names() else f"{prefix!r} is not a variant ({', '.join(variant_names())}); "
                )
                raise RecipeArgumentError(
                    f"override {key}={value!r}: {known}the variants of this run are {', '.join(variants)}; "
                    f"prefix a field with one of them (e.g. {moe[0] if moe else 'comet'}.{name}) or add {prefix} to "
                    "the variants."
                )
            if prefix == "dense":
                raise RecipeArgumentError(
                    f"override {key}={value!r}: the dense variant is the upstream model built from the recipe's "
                    "settings; overrides change the MoE variants only."
                )
            prefixed.append((prefix, name, value))
            continue
        readers = [v for v in moe if name not in rules or _routing(v) in configuration_comet.routings_reading(name)]
        if not readers:
            reading = ", ".join(configuration_comet.routings_reading(name)) if name in rules else "MoE variants"
            raise RecipeArgumentError(
                f"override {key}={value!r}: no variant of this run ({', '.join(variants)}) reads {name}; it is read "
                f"by {reading}."
            )
        for variant in readers:
            per_variant[variant][name] = value
    for variant, name, value in prefixed:
        per_variant[variant][name] = value
    return per_variant


def check_models_build(
    recipe: Recipe, variants: list[str], settings: Settings, overrides: Mapping[str, dict], data=None
) -> dict[str, int]:
    """Build every variant's model on the meta device (no memory, no weights): sizes that build a config but not a
    model (e.g. ``hidden_size=33`` with 4 heads) are refused here, not after the run has started.
    ``overrides`` are per variant (`variant_overrides`). Returns each variant's parameter count (of its body)."""
    shared = shared_config(recipe, settings, data)
    counts = {}
    for variant in variants:
        try:
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                model = build_model(recipe.family, "AutoModel", variant, shared, overrides.get(variant, {}), seed=0)
        except (ValueError, TypeError, ArithmeticError, RuntimeError) as error:
            raise RecipeArgumentError(
                f"recipe {recipe.name}: the {variant} model cannot be built with these settings and overrides: {error}"
            ) from error
        counts[variant] = sum(p.numel() for p in model.parameters())
    return counts


def estimate_run_bytes(settings: Settings, parameters: Mapping[str, int]) -> int:
    """A recipe run's peak memory, estimated before anything is allocated: float32 weights of every variant (a run
    keeps each trained model for its plots and card), gradients and Adam's two moments of the largest, activations
    of one batch (``batch_size x seq_len x hidden_size x num_layers``, ~32 floats per entry, and three attention
    maps of ``seq_len x seq_len`` per head and layer) and the token windows
    of ``num_train`` and of the ``4 x num_eval`` held-out candidates (three int64 columns of ``seq_len``). A
    deliberate over-estimate of the order of magnitude: it refuses runs that cannot fit (``hidden_size=65536``,
    ``num_train=2**31-1``), not runs that barely fit."""
    weights = 4 * (sum(parameters.values()) + 3 * max(parameters.values(), default=0))
    activations = 4 * 32 * settings.batch_size * settings.seq_len * settings.hidden_size * settings.num_layers
    activations += 4 * 3 * settings.batch_size * settings.num_heads * settings.seq_len**2 * settings.num_layers
    windows = 3 * 8 * (settings.num_train + 4 * settings.num_eval) * settings.seq_len
    return weights + activations + windows


def shared_config(recipe: Recipe, settings: Settings, data: RecipeData | None = None) -> dict[str, Any]:
    """`Recipe.shared_config` of ``settings``, with the config fields a user's ``data`` decides on top."""
    return {**recipe.shared_config(settings), **(data.config if data is not None else {})}


def load_recipe_data(name: str, source: DatasetSource, seed: int = 0) -> RecipeData:
    """Read a user's data for recipe ``name`` (`Recipe.load_data`; splits a single dataset with ``seed``). Raises
    `RecipeArgumentError` for a bad path, format or column, or a recipe that trains on its own data only."""
    if name not in RECIPES:
        raise RecipeArgumentError(f"recipe {name!r} does not exist; choose one of {', '.join(RECIPES)}.")
    recipe = RECIPES[name]
    if recipe.load_data is None:
        takes = [n for n, r in RECIPES.items() if r.load_data is not None]
        raise RecipeArgumentError(
            f"recipe {name} trains on its own data only; --dataset works with {', '.join(takes)}."
        )
    return recipe.load_data(source, seed)


MAX_INT_SETTING = 2**31 - 1
"""Largest whole-number recipe setting (steps, sizes): beyond it a run could not finish."""


# -- helpers for runners -------------------------------------------------------------------------------------------
class Rows(torch.utils.data.Dataset):
    """A dict of equal-length tensors as a map-style dataset of row dicts (the built-in recipes build
    `datasets.Dataset` objects instead, see `torch_dataset`; kept for recipes written against it)."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def torch_dataset(columns: Mapping[str, torch.Tensor | np.ndarray]) -> datasets.Dataset:
    """Equal-length columns (tensors or arrays, one row per item) as a `datasets.Dataset` whose rows come back as
    torch tensors of the same dtypes (``with_format("torch")``), ready for Trainer's default collator."""
    arrays = {name: np.asarray(column.numpy() if isinstance(column, torch.Tensor) else column)
              for name, column in columns.items()}  # fmt: skip
    return datasets.Dataset.from_dict(arrays).with_format("torch")


def accuracy(prediction) -> dict[str, float]:
    """``compute_metrics`` for classification and token prediction (labels ``-100`` are left out), computed with the
    ``accuracy`` `evaluate` module shipped in `hf_comet.metrics` (offline)."""
    from ...metrics import load_metric

    predictions = np.asarray(prediction.predictions)
    labels = np.asarray(prediction.label_ids)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(-1)
    valid = labels != -100
    return load_metric("accuracy").compute(predictions=predictions[valid], references=labels[valid])


def mean_label_loss(model: torch.nn.Module, dataset, *, batch_size: int = 64) -> float:
    """The mean cross-entropy of ``model`` over every scored label position of ``dataset`` (rows of model inputs and
    ``labels``; ``-100`` is not scored), in eval mode and without touching the routing-statistics windows.

    Every recipe reports its losses with this one function, so the dense baseline and every MoE variant share one
    denominator whatever their heads or Trainer do: for a causal LM (`~hf_comet.training.trainer.is_causal_lm`)
    position ``t``'s logits are scored against label ``t + 1`` (63 positions per 64-token window), otherwise each
    position (or example) against its own label; the summed cross-entropy is divided once by the count of scored
    positions over the whole set (not a mean of per-batch means). docs/decisions.md, "One loss denominator"."""
    causal = is_causal_lm(model)
    rows = len(dataset)
    if rows == 0:
        raise ValueError("mean_label_loss: the dataset has no rows; give it the rows to score.")
    try:
        labels = [torch.as_tensor(dataset[i]["labels"]) for i in range(rows)]
    except KeyError:
        raise ValueError(f"mean_label_loss: the dataset's rows have no 'labels' (they have {sorted(dataset[0])}); "
                         "give each row its labels, -100 where a position is not scored.") from None  # fmt: skip
    if not any(bool(((row[..., 1:] if causal else row) != -100).any()) for row in labels):  # before any forward
        raise ValueError(f"mean_label_loss: none of the {rows} rows has a scored label (every label is -100"
                         f"{', or only the first position, which a causal LM does not predict' if causal else ''}).")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=transformers.default_data_collator)
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), statistics_paused(model):
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                logits = model(**batch).logits.float()
                if causal:
                    logits, labels = logits[..., :-1, :], labels[..., 1:]
                logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
                loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
                total += loss.double()
                count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return float(total / count)


class TrainingDiverged(UserError):
    """A recipe's training produced a NaN or infinite loss, gradient norm or weight; raised at once, so nothing of
    the run is saved, carded or reported (a `~hf_comet.io.UserError`: ``hf-comet train`` prints one line, exit 2)."""


class StopOnNonFinite(TrainerCallback):
    """Stop training with `TrainingDiverged` as soon as a logged loss or gradient norm, or any trainable weight
    after an optimizer step, is NaN or infinite (Trainer's ``logging_nan_inf_filter`` hides a non-finite loss from
    the logs, and a diverged model would otherwise be saved, carded and reported with exit status 0)."""

    def _refuse(self, state, what: str):
        raise TrainingDiverged(
            f"training diverged at step {state.global_step}: {what} is not finite (NaN or infinite). Nothing of this "
            "run is saved; check the data for huge or non-finite values, or lower the learning rate."
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._refuse(state, f"the {key.replace('_', ' ')} ({value})")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        params = [p.detach() for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            name = next(n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all())
            self._refuse(state, f"the weight {name}")


class _StepProgress(ProgressCallback):
    """Trainer's progress bar, with the loss in the bar instead of printing every (long) telemetry log line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)


RECIPE_TRAINING_ARGUMENTS = {
    "output_dir": "the run's folder is --output-dir (output_dir of run_recipe); each variant trains in a scratch "
    "folder inside it",
    "seed": "give --seed (seed of run_recipe): it seeds the models, the data split and the Trainer alike",
    "remove_unused_columns": "the recipes' collators read every column they prepare",
}
"""TrainingArguments fields a recipe decides itself, refused by name with what to use instead."""
SETTING_TRAINING_ARGUMENTS = {
    "max_steps": "steps",
    "per_device_train_batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "logging_steps": "logging_steps",
    "eval_steps": "eval_steps",
}
"""TrainingArguments fields that are recipe `Settings` fields: given as a training argument, the value is the setting
(recorded in ``metrics.json``; also giving the setting is refused)."""


def _recipe_training_arguments(settings: Settings, workdir: Path, seed: int, progress: bool) -> dict[str, Any]:
    steps = settings.steps
    return dict(
        output_dir=str(workdir),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=settings.learning_rate,
        weight_decay=0.01,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        logging_steps=min(settings.logging_steps, steps),
        eval_strategy="steps",
        eval_steps=min(settings.eval_steps, steps),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def trainer_writes(training_args: Mapping[str, Any]) -> bool:
    """Whether ``training_args`` ask the Trainer for files worth keeping (a reporter's logs such as TensorBoard's
    event files, Trainer checkpoints, a Hub push): then each variant's Trainer writes into ``OUTPUT/trainer/VARIANT``,
    kept; otherwise into a scratch folder removed after the variant."""
    report_to = training_args.get("report_to", "none")
    reporters = [report_to] if isinstance(report_to, str) else list(report_to or [])
    strategy = training_args.get("save_strategy", "no")
    saves = getattr(strategy, "value", strategy) != "no"
    return any(r != "none" for r in reporters) or saves or bool(training_args.get("push_to_hub"))


AT_LEAST_ONE_TRAINING_ARGUMENTS = frozenset(
    {
        "gradient_accumulation_steps",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "eval_accumulation_steps",
    }
)
"""TrainingArguments counts that are 1 or more when given (Trainer does not check them itself)."""


def _check_training_number(name: str, value: Any, default: Any) -> None:
    """Refuse a TrainingArguments count below 1 (`AT_LEAST_ONE_TRAINING_ARGUMENTS`) and a negative number where the
    field's default is not negative (a learning rate, weight decay, step count...); a field whose default is a
    negative sentinel (``max_steps=-1``: unset) keeps its meaning."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if name in AT_LEAST_ONE_TRAINING_ARGUMENTS and value < 1:
        raise RecipeArgumentError(f"--{name} {value!r} must be 1 or more.")
    if value < 0 and not (isinstance(default, int | float) and default < 0):
        raise RecipeArgumentError(f"--{name} {value!r} is negative; give 0 or more.")


def check_training_arguments(training_args: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a recipe run's ``training_args`` (TrainingArguments fields, as ``hf-comet train --learning_rate ...``
    gives them) into recipe settings (`SETTING_TRAINING_ARGUMENTS`) and the rest, which override the recipe's own
    TrainingArguments. Refuses (`RecipeArgumentError`, naming the field and what is allowed) a name that is not a
    TrainingArguments field, one the recipe decides (`RECIPE_TRAINING_ARGUMENTS`), a non-finite number, and a
    reporter (``report_to``) transformers does not know or that is not installed."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    known = set(fields)
    settings, rest = {}, {}
    for name, value in (training_args or {}).items():
        if name not in known:
            raise RecipeArgumentError(
                f'--{name} is not a TrainingArguments field; list them with: python -c "from transformers import '
                'HfArgumentParser, TrainingArguments; HfArgumentParser(TrainingArguments).print_help()".'
            )
        if name in RECIPE_TRAINING_ARGUMENTS:
            raise RecipeArgumentError(f"--{name} is decided by the recipe: {RECIPE_TRAINING_ARGUMENTS[name]}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeArgumentError(f"--{name} {value!r} is not finite; give a finite number.")
        _check_training_number(name, value, fields[name].default)
        if name in SETTING_TRAINING_ARGUMENTS:
            settings[SETTING_TRAINING_ARGUMENTS[name]] = value
        else:
            rest[name] = value
    if "report_to" in rest:
        report_to = rest["report_to"]
        names = [report_to] if isinstance(report_to, str) else list(report_to or [])
        installed = get_available_reporting_integrations()
        for name in names:
            if name in ("none", "all"):
                continue
            if name not in INTEGRATION_TO_CALLBACK:
                raise RecipeArgumentError(
                    f"--report_to {name!r} is not a reporter transformers knows; choose from "
                    f"{', '.join(INTEGRATION_TO_CALLBACK)}, all or none."
                )
            if name not in installed:
                raise RecipeArgumentError(
                    f"--report_to {name}: {name} is not installed (pip install {name}); installed reporters: "
                    f"{', '.join(installed) or 'none'}."
                )
    return settings, rest


def parse_training_arguments(argv: list[str]) -> dict[str, Any]:
    """The TrainingArguments fields given in ``argv`` (``["--report_to", "tensorboard", "--learning_rate", "1e-3"]``),
    typed by transformers' `HfArgumentParser`; only the fields given (a default is never mistaken for a choice).
    Raises `RecipeArgumentError` naming an unknown flag or a bad value; `check_training_arguments` checks the rest."""
    import argparse

    from transformers import HfArgumentParser

    unset = object()
    parser = HfArgumentParser(TrainingArguments, prog="hf-comet train", allow_abbrev=False)

    def refuse(message: str):
        raise RecipeArgumentError(
            f'{message} (TrainingArguments flags; list them with: python -c "from transformers import '
            'HfArgumentParser, TrainingArguments; HfArgumentParser(TrainingArguments).print_help()")'
        )

    parser.error = refuse
    for action in parser._actions:
        if action.dest != argparse.SUPPRESS and action.default is not argparse.SUPPRESS:
            action.default = unset
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        refuse(f"unrecognized arguments: {' '.join(unknown)}")
    return {name: value for name, value in vars(namespace).items() if value is not unset}


def train_model(
    model,
    train: torch.utils.data.Dataset,
    evaluation: torch.utils.data.Dataset,
    settings: Settings,
    workdir: Path,
    *,
    seed: int,
    progress: bool,
    compute_metrics: Callable | None = None,
    data_collator: Callable | None = None,
    preprocess_logits: Callable | None = None,
    training_args: Mapping[str, Any] | None = None,
    routing_logging: str = "summary",
) -> tuple[CometTrainer, dict[str, float], float]:
    """Train ``model`` for ``settings.steps`` with `CometTrainer` (``routing_logging``: its telemetry level) on CPU
    (cosine schedule, evaluation every ``settings.eval_steps``, no reporter), then evaluate (once: an evaluation at
    the last step is reused, unless ``load_best_model_at_end`` loads another model). ``training_args``
    (checked by `check_training_arguments`) override those TrainingArguments, e.g. ``{"report_to": "tensorboard",
    "gradient_accumulation_steps": 4}``. Returns the trainer, the evaluation metrics and the training seconds."""
    args = TrainingArguments(
        **{**_recipe_training_arguments(settings, workdir, seed, progress), **(training_args or {})}
    )
    callbacks = [DeepConstraintCallback()] if getattr(model.config, "routing", None) == "deep" else []
    callbacks.append(StopOnNonFinite())
    trainer = CometTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        compute_metrics=compute_metrics,
        data_collator=data_collator,
        preprocess_logits_for_metrics=preprocess_logits,
        callbacks=callbacks,
        routing_logging=routing_logging,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(_StepProgress())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == trainer.state.global_step and not args.load_best_model_at_end:
        metrics = {k: v for k, v in last.items() if k != "step"}  # evaluated at the last step: not twice
    else:
        metrics = trainer.evaluate()
    return trainer, metrics, seconds


@dataclass
class VariantJob:
    """One variant of one recipe run, as its runner sees it."""

    recipe: Recipe
    settings: Settings
    variant: str
    overrides: dict[str, Any]
    seed: int
    workdir: Path
    """The Trainer's folder for this variant: a scratch folder removed after the runner returns, or
    ``OUTPUT/trainer/VARIANT``, kept, when the training arguments ask for files (`trainer_writes`)."""
    progress: bool
    data: RecipeData | None = None
    """A user's data (``--dataset``) to train on instead of the recipe's own."""
    training_args: dict[str, Any] = field(default_factory=dict)
    """TrainingArguments that override the recipe's (`check_training_arguments`)."""
    routing_logging: str = "summary"
    """`CometTrainer`'s telemetry level."""

    def build_model(self, head: str):
        """The variant's model under the Auto class ``head`` (e.g. ``"AutoModelForCausalLM"``), seeded."""
        shared = shared_config(self.recipe, self.settings, self.data)
        return build_model(self.recipe.family, head, self.variant, shared, self.overrides, self.seed)

    def train(self, model, train, evaluation, *, settings: Settings | None = None, workdir: Path | None = None, **kw):
        """`train_model` with this job's settings (or ``settings``), scratch folder (or ``workdir``), seed, progress,
        training arguments and telemetry level; ``kw`` are `train_model`'s ``compute_metrics``, ``data_collator``, ``preprocess_logits``."""
        settings = settings or self.settings
        workdir = workdir or self.workdir
        return train_model(model, train, evaluation, settings, workdir, seed=self.seed, progress=self.progress,
                           training_args=self.training_args, routing_logging=self.routing_logging, **kw)  # fmt: skip


# -- running a recipe ----------------------------------------------------------------------------------------------
@dataclass
class VariantResult:
    name: str
    metrics: dict[str, float]
    parameters: int
    seconds: float
    checkpoint: str
    log_history: list[dict[str, Any]] = field(default_factory=list)
    routing_history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PreparedRun:
    """A recipe run whose every argument is checked (`prepare_recipe_run`); `run_prepared` runs it."""

    recipe: Recipe
    output: Path
    fast: bool
    variants: list[str]
    settings: Settings
    overrides: dict[str, Any]
    """The overrides as given (``metrics.json`` records them)."""
    variant_overrides: dict[str, dict[str, Any]]
    seed: int
    data: RecipeData | None
    training_args: dict[str, Any]
    routing_logging: str
    found: tuple[int, int] | None = None
    """`hf_comet.io.identity` of the output folder when it was checked (``None``: nothing there); checked again when
    the run is swapped in."""
    what: str = "output folder"


def prepare_recipe_run(
    name: str,
    output_dir: str | os.PathLike,
    *,
    fast: bool = False,
    variants: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    seed: int = 0,
    dataset: DatasetSource | RecipeData | None = None,
    training_args: Mapping[str, Any] | None = None,
    routing_logging: str = "summary",
    what: str = "output folder",
    overwrite: bool = False,
) -> PreparedRun:
    """Check every argument of `run_recipe` once, before any training: the recipe, the training arguments, the
    settings, the variants and their overrides (each MoE config built at the recipe's real sizes and every model on
    the meta device, its memory estimated against the machine's, `estimate_run_bytes`), the user's data (read here
    when a `DatasetSource`; its held-out rows capped at ``num_eval``) and the output folder (``what`` names it in
    errors; one that holds files is refused unless ``overwrite``). Raises `RecipeArgumentError` or
    `~hf_comet.io.UserError` naming the bad value and what is allowed."""
    if name not in RECIPES:
        raise RecipeArgumentError(f"recipe {name!r} does not exist; choose one of {', '.join(RECIPES)}.")
    if routing_logging not in ROUTING_LOGGING:
        raise RecipeArgumentError(
            f"routing_logging {routing_logging!r} is not a telemetry level; choose one of {', '.join(ROUTING_LOGGING)}."
        )
    from_training, training_args = check_training_arguments(training_args)
    settings = dict(settings or {})
    for key, value in from_training.items():
        if key in settings:
            flag = next(k for k, v in SETTING_TRAINING_ARGUMENTS.items() if v == key)
            raise RecipeArgumentError(
                f"--{flag} {value!r} and setting {key}={settings[key]!r} both set {key}; give one."
            )
        settings[key] = value
    data = load_recipe_data(name, dataset, seed) if isinstance(dataset, DatasetSource) else dataset
    try:
        variants, chosen, per_variant = validate_recipe_arguments(name, fast, variants, overrides, settings, data)
        parameters = check_models_build(RECIPES[name], variants, chosen, per_variant, data)
    except StrictDataclassError as error:  # huggingface_hub's typed config fields
        raise RecipeArgumentError(f"an override is refused by the config: {error}") from error
    try:
        check_memory(
            estimate_run_bytes(chosen, parameters),
            f"recipe {name} ({', '.join(f'{v}: {n:,} parameters' for v, n in parameters.items())}; "
            f"batch_size={chosen.batch_size}, seq_len={chosen.seq_len}, num_train={chosen.num_train}, "
            f"num_eval={chosen.num_eval})",
            "lower hidden_size, num_layers, batch_size, seq_len or num_train with --setting, or num_experts with --set.",
        )
    except UserError as error:
        raise RecipeArgumentError(str(error)) from None
    if data is not None and len(data.test) > chosen.num_eval:  # a size cap like any other: evaluate num_eval rows
        data = replace(data, test=data.test.select(range(chosen.num_eval)),
                       description=f"{data.description} (evaluated on {chosen.num_eval} held-out rows: num_eval)")  # fmt: skip
    try:  # the TrainingArguments the recipe will build, once, so a bad combination is refused now
        TrainingArguments(**{**_recipe_training_arguments(chosen, Path(output_dir), seed, False), **training_args})
    except (ValueError, TypeError) as error:
        raise RecipeArgumentError(f"the training arguments are refused by TrainingArguments: {error}") from error
    output = check_recipe_outputs(name, output_dir, variants, what=what)
    if trainer_writes(training_args):
        run_folder(output / "trainer", what, folders=[], files=[])
    if os.path.isdir(output) and not output.is_symlink():
        recover(output)
        recover_folder(output)  # what an interrupted earlier run left (each repair is logged as a warning)
        if not overwrite and any(not n.endswith(".lock") or not n.startswith(".") for n in os.listdir(output)):
            raise RecipeArgumentError(
                f"{what} {str(output_dir)!r} exists and holds files; pass --overwrite to replace the previous run "
                "as a whole (files of yours in it are kept), or choose another folder."
            )
    return PreparedRun(RECIPES[name], output, fast, variants, chosen, dict(overrides or {}), per_variant, seed, data,
                       training_args, routing_logging, identity(output), what)  # fmt: skip


def run_recipe(
    name: str,
    output_dir: str | os.PathLike,
    *,
    fast: bool = False,
    variants: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    dataset: DatasetSource | RecipeData | None = None,
    training_args: Mapping[str, Any] | None = None,
    routing_logging: str = "summary",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the recipe's variants side by side and write metrics, plots, checkpoints and model cards.

    Args:
        name: one of `RECIPES`.
        output_dir: folder for the run: created, or an empty folder, or with ``overwrite`` one that holds files
            (the previous run's outputs are replaced as a whole, other files kept). The run is staged in a hidden
            sibling and swapped in at the end (`run_prepared`).
        fast: the seconds-long preset used by the tests instead of the full one.
        variants: ``"dense"`` and/or routing names (``"comet"``, ``"topk"``, ... and ``"block_comet"``).
        overrides: config fields of the MoE variants (validated by the config, e.g. ``comet_keep_rate``); a key
            ``"VARIANT.FIELD"`` sets one variant's, a bare field every variant whose routing reads it
            (`variant_overrides`).
        settings: `Settings` fields to change (e.g. ``{"steps": 100}``).
        dataset: the user's data to train on instead of the recipe's own: a `DatasetSource` (read here with
            `load_recipe_data`) or `RecipeData` already read.
        training_args: TrainingArguments fields over the recipe's (`check_training_arguments`; e.g.
            ``{"report_to": "tensorboard"}``; the recipe reports nowhere by default). A reporter's logs and Trainer
            checkpoints go to ``OUTPUT/trainer/VARIANT`` (`trainer_writes`).
        routing_logging: `CometTrainer`'s telemetry level, ``"summary"``, ``"layers"`` or ``"none"``.
        overwrite: replace a previous run in ``output_dir`` (``hf-comet train --overwrite``).

    Returns the content of ``metrics.json``. All arguments are checked before any training starts
    (`prepare_recipe_run`).
    """
    prepared = prepare_recipe_run(
        name, output_dir, fast=fast, variants=variants, overrides=overrides, settings=settings, seed=seed,
        dataset=dataset, training_args=training_args, routing_logging=routing_logging, overwrite=overwrite,
    )  # fmt: skip
    return run_prepared(prepared, progress=progress, log=log)


def _previous_run_output(path: Path) -> bool:
    """Whether an entry of a replaced output folder is a run's output (a variant's checkpoint, ``metrics.json``,
    plots, Trainer files), replaced by the new run; every other entry (a user's notes) is kept."""
    name = path.name
    return (name in (*variant_names(), "metrics.json", "loss_curves.png", "trainer")
            or re.fullmatch(r"(expert_load|overlap_similarity)_.+\.png", name) is not None)  # fmt: skip


def run_prepared(prepared: PreparedRun, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a checked recipe run (`prepare_recipe_run`); see `run_recipe`.

    The run is one unit: the output folder is locked for the run (`hf_comet.io.destination_lock`: a second run
    into it is refused), everything is written into a hidden sibling and swapped in whole at the end, keeping the
    replaced folder's own files (not the previous run's outputs). A failure, a full disk (one clear `UserError`) or
    Ctrl-C leaves the previous folder as it was; a folder that appeared at the destination meanwhile is never
    replaced (the result is kept under a printed name, `hf_comet.io.DestinationChanged`)."""
    output, what = prepared.output, prepared.what
    with destination_lock(output, what), write_failures(output, what):
        if os.path.isdir(output) and not output.is_symlink():
            recover_folder(output)
        with staged_path(output, directory=True, carry_over=lambda p: not _previous_run_output(p),
                         expect=prepared.found, what=what) as stage:  # fmt: skip
            return _run_into(prepared, stage, progress, log)


def _run_into(prepared: PreparedRun, stage: Path, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Train every variant and write the run's files into ``stage`` (recording the final paths under the output)."""
    recipe, chosen, data = prepared.recipe, prepared.settings, prepared.data
    final = prepared.output.absolute()
    results: dict[str, VariantResult] = {}
    samples = {}
    models = {}
    for variant in prepared.variants:
        log(f"[{recipe.name}] training {variant} ({chosen.steps} steps)")
        kept = stage / "trainer" / variant
        trainer_folder = scratch_directory(stage / f"{variant}.trainer")
        if trainer_writes(prepared.training_args):  # a reporter's logs or Trainer checkpoints: kept
            kept.mkdir(parents=True, exist_ok=True)
            trainer_folder = contextlib.nullcontext(kept)
        with trainer_folder as workdir:
            job = VariantJob(recipe, chosen, variant, prepared.variant_overrides.get(variant, {}), prepared.seed,
                             Path(workdir), progress, data, prepared.training_args, prepared.routing_logging)  # fmt: skip
            trainer, metrics, seconds, sample = recipe.run(job)
        model = trainer.model
        atomic_save_pretrained(model, stage / variant, what=f"the {variant} checkpoint of recipe {recipe.name}")
        results[variant] = VariantResult(
            name=variant,
            metrics=metrics,
            parameters=sum(p.numel() for p in model.parameters()),
            seconds=seconds,
            checkpoint=str(final / variant),
            log_history=trainer.state.log_history,
            routing_history=trainer.routing_history,
        )
        samples[variant], models[variant] = sample, model
    _write_plots_and_cards(recipe, stage, results, models, samples, data)
    summary = _summary(recipe, prepared.fast, chosen, prepared.overrides, prepared.seed, results, data)
    if prepared.training_args:  # as given (an enum or object as its text)
        summary["training_args"] = {k: v if isinstance(v, (bool, int, float, str, list, type(None))) else str(v)
                                     for k, v in prepared.training_args.items()}  # fmt: skip
    atomic_write_text(stage / "metrics.json", json.dumps(summary, indent=2))
    return summary


def recipe_outputs(name: str, variants: list[str]) -> tuple[list[str], list[str]]:
    """The folders (one checkpoint per variant) and files (``metrics.json`` and plots) `run_recipe` writes."""
    moe = [v for v in variants if v != "dense"]
    files = ["metrics.json", "loss_curves.png"]
    files += [f"{plot}_{v}.png" for v in moe for plot in ("expert_load", "overlap_similarity")]
    return list(variants), files


def check_recipe_outputs(
    name: str, output_dir: str | os.PathLike, variants: list[str] | None = None, *, what: str = "output folder"
) -> Path:
    """Raise `RecipeArgumentError` if `run_recipe` could not write its outputs in ``output_dir``
    (`hf_comet.io.run_folder`, the same check as every run folder: a file or a symbolic link there, a symbolic link,
    a file or a folder that is not a checkpoint folder where a checkpoint folder goes, a folder where a file goes, no
    write permission); run before any training. Returns the output folder. Every output is written atomically
    (`hf_comet.io`)."""
    if name not in RECIPES:
        raise RecipeArgumentError(f"recipe {name!r} does not exist; choose one of {', '.join(RECIPES)}.")
    folders, files = recipe_outputs(name, list(variants or RECIPES[name].default_variants))
    try:
        return run_folder(output_dir, what, folders=folders, files=files)
    except UserError as error:  # raised as the recipes' error, like every other recipe argument
        raise RecipeArgumentError(str(error)) from error


def _write_plots_and_cards(
    recipe: Recipe, output: Path, results: dict[str, VariantResult], models, samples, data: RecipeData | None = None
) -> None:
    """The loss curves of every variant; per MoE variant its load and overlap plots (adding the overlap-similarity
    correlation to its metrics), copies of the plots in its checkpoint, and its model card."""
    name = recipe.name
    plot_loss_curves({v: r.log_history for v, r in results.items()}, output / "loss_curves.png", title=name)
    for variant, result in results.items():
        if variant == "dense":
            continue
        plots = [f"expert_load_{variant}.png", f"overlap_similarity_{variant}.png"]
        plot_expert_load(result.routing_history, output / plots[0], title=f"{name}: {variant} expert load")
        correlations = plot_overlap_vs_similarity(
            models[variant], samples[variant], output / plots[1], title=f"{name}: {variant}"
        )
        result.metrics["overlap_similarity_correlation"] = float(np.nanmean(list(correlations.values())))
        for plot in (*plots, "loss_curves.png"):
            atomic_write_bytes(output / variant / plot, (output / plot).read_bytes())
        write_model_card(
            models[variant],
            output / variant,
            results={k: v for k, v in result.metrics.items() if isinstance(v, float)},
            plots=["loss_curves.png", *plots],
            datasets_text=card_text(data.description) if data is not None else recipe.data_description,
            dataset_name=data.description if data is not None else recipe.dataset_name,
        )


def _summary(
    recipe: Recipe, fast: bool, chosen: Settings, overrides: dict, seed: int, results, data: RecipeData | None = None
) -> dict[str, Any]:
    """The content of ``metrics.json`` (``dataset``: the user's data, ``null`` for the recipe's own)."""
    return {
        "recipe": recipe.name,
        "dataset": data.description if data is not None else None,
        "setting": "fast" if fast else "full",
        "settings": asdict(chosen),
        "overrides": overrides,
        "seed": seed,
        "variants": {
            v: {
                "metrics": r.metrics,
                "parameters": r.parameters,
                "train_seconds": r.seconds,
                "checkpoint": r.checkpoint,
                "last_routing": {k: x for k, x in (r.routing_history[-1] if r.routing_history else {}).items()
                                 if k.startswith("routing/") and "/layer_" not in k},
            }
            for v, r in results.items()
        },
    }  # fmt: skip
