"""Keeping forwards out of the routers' training statistics window."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def statistics_paused(model: torch.nn.Module) -> Iterator[None]:
    """Inside the ``with`` body no MoE block of ``model`` adds to its routing statistics (evaluation, plotting);
    on exit every block's ``track_statistics`` is restored to what it was, also when the body raises.

    A model without MoE blocks (a dense baseline) is left alone.
    """
    blocks = model.moe_blocks() if hasattr(model, "moe_blocks") else []
    previous = [block.track_statistics for block in blocks]
    for block in blocks:
        block.track_statistics = False
    try:
        yield
    finally:
        for block, enabled in zip(blocks, previous, strict=True):
            block.track_statistics = enabled


__all__ = ["statistics_paused"]
