"""Routing statistics of one MoE block: device-side accumulators over a window of forwards, read at logging time.

Every statistic is defined on one documented quantity for every router (see `RoutingStatistics.summary`): loads on
the selection mask, the gate entropy on the pre-selection distribution ``gate_probs`` (COMET: the uniform
distribution over its k kept choices), the usage entropy on the mean of that distribution, and the mask overlap on
sampled token pairs. Accumulators are sums, so summing them over DDP ranks gives the statistics of the global batch.
They are plain tensors, not buffers: DDP would otherwise overwrite each rank's counts with rank 0's at every forward
(``broadcast_buffers``). They accumulate without host syncs; reading them syncs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .moe_routers import RoutingDecision, masked_sum

STATISTICS_PAIRS = 64
"""Token pairs sampled per layer and forward for the overlap-vs-similarity statistic."""

COUNTS = ("tokens", "dropped", "pairs", "non_finite_decisions")
"""int64 accumulators: exact however long the window."""
SUMS = ("entropy_sum", "overlap_sum", "similarity_sum", "overlap_sq", "similarity_sq", "cross")
"""float64 accumulators of fractional quantities."""


def pair_overlap_and_similarity(
    selection: torch.Tensor, inputs: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token pair (first[p], second[p]): the Jaccard overlap of their selections (T, C) and the cosine
    similarity of their inputs (T, d). COMET's claim is that the two are positively correlated."""
    sel_i, sel_j = selection[first], selection[second]
    union = torch.maximum(sel_i, sel_j).sum(dim=-1)
    overlap = (sel_i * sel_j).sum(dim=-1) / union.clamp_min(1.0)
    cosine = F.cosine_similarity(inputs[first].float(), inputs[second].float(), dim=-1)
    return overlap, cosine


def gate_entropy_bits(
    decision: RoutingDecision, selection: torch.Tensor, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """(T,) entropy in bits of each token's gate distribution: ``gate_probs`` for learned routers, the uniform
    distribution over the kept choices for COMET (``log2 k``; ``kept`` is the per-token count when known)."""
    if decision.gate_probs is None:
        return torch.log2((selection.sum(dim=-1) if kept is None else kept).clamp_min(1.0))
    probs = decision.gate_probs.detach()
    return -torch.special.xlogy(probs, probs).sum(dim=-1) / math.log(2)


def _zeros(shape, device, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor that stays a normal tensor even when created under ``torch.inference_mode``."""
    if torch.compiler.is_compiling():
        return torch.zeros(shape, device=device, dtype=dtype)
    with torch.inference_mode(False):
        return torch.zeros(shape, device=device, dtype=dtype)


def _kept(valid: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` where the decision is valid, else zero (NaN-safe: ``where``, not a multiplication)."""
    return torch.where(valid, value, torch.zeros_like(value))


class RoutingStatistics:
    """The accumulators of one block over the current window, and their summary."""

    def __init__(self, num_choices: int, device: torch.device | str):
        self.num_choices = num_choices
        self.tensors = {name: _zeros((), device, torch.long) for name in COUNTS}
        self.tensors.update({name: _zeros((), device, torch.float64) for name in SUMS})
        self.tensors["selections"] = _zeros((num_choices,), device, torch.long)
        self.tensors["gate_sum"] = _zeros((num_choices,), device, torch.float64)

    @property
    def device(self) -> torch.device:
        return self.tensors["tokens"].device

    def to(self, device: torch.device) -> RoutingStatistics:
        """Keep the window when the model moves."""
        self.tensors = {name: value.to(device) for name, value in self.tensors.items()}
        return self

    def update(
        self,
        decision: RoutingDecision,
        selection: torch.Tensor,
        inputs: torch.Tensor,
        token_mask: torch.Tensor | None,
        pairs: tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor],
        valid: torch.Tensor | None = None,
    ) -> None:
        """Fold one forward's decision into the window (call under ``torch.no_grad``). ``pairs`` are sampled token
        pairs and their weights; ``valid`` (0-d bool) is False for a non-finite decision, which is only counted."""
        stats = self.tensors
        device = selection.device
        if valid is None:
            valid = torch.ones((), dtype=torch.bool, device=device)
        stats["non_finite_decisions"] += (~valid).long()
        count_mask = None if token_mask is None else token_mask
        tokens = selection.shape[0] if count_mask is None else count_mask.sum()
        selections = masked_sum(selection, count_mask)
        kept = selection.sum(dim=-1) if decision.gate_probs is None else None  # one pass, used twice
        if decision.gate_probs is None:  # COMET: uniform over the k kept units / blocks (k is the same for all)
            gate_sum = selections / kept.clamp_min(1.0).max()
        else:
            gate_sum = masked_sum(decision.gate_probs.detach().float(), count_mask)
        weights = torch.ones(selection.shape[0], device=device) if count_mask is None else count_mask.float()
        entropy = (gate_entropy_bits(decision, selection, kept) * weights).sum()
        stats["tokens"] += _kept(valid, torch.as_tensor(tokens, device=device).long())
        stats["selections"] += _kept(valid, selections.round().long())
        stats["gate_sum"] += _kept(valid, gate_sum.double())
        stats["entropy_sum"] += _kept(valid, entropy.double())
        dropped = decision.extras.get("dropped")
        if dropped is not None:
            stats["dropped"] += _kept(valid, (dropped & (weights > 0)).sum())
        (first, second), pair_weights = pairs
        if first.numel():
            overlap, cosine = pair_overlap_and_similarity(selection, inputs, first, second)
            pair_weights = pair_weights.double()
            overlap, cosine = overlap.double(), cosine.double()
            stats["pairs"] += _kept(valid, pair_weights.sum().round().long())
            stats["overlap_sum"] += _kept(valid, (pair_weights * overlap).sum())
            stats["similarity_sum"] += _kept(valid, (pair_weights * cosine).sum())
            stats["overlap_sq"] += _kept(valid, (pair_weights * overlap.square()).sum())
            stats["similarity_sq"] += _kept(valid, (pair_weights * cosine.square()).sum())
            stats["cross"] += _kept(valid, (pair_weights * overlap * cosine).sum())

    def summary(self) -> dict[str, float | int | list[float] | None]:
        """The window's statistics (host sync; call at logging time).

        Keys: ``tokens``; ``tokens_per_expert`` (per unit for unit-level COMET); ``max_load_share`` /
        ``min_load_share`` (share of the routed (token, slot) pairs; 1/E is perfect balance); ``dead_experts``
        (never selected in the window); ``gate_entropy`` (mean per-token entropy H_s of ``gate_probs``, bits);
        ``usage_entropy`` (entropy H_u of the mean ``gate_probs``, bits) and its maximum ``max_usage_entropy``;
        ``dropped_tokens`` (capacity overflow); ``non_finite_decisions`` (forwards whose NaN/inf decision was left
        out of every count); ``mask_overlap`` (mean Jaccard overlap of the selections of random
        token pairs) and ``overlap_similarity_correlation`` (Pearson correlation of that overlap with the pair's
        input cosine similarity; COMET's claim is that it is positive). ``None`` where a window has no data.
        """
        stats = {name: value.double().cpu() for name, value in self.tensors.items()}
        tokens = float(stats["tokens"])
        selections = stats["selections"]
        share = selections / selections.sum() if selections.sum() > 0 else None
        usage = stats["gate_sum"] / stats["gate_sum"].sum() if stats["gate_sum"].sum() > 0 else None
        result: dict[str, float | int | list[float] | None] = {
            "tokens": int(tokens),
            "tokens_per_expert": selections.tolist(),
            "max_load_share": float(share.max()) if share is not None else None,
            "min_load_share": float(share.min()) if share is not None else None,
            "dead_experts": int((selections == 0).sum()) if tokens > 0 else None,
            "gate_entropy": float(stats["entropy_sum"]) / tokens if tokens > 0 else None,
            "usage_entropy": float(-torch.special.xlogy(usage, usage).sum() / math.log(2))
            if usage is not None
            else None,
            "max_usage_entropy": math.log2(self.num_choices),
            "dropped_tokens": int(stats["dropped"]),
            "non_finite_decisions": int(stats["non_finite_decisions"]),
            "mask_overlap": None,
            "overlap_similarity_correlation": None,
        }
        pairs = float(stats["pairs"])
        if pairs > 0:
            mean_x = float(stats["overlap_sum"]) / pairs
            mean_y = float(stats["similarity_sum"]) / pairs
            var_x = float(stats["overlap_sq"]) / pairs - mean_x**2
            var_y = float(stats["similarity_sq"]) / pairs - mean_y**2
            cov = float(stats["cross"]) / pairs - mean_x * mean_y
            result["mask_overlap"] = mean_x
            if var_x > 1e-12 and var_y > 1e-12:
                result["overlap_similarity_correlation"] = cov / math.sqrt(var_x * var_y)
        return result


def new_counter(num_choices: int, device) -> torch.Tensor:
    """A zero (num_choices,) int64 selection counter (what expert merging ranks by)."""
    return _zeros((num_choices,), device, torch.long)


__all__ = [
    "STATISTICS_PAIRS",
    "RoutingStatistics",
    "gate_entropy_bits",
    "new_counter",
    "pair_overlap_and_similarity",
]
