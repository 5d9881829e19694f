"""`convert_checkpoint`: a dense checkpoint folder (or Hub id) -> a checked, reported and atomically saved MoE
checkpoint, what ``hf-comet convert`` runs; and `load_eval_inputs`, the check of its labelled evaluation batch.

Everything that can be refused (the source, the destination, the sweep, the evaluation batch) is refused with a
`~hf_comet.io.UserError` naming the value before anything is built or written. Every fact that depends on the method
(its default sweep, which sweep values it takes, what the sweep varies) comes from the method object (`METHODS`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers

from ..io import (
    UserError,
    atomic_save_pretrained,
    checkpoint_folder,
    destination_folder,
    destination_lock,
    existing_file,
    given_path,
    identity,
    loading,
    missing_path,
    paths_overlap,
    write_failures,
)
from ..limits import check_memory
from .companions import is_hub_id
from .core import _moe_config, conversion_method, convert_to_moe, stock_to_ours
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


def conversion_parameters(config, method: str, fields: dict[str, Any]) -> tuple[int, int] | None:
    """Parameter counts of the dense source (of ``config``) and of the MoE model ``method`` and ``fields`` make of
    it, from models built on the meta device (no memory); ``None`` where the source or the fields cannot be built
    (the conversion itself then says why)."""
    heads = stock_to_ours()
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if architecture not in heads:
        return None
    family, head = heads[architecture]
    try:
        moe_config = _moe_config(SimpleNamespace(config=config), family, conversion_method(method), dict(fields), {})
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            moe = family.head_class(head)._from_config(moe_config)
            dense = family.stock_class(head)._from_config(config)
    except Exception:  # noqa: BLE001 - refused later, with the conversion's own message
        return None
    return sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in moe.parameters())


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
    target = found = None
    if destination is not None:
        target = destination_folder(destination, "destination", overwrite=overwrite)
        found = identity(target, contents=True)  # a file added to it meanwhile is never deleted by the swap
        if os.path.lexists(source) and paths_overlap(target, source):
            raise UserError(
                f"destination {str(destination)!r} and source {str(source)!r} overlap; writing one would damage the "
                "other: choose a destination outside the source."
            )
    sizes = conversion_parameters(config, method, fields)
    if sizes is not None:  # dense weights, the MoE model and the mapped state dict (float32), plus the report's copy
        dense, moe = sizes
        check_memory(4 * (dense + (3 if report else 2) * moe), f"converting {str(source)!r} ({dense:,} parameters) "
                     f"into a {moe:,}-parameter MoE model", "lower --num-experts or the expert width.")  # fmt: skip
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
    lock = destination_lock(target, "destination") if target is not None else contextlib.nullcontext()
    try:
        with lock:
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
                with write_failures(target, "destination"):  # a full disk, a read-only place: one clear line
                    atomic_save_pretrained(result.model, target, expect=found, what="destination")
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


def load_eval_inputs(
    path: str | os.PathLike, config, family, head: str, what: str = "--eval-inputs", need_labels: bool = True
) -> dict[str, torch.Tensor]:
    """The labelled batch of a conversion report: a safetensors file (read with safetensors only, never unpickled)
    whose tensors are inputs the model of ``config`` (family ``family``, head ``head``, an Auto class name) takes, of
    the right dtype and shape, ids within its vocabulary and labels within its classes. Returned as the model takes
    them (ids and labels int64, pixels float32). Raises `~hf_comet.io.UserError` naming the file and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = existing_file(path, what)
    architecture = (getattr(config, "architectures", None) or [head])[0]
    if head == "AutoModel" and need_labels:
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
    needed = sorted(({main, "labels"} if need_labels else {main}) - set(tensors))
    if needed:
        raise bad(f"lacks {needed}; it needs {main}" + (" and labels." if need_labels else "."))
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
    if "labels" not in tensors or head == "AutoModel":
        return batch  # inputs only (a calibration batch)
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


@dataclass
class SparsifiedCheckpoint:
    """What `sparsify_checkpoint` made: the model, where it was saved, its deviation from the source on held-out
    calibration rows (`hf_comet.convert.sparse.deviation`) and the measured speed (`measure_speedup`), or None."""

    model: Any
    destination: Path | None
    deviation: dict[str, float] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    measured_on: str = ""
    """What the deviation and the timing ran on (held-out calibration rows, the fit's own rows, or random inputs)."""


def _held_out(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fit rows, held-out rows): every 4th row is held out for the deviation once there are 4 rows or more."""
    rows = next(iter(batch.values())).shape[0]
    if rows < 4:
        return batch, batch
    held = torch.arange(rows) % 4 == 3
    return {k: v[~held] for k, v in batch.items()}, {k: v[held] for k, v in batch.items()}


def measure_speedup(dense, converted, batch: dict[str, torch.Tensor], rounds: int) -> dict[str, Any]:
    """Dense time / converted time on this machine, interleaved over ``rounds`` after a warm-up, median and range:
    a forward on ``batch`` (eval) and, for causal LMs, greedy decoding of 16 tokens with the cache from one row."""
    from ..timing import interleaved

    forward = {k: v for k, v in batch.items() if k != "labels"}

    def runner(model):
        def run():
            with torch.no_grad():
                model(**forward)

        return run

    results: dict[str, Any] = {}
    workloads = {"forward": (runner(dense), runner(converted))}
    if "input_ids" in forward and dense.can_generate():  # causal LMs: decoding, where sparsity pays most
        prompt = forward["input_ids"][:1, :8]

        def decoder(model):
            def run():
                with torch.no_grad():
                    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                   min_new_tokens=16, do_sample=False, pad_token_id=0)  # fmt: skip

            return run

        workloads["decode, batch 1"] = (decoder(dense), decoder(converted))
    for name, (dense_run, converted_run) in workloads.items():
        measured = interleaved({"dense": dense_run, "converted": converted_run}, rounds=rounds)
        speeds = sorted(1 / ratio for ratio in measured["converted"].ratios)
        results[name] = {"speedup": 1 / measured["converted"].median_ratio, "min": speeds[0], "max": speeds[-1]}
    return results


def sparsify_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike | None,
    *,
    keep_rate: float,
    block_size: int | None = None,
    calibration: str | os.PathLike | None = None,
    cluster: str | None = None,
    router: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    rounds: int = 5,
) -> SparsifiedCheckpoint:
    """``hf-comet sparsify``: `hf_comet.convert.sparsify` on a saved dense checkpoint with a calibration
    batch read from a safetensors file, its deviation on held-out rows, the speedup measured here, and the result saved
    to ``destination`` atomically (``None`` saves nothing).

    ``block_size`` defaults to F/8 (the issue's sizes: 384 of 3072). Every 4th calibration row is held out from the
    fit for the deviation (all rows when there are fewer than 4). ``rounds=0`` skips the timing. Raises
    `~hf_comet.io.UserError` (or `ConversionError`) naming a bad value before anything is built or written."""
    from .sparse import CLUSTERS, DEFAULT_CLUSTER, DEFAULT_ROUTER, ROUTERS, _check_sizes, deviation, sparsify

    cluster, router = cluster or DEFAULT_CLUSTER, router or DEFAULT_ROUTER
    if cluster not in CLUSTERS:
        raise UserError(f"cluster={cluster!r} is not a clustering; choose one of {', '.join(CLUSTERS)}.")
    if router not in ROUTERS:
        raise UserError(f"router={router!r} is not a sparsify router; choose one of {', '.join(ROUTERS)}.")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise UserError(f"rounds={rounds!r} must be 0 (no timing) or more.")
    config = source_config(source)
    heads = stock_to_ours()
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if architecture not in heads:
        raise UserError(
            f"{str(source)!r} holds a {architecture or type(config).__name__} checkpoint; sparsify takes a stock "
            f"GPT-2, ViT or BERT class: {', '.join(sorted(heads))}."
        )
    family, head = heads[architecture]
    width = family.ffn_width(config)
    if block_size is None:
        if width % 8:
            raise UserError(f"the FFN width {width} is not a multiple of 8, so the default block size (width / 8) "
                            "does not exist: give --block-size, a divisor of the width.")  # fmt: skip
        block_size = width // 8
    _check_sizes(keep_rate, block_size, width)  # keep rate and block size, before anything is read or written
    sizes = conversion_parameters(config, "comet", {"comet_block_size": block_size, "comet_keep_rate": keep_rate})
    if sizes is not None:  # the dense model and the fit's working copy of it, the result and a save's copy, float32
        dense_parameters, moe_parameters = sizes
        check_memory(4 * (2 * dense_parameters + 2 * moe_parameters), f"sparsifying {str(source)!r} "
                     f"({dense_parameters:,} parameters)", "sparsify on a machine with more memory.")  # fmt: skip
    target = found = None
    if destination is not None:
        target = destination_folder(destination, "destination", overwrite=overwrite)
        found = identity(target, contents=True)
        if os.path.lexists(source) and paths_overlap(target, source):
            raise UserError(
                f"destination {str(destination)!r} and source {str(source)!r} overlap; writing one would damage the "
                "other: choose a destination outside the source."
            )
    needs_data = cluster != "none" or router != "random"
    if calibration is None and needs_data:
        raise UserError(
            f"--cluster {cluster} and --router {router} fit the model to data: give --calibration FILE (a safetensors "
            "file of model inputs: input_ids [and attention_mask], or pixel_values), or use --cluster none --router "
            "random, which need none."
        )
    batch = None
    if calibration is not None:
        batch = load_eval_inputs(calibration, config, family, head, what="--calibration", need_labels=False)
    fit, held_out = _held_out(batch) if batch is not None else (None, None)
    for part, rows in (("fit", fit), ("held-out", held_out)):  # a row set of padding only: a NaN router, a crash
        mask = rows.get("attention_mask") if rows is not None else None
        if mask is not None and not bool(mask.bool().any()):
            raise UserError(f"--calibration {str(calibration)!r}: its attention_mask marks no real token in the {part} "
                            "rows (every 4th row is held out for the deviation once there are 4 or more); give rows "
                            "with real tokens.")  # fmt: skip
    measured_on = ("held-out calibration rows" if batch is not None and held_out is not fit
                   else "the calibration rows the fit used (fewer than 4 rows)" if batch is not None
                   else "seeded random inputs")  # fmt: skip
    lock = destination_lock(target, "destination") if target is not None else contextlib.nullcontext()
    with lock:
        dense = _load_dense_model(source)  # once: the fit reads it (unchanged), then the deviation and the timing
        model = sparsify(dense, keep_rate, block_size, fit if needs_data else None, cluster=cluster, router=router,
                         seed=seed)  # fmt: skip
        result = SparsifiedCheckpoint(model=model, destination=target, measured_on=measured_on)
        if held_out is None:
            held_out = _random_inputs(dense.config, family)
        result.deviation = deviation(dense, model, held_out)
        if rounds:
            result.speed = measure_speedup(dense, model, held_out, rounds)
        if target is not None:
            with write_failures(target, "destination"):
                atomic_save_pretrained(model, target, expect=found, what="destination")
    return result


def _load_dense_model(source):
    from .core import _load_dense

    model, _ = _load_dense(source)
    return model.eval()


def _random_inputs(config, family) -> dict[str, torch.Tensor]:
    """Seeded random inputs of 4 rows (the deviation and timing batch when no calibration is given)."""
    generator = torch.Generator().manual_seed(0)
    if family.main_input_name == "pixel_values":
        return {"pixel_values": torch.randn(4, config.num_channels, config.image_size, config.image_size,
                                            generator=generator)}  # fmt: skip
    length = min(64, getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 64))
    return {"input_ids": torch.randint(0, config.vocab_size, (4, length), generator=generator)}


def format_sparsified(result: SparsifiedCheckpoint) -> str:
    """The deviation and speed lines ``hf-comet sparsify`` prints."""
    lines = []
    d = result.deviation
    if d:
        parts = [f"relative output error {d['relative_error']:.3g}"]
        if "argmax_agreement" in d:
            parts.append(f"argmax agreement {100 * d['argmax_agreement']:.1f} %")
        for metric in ("eval_loss", "accuracy"):
            if metric in d:
                parts.append(f"{metric} {d[metric]:.4g} (dense {d['dense_' + metric]:.4g})")
        lines.append(f"deviation from the source before fine-tuning ({result.measured_on}): " + ", ".join(parts))
    for name, speed in (result.speed or {}).items():
        lines.append(f"speedup over the source on this machine, {name}: {speed['speedup']:.2f}x "
                     f"(range {speed['min']:.2f}-{speed['max']:.2f})")  # fmt: skip
    return "\n".join(lines)


__all__ = [
    "ConvertedCheckpoint",
    "SparsifiedCheckpoint",
    "convert_checkpoint",
    "format_deviation",
    "format_sparsified",
    "load_eval_inputs",
    "measure_speedup",
    "source_config",
    "sparsify_checkpoint",
]
