"""Byte windows of CPython's bundled English documentation, shared by the text recipes."""

from __future__ import annotations

import torch

from ...data import byte_windows, english_text_split
from .base import RecipeArgumentError, Settings

MAX_SEQ_LEN = 4096


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
