"""Convert, then fine-tune (issue 14 §6): a GPT-2 pre-trained densely on one set of documentation topics, converted
to MoE and fine-tuned on held-out topics, against the dense model fine-tuned the same way.

Variants: ``dense`` (the pre-trained model itself), ``comet`` (COMET at keep 0.5 from step 0), ``comet_schedule``
(the same with `KeepRateScheduleCallback`: keep 1.0, exactly the dense model, annealed to 0.5 over the first half of
the fine-tune, cubic), ``block_comet_schedule`` (blocks of 32 units, scheduled the same way) and ``topk`` (sparse
upcycling: 4 copies of the FFN, 2 per token). Every variant fine-tunes with the same Trainer settings and data order
per seed; the metric is the mean next-byte loss on held-out bytes of the fine-tune topics (validation curve; the
test bytes read once at the end).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

FINETUNE_VARIANTS = ("dense", "comet", "comet_schedule", "block_comet_schedule", "topk")


@dataclass(frozen=True)
class FinetuneSettings:
    hidden_size: int
    layers: int
    seq_len: int
    pretrain_steps: int
    finetune_steps: int
    eval_every: int
    seeds: tuple[int, ...]
    variants: tuple[str, ...] = FINETUNE_VARIANTS
    eval_windows: int = 96


def _domains(seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pre-training bytes (9 of 10 topics), and of the held-out 10th: fine-tune bytes (the first 80 %), validation
    bytes (the next 10 %: the curves) and test bytes (the last 10 %: read once per run)."""
    from ..data import english_text_split

    pretrain, held_out = english_text_split()
    first, second = int(len(held_out) * 0.8), int(len(held_out) * 0.9)
    return pretrain, held_out[:first], held_out[first:second], held_out[second:]


def _config(settings: FinetuneSettings) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=256, n_positions=settings.seq_len, n_embd=settings.hidden_size, n_layer=settings.layers,
        n_head=4, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def _windows(data: np.ndarray, seq_len: int, num: int, seed: int) -> list[dict]:
    from ..data import byte_windows

    ids = byte_windows(data, seq_len, num, seed)
    return [{"input_ids": row, "labels": row} for row in ids]


def _quiet(trainer):
    """No per-run metrics print or load bars: the claim's progress bar is the output of ``hf-comet reproduce``."""
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    return trainer


def _args(folder: Path, steps: int, seed: int, lr: float, batch: int) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        str(folder), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr, warmup_steps=0,
        weight_decay=0.01, seed=seed, data_seed=seed, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
    )  # fmt: skip


def pretrained_dense(settings: FinetuneSettings, folder: Path) -> Path:
    """The dense GPT-2 pre-trained on the pre-training topics (seed 0), trained once and saved under ``folder``."""
    path = folder / f"pretrained-d{settings.hidden_size}-l{settings.layers}-s{settings.pretrain_steps}"
    if (path / "config.json").exists():
        return path
    pretrain = _domains(settings.seq_len)[0]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_config(settings))
    data = _windows(pretrain, settings.seq_len, settings.pretrain_steps * 32, seed=0)
    scratch = path.with_name(path.name + ".trainer")
    trainer = transformers.Trainer(model=model, args=_args(scratch, settings.pretrain_steps, 0, 1e-3, 32),
                                   train_dataset=data)  # fmt: skip
    _quiet(trainer).train()
    temporary = path.with_name(path.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)  # left by an interrupted save
    model.save_pretrained(temporary)
    shutil.rmtree(path, ignore_errors=True)  # a folder without config.json: an interrupted earlier attempt
    temporary.rename(path)
    shutil.rmtree(scratch, ignore_errors=True)
    return path


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor) -> float:
    """Mean next-byte cross-entropy over the fixed evaluation windows (eval mode: no aux loss, no dropout)."""
    model.eval()
    losses = [float(model(input_ids=chunk, labels=chunk).loss) for chunk in windows.split(32)]
    model.train()
    return float(np.mean(losses))


def finetune_one(variant: str, settings: FinetuneSettings, seed: int, folder: Path) -> dict:
    """Convert (or not) the pre-trained model and fine-tune it; the held-out loss before and every ``eval_every``
    steps, and the seconds the fine-tune took."""
    from ..convert import convert_to_moe
    from ..training import CometTrainer, KeepRateScheduleCallback

    source = pretrained_dense(settings, folder)
    _, finetune, validation, test = _domains(settings.seq_len)

    def fixed_windows(data: np.ndarray) -> torch.Tensor:
        return torch.stack([w["input_ids"] for w in _windows(data, settings.seq_len, settings.eval_windows, 1234)])

    eval_windows, test_windows = fixed_windows(validation), fixed_windows(test)
    callbacks = []
    if variant == "dense":
        model = transformers.GPT2LMHeadModel.from_pretrained(source)
    elif variant == "topk":
        model = convert_to_moe(source, "upcycle", routing="topk", num_experts=4, num_experts_per_tok=2)
    else:
        fields = {"comet_keep_rate": 0.5} | ({"comet_block_size": 32} if variant.startswith("block") else {})
        model = convert_to_moe(source, "comet", **fields)
        if variant.endswith("schedule"):
            callbacks.append(KeepRateScheduleCallback(steps=max(1, settings.finetune_steps // 2)))
    model.train()
    record = {"curve_steps": [], "curve": []}

    class Evaluate(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):  # after the schedule set step 0's k
            record["curve_steps"].append(0)
            record["curve"].append(held_out_loss(model, eval_windows))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % settings.eval_every == 0 or state.global_step == settings.finetune_steps:
                record["curve_steps"].append(state.global_step)
                record["curve"].append(held_out_loss(model, eval_windows))

    data = _windows(finetune, settings.seq_len, settings.finetune_steps * 16, seed=seed)
    scratch = folder / f"ft-{variant}-{seed}"
    trainer = CometTrainer(model=model, args=_args(scratch, settings.finetune_steps, seed,
                                                   5e-4, 16), train_dataset=data,
                           callbacks=[*callbacks, Evaluate()])  # fmt: skip
    started = time.perf_counter()
    _quiet(trainer).train()
    record["seconds"] = time.perf_counter() - started  # the validation passes included
    record["test"] = held_out_loss(model, test_windows)  # read once
    shutil.rmtree(scratch, ignore_errors=True)
    record["perplexity"] = math.exp(record["test"])
    return record


__all__ = ["FINETUNE_VARIANTS", "FinetuneSettings", "finetune_one", "held_out_loss", "pretrained_dense"]
