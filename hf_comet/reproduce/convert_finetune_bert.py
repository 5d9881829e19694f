"""Convert, then fine-tune: the BERT half of issue 14 §6. A BERT pre-trained densely with the ``bert_mlm_cls``
recipe's masked-byte LM on the bundled documentation is fine-tuned to classify standard-library docstrings by topic
(the recipe's task), as it is or converted to MoE first.

Variants: ``dense`` (the pre-trained encoder itself), ``comet`` (COMET at keep 0.5 from step 0), ``comet_schedule``
(the same with `KeepRateScheduleCallback`: keep 1.0, exactly the dense encoder, annealed to 0.5 over the first half
of the fine-tune, cubic), ``topk`` (sparse upcycling: 4 copies of the FFN, 2 per token) and ``scratch`` (the dense
architecture from random weights: what the pre-training is worth here). Every variant fine-tunes with the same
Trainer settings; a seed sets the new head's initial weights (the same head for every converted variant), the
dropout and the batch order, so runs pair by seed.

Open details decided here (also in docs/decisions.md, "Reproducing the papers"): the recipe's 80/20 docstring split
(seed 0) is kept and its train part split again 80/20 (seed 0) into fine-tune and validation texts, so the test
texts are the recipe's; the optimiser is the recipe's (AdamW, 5 % warm-up, cosine decay) on one CPU thread; sizes
(d = 64, 2 layers, 64 tokens), the 2,000 pre-training steps and the 200 fine-tune steps were chosen on the
validation split (the dense fine-tune's accuracy levels off by ~150 steps, near 0.6: not saturated) and to fit ~12
minutes on 2 cores, which leaves no time for a gap-closing variant beyond the schedule.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from . import finetune
from .core import ClaimResult, RunCache, code_version, plot_curves, register_claim, run_all
from .stats import SIGNIFICANCE, format_interval, gap_in_points, mean_interval, paired_test

VARIANTS = ("dense", "comet", "comet_schedule", "topk")
GOAL_POINTS = 0.5
"""Issue 14 §6's goal for BERT: the converted COMET model's test accuracy within 0.5 points of the dense fine-tune's."""


@dataclass(frozen=True)
class BertSettings:
    hidden_size: int
    layers: int
    seq_len: int
    pretrain_steps: int
    finetune_steps: int
    eval_every: int
    seeds: tuple[int, ...]
    variants: tuple[str, ...] = VARIANTS
    heads: int = 4
    pretrain_lr: float = 2e-3
    finetune_lr: float = 2e-3
    batch_size: int = 32
    schedule_fraction: float = 0.5
    mlm_eval: int = 128


FULL = BertSettings(hidden_size=64, layers=2, seq_len=64, pretrain_steps=2000, finetune_steps=200, eval_every=20,
                    seeds=(0, 1, 2, 3, 4), variants=("dense", "scratch", "comet", "comet_schedule", "topk"))  # fmt: skip
"""Sized for ~10 minutes on 2 cores: the pre-training ~150 s, a dense fine-tune ~15 s, a converted one ~25-35 s."""
QUICK = BertSettings(hidden_size=16, layers=1, seq_len=16, pretrain_steps=3, finetune_steps=3, eval_every=1, seeds=(0,),
                     variants=("dense", "scratch", "comet", "comet_schedule"), batch_size=8, mlm_eval=16)  # fmt: skip
"""One seed: every Trainer run costs ~0.3 s in the garbage collection `Trainer.train` starts with, and quick mode has
4 s. Its paired statistics read NaN; quick mode's page says its numbers are not results."""


def _args(folder: Path, steps: int, seed: int, lr: float, batch: int) -> transformers.TrainingArguments:
    """The recipe's optimiser settings (AdamW, weight decay 0.01, 5 % warm-up, cosine decay, gradient norm 1), quiet."""
    return transformers.TrainingArguments(
        str(folder), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr, weight_decay=0.01,
        warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine", max_grad_norm=1.0, seed=seed, data_seed=seed,
        use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip


@contextmanager
def one_thread():
    """Run on one CPU thread, with the objects alive before it frozen out of garbage collection, then restore both.
    On a shared 2-core machine two threads per process oversubscribe the cores (a step takes ~4 times longer), and
    the full collection `Trainer.train` starts with would walk every object of the process (~0.3 s a run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)


def recipe_settings(settings: BertSettings):
    """The ``bert_mlm_cls`` recipe's `Settings` for these sizes (its data functions and config read them)."""
    from ..training.recipes.base import Settings

    return Settings(steps=settings.pretrain_steps, batch_size=settings.batch_size, hidden_size=settings.hidden_size,
                    num_layers=settings.layers, num_heads=settings.heads, learning_rate=settings.pretrain_lr,
                    eval_steps=settings.eval_every, logging_steps=settings.eval_every, seq_len=settings.seq_len,
                    finetune_steps=settings.finetune_steps, num_train=settings.pretrain_steps * settings.batch_size,
                    num_eval=settings.mlm_eval)  # fmt: skip


@functools.lru_cache(maxsize=2)
def topic_splits(settings: BertSettings):
    """The recipe's docstring-topic split (seed 0): its train texts split 80/20 (seed 0) into fine-tune and validation
    texts, its test texts kept as the test split. Returns ``(train, validation, test, topic names)``."""
    from ..training.recipes.bert_mlm_cls import _docstring_topics

    train, test, names = _docstring_topics(recipe_settings(settings), 0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    n_validation = len(train) // 5
    return train.select(order[n_validation:]), train.select(order[:n_validation]), test, names


@functools.lru_cache(maxsize=2)
def _mlm_eval(settings: BertSettings) -> dict[str, torch.Tensor]:
    """Masked windows of the held-out documentation topics (fixed masking, seed 7): the masked LM's validation set."""
    from ..training.recipes.bert_mlm_cls import CLS_ID, mask_bytes
    from ..training.recipes.text_data import text_windows

    evaluation = text_windows(recipe_settings(settings), 0, prefix=CLS_ID)[1]
    return mask_bytes(evaluation, torch.ones_like(evaluation), torch.Generator().manual_seed(7))


@torch.no_grad()
def masked_scores(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """The masked LM's share of masked bytes predicted and its mean cross-entropy on them (eval mode)."""
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen = batch["labels"] != -100
    picked, targets = logits[chosen], batch["labels"][chosen]
    return {"masked_accuracy": float((picked.argmax(-1) == targets).float().mean()),
            "masked_loss": float(torch.nn.functional.cross_entropy(picked, targets))}  # fmt: skip


def pretrained_dense(settings: BertSettings, folder: Path) -> Path:
    """The dense BERT masked LM pre-trained once (seed 0) on the recipe's documentation windows and saved atomically
    under ``folder``, with ``pretrain.json`` (its seconds and held-out masked-byte accuracy) beside the weights."""
    from ..training.recipes.base import torch_dataset
    from ..training.recipes.bert_mlm_cls import CLS_ID, MaskingCollator, shared_config
    from ..training.recipes.text_data import text_windows

    path = folder / (f"bert-mlm-d{settings.hidden_size}-l{settings.layers}-h{settings.heads}-n{settings.seq_len}-"
                     f"s{settings.pretrain_steps}-lr{settings.pretrain_lr:g}-b{settings.batch_size}")
    if (path / "pretrain.json").exists():
        return path
    train = text_windows(recipe_settings(settings), 0, prefix=CLS_ID)[0]
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**shared_config(recipe_settings(settings))))
    scratch = path.with_name(path.name + ".trainer")
    args = _args(scratch, settings.pretrain_steps, 0, settings.pretrain_lr, settings.batch_size)
    trainer = transformers.Trainer(model=model, args=args, data_collator=MaskingCollator(0),
                                   train_dataset=torch_dataset({"input_ids": train,
                                                                "attention_mask": torch.ones_like(train)}))  # fmt: skip
    started = time.perf_counter()
    finetune._quiet(trainer).train()
    seconds = time.perf_counter() - started
    temporary = path.with_name(path.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)  # left by an interrupted save
    model.save_pretrained(temporary)
    facts = {"seconds": seconds, **masked_scores(model, _mlm_eval(settings))}
    (temporary / "pretrain.json").write_text(json.dumps(facts))
    shutil.rmtree(path, ignore_errors=True)  # a folder without pretrain.json: an interrupted earlier attempt
    temporary.rename(path)
    shutil.rmtree(scratch, ignore_errors=True)
    return path


def pretrain_record(settings: BertSettings, folder: Path) -> dict:
    """The pre-training run's record (trained here unless its checkpoint is already saved)."""
    return json.loads((pretrained_dense(settings, folder) / "pretrain.json").read_text())


def convert(variant: str, source: Path | transformers.PreTrainedModel, keep_rate: float = 0.5):
    """``variant``'s model from the dense ``source`` (a model or checkpoint folder of any BERT head)."""
    from ..convert import convert_to_moe

    if variant == "dense":
        return source
    if variant == "topk":
        return convert_to_moe(source, "upcycle", routing="topk", num_experts=4, num_experts_per_tok=2)
    return convert_to_moe(source, "comet", comet_keep_rate=keep_rate)


@torch.no_grad()
def topic_accuracy(model, rows) -> float:
    """Classification accuracy on a tokenised split (eval mode, then back to train mode)."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), 128):
        batch = rows[start : start + 128]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    return correct / len(rows)


def finetune_one(variant: str, settings: BertSettings, seed: int, folder: Path) -> dict:
    """Convert (or not) the pre-trained encoder under a new classification head (seeded) and fine-tune it on the
    docstring topics; validation accuracy before and every ``eval_every`` steps, test accuracy once at the end, the
    converted masked LM's held-out masked-byte accuracy (the damage of converting) and the fine-tune's seconds."""
    from ..training import CometTrainer, KeepRateScheduleCallback

    source = pretrained_dense(settings, folder)
    train, validation, test, names = topic_splits(settings)
    scheduled = variant.endswith("schedule")
    if variant == "scratch":
        torch.manual_seed(seed)
        mlm = transformers.BertForMaskedLM(transformers.BertConfig.from_pretrained(source))
    else:
        mlm = convert(variant.removesuffix("_schedule"), transformers.BertForMaskedLM.from_pretrained(source),
                      keep_rate=1.0 if scheduled else 0.5)  # fmt: skip
    record = {f"{k}_start": v for k, v in masked_scores(mlm, _mlm_eval(settings)).items()}
    record |= {"curve_steps": [], "curve": []}
    torch.manual_seed(seed)  # the head's initial weights: the same for every variant of this seed
    labels = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if variant == "scratch":  # the reference without pre-training: what the pre-trained encoder is worth
        model = transformers.BertForSequenceClassification(transformers.BertConfig.from_pretrained(source, **labels))
    else:
        dense = transformers.BertForSequenceClassification.from_pretrained(source, **labels)
        model = convert(variant.removesuffix("_schedule"), dense)
    callbacks = []
    if scheduled:
        callbacks.append(KeepRateScheduleCallback(steps=max(1, round(settings.finetune_steps * settings.schedule_fraction))))
    model.train()

    class Evaluate(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):  # after the schedule set step 0's k
            record["curve_steps"].append(0)
            record["curve"].append(topic_accuracy(model, validation))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % settings.eval_every == 0 or state.global_step == settings.finetune_steps:
                record["curve_steps"].append(state.global_step)
                record["curve"].append(topic_accuracy(model, validation))

    scratch = folder / f"bert-ft-{variant}-{seed}"
    args = _args(scratch, settings.finetune_steps, seed, settings.finetune_lr, settings.batch_size)
    trainer = CometTrainer(model=model, args=args, train_dataset=train, callbacks=[*callbacks, Evaluate()])
    started = time.perf_counter()
    finetune._quiet(trainer).train()
    record["seconds"] = time.perf_counter() - started  # the validation passes included
    record["test"] = topic_accuracy(model, test)  # read once
    shutil.rmtree(scratch, ignore_errors=True)
    return record


def _spec(variant: str, settings: BertSettings, seed: int) -> dict:
    fields = ("hidden_size", "layers", "heads", "seq_len", "pretrain_steps", "pretrain_lr", "batch_size", "mlm_eval")
    if variant != "pretrain":
        fields += ("finetune_steps", "eval_every", "finetune_lr", "schedule_fraction")
    return dict(claim="convert_finetune_bert", variant=variant, seed=seed, **{k: getattr(settings, k) for k in fields})


def _run(spec: dict, settings: BertSettings, folder: Path) -> dict:
    with one_thread():
        if spec["variant"] == "pretrain":
            return pretrain_record(settings, folder)
        return finetune_one(spec["variant"], settings, spec["seed"], folder)


@register_claim(
    "convert_finetune_bert",
    "Convert a dense BERT checkpoint, then fine-tune it on a topic task, without losing its accuracy",
    "ours (issue 14 §6, BERT; keep-rate schedule after Zhu & Gupta 2017)",
    "no paper runs it; the issue's setting is a downloaded BERT-base fine-tuned on a GPU, which the same code path takes (`hf-comet convert`); here a small byte-level BERT pre-trained on 2 cores.",
)
def claim(cache_dir: Path, plots: Path, quick: bool, cached_only: bool = False) -> ClaimResult:
    """The section of the results page: each variant's test accuracy against the dense fine-tune's, and the verdict."""
    import sys

    from .stats import INCONCLUSIVE, interval_mde, margin_verdict

    settings = QUICK if quick else FULL
    cache = RunCache(cache_dir, "convert_finetune_bert", code_version(sys.modules[__name__], finetune))
    folder = cache_dir / "checkpoints"
    specs = [_spec("pretrain", settings, 0)] + [_spec(v, settings, seed) for v in settings.variants
                                                for seed in settings.seeds]  # fmt: skip
    records = run_all(specs, cache, lambda spec: _run(spec, settings, folder), "convert_finetune_bert", cached_only)
    pretrained, records = records[0], records[1:]
    groups = {v: sorted((r for r in records if r["spec"]["variant"] == v), key=lambda r: r["spec"]["seed"])
              for v in settings.variants}  # fmt: skip
    dense = [r["test"] for r in groups["dense"]]
    train, validation, test, _ = topic_splits(settings)
    lines = [
        f"A BERT with the `bert_mlm_cls` recipe's config (d = {settings.hidden_size}, {settings.layers} "
        f"layer{'s' * (settings.layers > 1)}, "
        f"{settings.heads} heads, FFN 4d, byte vocabulary, {settings.seq_len} tokens) pre-trained densely as the "
        f"recipe does (its masking collator: 15 % of the bytes, 80/10/10, on windows of 9 of every 10 documentation "
        f"topics) for {settings.pretrain_steps} steps (AdamW {settings.pretrain_lr:g}, batch {settings.batch_size}, "
        f"seed 0; held-out masked-byte accuracy {pretrained['masked_accuracy']:.3f}, loss "
        f"{pretrained['masked_loss']:.3f}), then fine-tuned as each variant to classify standard-library docstrings "
        f"by the recipe's 4 topics: {len(train)} fine-tune / {len(validation)} validation / {len(test)} test texts "
        f"(the test texts are the recipe's test split), {settings.finetune_steps} steps of AdamW "
        f"{settings.finetune_lr:g} (5 % warm-up, cosine decay, batch {settings.batch_size}), seeds "
        f"{list(settings.seeds)} (the new head's initial weights, dropout and batch order; runs pair by seed). "
        f"Validation accuracy every {settings.eval_every} steps; test accuracy read once per run. `scratch` is the "
        "dense architecture fine-tuned from random weights: how much the pre-trained encoder is worth here.", "",
        "| variant | masked-byte loss at conversion | accuracy at step 0 (validation) | final test accuracy | "
        "Δ vs dense, points [95 % interval] (p) | seconds |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    gaps = {}
    for variant, group in groups.items():
        tests = [r["test"] for r in group]
        gaps[variant] = gap, low, high, p = gap_in_points(tests, dense)
        start = "–" if variant == "scratch" else f"{mean_interval([r['masked_loss_start'] for r in group])[0]:.3f}"
        lines.append(f"| {variant} | {start} | {format_interval([r['curve'][0] for r in group], bounds=(0.0, 1.0))} | "
                     f"{format_interval(tests, bounds=(0.0, 1.0))} | {'–' if variant == 'dense' else f'{gap:+.1f} [{low:+.1f}, {high:+.1f}] ({p:.2g})'} | "
                     f"{mean_interval([r['seconds'] for r in group])[0]:.0f} |")  # fmt: skip
    lines += ["", "The masked-byte loss at conversion is the converted masked LM's, on held-out documentation, "
              "before any fine-tuning: the damage of converting (scheduled COMET starts at keep 1.0, the dense "
              "model; upcycled top-k starts as the dense model too, its copies' weights summing to one). Accuracy at "
              "step 0 is that of the new, untrained head.", ""]  # fmt: skip
    plot = plots / "convert_finetune_bert_curves.png"
    plot_curves(groups, plot, "convert, then fine-tune (BERT, docstring topics)", "accuracy")
    lines += [f"![fine-tune curves]({os.path.relpath(plot, plots.parent)})", ""]
    comet_like = {v: g for v, g in gaps.items() if "comet" in v}
    # the variant judged is the one with the best final validation accuracy (mean over seeds), never chosen on test
    best = max(comet_like, key=lambda v: mean_interval([r["curve"][-1] for r in groups[v]])[0]) if comet_like else None
    word = margin_verdict(*comet_like[best][1:3], GOAL_POINTS) if best is not None else INCONCLUSIVE
    verdict = (f"goal (converted COMET within {GOAL_POINTS:g} accuracy points of the dense fine-tune, judged on the "
               f"interval's lower bound): **{word}**")  # fmt: skip
    if best is not None:
        gap, low, high, p = comet_like[best]
        mde = interval_mde(low, high, len(groups[best]))
        verdict += (f", {best} (chosen on validation) {gap:+.1f} points [{low:+.1f}, {high:+.1f}] (p {p:.2g}; MDE "
                    f"{mde:.1f} points over {len(groups[best])} seeds)")  # fmt: skip
    if "comet" in groups and "comet_schedule" in groups:
        diff, p = paired_test([r["test"] for r in groups["comet_schedule"]], [r["test"] for r in groups["comet"]])
        helps = ("helps" if p < SIGNIFICANCE and diff > 0 else "hurts" if p < SIGNIFICANCE
                 else "makes no significant difference")  # fmt: skip
        verdict += f"; the keep-rate schedule {helps} (scheduled minus unscheduled COMET {100 * diff:+.1f} points, p {p:.2g})"
    if best is not None:
        _, low, high, _ = comet_like[best]
        if low >= -GOAL_POINTS:
            resolved = f"the 95 % interval of {best}'s gap excludes a loss larger than the margin"
        elif high < -GOAL_POINTS:
            resolved = f"the whole 95 % interval of {best}'s gap lies below the margin"
        else:
            resolved = (f"the 95 % interval of {best}'s gap is wider than the margin, so {len(settings.seeds)} seeds "
                        "cannot settle a gap this small either way")  # fmt: skip
        facts = []
        if "comet" in groups:
            damage = [c["masked_loss_start"] - d["masked_loss_start"] for c, d in zip(groups["comet"], groups["dense"],
                                                                                       strict=True)]  # fmt: skip
            facts.append(f"converting at keep 0.5 raises the held-out masked-byte loss by {mean_interval(damage)[0]:+.3f}")
        if "scratch" in gaps:
            facts.append(f"the pre-trained encoder is worth {-gaps['scratch'][0]:+.1f} test points over random weights")
        lines += [f"Read with care: {resolved}. Here {' and '.join(facts) or 'nothing more is measured'}. The issue's "
                  "motivating observation was a converted BERT-family encoder ~2.5 points under its dense fine-tune "
                  "at equal steps; no paper reports this experiment. Where this setting differs: a small byte-level "
                  "BERT pre-trained briefly on 2 CPU cores, not a full-size pre-trained checkpoint, so its FFNs hold "
                  "less that converting could damage.", ""]  # fmt: skip
    seconds = sum(r["seconds"] for r in [pretrained, *records])
    return ClaimResult("convert_finetune_bert", "", verdict, "\n".join(lines), seconds)
