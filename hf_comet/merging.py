"""Optimizer bookkeeping for expert merging (Park 2024): the merged-into expert starts with fresh optimizer state."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .modeling.moe_block import ExpertMerge


@torch.no_grad()
def reset_merged_optimizer_state(optimizer: torch.optim.Optimizer, merges: Iterable[ExpertMerge]) -> int:
    """Zero the per-element optimizer state (Adam moments, SGD momentum, ...) of every overwritten expert slice.

    Stale moments would give the freshly merged expert huge first updates (methods.md §3.6). Only the ``[into]``
    slice of each packed tensor is reset; per-tensor scalars such as Adam's ``step`` are shared by all experts of
    the tensor and are left alone, so the first updates of the reset slice use the current bias correction.
    Returns the number of state tensors reset.
    """
    reset = 0
    for merge in merges:
        for param in merge.parameters.values():
            state = optimizer.state.get(param)
            if not state:
                continue
            for value in state.values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value[merge.into].zero_()
                    reset += 1
    return reset


__all__ = ["reset_merged_optimizer_state"]
