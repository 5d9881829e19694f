"""Byte windows of CPython's bundled English documentation, and byte tokenisation and reading of a user's texts
(``--dataset``), shared by the text recipes."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch

from ...data import byte_windows, encode_bytes, english_text_split
from . import data_sources
from .base import DatasetSource, RecipeArgumentError, RecipeData, Settings

MAX_SEQ_LEN = 4096
TEXT_COLUMN, LABEL_COLUMN = "text", "label"
"""Default columns of a user's data (``--text-column``, ``--label-column``)."""


def check_text_settings(settings: Settings) -> None:
    if settings.seq_len > MAX_SEQ_LEN:
        raise RecipeArgumentError(f"setting seq_len={settings.seq_len} must be <= {MAX_SEQ_LEN} for the bundled text.")


def text_windows(settings: Settings, seed: int, prefix: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def byte_tokenize(
    dataset: datasets.Dataset,
    column: str,
    seq_len: int,
    *,
    prefix: int | None = None,
    pad: int = 0,
    causal_labels: bool = False,
    keep: tuple[str, ...] = ("labels",),
) -> datasets.Dataset:
    """Tokenise the texts of ``column`` into UTF-8 byte ids with ``Dataset.map(batched=True)``: ``input_ids`` and
    ``attention_mask`` of ``seq_len`` (`hf_comet.data.encode_bytes`: truncated after an optional ``prefix`` id,
    right-padded with ``pad``), plus with ``causal_labels`` the ids as ``labels`` with ``-100`` at padding. Keeps the
    columns of ``keep`` that exist; the result is in torch format."""

    def tokenize(batch):
        ids, mask = encode_bytes(batch[column], seq_len, prefix=prefix, pad=pad)
        out = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if causal_labels:
            out["labels"] = torch.where(mask.bool(), ids, -100).numpy()
        return out

    tokenized = dataset.map(tokenize, batched=True, keep_in_memory=True)
    names = ["input_ids", "attention_mask", *(c for c in keep if c in tokenized.column_names and c != "input_ids")]
    if causal_labels and "labels" not in names:
        names.append("labels")
    return tokenized.select_columns(list(dict.fromkeys(names))).with_format("torch")


def load_text_data(
    source: DatasetSource, seed: int, recipe: str, *, labelled: bool, text: str = TEXT_COLUMN, label: str = LABEL_COLUMN
) -> RecipeData:
    """A user's texts for a text recipe: the text column (default ``text``; strings, rows of fewer than 2 UTF-8 bytes
    dropped) becomes ``text``; when ``labelled``, the label column (default ``label``) becomes ``labels``."""
    path = source.path
    if source.image_column is not None:
        raise RecipeArgumentError(
            f"--image-column {source.image_column!r}: recipe {recipe} trains on text; images train with vit_digits."
        )
    if source.label_column is not None and not labelled:
        raise RecipeArgumentError(
            f"--label-column {source.label_column!r}: recipe {recipe} reads no labels (it is a language model)."
        )
    text = source.text_column or text
    train, test = data_sources.read_splits(path, seed)
    data_sources.require_column((train, test), text, "--text-column", recipe, "text", path)
    data_sources.check_texts((train, test), text, path)
    names = None
    if labelled:
        label = source.label_column or label
        data_sources.require_column((train, test), label, "--label-column", recipe, "label", path)
        train, test, names = data_sources.encode_labels(train, test, label, path)
    long_enough = lambda batch: [t is not None and len(t.encode("utf-8")) >= 2 for t in batch[text]]  # noqa: E731
    train, test = (split.filter(long_enough, batched=True, keep_in_memory=True) for split in (train, test))
    for split, rows in (("train", train), ("test", test)):
        if len(rows) == 0:
            raise RecipeArgumentError(f"--dataset {path!r}: no {split} text in column {text!r} has 2 bytes or more.")
    columns = [text, "labels"] if labelled else [text]
    train, test = (split.select_columns(columns) for split in (train, test))
    if text != TEXT_COLUMN:
        train, test = (split.rename_column(text, TEXT_COLUMN) for split in (train, test))
    classes = f", {len(names)} classes; label column {label!r}" if labelled else ""
    description = f"{Path(path).name} ({len(train)} train / {len(test)} test texts, UTF-8 bytes; text column {text!r}{classes})."
    return RecipeData(train, test, {}, names, description)
