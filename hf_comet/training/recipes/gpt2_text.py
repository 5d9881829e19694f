"""Recipe ``gpt2_text``: dense vs MoE GPT-2, byte-level causal LM on CPython's bundled English documentation,
scored by validation perplexity on held-out topics."""

from __future__ import annotations

import math

from .base import Recipe, Rows, Settings, VariantJob, VariantRun, register_recipe
from .text_data import check_text_settings, text_windows


def shared_config(settings: Settings) -> dict:
    return dict(
        vocab_size=256, n_positions=settings.seq_len, n_embd=settings.hidden_size, n_layer=settings.num_layers,
        n_head=settings.num_heads, bos_token_id=10, eos_token_id=10, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0,
    )  # fmt: skip


def run(job: VariantJob) -> VariantRun:
    train, evaluation = text_windows(job.settings, job.seed)
    model = job.build_model("AutoModelForCausalLM")
    columns = lambda ids: {"input_ids": ids, "labels": ids.clone()}  # noqa: E731
    trainer, metrics, seconds = job.train(model, Rows(columns(train)), Rows(columns(evaluation)))
    results = {"val_loss": metrics["eval_loss"], "val_perplexity": math.exp(metrics["eval_loss"])}
    return VariantRun(trainer, results, seconds, {"input_ids": evaluation[:32]})


RECIPE = register_recipe(
    Recipe(
        name="gpt2_text",
        family="comet_gpt2",
        fast=Settings(steps=10, batch_size=8, hidden_size=32, num_layers=2, num_heads=4, learning_rate=3e-3,
                      eval_steps=5, logging_steps=5, seq_len=64, num_train=400, num_eval=32),
        full=Settings(steps=600, batch_size=32, hidden_size=96, num_layers=4, num_heads=4, learning_rate=2e-3,
                      eval_steps=100, logging_steps=25, seq_len=128, num_train=20000, num_eval=256),
        default_variants=("dense", "comet"),
        shared_config=shared_config,
        run=run,
        data_description="byte-level English text of CPython's bundled documentation (`pydoc_data.topics`); the "
        "last 10% held out for validation.",
        dataset_name="CPython pydoc_data topics (held-out topics)",
        min_settings={"num_train": 1},
        check_settings=check_text_settings,
    )
)  # fmt: skip
