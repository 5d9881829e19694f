"""Optimizer bookkeeping for expert merging (Park 2024): the merged-into expert starts with fresh optimizer state."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .modeling.moe_block import ExpertMerge

SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq")
"""Per-element state that estimates the gradient scale: the merged expert inherits its sources' mean."""


@torch.no_grad()
def reset_merged_optimizer_state(optimizer: torch.optim.Optimizer, merges: Iterable[ExpertMerge]) -> int:
    """Give every overwritten expert slice fresh optimizer state (methods.md §3.6: stale moments misdirect it).

    First moments and momentum buffers of the ``[into]`` slice are zeroed, so no stale direction survives. Second
    moments (Adam's ``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``) become the mean of the two sources' instead of
    zero: Adam's ``step`` is one scalar per packed tensor, shared with the experts that were not merged, so its bias
    correction is already ~1 and a zeroed second moment would make the first updates ``(1 - beta1) / sqrt(1 -
    beta2)`` (about 3x) larger than normal. With the sources' scale they start about ``1 - beta1`` (10x) smaller and
    warm up like a fresh Adam. Returns the number of state tensors touched.
    """
    touched = 0
    for merge in merges:
        source_a, source_b = merge.sources
        for param in merge.parameters.values():
            state = optimizer.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if not torch.is_tensor(value) or value.shape != param.shape:
                    continue  # scalars such as `step` are shared by every expert of the tensor
                if key in SECOND_MOMENT_KEYS:
                    value[merge.into] = (value[source_a] + value[source_b]) / 2
                else:
                    value[merge.into].zero_()
                touched += 1
    return touched


__all__ = ["reset_merged_optimizer_state"]
