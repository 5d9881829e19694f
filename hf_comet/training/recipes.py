"""Recipes: MoE variants against a dense baseline on real data that ships offline, trained with `CometTrainer`.

Each recipe has a ``fast`` setting (seconds; tests) and a ``full`` one (minutes on 2 CPU cores; README results),
trains its variants side by side, and writes into its output folder:

* ``metrics.json`` (settings, per variant: metrics, parameters, runtime, telemetry of the last window),
* ``loss_curves.png``, and per MoE variant ``expert_load_<variant>.png`` and ``overlap_similarity_<variant>.png``,
* one checkpoint folder per variant (loadable with the Auto classes) with a model card for the MoE ones.

Recipes: ``vit_digits`` (image classification on scikit-learn's digits), ``gpt2_text`` (byte-level causal LM on
CPython's bundled English documentation, validation perplexity), ``bert_mlm_cls`` (byte-level masked-LM
pre-training on the same text, then sequence classification of standard-library docstrings by topic).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..cards import write_model_card
from ..data import byte_windows, digits_images, encode_bytes, english_text_split, stdlib_docstrings
from ..io import atomic_save_pretrained
from ..modeling.configuration_comet import ROUTINGS
from .callbacks import DeepConstraintCallback
from .plots import plot_expert_load, plot_loss_curves, plot_overlap_vs_similarity
from .trainer import CometTrainer

PAD_ID, MASK_ID, CLS_ID = 256, 257, 258  # byte vocabulary (0-255) plus BERT's special tokens
BYTE_VOCAB = 259


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


PRESETS: dict[str, dict[str, Settings]] = {
    "vit_digits": {
        "fast": Settings(steps=12, batch_size=32, hidden_size=32, num_layers=2, num_heads=4, learning_rate=3e-3,
                         eval_steps=6, logging_steps=3),
        "full": Settings(steps=1200, batch_size=64, hidden_size=64, num_layers=4, num_heads=4, learning_rate=2e-3,
                         eval_steps=200, logging_steps=50),
    },
    "gpt2_text": {
        "fast": Settings(steps=10, batch_size=8, hidden_size=32, num_layers=2, num_heads=4, learning_rate=3e-3,
                         eval_steps=5, logging_steps=5, seq_len=64, num_train=400, num_eval=32),
        "full": Settings(steps=600, batch_size=32, hidden_size=96, num_layers=4, num_heads=4, learning_rate=2e-3,
                         eval_steps=100, logging_steps=25, seq_len=128, num_train=20000, num_eval=256),
    },
    "bert_mlm_cls": {
        "fast": Settings(steps=8, batch_size=8, hidden_size=32, num_layers=2, num_heads=4, learning_rate=3e-3,
                         eval_steps=4, logging_steps=4, seq_len=64, finetune_steps=8, num_train=400, num_eval=32),
        "full": Settings(steps=500, batch_size=32, hidden_size=96, num_layers=4, num_heads=4, learning_rate=2e-3,
                         eval_steps=100, logging_steps=25, seq_len=128, finetune_steps=400, num_train=20000,
                         num_eval=256),
    },
}  # fmt: skip

DEFAULT_VARIANTS = {"vit_digits": ["dense", "comet", "topk"], "gpt2_text": ["dense", "comet"]}
DEFAULT_VARIANTS["bert_mlm_cls"] = ["dense", "comet"]
RECIPES = tuple(PRESETS)


class _Rows(torch.utils.data.Dataset):
    """A dict of equal-length tensors as a map-style dataset of row dicts."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


class _StepProgress(ProgressCallback):
    """Trainer's progress bar, with the loss in the bar instead of printing every (long) telemetry log line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)


@dataclass
class VariantResult:
    name: str
    metrics: dict[str, float]
    parameters: int
    seconds: float
    checkpoint: str
    log_history: list[dict[str, Any]] = field(default_factory=list)
    routing_history: list[dict[str, Any]] = field(default_factory=list)


def _moe_config(family: str, variant: str, shared: dict, overrides: dict):
    routing = {"block_comet": "comet"}.get(variant, variant)
    fields = dict(shared, routing=routing, num_experts=4, num_experts_per_tok=2)
    if variant == "block_comet":
        fields["comet_block_size"] = 32
    fields.update(overrides)
    return AutoConfig.for_model(family, **fields)


def build_model(family: str, head: str, variant: str, shared: dict, overrides: dict, seed: int):
    """The dense upstream model (``variant="dense"``) or our MoE model with ``routing=variant`` and ``overrides``."""
    torch.manual_seed(seed)
    if variant == "dense":
        upstream = {"comet_vit": "ViT", "comet_gpt2": "GPT2", "comet_bert": "Bert"}[family]
        config = getattr(transformers, f"{upstream}Config")(**shared)
        return getattr(transformers, head).from_config(config)
    return getattr(transformers, head).from_config(_moe_config(family, variant, shared, overrides))


def _accuracy(prediction) -> dict[str, float]:
    predictions = np.asarray(prediction.predictions)
    labels = np.asarray(prediction.label_ids)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(-1)
    valid = labels != -100
    return {"accuracy": float((predictions[valid] == labels[valid]).mean())}


def _argmax_logits(logits, labels):
    return logits.argmax(-1)


def _train(
    model,
    train: torch.utils.data.Dataset,
    evaluation: torch.utils.data.Dataset,
    settings: Settings,
    workdir: Path,
    seed: int,
    progress: bool,
    steps: int | None = None,
    compute_metrics: Callable | None = None,
    data_collator: Callable | None = None,
    preprocess_logits: Callable | None = None,
) -> tuple[CometTrainer, dict[str, float], float]:
    steps = steps or settings.steps
    args = TrainingArguments(
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
    callbacks = [DeepConstraintCallback()] if getattr(model.config, "routing", None) == "deep" else []
    trainer = CometTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        compute_metrics=compute_metrics,
        data_collator=data_collator,
        preprocess_logits_for_metrics=preprocess_logits,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(_StepProgress())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    return trainer, metrics, seconds


# -- the three recipes ---------------------------------------------------------------------------------------------
def _vit_shared(settings: Settings) -> dict:
    return dict(
        image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        intermediate_size=4 * settings.hidden_size, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def _gpt2_shared(settings: Settings) -> dict:
    return dict(
        vocab_size=256, n_positions=settings.seq_len, n_embd=settings.hidden_size, n_layer=settings.num_layers,
        n_head=settings.num_heads, bos_token_id=10, eos_token_id=10, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0,
    )  # fmt: skip


def _bert_shared(settings: Settings) -> dict:
    return dict(
        vocab_size=BYTE_VOCAB, pad_token_id=PAD_ID, max_position_embeddings=settings.seq_len,
        hidden_size=settings.hidden_size, num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads, intermediate_size=4 * settings.hidden_size, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def _vit_digits(settings: Settings, variant: str, overrides: dict, seed: int, workdir: Path, progress: bool):
    train, test = digits_images(seed=seed)
    shared = _vit_shared(settings)
    model = build_model("comet_vit", "AutoModelForImageClassification", variant, shared, overrides, seed)
    trainer, metrics, seconds = _train(
        model, _Rows(train), _Rows(test), settings, workdir, seed, progress, compute_metrics=_accuracy
    )
    sample = {"pixel_values": test["pixel_values"][:256]}
    return trainer, {"test_accuracy": metrics["eval_accuracy"], "test_loss": metrics["eval_loss"]}, seconds, sample


def _text_windows(settings: Settings, seed: int, prefix: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte windows of the bundled documentation: every 10th topic is held out, and held-out windows whose bytes
    also occur in the training text (the topics repeat some paragraphs) are dropped, so evaluation is unseen text.
    With ``prefix`` each window starts with that token id (BERT's [CLS])."""
    train_text, eval_text = english_text_split()
    length = settings.seq_len - (prefix is not None)
    train = byte_windows(train_text, length, settings.num_train, seed=seed)
    candidates = byte_windows(eval_text, length, 4 * settings.num_eval, seed=seed + 1)
    train_bytes = train_text.tobytes()
    unseen = [row for row in candidates if bytes(row.to(torch.uint8).tolist()) not in train_bytes]
    evaluation = torch.stack(unseen[: settings.num_eval])
    if prefix is not None:
        train = torch.cat([torch.full((len(train), 1), prefix), train], dim=1)
        evaluation = torch.cat([torch.full((len(evaluation), 1), prefix), evaluation], dim=1)
    return train, evaluation


def _gpt2_text(settings: Settings, variant: str, overrides: dict, seed: int, workdir: Path, progress: bool):
    train, evaluation = _text_windows(settings, seed)
    shared = _gpt2_shared(settings)
    model = build_model("comet_gpt2", "AutoModelForCausalLM", variant, shared, overrides, seed)
    columns = lambda ids: {"input_ids": ids, "labels": ids.clone()}  # noqa: E731
    trainer, metrics, seconds = _train(
        model, _Rows(columns(train)), _Rows(columns(evaluation)), settings, workdir, seed, progress
    )
    results = {"val_loss": metrics["eval_loss"], "val_perplexity": math.exp(metrics["eval_loss"])}
    return trainer, results, seconds, {"input_ids": evaluation[:32]}


class _MaskingCollator:
    """Dynamic BERT masking of byte sequences: 15% of the real tokens, 80% -> [MASK], 10% random byte, 10% kept.
    Rows that already carry ``labels`` (the fixed evaluation set) are left as they are."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        if "labels" in batch:
            return batch
        return mask_bytes(batch["input_ids"], batch["attention_mask"], self.generator)


def mask_bytes(ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """BERT's 80/10/10 masking of 15% of the non-padding, non-[CLS] positions."""
    real = attention_mask.bool() & (ids != CLS_ID)
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & real
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(ids, MASK_ID), ids)
    random_bytes = torch.randint(0, 256, ids.shape, generator=generator)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_bytes, masked)
    return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}


def _bert_mlm_cls(settings: Settings, variant: str, overrides: dict, seed: int, workdir: Path, progress: bool):
    train, evaluation = _text_windows(settings, seed, prefix=CLS_ID)  # [CLS] is seen in pre-training too
    shared = _bert_shared(settings)
    model = build_model("comet_bert", "AutoModelForMaskedLM", variant, shared, overrides, seed)
    ones = torch.ones_like
    eval_masked = mask_bytes(evaluation, ones(evaluation), torch.Generator().manual_seed(seed + 7))
    trainer, mlm_metrics, seconds = _train(
        model,
        _Rows({"input_ids": train, "attention_mask": ones(train)}),
        _Rows(eval_masked),
        settings,
        workdir / "mlm",
        seed,
        progress,
        compute_metrics=_accuracy,
        data_collator=_MaskingCollator(seed),
        preprocess_logits=_argmax_logits,
    )
    # fine-tune the pre-trained encoder on a real labelled text task: the topic of a standard-library docstring
    pretrained = workdir / "mlm_checkpoint"
    model.save_pretrained(pretrained)
    texts, labels, names = stdlib_docstrings()
    seen: dict[bytes, int] = {}  # texts identical once truncated would leak from train to test: keep one
    for index, text in enumerate(texts):
        seen.setdefault(text.encode("utf-8")[: settings.seq_len - 1], index)
    kept = sorted(seen.values())
    texts, labels = [texts[i] for i in kept], [labels[i] for i in kept]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    ids, mask = encode_bytes(texts, settings.seq_len, prefix=CLS_ID, pad=PAD_ID)
    labels = torch.tensor(labels)
    n_test = len(texts) // 5
    test_idx, train_idx = order[:n_test], order[n_test:]
    columns = lambda idx: {"input_ids": ids[idx], "attention_mask": mask[idx], "labels": labels[idx]}  # noqa: E731
    classifier_class = transformers.AutoModelForSequenceClassification
    if variant == "dense":
        classifier_class = transformers.BertForSequenceClassification
    torch.manual_seed(seed)
    classifier = classifier_class.from_pretrained(
        pretrained, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    finetune = replace(settings, steps=settings.finetune_steps, learning_rate=settings.learning_rate / 2)
    trainer_cls, cls_metrics, cls_seconds = _train(
        classifier,
        _Rows(columns(train_idx)),
        _Rows(columns(test_idx)),
        finetune,
        workdir / "cls",
        seed,
        progress,
        compute_metrics=_accuracy,
    )
    shutil.rmtree(pretrained, ignore_errors=True)
    results = {
        "mlm_val_loss": mlm_metrics["eval_loss"],
        "mlm_masked_accuracy": mlm_metrics["eval_accuracy"],
        "topic_test_accuracy": cls_metrics["eval_accuracy"],
        "topic_test_loss": cls_metrics["eval_loss"],
    }
    trainer_cls.state.log_history = [  # one curve: pre-training steps, then fine-tuning steps after them
        *trainer.state.log_history,
        *({**e, "step": e["step"] + settings.steps} for e in trainer_cls.state.log_history if "step" in e),
    ]
    trainer_cls.routing_history = trainer.routing_history + [
        {**h, "step": h["step"] + settings.steps} for h in trainer_cls.routing_history
    ]
    sample = {"input_ids": ids[test_idx[:64]], "attention_mask": mask[test_idx[:64]]}
    return trainer_cls, results, seconds + cls_seconds, sample


RUNNERS = {"vit_digits": _vit_digits, "gpt2_text": _gpt2_text, "bert_mlm_cls": _bert_mlm_cls}
DATA_DESCRIPTIONS = {
    "vit_digits": "scikit-learn's bundled handwritten digits (8×8, 10 classes; 80/20 split, seed 0).",
    "gpt2_text": "byte-level English text of CPython's bundled documentation (`pydoc_data.topics`); the last 10% "
    "held out for validation.",
    "bert_mlm_cls": "masked-LM pre-training on the bytes of CPython's bundled documentation, then topic "
    "classification (4 classes) of standard-library docstrings.",
}


class RecipeArgumentError(ValueError):
    """A recipe argument is out of range; raised before any training starts."""


SHARED = {"vit_digits": _vit_shared, "gpt2_text": _gpt2_shared, "bert_mlm_cls": _bert_shared}
FAMILY = {"vit_digits": "comet_vit", "gpt2_text": "comet_gpt2", "bert_mlm_cls": "comet_bert"}
MIN_SETTINGS = {"steps": 1, "batch_size": 1, "hidden_size": 8, "num_layers": 1, "num_heads": 1, "eval_steps": 1}
MIN_SETTINGS |= {"logging_steps": 1, "seq_len": 8, "num_eval": 1}


def validate_recipe_arguments(
    name: str, fast: bool, variants: list[str] | None, overrides: dict | None, settings: dict | None
) -> tuple[list[str], Settings, dict]:
    """Check every argument of `run_recipe` (and build each MoE config at the recipe's real sizes) before any work.

    Raises `RecipeArgumentError` naming the bad value and what is allowed.
    """
    if name not in PRESETS:
        raise RecipeArgumentError(f"recipe {name!r} does not exist; choose one of {', '.join(RECIPES)}.")
    variants = list(variants or DEFAULT_VARIANTS[name])
    allowed = ("dense", "block_comet", *ROUTINGS)
    bad = [v for v in variants if v not in allowed]
    if bad or not variants or len(set(variants)) != len(variants):
        raise RecipeArgumentError(
            f"variants {bad or variants} are not allowed; choose distinct ones from {', '.join(allowed)}."
        )
    preset = PRESETS[name]["fast" if fast else "full"]
    known = asdict(preset)
    for key, value in (settings or {}).items():
        if key not in known:
            raise RecipeArgumentError(f"setting {key!r} does not exist; known: {', '.join(known)}.")
        expected = type(known[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (expected is int and value != int(value)):
            raise RecipeArgumentError(f"setting {key}={value!r} must be a {expected.__name__}.")
    chosen = replace(preset, **{k: type(known[k])(v) for k, v in (settings or {}).items()})
    minimum = dict(MIN_SETTINGS)
    if name != "vit_digits":
        minimum["num_train"] = 1
    if name == "bert_mlm_cls":
        minimum["finetune_steps"] = 1
    for key, low in minimum.items():
        if getattr(chosen, key) < low:
            raise RecipeArgumentError(f"setting {key}={getattr(chosen, key)} must be >= {low}.")
    if chosen.learning_rate <= 0:
        raise RecipeArgumentError(f"setting learning_rate={chosen.learning_rate} must be > 0.")
    if name != "vit_digits" and chosen.seq_len > 4096:
        raise RecipeArgumentError(f"setting seq_len={chosen.seq_len} must be <= 4096 for the bundled text.")
    overrides = dict(overrides or {})
    family = FAMILY[name]
    config_fields = {f.name for f in dataclasses.fields(AutoConfig.for_model(family).__class__)}
    unknown = sorted(set(overrides) - config_fields)
    if unknown:
        raise RecipeArgumentError(f"{unknown} are not {family} config fields (misspelt?); e.g. comet_keep_rate.")
    shared = SHARED[name](chosen)
    for variant in variants:
        if variant == "dense":
            continue
        try:
            _moe_config(family, variant, shared, overrides)
        except (ValueError, TypeError) as error:
            raise RecipeArgumentError(f"variant {variant!r}: {error}") from error
    return variants, chosen, overrides


DATASET_NAMES = {
    "vit_digits": "scikit-learn digits",
    "gpt2_text": "CPython pydoc_data topics (held-out topics)",
    "bert_mlm_cls": "standard-library docstring topics",
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["comet_keep_rate=0.25", "moe_layers=[0,2]"]`` -> a dict; values are JSON when they parse, else strings."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeArgumentError(f"{item!r} is not KEY=VALUE (e.g. comet_keep_rate=0.25).")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


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
) -> dict[str, Any]:
    """Train the recipe's variants side by side and write metrics, plots, checkpoints and model cards.

    Args:
        name: one of `RECIPES`.
        output_dir: folder for the run (created; files in it are replaced).
        fast: the seconds-long preset used by the tests instead of the full one.
        variants: ``"dense"`` and/or routing names (``"comet"``, ``"topk"``, ... and ``"block_comet"``).
        overrides: MoE config fields for every MoE variant (validated by the config, e.g. ``comet_keep_rate``).
        settings: `Settings` fields to change (e.g. ``{"steps": 100}``).

    Returns the content of ``metrics.json``. All arguments are checked before any training starts.
    """
    variants, chosen, overrides = validate_recipe_arguments(name, fast, variants, overrides, settings)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results: dict[str, VariantResult] = {}
    samples = {}
    models = {}
    for variant in variants:
        log(f"[{name}] training {variant} ({chosen.steps} steps)")
        with tempfile.TemporaryDirectory(prefix=".trainer-", dir=output) as workdir:
            trainer, metrics, seconds, sample = RUNNERS[name](chosen, variant, overrides, seed, Path(workdir), progress)
        model = trainer.model
        checkpoint = atomic_save_pretrained(model, output / variant)
        results[variant] = VariantResult(
            name=variant,
            metrics=metrics,
            parameters=sum(p.numel() for p in model.parameters()),
            seconds=seconds,
            checkpoint=str(checkpoint),
            log_history=trainer.state.log_history,
            routing_history=trainer.routing_history,
        )
        samples[variant], models[variant] = sample, model

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
            shutil.copy(output / plot, Path(result.checkpoint) / plot)
        write_model_card(
            models[variant],
            result.checkpoint,
            results={k: v for k, v in result.metrics.items() if isinstance(v, float)},
            plots=["loss_curves.png", *plots],
            datasets_text=DATA_DESCRIPTIONS[name],
            dataset_name=DATASET_NAMES[name],
        )

    summary = {
        "recipe": name,
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
    handle, temp = tempfile.mkstemp(dir=output, prefix=".metrics.", suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(temp, output / "metrics.json")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text comparison table of a recipe summary (one row per variant)."""
    variants = summary["variants"]
    keys = [k for k in next(iter(variants.values()))["metrics"] if k != "overlap_similarity_correlation"]
    header = f"{'variant':<12}" + "".join(f"{k:>22}" for k in keys) + f"{'params':>10}{'seconds':>9}"
    lines = [header, "-" * len(header)]
    for name, entry in variants.items():
        cells = "".join(f"{entry['metrics'][k]:>22.4f}" for k in keys)
        lines.append(f"{name:<12}{cells}{entry['parameters']:>10,}{entry['train_seconds']:>9.1f}")
    return "\n".join(lines)


__all__ = [
    "PRESETS",
    "RECIPES",
    "RecipeArgumentError",
    "Settings",
    "format_table",
    "parse_overrides",
    "run_recipe",
    "validate_recipe_arguments",
]
