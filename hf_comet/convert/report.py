"""How far a converted model is from the dense one before any training: `deviation_report` over a sweep."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PreTrainedModel

from .core import _load_dense, conversion_method, convert_to_moe, family_of_model_type

MULTIPLE_CHOICE_SUFFIXES = ("ForMultipleChoice", "DoubleHeadsModel")
"""Heads that take (batch, choices, seq) token ids."""


def probe_inputs(
    config, batch: int = 4, seq_len: int = 32, seed: int = 0, model: PreTrainedModel | None = None
) -> dict[str, torch.Tensor]:
    """Seeded random inputs of the right kind for a model of ``config`` (token ids or pixel values); for ``model``'s
    multiple-choice heads, two choices per example."""
    generator = torch.Generator().manual_seed(seed)
    family = family_of_model_type(config.model_type)
    if family is not None and family.main_input_name == "pixel_values":
        shape = (batch, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", seq_len)
    seq_len = min(seq_len, positions)
    if getattr(config, "pad_token_id", None) is None and family is not None and family.batches_need_pad_token:
        batch = 1  # e.g. GPT-2 sequence classification refuses batches > 1 without a pad token
    choices = model is not None and type(model).__name__.endswith(MULTIPLE_CHOICE_SUFFIXES)
    shape = (batch, 2, seq_len) if choices else (batch, seq_len)
    ids = torch.randint(0, config.vocab_size, shape, generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if choices and type(model).__name__.endswith("DoubleHeadsModel"):  # each choice is scored at its last token
        inputs["mc_token_ids"] = torch.full(shape[:2], seq_len - 1)
    return inputs


def _task_metrics(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss and accuracy (and perplexity for causal LMs) of ``model`` on a labelled batch."""
    outputs = model(**batch)
    metrics = {"eval_loss": float(outputs.loss)}
    logits, labels = outputs.logits, batch["labels"]
    if getattr(model, "loss_type", None) == "ForCausalLM" or type(model).__name__.endswith(("LMHeadModel", "CausalLM")):
        metrics["perplexity"] = float(torch.exp(outputs.loss))
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    metrics["accuracy"] = float((logits.argmax(-1)[valid] == labels[valid]).float().mean())
    return metrics


@torch.no_grad()
def deviation_report(
    dense: PreTrainedModel | str | os.PathLike,
    method: str,
    sweep: list[float | int],
    inputs: dict[str, torch.Tensor] | None = None,
    split_method: str | None = None,
    seed: int = 0,
    **moe_fields: Any,
) -> list[dict[str, float]]:
    """How far the converted model is from the dense one before any training, for a sweep of COMET keep rates
    (``method="comet"``) or of experts per token (``upcycle``/``split``). Per setting: the max and mean absolute
    difference of the main output (logits, or the last hidden state), and for classification/LM heads the share of
    positions whose argmax prediction agrees with the dense model's. When ``inputs`` carry ``labels`` (an evaluation
    set), the task metrics of the dense model (setting ``"dense"``) and of every converted one are added: loss,
    accuracy, and perplexity for causal LMs."""
    model, _ = _load_dense(dense)
    conversion = conversion_method(method)
    model.eval()
    inputs = inputs or probe_inputs(model.config, model=model)
    labelled = "labels" in inputs
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    reference = model(**forward_inputs)[0]
    rows = []
    if labelled:
        rows.append({"setting": "dense", "max_abs_error": 0.0, "mean_abs_error": 0.0, **_task_metrics(model, inputs)})
    for value in sweep:
        fields = conversion.sweep_fields(moe_fields, value)
        converted = convert_to_moe(model, method, split_method=split_method, seed=seed, **fields)
        output = converted(**forward_inputs)[0]
        difference = (output - reference).abs()
        row = {"setting": value, "max_abs_error": float(difference.max()), "mean_abs_error": float(difference.mean())}
        if reference.dim() >= 2 and reference.shape[-1] > 1:
            row["argmax_agreement"] = float((output.argmax(-1) == reference.argmax(-1)).float().mean())
        if labelled:
            row.update(_task_metrics(converted, inputs))
        rows.append(row)
    return rows


__all__ = ["deviation_report", "probe_inputs"]
