"""The ``hf-comet`` command: ``--version``, ``info``, ``demo`` (the README's main job), ``train RECIPE``,
``convert SRC DST`` and ``card CHECKPOINT``.

Errors: a user's mistake (a bad path, a damaged checkpoint, a bad flag value, flags that conflict) never shows a
traceback. Every check runs before anything is written, and a failed one prints ``hf-comet <command>: error: <what,
which value, what to do>`` on stderr and exits 2 (argparse's own refusals look the same). The checks are classes of
behaviour, each in one function: `UserError` (what they raise; `main` is the one handler), the argument types
(`finite_float`, `seed_int`, ...: no NaN or infinity anywhere), the path checks (`existing_folder`, `existing_file`,
`destination_folder`, `run_folder`), the checkpoint check (`checkpoint_folder`: config.json parses, the safetensors
weights are present and whole; `loading` turns transformers' errors into a message naming the path; `check_loaded`
refuses a load report with missing, unexpected or mis-shaped tensors) and the evaluation-batch check
(`load_eval_inputs`: a safetensors file, never unpickled, whose tensors fit the model). Anything else that raises is a
bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import stat
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in what the user typed or pointed at. `main` prints ``hf-comet <command>: error: <message>`` on
    stderr and returns 2; validators raise it before anything is written, with a message that names the value and
    says what to do."""


# -- argument types (argparse turns their refusals into "hf-comet CMD: error: argument --flag: ..." and exit 2) ----
def finite_float(text: str) -> float:
    """A float flag: any number but NaN and +-infinity."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def finite_float_list(text: str) -> list[float]:
    """``0.25,0.5`` -> ``[0.25, 0.5]``; every item a finite number, at least one."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (e.g. 0.25,0.5)")
    return [finite_float(part) for part in parts]


def _int_list(text: str) -> list[int]:
    """``0,2`` -> ``[0, 2]``; at least one integer, no empty items."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 0,2)")
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 0,2)") from None


SEED_RANGE = (0, 2**32 - 1)
"""Seeds every generator we seed accepts (numpy's is the narrowest)."""


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is outside the seed range {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    return value


def _non_finite(value: Any, where: str = "") -> str | None:
    """Where ``value`` (a parsed JSON value) holds NaN or an infinity (``"a.b[1]"``; ``""`` for the value itself),
    or ``None`` when it holds none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def _names_non_finite(text: str) -> bool:
    """Whether ``text`` is a spelling of NaN or an infinity that JSON does not parse (``nan``, ``inf``, ``-inf``)."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["comet_keep_rate=0.25", "moe_layers=[0,2]"]`` -> a dict; values are JSON when they parse, else strings.
    Refuses an item that is not KEY=VALUE, a key given twice, and NaN or infinity in any value."""
    from hf_comet.training.recipes import RecipeArgumentError

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeArgumentError(f"{item!r} is not KEY=VALUE (e.g. comet_keep_rate=0.25).")
        if key in overrides:
            raise RecipeArgumentError(f"{key} is given twice ({key}={overrides[key]!r} and {item!r}); give it once.")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if _non_finite(parsed) is not None or (isinstance(parsed, str) and _names_non_finite(parsed)):
            raise RecipeArgumentError(f"{key}={value!r} is not finite; give a finite number.")
        overrides[key] = parsed
    return overrides


# -- paths ---------------------------------------------------------------------------------------------------------
def _lstat(path: Path, what: str) -> os.stat_result | None:
    """``os.lstat`` of ``path``, ``None`` when nothing is there; a path that cannot be examined is a `UserError`."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as error:  # e.g. an embedded NUL byte
        raise UserError(f"{what} {str(path)!r} is not a valid path ({error}).") from None
    except OSError as error:
        raise UserError(f"{what} {str(path)!r} cannot be examined ({error.strerror or error}).") from None


def _given(path: str | os.PathLike, what: str) -> Path:
    if not str(path).strip():
        raise UserError(f"{what} is empty; give a path.")
    return Path(path)


def _missing(path: Path, what: str) -> UserError:
    """The error for nothing at ``path``: a dangling link, a parent that is a file, or simply no such path."""
    if os.path.islink(path):
        return UserError(f"{what} {str(path)!r} is a symlink to {os.readlink(path)!r}, which does not exist.")
    for parent in path.absolute().parents:
        status = _lstat(parent, what)
        if status is not None:
            if not os.path.isdir(parent):
                return UserError(f"{what} {str(path)!r} does not exist: {str(parent)!r} is a file, not a folder.")
            break
    return UserError(f"{what} {str(path)!r} does not exist; check the path.")


def existing_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a readable folder (a symlink to one is fine for reading): refuses no such path, a file, no
    permission."""
    path = _given(path, what)
    if _lstat(path, what) is None or not os.path.exists(path):
        raise _missing(path, what)
    if not os.path.isdir(path):
        raise UserError(f"{what} {str(path)!r} is a file, not a folder; give the folder.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r} cannot be read (permission denied).")
    return path


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a readable regular file: refuses no such path, a folder, no permission."""
    path = _given(path, what)
    if _lstat(path, what) is None or not os.path.exists(path):
        raise _missing(path, what)
    if os.path.isdir(path):
        raise UserError(f"{what} {str(path)!r} is a folder, not a file; give the file.")
    if not os.path.isfile(path):
        raise UserError(f"{what} {str(path)!r} is not a regular file.")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {str(path)!r} cannot be read (permission denied).")
    return path


def _writable_place(path: Path, what: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a folder we may write in."""
    for parent in path.absolute().parents:
        if _lstat(parent, what) is None:
            continue
        if not os.path.isdir(parent):
            raise UserError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(
                f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not writable; choose another place."
            )
        return


def _no_link(path: Path, status: os.stat_result, what: str) -> None:
    if stat.S_ISLNK(status.st_mode):
        raise UserError(
            f"{what} {str(path)!r} is a symlink (to {os.readlink(path)!r}); hf-comet replaces what it writes as a "
            "whole and will not replace what a link points to: give the real path or a new one."
        )


def _replaceable(path: Path, what: str) -> None:
    """An existing folder that will be replaced as a whole must be a checkpoint (it has a config.json) or empty:
    anything else is someone's files, which replacing would delete."""
    try:
        entries = os.listdir(path)
    except OSError as error:
        raise UserError(f"{what} {str(path)!r} cannot be read ({error.strerror or error}).") from None
    if entries and "config.json" not in entries:
        raise UserError(
            f"{what} {str(path)!r} holds files but no config.json, so it is not a checkpoint; replacing it would "
            "delete them: choose another path."
        )


def destination_folder(path: str | os.PathLike, what: str, *, overwrite: bool) -> Path:
    """A folder that will be written as a whole (a checkpoint): refuses a symlink, a file, an existing folder
    without ``--overwrite`` or that is not a checkpoint, and a place we may not write in."""
    path = _given(path, what)
    if not path.is_symlink():  # first repair what an interrupted earlier write left there (hf_comet.io), and say so
        from hf_comet.io import recover

        recover(path)
    status = _lstat(path, what)
    if status is not None:
        _no_link(path, status, what)
        if not stat.S_ISDIR(status.st_mode):
            raise UserError(f"{what} {str(path)!r} is a file, not a folder; remove it or choose another path.")
        if not overwrite:
            raise UserError(f"{what} {str(path)!r} exists; pass --overwrite to replace it.")
        _replaceable(path, what)
    _writable_place(path, what)
    return path


def destination_file(path: Path, what: str) -> None:
    """A file that will be replaced: refuses a symlink and anything but a regular file there."""
    status = _lstat(path, what)
    if status is None:
        return
    _no_link(path, status, what)
    if not stat.S_ISREG(status.st_mode):
        kind = "a folder, not a file" if stat.S_ISDIR(status.st_mode) else "not a regular file"
        raise UserError(f"{what} {str(path)!r} is {kind}; remove it or choose another path.")


def run_folder(path: str | os.PathLike, what: str, *, folders: list[str], files: list[str]) -> Path:
    """The output folder of a run (created, or written into): refuses a symlink, a file, no write permission, and
    in it a symlink or the wrong kind of entry where the run writes ``folders`` (checkpoints, replaced as a whole:
    each must be a checkpoint or empty) and ``files``."""
    path = _given(path, what)
    status = _lstat(path, what)
    if status is None:
        _writable_place(path, what)
        return path
    _no_link(path, status, what)
    if not stat.S_ISDIR(status.st_mode):
        raise UserError(f"{what} {str(path)!r} is a file, not a folder; remove it or choose another path.")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r} is not writable; choose another place.")
    for name in folders:
        inner = _lstat(path / name, what)
        if inner is not None:
            _no_link(path / name, inner, what)
            if not stat.S_ISDIR(inner.st_mode):
                raise UserError(
                    f"{what} {str(path)!r} holds a file {name!r} where the run saves its {name} checkpoint folder; "
                    "remove it or choose another output folder."
                )
            _replaceable(path / name, what)
    for name in files:
        destination_file(path / name, what)
    return path


def _inside(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


# -- checkpoints ---------------------------------------------------------------------------------------------------
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what}: {str(path)!r} is not UTF-8 text (a damaged file?); re-save it.") from None
    except OSError as error:
        raise UserError(f"{what}: {str(path)!r} cannot be read ({error.strerror or error}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{what}: {str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "fix it or re-save the checkpoint."
        ) from None


def _safetensors_keys(path: Path, what: str) -> dict[str, list[int]]:
    """The tensor names and shapes in the header of a safetensors file; a missing, truncated or garbage file (the
    header must parse and cover the whole file) is a `UserError`. Reads the header only."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise UserError(f"{what}: {str(path)!r} is missing or not a file; re-save the checkpoint.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"{what}: {str(path)!r} is not a whole safetensors file ({error}); re-save the checkpoint."
        ) from None


def checkpoint_folder(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder saved by ``save_pretrained``, once the folder is checked:
    it exists and is a folder, ``config.json`` is a JSON object with a ``model_type``, and its safetensors weights
    (one file, or the shards an index names) are present with whole headers. Pickled weights are refused (never
    unpickled)."""
    folder = existing_folder(path, what)
    config_path = folder / "config.json"
    if not os.path.isfile(config_path):
        raise UserError(
            f"{what} {str(folder)!r} has no config.json, so it is not a saved checkpoint (save_pretrained writes "
            "one); give the checkpoint folder."
        )
    config = _read_json(config_path, what)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{what}: {str(config_path)!r} is not a transformers config (no model_type); re-save it.")
    field = _non_finite(config)
    if field is not None:
        raise UserError(f"{what}: {str(config_path)!r} sets {field} to a non-finite number; give a finite one.")
    index_path = folder / WEIGHTS_INDEX_NAME
    if os.path.exists(index_path):
        index = _read_json(index_path, what)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{what}: {str(index_path)!r} has no weight_map of tensor -> shard; re-save it.")
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise UserError(f"{what}: {str(index_path)!r} names a shard outside the folder ({shard!r}).")
            keys = _safetensors_keys(folder / shard, what)
            absent = sorted(key for key, name in weight_map.items() if name == shard and key not in keys)
            if absent:
                raise UserError(f"{what}: shard {shard!r} lacks tensors its index lists: {absent[:5]}; re-save it.")
    elif os.path.lexists(folder / WEIGHTS_NAME):
        _safetensors_keys(folder / WEIGHTS_NAME, what)
    else:
        pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(pattern))
        if pickled:
            raise UserError(
                f"{what} {str(folder)!r} has only pickled weights ({', '.join(pickled)}), which hf-comet does not "
                "unpickle; load them in Python and re-save with save_pretrained (it writes model.safetensors)."
            )
        raise UserError(f"{what} {str(folder)!r} has no weights ({WEIGHTS_NAME}); save the model with save_pretrained.")
    return config


@contextlib.contextmanager
def loading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn what transformers raises for a checkpoint it cannot load (OSError, a ValueError such as bad JSON or a
    refused config, huggingface_hub's typed-config errors, a TypeError or ZeroDivisionError from a config value the
    model cannot be built with, a safetensors error, a size mismatch) into a `UserError` naming the path."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (
        OSError,
        ValueError,
        TypeError,
        ArithmeticError,
        RuntimeError,
        SafetensorError,
        StrictDataclassError,
    ) as error:
        raise UserError(f"{what} {str(path)!r} cannot be loaded: {error}") from error


def check_loaded(report: dict[str, Any], path: str | os.PathLike, what: str) -> None:
    """Refuse a load report (``from_pretrained(..., output_loading_info=True)``) with any missing, unexpected or
    mis-shaped tensor: the model would hold random values where the user expects saved ones."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(report.get(kind) or ())
        if keys:
            problems.append(f"{kind.replace('_keys', '')} tensors {keys[:5]}" + (" ..." if len(keys) > 5 else ""))
    mismatched = sorted(report.get("mismatched_keys") or ())
    if mismatched:
        problems.append(
            "tensors of the wrong shape "
            + ", ".join(f"{k} {tuple(s)} (needs {tuple(n)})" for k, s, n in mismatched[:5])
        )
    if report.get("error_msgs"):
        problems.append(f"errors {report['error_msgs']}")
    if problems:
        raise UserError(
            f"{what} {str(path)!r} does not match its config: {'; '.join(problems)}. Its weights are damaged or "
            "were saved for another model; re-save the checkpoint."
        )


# -- the evaluation batch of ``convert --report`` ------------------------------------------------------------------
TOKEN_LABEL_HEADS = {
    "AutoModelForCausalLM": "vocab_size",
    "AutoModelForMaskedLM": "vocab_size",
    "AutoModelForTokenClassification": "num_labels",
}
"""Heads with one label per token -> the config field that bounds a label (``-100`` marks an ignored token)."""
CLASS_LABEL_HEADS = ("AutoModelForSequenceClassification", "AutoModelForImageClassification")
"""Heads with one class label per example."""


def _is_integer(tensor) -> bool:
    import torch

    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)


def load_eval_inputs(path: str | os.PathLike, config, family, head: str) -> dict[str, Any]:
    """The labelled batch of ``--eval-inputs``: a safetensors file (read with safetensors only, never unpickled) whose
    tensors are inputs the model of ``config`` (family ``family``, head ``head``, an Auto class name) takes, of the
    right dtype and shape, ids within its vocabulary and labels within its classes. Returned as the model takes
    them (ids and labels int64, pixels float32)."""
    import torch
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
        for name, (field, limit) in bounds.items():
            if name not in tensors:
                continue
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(inputs.shape):
                raise bad(f"{name} has shape {tuple(tensor.shape)}; it must match input_ids {tuple(inputs.shape)}.")
            if not (_is_integer(tensor) or (name == "attention_mask" and tensor.dtype == torch.bool)):
                raise bad(f"{name} is {tensor.dtype}; it must be an integer tensor.")
            tensor = tensor.long()
            if tensor.min() < 0 or tensor.max() >= limit:
                within = "0 or 1" if name == "attention_mask" else f"0..{limit - 1} ({field}={limit})"
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
        field = TOKEN_LABEL_HEADS[head]
        limit = getattr(config, field)
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
                f"labels hold {int(valid.min())}..{int(valid.max())}; they must be -100 or 0..{limit - 1} ({field}={limit})."
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


# -- the commands --------------------------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import hf_comet
    from hf_comet.modeling import FAMILIES, FAMILY_ADAPTERS, ROUTINGS

    print(f"hf-comet {hf_comet.__version__} (transformers {transformers.__version__}, torch {torch.__version__})")
    print(f"routings: {', '.join(ROUTINGS)}")
    for model_type, (config_class, auto_classes) in FAMILIES.items():
        print(f"{model_type}: {config_class.__name__}")
        for auto_name, model_class in auto_classes.items():
            print(f"  {auto_name:<36} {model_class.__name__}")
        for model_class in FAMILY_ADAPTERS[model_type].other_classes:
            print(f"  {'(no Auto class: load by class)':<36} {model_class.__name__}")
    return 0


def _quiet_transformers() -> None:
    """Keep the console to our tables and the training progress bar (no save/load bars or load reports: the load
    reports are checked by `check_loaded` and the converter instead)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()  # Dataset.map and load_dataset of --dataset


def _run_outputs(variants) -> dict[str, list[str]]:
    """What a recipe run writes in its output folder: a checkpoint folder per variant, the metrics and the plots."""
    moe = [v for v in variants if v != "dense"]
    plots = [f"{kind}_{v}.png" for v in moe for kind in ("expert_load", "overlap_similarity")]
    return {"folders": list(variants), "files": ["metrics.json", "loss_curves.png", *plots]}


DEMO_RECIPE = "vit_digits"


def _demo(args: argparse.Namespace) -> int:
    from hf_comet.training.recipes import RECIPES, run_recipe

    recipe = RECIPES[DEMO_RECIPE]
    run_folder(args.output_dir, "--output-dir", **_run_outputs(recipe.default_variants))
    _quiet_transformers()
    setting = "fast" if args.fast else "full"
    print(
        f"hf-comet demo: COMET vs top-k vs dense ViT on scikit-learn's digits ({setting} setting) -> {args.output_dir}"
    )
    summary = run_recipe(DEMO_RECIPE, args.output_dir, fast=args.fast, seed=args.seed, progress=not args.no_progress)
    return _report(summary, args.output_dir, reload_checks=recipe.check_reload(summary))


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


def _report(summary: dict, output_dir: str, reload_checks: list | None = None) -> int:
    """Print the comparison table and each reload check; 1 when a reloaded checkpoint scores differently."""
    print()
    print(format_table(summary))
    status = 0
    for check in reload_checks or []:
        status |= 0 if check.matches else 1
        print(
            f"{check.variant:<6} reloads with {check.auto_class} as {check.model_class}: "
            f"{check.metric.replace('_', ' ')} {check.reloaded:.4f} "
            f"{'(as trained)' if check.matches else '(DIFFERS from training!)'}"
        )
    print(
        f"\nmetrics.json, loss_curves.png, expert_load_*.png, overlap_similarity_*.png and checkpoints with model "
        f"cards are in {output_dir}/"
    )
    return status


PROVENANCE_FIELDS = ("converted_from", "conversion_method", "split_method", "conversion_seed")
"""Config fields `hf-comet convert` records; nobody sets them by hand."""


def _variants(text: str | None) -> list[str] | None:
    """``--variants dense,comet`` -> ``["dense", "comet"]``; ``None`` (not given) -> the recipe's defaults. An empty
    list or an empty item is refused (never read as "the defaults"); unknown names are the recipe check's."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise UserError(f"--variants {text!r} has an empty name; give comma-separated variants, e.g. dense,comet.")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"--variants {text!r} names {', '.join(twice)} twice; give each variant once.")
    return names


def _train_overrides(items: list[str]) -> dict[str, Any]:
    overrides = parse_overrides(items)
    if "routing" in overrides:
        raise UserError(
            f"--set routing={overrides['routing']!r}: a variant's name is its routing (block_comet is comet over "
            "blocks of units), so the routing is not a field to set; choose it with --variants, e.g. --variants topk."
        )
    given = sorted(set(overrides) & set(PROVENANCE_FIELDS))
    if given:
        raise UserError(
            f"--set {given[0]}=...: {', '.join(given)} is conversion provenance, recorded by hf-comet convert."
        )
    return overrides


def _check_models_build(name: str, variants: list[str], settings, overrides: dict[str, Any], data=None) -> None:
    """Build every variant's model on the meta device (no memory, no weights): sizes that build a config but not a
    model (e.g. ``--setting hidden_size=33`` with 4 heads) are refused here, not after the run has started."""
    import torch

    from hf_comet.training.recipes import RECIPES
    from hf_comet.training.recipes.base import build_model, shared_config

    recipe = RECIPES[name]
    shared = shared_config(recipe, settings, data)
    for variant in variants:
        try:
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                build_model(recipe.family, "AutoModel", variant, shared, overrides, seed=0)
        except (ValueError, TypeError, ArithmeticError, RuntimeError) as error:
            raise UserError(
                f"recipe {name}: the {variant} model cannot be built with these --setting/--set values: {error}"
            ) from error


COLUMN_FLAGS = ("text_column", "image_column", "label_column")


def _dataset_source(args: argparse.Namespace):
    """The `DatasetSource` of ``--dataset`` and the column flags (``None`` without ``--dataset``); a column flag
    without ``--dataset`` is refused."""
    from hf_comet.training.recipes import DatasetSource

    columns = {name: getattr(args, name) for name in COLUMN_FLAGS}
    if args.dataset is None:
        given = [f"--{name.replace('_', '-')}" for name, value in columns.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} names a column of --dataset PATH; give --dataset too.")
        return None
    for name, value in columns.items():
        if value is not None and not value.strip():
            raise UserError(f"--{name.replace('_', '-')} is empty; give a column name.")
    return DatasetSource(args.dataset, **columns)


def _train(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import StrictDataclassError

    from hf_comet.training.recipes import load_recipe_data, run_recipe, validate_recipe_arguments

    # every argument is checked here, before anything is trained or written
    variants = _variants(args.variants)
    overrides = _train_overrides(args.set)
    settings = parse_overrides(args.setting)
    if args.steps is not None:
        if "steps" in settings:
            raise UserError(f"--steps {args.steps} and --setting steps={settings['steps']!r} both set steps; give one.")
        settings["steps"] = args.steps
    source = _dataset_source(args)
    _quiet_transformers()
    data = load_recipe_data(args.recipe, source, args.seed) if source is not None else None
    try:
        variants, chosen, _ = validate_recipe_arguments(args.recipe, args.fast, variants, overrides, settings, data)
    except StrictDataclassError as error:  # huggingface_hub's typed config fields (the recipe catches ValueErrors)
        raise UserError(f"a --set value is refused by the config: {error}") from error
    _check_models_build(args.recipe, variants, chosen, overrides, data)
    output_dir = args.output_dir if args.output_dir is not None else f"runs/{args.recipe}"
    run_folder(output_dir, "--output-dir", **_run_outputs(variants))
    summary = run_recipe(
        args.recipe,
        output_dir,
        fast=args.fast,
        variants=variants,
        overrides=overrides,
        settings=settings,
        seed=args.seed,
        progress=not args.no_progress,
        dataset=data,
    )
    return _report(summary, output_dir)


def _moe_field_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Add every MoE config field as a dashed flag (``--comet-keep-rate 0.5``, ``--moe-layers 0,2``,
    ``--norm-topk-prob/--no-norm-topk-prob``); defaults stay unset so the config's own defaults apply. Float flags
    take finite numbers only."""
    import dataclasses

    from hf_comet.modeling.configuration_comet import CometMoEConfigMixin

    names = []
    group = parser.add_argument_group("MoE config fields (see docs/config.md; unset = the config default)")
    for field in dataclasses.fields(CometMoEConfigMixin):
        if field.name in PROVENANCE_FIELDS or field.name == "output_router_logits":
            continue
        flag = "--" + field.name.replace("_", "-")
        annotation = str(field.type)
        if "bool" in annotation:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, dest=field.name)
        elif "list" in annotation:
            group.add_argument(flag, type=_int_list, default=None, dest=field.name, metavar="I,J,...")
        elif "float" in annotation:
            group.add_argument(flag, type=finite_float, default=None, dest=field.name)
        elif "int" in annotation:
            group.add_argument(flag, type=int, default=None, dest=field.name)
        else:
            group.add_argument(flag, default=None, dest=field.name)
        names.append(field.name)
    return names


def _looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` may name a Hub repo (``org/name``) rather than only a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or os.path.isabs(text) or os.sep != "/" and os.sep in text:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _convert_source(text: str):
    """The dense source's config, once the source is checked: a local checkpoint folder (`checkpoint_folder`) or,
    when nothing is at that path and it reads as ``org/name``, a Hub repo id."""
    import transformers

    path = _given(text, "source")
    if os.path.lexists(path):
        checkpoint_folder(path, "source")
        with loading(path, "source"):
            return transformers.AutoConfig.from_pretrained(path)
    if not _looks_like_repo_id(text):
        raise _missing(path, "source")
    with loading(text, "source"):  # what a Hub checkpoint that downloads can still get wrong
        return _hub_config(text)


def _hub_config(text: str):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(text)
    except OSError as error:
        raise UserError(
            f"source {text!r} is not a local path (nothing is there) and cannot be loaded from the Hub as a repo id "
            f"({error}); check the path."
        ) from error


def _check_convert_flags(args: argparse.Namespace) -> None:
    """Flags that conflict or would be ignored."""
    if args.split_method is not None and args.method != "split":
        raise UserError(
            f"--split-method {args.split_method} applies only to --method split, not --method {args.method}; "
            "leave it out."
        )
    if args.report_only and args.overwrite:
        raise UserError("--overwrite has no effect with --report-only, which writes nothing; give one of them.")
    if not (args.report or args.report_only):
        for flag, value in (("--sweep", args.sweep), ("--eval-inputs", args.eval_inputs)):
            if value is not None:
                raise UserError(f"{flag} only applies with --report or --report-only; add one or leave {flag} out.")
    for value in args.sweep or ():
        if args.method == "comet" and not 0 < value <= 1:
            raise UserError(f"--sweep {value:g}: a COMET keep rate is in (0, 1].")
        if args.method != "comet" and (value < 1 or value != int(value)):
            raise UserError(f"--sweep {value:g}: with --method {args.method} the sweep is of experts per token, >= 1.")


def _convert(args: argparse.Namespace) -> int:
    from hf_comet.convert import convert_to_moe, deviation_report, stock_to_ours
    from hf_comet.io import atomic_save_pretrained

    _quiet_transformers()

    field_names = args._moe_fields
    fields = {name: getattr(args, name) for name in field_names if getattr(args, name) is not None}
    # everything that can be refused is refused here, before anything is built or written
    _check_convert_flags(args)
    source_config = _convert_source(args.source)
    destination = None
    if not args.report_only:
        destination = destination_folder(args.destination, "destination", overwrite=args.overwrite)
        if os.path.lexists(args.source) and (
            _inside(destination, Path(args.source)) or _inside(Path(args.source), destination)
        ):
            raise UserError(
                f"destination {args.destination!r} and source {args.source!r} overlap; writing one would damage the "
                "other: choose a destination outside the source."
            )
    eval_inputs = None
    if args.eval_inputs is not None:
        heads = stock_to_ours()
        architecture = (getattr(source_config, "architectures", None) or [""])[0]
        if architecture in heads:  # otherwise the conversion refuses the source below
            family, head = heads[architecture]
            eval_inputs = load_eval_inputs(args.eval_inputs, source_config, family, head)
    split_method = args.split_method if args.method == "split" else None
    from tqdm.auto import tqdm

    stages = tqdm(total=3, desc="convert", disable=args.no_progress)
    rows = []
    try:
        stages.set_postfix_str("loading and mapping weights")
        model = convert_to_moe(args.source, args.method, split_method=split_method, seed=args.seed, **fields)
        stages.update(1)
        if args.report or args.report_only:
            stages.set_postfix_str("deviation sweep")
            sweep = args.sweep or ([0.25, 0.5, 0.75, 1.0] if args.method == "comet" else None)
            experts = model.config.num_experts
            if sweep is None:
                sweep = sorted({1, 2, max(1, experts // 2), experts})
            elif args.method != "comet" and max(sweep) > experts:
                raise UserError(f"--sweep {max(sweep):g}: more experts per token than the {experts} experts.")
            try:
                rows = deviation_report(
                    args.source,
                    args.method,
                    sweep,
                    inputs=eval_inputs,
                    split_method=split_method,
                    seed=args.seed,
                    **fields,
                )
            except UserError:
                raise
            except (ValueError, RuntimeError) as error:  # a ConversionError is a ValueError too
                raise UserError(f"the deviation report failed: {error}") from error
        stages.update(1)
        if destination is not None:
            stages.set_postfix_str(f"saving to {destination}")
            try:
                atomic_save_pretrained(model, destination)
            except OSError as error:
                raise UserError(
                    f"cannot write destination {str(destination)!r} ({error}); what was there before is unchanged."
                ) from error
        stages.update(1)
    finally:
        stages.close()
    if destination is not None:
        print(f"{type(model).__name__} ({model.config.routing}, method {args.method}) saved to {destination}")
    if rows:
        what = "comet_keep_rate" if args.method == "comet" else "experts per token"
        where = f"on {args.eval_inputs}" if args.eval_inputs else "on seeded random inputs"
        print(f"\ndeviation from the dense model before training ({what} sweep, {where}):")
        task = [k for k in ("eval_loss", "accuracy", "perplexity") if k in rows[-1]]
        print(
            f"{what:>18} {'max |error|':>12} {'mean |error|':>13} {'argmax agree':>13}"
            + "".join(f"{k:>11}" for k in task)
        )
        for row in rows:
            agree = f"{row['argmax_agreement']:.3f}" if "argmax_agreement" in row else "-"
            cells = "".join(f"{row[k]:>11.4f}" for k in task)
            setting = row["setting"] if isinstance(row["setting"], str) else f"{row['setting']:g}"
            print(f"{setting:>18} {row['max_abs_error']:>12.3e} {row['mean_abs_error']:>13.3e} {agree:>13}{cells}")
    return 0


def repo_id(text: str) -> str:
    """``--repo-id``: a Hub repo id, ``name`` or ``namespace/name``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub repo id ({error})") from None
    return text


def _card(args: argparse.Namespace) -> int:
    import transformers

    from hf_comet.cards import write_model_card
    from hf_comet.modeling import FAMILIES, FAMILY_ADAPTERS

    _quiet_transformers()

    saved = checkpoint_folder(args.checkpoint, "checkpoint")
    checkpoint = Path(args.checkpoint)
    if saved["model_type"] not in FAMILIES:
        raise UserError(
            f"checkpoint {args.checkpoint!r} is a {saved['model_type']} checkpoint, not an hf_comet one; convert it "
            "first with hf-comet convert."
        )
    readme = checkpoint / "README.md"
    destination_file(readme, "model card")
    if os.path.lexists(readme) and not args.overwrite:
        raise UserError(f"{str(readme)!r} exists; pass --overwrite to replace it.")
    if not os.access(checkpoint, os.W_OK | os.X_OK):
        raise UserError(f"checkpoint {args.checkpoint!r} is not writable, so README.md cannot be written there.")
    with loading(checkpoint, "checkpoint"):
        config = transformers.AutoConfig.from_pretrained(checkpoint)
        classes = FAMILY_ADAPTERS[config.model_type].model_classes
        architecture = (config.architectures or ["AutoModel"])[0]
        model_class = classes.get(architecture, next(iter(classes.values())))
        model, report = model_class.from_pretrained(checkpoint, output_loading_info=True, ignore_mismatched_sizes=True)
    check_loaded(report, checkpoint, "checkpoint")
    plots = sorted(p.name for p in checkpoint.glob("*.png"))
    try:
        path = write_model_card(model, checkpoint, plots=plots, repo_id=args.repo_id)
    except OSError as error:
        raise UserError(f"cannot write {str(readme)!r} ({error}); what was there before is unchanged.") from error
    print(f"model card written to {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, refusing a bad flag in the same form as every other mistake, ``hf-comet CMD: error: ...`` (exit 2),
    with a pointer to ``--help`` instead of the usage block (``convert``'s is 30 lines that would bury the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from hf_comet import __version__
    from hf_comet.convert import DEFAULT_SPLIT_METHOD, METHODS, SPLIT_METHODS

    parser = _Parser(prog="hf-comet", description="Mixture-of-experts FFNs for GPT-2, ViT and BERT.")
    parser.add_argument("--version", action="version", version=f"hf-comet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="list model types, heads and routers")
    demo = commands.add_parser(
        "demo", help="train COMET, top-k and dense ViT side by side on scikit-learn's digits (~2 min), compare, save"
    )
    demo.add_argument("--output-dir", default="runs/demo", help="where results and checkpoints go (default: runs/demo)")
    demo.add_argument("--fast", action="store_true", help="a few steps per model, for a quick check")
    demo.add_argument("--seed", type=seed_int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    from hf_comet.training.recipes import RECIPES

    train = commands.add_parser("train", help="run a recipe: " + ", ".join(RECIPES))
    train.add_argument("recipe", choices=RECIPES)
    train.add_argument("--fast", action="store_true", help="the seconds-long setting (the full one takes minutes)")
    train.add_argument("--variants", help="comma-separated: dense and/or routings, e.g. dense,comet,topk,block_comet")
    train.add_argument("--steps", type=int, help="training steps per variant (default: the setting's)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="MoE config field, e.g. comet_keep_rate=0.25 (not routing: that is the variant's name)",
    )
    train.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE", help="recipe setting, e.g. batch_size=16"
    )
    train.add_argument("--output-dir", help="default: runs/RECIPE")
    train.add_argument("--seed", type=seed_int, default=0)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    user_data = train.add_argument_group("your own data (instead of the recipe's; see the README's Training section)")
    user_data.add_argument(
        "--dataset",
        metavar="PATH",
        help="a folder saved with save_to_disk (train + test/validation splits, or one split: 20%% held out) or a "
        ".json/.jsonl/.csv file (20%% held out, split with --seed)",
    )
    user_data.add_argument("--text-column", help="the text column (gpt2_text, bert_mlm_cls; default: text)")
    user_data.add_argument(
        "--image-column",
        help="the image column (vit_digits; default: image): nested lists [channels][height][width] or "
        "[height][width], or a flat list / space-separated string of a square grayscale image",
    )
    user_data.add_argument("--label-column", help="the label column (vit_digits, bert_mlm_cls; default: label)")

    convert = commands.add_parser(
        "convert", help=f"convert a dense GPT-2/ViT/BERT checkpoint into an MoE checkpoint ({', '.join(METHODS)})"
    )
    convert.add_argument("source", help="folder of a checkpoint saved by a stock transformers GPT-2/ViT/BERT class")
    convert.add_argument("destination", help="folder for the MoE checkpoint (written atomically)")
    convert.add_argument("--method", choices=list(METHODS), default="comet")
    convert.add_argument(
        "--split-method",
        choices=list(SPLIT_METHODS),
        default=None,
        help=f"unit partition, only for --method split (default: {DEFAULT_SPLIT_METHOD})",
    )
    convert.add_argument("--seed", type=seed_int, default=0, help="seed of the router init and the unit partition")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.add_argument("--report", action="store_true", help="also print the deviation from the dense model")
    convert.add_argument("--report-only", action="store_true", help="print the deviation sweep, write nothing")
    convert.add_argument(
        "--sweep", type=finite_float_list, help="keep rates (comet) or k values to report, e.g. 0.25,0.5"
    )
    convert.add_argument(
        "--eval-inputs",
        help="a safetensors file of a labelled batch (e.g. input_ids and labels, or pixel_values and labels; written "
        "with safetensors.torch.save_file): the report adds loss/accuracy/perplexity",
    )
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(_moe_fields=_moe_field_flags(convert))

    from hf_comet import bench

    bench_parser = commands.add_parser(
        "bench", help="the speed/memory benchmark of the README (blocks, training, generation; ~15 min; --quick: 1)"
    )
    bench.add_arguments(bench_parser)

    reproduce = commands.add_parser(
        "reproduce", help="the papers' claims over seeds, written to docs/results.md (resumable; --quick: tiny)"
    )
    reproduce.add_argument("claims", nargs="*", metavar="CLAIM", help="claims to run (default: all)")
    reproduce.add_argument("--quick", action="store_true", help="tiny settings that check the pipeline, not results")
    reproduce.add_argument("--cache", default="runs/reproduce", help="folder of finished runs (resumed from)")
    reproduce.add_argument(
        "--page", default=None, help="the results page to write (default docs/results.md; --quick: under --cache)"
    )

    card = commands.add_parser("card", help="write the model card (README.md) of a saved hf_comet checkpoint")
    card.add_argument("checkpoint")
    card.add_argument("--repo-id", type=repo_id, help="the Hub repo id to show in the loading snippet")
    card.add_argument("--overwrite", action="store_true", help="replace an existing README.md")
    return parser


def _bench(args: argparse.Namespace) -> int:
    from hf_comet import bench

    argv = [*args.sections, *(["--quick"] if args.quick else []), "--threads", str(args.threads)]
    for flag, value in (("--rounds", args.rounds), ("--json", args.json), ("--readme", args.readme)):
        if value is not None:
            argv += [flag, str(value)]
    try:
        return bench.run_from_args(args, argv)
    except ValueError as error:
        raise UserError(str(error)) from None


def _reproduce(args: argparse.Namespace) -> int:
    from hf_comet.reproduce import CLAIMS, reproduce

    unknown = [claim for claim in args.claims if claim not in CLAIMS]
    if unknown:
        raise UserError(f"unknown claim(s) {', '.join(map(repr, unknown))}; choose from {', '.join(CLAIMS)}.")
    cache = Path(args.cache)
    if cache.exists() and not cache.is_dir():
        raise UserError(f"--cache {args.cache!r} is a file, not a folder; remove it or choose another path.")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--cache {args.cache!r} cannot be created ({error}).") from None
    page = Path(args.page) if args.page else (Path(args.cache, "quick", "results.md") if args.quick else None)
    page = page or Path("docs/results.md")
    destination_file(page, "results page")
    results = reproduce(args.claims or None, quick=args.quick, cache_dir=args.cache, page=page)
    for result in results:
        print(f"{result.name}: {result.verdict} ({result.seconds / 60:.1f} min)")
    print(f"results page written to {page}")
    return 0


COMMANDS = {
    "info": _info, "demo": _demo, "train": _train, "convert": _convert, "card": _card, "bench": _bench,
    "reproduce": _reproduce,
}  # fmt: skip


@contextlib.contextmanager
def _our_warnings_on_stderr(command: str) -> Iterator[None]:
    """hf_comet's own warnings (e.g. a source tensor its class does not use) as ``hf-comet CMD: warning: ...``."""
    package = str(Path(__file__).parent)
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(package):
            print(f"hf-comet {command}: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-comet``; the one handler of user mistakes (`UserError`, and the recipe's and converter's argument
    errors): the message on stderr as ``hf-comet <command>: error: ...`` and exit code 2."""
    from hf_comet.convert import ConversionError
    from hf_comet.training.recipes import RecipeArgumentError

    args = build_parser().parse_args(argv)
    try:
        with _our_warnings_on_stderr(args.command):
            return COMMANDS[args.command](args)
    except (UserError, ConversionError, RecipeArgumentError) as error:
        print(f"hf-comet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-comet {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
