"""Recipe ``gpt2_text``: dense vs MoE GPT-2, byte-level causal LM on CPython's bundled English documentation,
scored by validation perplexity on held-out topics; or on a user's texts (``--dataset``)."""

from __future__ import annotations

import math

from .base import (
    DatasetSource,
    Recipe,
    RecipeData,
    Settings,
    VariantJob,
    VariantRun,
    mean_label_loss,
    register_recipe,
    torch_dataset,
)
from .text_data import TEXT_COLUMN, byte_tokenize, check_text_settings, load_text_data, text_windows


def shared_config(settings: Settings) -> dict:
    return dict(
        vocab_size=256, n_positions=settings.seq_len, n_embd=settings.hidden_size, n_layer=settings.num_layers,
        n_head=settings.num_heads, bos_token_id=10, eos_token_id=10, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0,
    )  # fmt: skip


def load_data(source: DatasetSource, seed: int) -> RecipeData:
    """A user's texts (the text column, default ``text``), UTF-8 byte-level like the bundled text."""
    return load_text_data(source, seed, "gpt2_text", labelled=False)


def run(job: VariantJob) -> VariantRun:
    if job.data is None:  # random byte windows of the bundled text (already token ids)
        windows = text_windows(job.settings, job.seed)
        train, evaluation = (torch_dataset({"input_ids": ids, "labels": ids}) for ids in windows)
        sample = {"input_ids": evaluation[:32]["input_ids"]}
    else:  # one row per text, tokenised with Dataset.map; labels -100 at padding
        train, evaluation = (
            byte_tokenize(split, TEXT_COLUMN, job.settings.seq_len, causal_labels=True)
            for split in (job.data.train, job.data.test)
        )
        sample = {k: v for k, v in evaluation[:32].items() if k != "labels"}
    model = job.build_model("AutoModelForCausalLM")
    trainer, _, seconds = job.train(model, train, evaluation)
    loss = mean_label_loss(trainer.model, evaluation)  # the denominator every variant shares
    results = {"val_loss": loss, "val_perplexity": math.exp(loss)}
    return VariantRun(trainer, results, seconds, sample)


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
        load_data=load_data,
    )
)  # fmt: skip
