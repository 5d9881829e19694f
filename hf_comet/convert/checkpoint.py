"""`convert_checkpoint`: a dense checkpoint folder (or Hub id) -> a checked, reported and atomically saved MoE
checkpoint, what ``hf-comet convert`` runs; and `load_eval_inputs`, the check of its labelled evaluation batch.

Everything that can be refused (the source, the destination, the sweep, the evaluation batch) is refused with a
`~hf_comet.io.UserError` naming the value before anything is built or written. Every fact that depends on the method
(its default sweep, which sweep values it takes, what the sweep varies) comes from the method object (`METHODS`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from ..io import (
    UserError,
    atomic_save_pretrained,
    checkpoint_folder,
    destination_folder,
    existing_file,
    given_path,
    loading,
    missing_path,
    paths_overlap,
)
from .companions import is_hub_id
from .core import conversion_method, convert_to_moe, stock_to_ours
from .report import deviation_report

TOKEN_LABEL_HEADS = {
    "AutoModelForCausalLM": "vocab_size",
    "AutoModelForMaskedLM": "vocab_size",
    "AutoModelForTokenClassification": "num_labels",
}
"""Heads with one label per token -> the config field that bounds a label (``-100`` marks an ignored token)."""
CLASS_LABEL_HEADS = ("AutoModelForSequenceClassification", "AutoModelForImageClassification")
"""Heads with one class label per example."""


@dataclass
class ConvertedCheckpoint:
    """What `convert_checkpoint` did: the converted model, where it was saved (``None``: report only) and the rows
    of the deviation report (empty without one)."""

    model: transformers.PreTrainedModel
    destination: Path | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    sweep_label: str = ""
    """What the report's sweep varies (``comet_keep_rate`` or ``experts per token``)."""


def source_config(source: str | os.PathLike) -> transformers.PretrainedConfig:
    """The dense source's config, once the source is checked: a local checkpoint folder (`checkpoint_folder`) or,
    when nothing is at that path and it reads as ``org/name``, a Hub repo id."""
    path = given_path(source, "source")
    if os.path.lexists(path):
        checkpoint_folder(path, "source")
        with loading(path, "source"):
            return transformers.AutoConfig.from_pretrained(path)
    if not is_hub_id(str(source)):
        raise missing_path(path, "source")
    with loading(source, "source"):  # what a Hub checkpoint that downloads can still get wrong
        try:
            return transformers.AutoConfig.from_pretrained(str(source))
        except OSError as error:
            raise UserError(
                f"source {str(source)!r} is not a local path (nothing is there) and cannot be loaded from the Hub as a "
                f"repo id ({error}); check the path."
            ) from error


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike | None = None,
    *,
    method: str = "comet",
    split_method: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    report: bool = False,
    sweep: list[float] | None = None,
    eval_inputs: str | os.PathLike | None = None,
    progress: bool = False,
    **fields: Any,
) -> ConvertedCheckpoint:
    """Convert the dense checkpoint ``source`` with `convert_to_moe` and save it to ``destination`` atomically.

    Args:
        destination: the MoE checkpoint folder; ``None`` writes nothing (a report only).
        overwrite: replace an existing ``destination`` (only a checkpoint folder or an empty one is replaced).
        report: also run `deviation_report` over ``sweep`` (default: the method's sweep; keep rates for
            ``comet``, experts per token otherwise), on ``eval_inputs`` (a labelled safetensors batch checked by
            `load_eval_inputs`) or on seeded random inputs. Always on without a destination.
        fields: MoE config fields, as for `convert_to_moe`.

    Raises `~hf_comet.io.UserError` (or `ConversionError`) naming a bad value before anything is built or written.
    """
    conversion = conversion_method(method)
    report = report or destination is None
    for value in sweep or ():
        problem = conversion.sweep_problem(value)
        if problem:
            raise UserError(f"sweep {value:g}: {problem}.")
    config = source_config(source)
    target = None
    if destination is not None:
        target = destination_folder(destination, "destination", overwrite=overwrite)
        if os.path.lexists(source) and paths_overlap(target, source):
            raise UserError(
                f"destination {str(destination)!r} and source {str(source)!r} overlap; writing one would damage the "
                "other: choose a destination outside the source."
            )
    batch = None
    if eval_inputs is not None:
        heads = stock_to_ours()
        architecture = (getattr(config, "architectures", None) or [""])[0]
        if architecture in heads:  # otherwise the conversion refuses the source below
            family, head = heads[architecture]
            batch = load_eval_inputs(eval_inputs, config, family, head)
    split_method = split_method if conversion.takes_split_method else None
    from tqdm.auto import tqdm

    stages = tqdm(total=3, desc="convert", disable=not progress)
    result = ConvertedCheckpoint(model=None, destination=target, sweep_label=conversion.sweep_label)
    try:
        stages.set_postfix_str("loading and mapping weights")
        result.model = convert_to_moe(source, method, split_method=split_method, seed=seed, **fields)
        stages.update(1)
        if report:
            stages.set_postfix_str("deviation sweep")
            experts = result.model.config.num_experts
            values = list(sweep) if sweep else conversion.default_sweep(experts)
            for value in values:
                problem = conversion.sweep_problem(value, experts)
                if problem:
                    raise UserError(f"sweep {value:g}: {problem}.")
            try:
                result.rows = deviation_report(
                    source, method, values, inputs=batch, split_method=split_method, seed=seed, **fields
                )
            except (ValueError, RuntimeError) as error:  # a ConversionError is a ValueError too
                raise UserError(f"the deviation report failed: {error}") from error
        stages.update(1)
        if target is not None:
            stages.set_postfix_str(f"saving to {target}")
            try:
                atomic_save_pretrained(result.model, target)
            except OSError as error:
                raise UserError(
                    f"cannot write destination {str(target)!r} ({error}); what was there before is unchanged."
                ) from error
        stages.update(1)
    finally:
        stages.close()
    return result


def format_deviation(rows: list[dict[str, Any]], sweep_label: str, where: str = "on seeded random inputs") -> str:
    """The rows of a deviation report as a plain-text table (what ``hf-comet convert --report`` prints)."""
    task = [k for k in ("eval_loss", "accuracy", "perplexity") if k in rows[-1]]
    lines = [
        f"deviation from the dense model before training ({sweep_label} sweep, {where}):",
        f"{sweep_label:>18} {'max |error|':>12} {'mean |error|':>13} {'argmax agree':>13}"
        + "".join(f"{k:>11}" for k in task),
    ]
    for row in rows:
        agree = f"{row['argmax_agreement']:.3f}" if "argmax_agreement" in row else "-"
        cells = "".join(f"{row[k]:>11.4f}" for k in task)
        setting = row["setting"] if isinstance(row["setting"], str) else f"{row['setting']:g}"
        lines.append(f"{setting:>18} {row['max_abs_error']:>12.3e} {row['mean_abs_error']:>13.3e} {agree:>13}{cells}")
    return "\n".join(lines)


def _is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)


def load_eval_inputs(path: str | os.PathLike, config, family, head: str) -> dict[str, torch.Tensor]:
    """The labelled batch of a conversion report: a safetensors file (read with safetensors only, never unpickled)
    whose tensors are inputs the model of ``config`` (family ``family``, head ``head``, an Auto class name) takes, of
    the right dtype and shape, ids within its vocabulary and labels within its classes. Returned as the model takes
    them (ids and labels int64, pixels float32). Raises `~hf_comet.io.UserError` naming the file and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    what = "--eval-inputs"
    path = existing_file(path, what)
    architecture = (getattr(config, "architectures", None) or [head])[0]
    if head == "AutoModel":
        raise UserError(
            f"{what} {str(path)!r}: {architecture} has no head, so there is no loss or accuracy to report; leave out "
            "--eval-inputs (the report then compares outputs on seeded random inputs)."
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"{what} {str(path)!r} is not a safetensors file ({error}); save the batch with "
            "safetensors.torch.save_file({'input_ids': ..., 'labels': ...}, path) (torch.save pickles are not read)."
        ) from None

    def bad(message: str) -> UserError:
        return UserError(f"{what} {str(path)!r}: {message}")

    main = family.main_input_name
    if main == "pixel_values":
        allowed = {"pixel_values", "labels"}
    else:
        allowed = {"input_ids", "attention_mask", "labels"}
        if getattr(config, "type_vocab_size", None):
            allowed.add("token_type_ids")
    unknown = sorted(set(tensors) - allowed)
    if unknown:
        raise bad(f"holds {unknown}, which {architecture} does not take; allowed names: {', '.join(sorted(allowed))}.")
    needed = sorted({main, "labels"} - set(tensors))
    if needed:
        raise bad(f"lacks {needed}; the report needs {main} and labels.")
    batch: dict[str, torch.Tensor] = {}
    inputs = tensors[main]
    if main == "pixel_values":
        expected = (config.num_channels, config.image_size, config.image_size)
        if inputs.dim() != 4 or tuple(inputs.shape[1:]) != expected or inputs.shape[0] == 0:
            raise bad(
                f"pixel_values has shape {tuple(inputs.shape)}; {architecture} needs (batch, {', '.join(map(str, expected))})."
            )
        if not inputs.dtype.is_floating_point:
            raise bad(f"pixel_values is {inputs.dtype}; it must be a float tensor.")
        if not torch.isfinite(inputs).all():
            raise bad("pixel_values holds NaN or infinite values.")
        batch["pixel_values"] = inputs.float()
    else:
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if inputs.dim() != 2 or 0 in inputs.shape:
            raise bad(f"input_ids has shape {tuple(inputs.shape)}; it must be (batch, sequence length), both >= 1.")
        if positions is not None and inputs.shape[1] > positions:
            raise bad(f"input_ids has sequences of {inputs.shape[1]} tokens; {architecture} takes at most {positions}.")
        bounds = {"input_ids": ("vocab_size", config.vocab_size), "attention_mask": ("a mask", 2)}
        if "token_type_ids" in allowed:
            bounds["token_type_ids"] = ("type_vocab_size", config.type_vocab_size)
        for name, (field_name, limit) in bounds.items():
            if name not in tensors:
                continue
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(inputs.shape):
                raise bad(f"{name} has shape {tuple(tensor.shape)}; it must match input_ids {tuple(inputs.shape)}.")
            if not (_is_integer(tensor) or (name == "attention_mask" and tensor.dtype == torch.bool)):
                raise bad(f"{name} is {tensor.dtype}; it must be an integer tensor.")
            tensor = tensor.long()
            if tensor.min() < 0 or tensor.max() >= limit:
                within = "0 or 1" if name == "attention_mask" else f"0..{limit - 1} ({field_name}={limit})"
                raise bad(f"{name} holds values {int(tensor.min())}..{int(tensor.max())}; they must be {within}.")
            batch[name] = tensor
        if head == "AutoModelForSequenceClassification" and family.batches_need_pad_token:
            if inputs.shape[0] > 1 and getattr(config, "pad_token_id", None) is None:
                raise bad(f"{architecture} without a pad_token_id takes one sequence per batch, not {inputs.shape[0]}.")
    labels = tensors["labels"]
    if not _is_integer(labels):
        raise bad(f"labels is {labels.dtype}; it must be an integer tensor of class ids.")
    labels = labels.long()
    if head in TOKEN_LABEL_HEADS:
        field_name = TOKEN_LABEL_HEADS[head]
        limit = getattr(config, field_name)
        if tuple(labels.shape) != tuple(inputs.shape):
            raise bad(
                f"labels has shape {tuple(labels.shape)}; {architecture} needs one per token, {tuple(inputs.shape)}."
            )
        scored = labels[:, 1:] if head == "AutoModelForCausalLM" else labels  # a causal LM scores the next token
        if not (scored != -100).any():
            raise bad("every label is -100 (ignored), so there is nothing to score.")
        valid = labels[labels != -100]
        if valid.numel() and (valid.min() < 0 or valid.max() >= limit):
            raise bad(
                f"labels hold {int(valid.min())}..{int(valid.max())}; they must be -100 or 0..{limit - 1} "
                f"({field_name}={limit})."
            )
    elif head in CLASS_LABEL_HEADS:
        problem = getattr(config, "problem_type", None)
        if config.num_labels < 2 or problem not in (None, "single_label_classification"):
            raise bad(
                f"the report's accuracy needs single-label classification; {architecture} has num_labels="
                f"{config.num_labels}, problem_type={problem!r}."
            )
        if tuple(labels.shape) != (inputs.shape[0],):
            raise bad(
                f"labels has shape {tuple(labels.shape)}; {architecture} needs one class id per example, ({inputs.shape[0]},)."
            )
        if labels.min() < 0 or labels.max() >= config.num_labels:
            raise bad(
                f"labels hold {int(labels.min())}..{int(labels.max())}; they must be 0..{config.num_labels - 1} "
                f"(num_labels={config.num_labels})."
            )
    else:
        raise bad(f"{architecture} ({head}) has no label rule here; leave out --eval-inputs.")
    batch["labels"] = labels
    return batch


__all__ = ["ConvertedCheckpoint", "convert_checkpoint", "format_deviation", "load_eval_inputs", "source_config"]
