"""The MoE feed-forward block (router × experts), its running counters, and the collector of routing decisions.

During a model forward each block hands its `RoutingDecision` to the active `RoutingCollector` (a context variable,
so threads and nested calls do not mix). After the forward the collector computes every layer's aux losses over the
non-padding tokens and *commits* the decisions: routing statistics, expert selection counts (for merging) and router
running state (Deep-MoE totals) are updated then, once per forward. Activation-checkpointing recompute runs outside
the collector, so it replays the forward exactly and counts nothing twice.

Counters are plain tensors on the block, not buffers: DDP would otherwise overwrite each rank's counts with rank 0's
at every forward (``broadcast_buffers``). They accumulate on the device without host syncs; reading them syncs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from .moe_experts import CometExperts
from .moe_routers import ROUTER_CLASSES, RoutingDecision, masked_sum, sample_similarity_loss

STATISTICS_PAIRS = 64
"""Token pairs sampled per layer and forward for the overlap-vs-similarity statistic."""

MERGE_METHODS = ("mean", "count_weighted")

DENSE_BLOCK_FRACTION = 0.5
"""Block-COMET keeping more than this fraction of blocks runs as masked dense compute: the token-choice kernels copy
each token once per kept block, which costs more than the FLOPs they save once over half the blocks are on
(benchmarks/bench_block_comet.py: at keep 1.0 kernels 2.4x the dense FFN, masked dense 1.3x; at keep 0.25 kernels
0.4x)."""


@dataclass
class ExpertMerge:
    """One expert merge: ``into`` was overwritten by a combination of ``sources``.

    ``parameters`` maps qualified parameter names to the packed tensors whose slice ``[into]`` changed: reset the
    optimizer state of exactly those slices (`hf_comet.reset_merged_optimizer_state`).
    """

    layer_idx: int
    sources: tuple[int, int]
    into: int
    how: str
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)


class CometMoEBlock(nn.Module):
    """One FFN turned into router × experts: ``(..., d) -> (..., d)``, a drop-in for the family's FFN.

    ``dropout`` is applied to the output for families whose dense FFN owns its output dropout (GPT-2).
    """

    def __init__(self, config, layer_idx: int, hidden_size: int, activation: str, dropout: float = 0.0):
        super().__init__()
        router_class = ROUTER_CLASSES[config.routing]
        num_experts, expert_width = router_class.expert_layout(config)
        self.layer_idx = layer_idx
        self.hidden_size = hidden_size
        self.routing = config.routing
        self.router = router_class(config, layer_idx, hidden_size)
        block_comet = config.routing == "comet" and config.comet_block_size > 1
        shared_bias = block_comet or (config.expert_output_bias == "shared" and num_experts > 1)
        self.experts = CometExperts(
            config, num_experts, hidden_size, expert_width, activation, shared_output_bias=shared_bias
        )
        self.dropout = nn.Dropout(dropout)
        # what the statistics count: FFN units for unit-level COMET, experts (or COMET blocks) otherwise
        self.num_choices = expert_width if config.routing == "comet" and not block_comet else num_experts
        self.similarity_betas = (float(config.similarity_beta_s), float(config.similarity_beta_d))
        self.similarity_num_pairs = config.similarity_num_pairs
        self.loss_weights = dict(self.router.loss_weights)
        if any(self.similarity_betas):
            self.loss_weights["similarity_loss"] = 1.0  # the betas are applied inside the loss
        self.track_statistics = True
        self._pair_seed = config.routing_seed * 1_000_003 + layer_idx + 7_919
        self._pair_generator: torch.Generator | None = None
        self._statistics: dict[str, torch.Tensor] | None = None
        self._selection_counts: torch.Tensor | None = None
        self._last_token_mask: torch.Tensor | None = None

    def replace_router(self, router: nn.Module, routing: str) -> None:
        """Swap in another router over the same experts (used by gate distillation) and its loss weights."""
        self.router = router
        self.routing = routing
        self.loss_weights = dict(router.loss_weights)
        if any(self.similarity_betas):
            self.loss_weights["similarity_loss"] = 1.0

    @property
    def learned(self) -> bool:
        """Whether this block has a trainable gate over experts (everything but COMET)."""
        return self.routing != "comet"

    # -- forward -------------------------------------------------------------------------------------------------
    @property
    def experts_module(self) -> CometExperts:
        """The packed experts, also when a wrapper (PEFT's ParamWrapper) sits around them."""
        experts = self.experts
        while not isinstance(experts, CometExperts) and hasattr(experts, "get_base_layer"):
            experts = experts.get_base_layer()
        return experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]
        tokens = hidden_states.reshape(-1, self.hidden_size)
        collector = _ACTIVE_COLLECTOR.get()
        if collector is not None:
            self.router.refresh_state()
        activations = None
        if self.router.reads_expert_activations:  # attentive: keys come from every expert's activations
            activations = self.experts(tokens, activations_only=True)
            decision = self.router(tokens, activations)
        elif self.router.accepts_token_mask:  # switch: padding takes no place in the capacity queues
            decision = self.router(tokens, token_mask=self._routing_token_mask(collector, batch_shape))
        else:
            decision = self.router(tokens)

        if decision.unit_mask is not None:  # unit-level COMET
            output = self.experts(tokens, unit_mask=decision.unit_mask)
        elif self._dense_is_cheaper(decision):  # block-COMET keeping most blocks
            experts = self.experts_module
            block_mask = torch.zeros(tokens.shape[0], experts.num_experts, device=tokens.device)
            block_mask.scatter_(1, decision.top_k_index, 1.0)
            output = self.experts(tokens, unit_mask=block_mask.repeat_interleave(experts.intermediate_size, dim=1))
        elif decision.expert_weights is not None:  # dense mixture
            output = self.experts(
                tokens if activations is None else activations, expert_weights=decision.expert_weights
            )
        else:  # sparse: packed-expert kernels
            output = self.experts(tokens, decision.top_k_index, decision.top_k_weights)
        if collector is not None:
            collector.record(self, decision, batch_shape, tokens)
        return self.dropout(output.view(*batch_shape, self.hidden_size))

    def _dense_is_cheaper(self, decision: RoutingDecision) -> bool:
        """The one place that picks the execution strategy of a sparse decision with weight-1 blocks (block-COMET):
        masked dense compute when more than ``DENSE_BLOCK_FRACTION`` of the blocks are kept per token, the
        packed-expert kernels otherwise (see benchmarks/bench_block_comet.py)."""
        if self.routing != "comet" or decision.top_k_index is None:
            return False
        return decision.top_k_index.shape[1] > DENSE_BLOCK_FRACTION * self.experts_module.num_experts

    def _routing_token_mask(self, collector, batch_shape: torch.Size) -> torch.Tensor | None:
        """The non-padding mask for routers that need it in the forward. Kept from the routed forward so that an
        activation-checkpointing recompute (which runs without the collector) routes the same way."""
        if collector is not None:
            self._last_token_mask = collector.token_mask(batch_shape)
        mask = self._last_token_mask
        return mask if mask is not None and mask.numel() == batch_shape.numel() else None

    # -- losses --------------------------------------------------------------------------------------------------
    def aux_losses(
        self, decision: RoutingDecision, inputs: torch.Tensor, token_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The router's unweighted aux losses plus the sample-similarity regulariser when its betas are set."""
        losses = self.router.aux_losses(decision, token_mask)
        if "similarity_loss" in self.loss_weights and decision.router_probs is not None:
            pairs, weights = self._sample_pairs(inputs.shape[0], self.similarity_num_pairs, token_mask, inputs.device)
            losses["similarity_loss"] = sample_similarity_loss(
                inputs, decision.router_probs, pairs, *self.similarity_betas, pair_weights=weights
            )
        return losses

    def _sample_pairs(
        self, num_tokens: int, num_pairs: int, token_mask: torch.Tensor | None, device: torch.device
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``num_pairs`` random pairs of distinct tokens from a private generator (the global RNG is untouched),
        and per-pair weights that are 0 where a pair touches padding (no host sync to filter them)."""
        if num_tokens < 2:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return (empty, empty), torch.zeros(0, device=device)
        if self._pair_generator is None or self._pair_generator.device != device:
            self._pair_generator = torch.Generator(device=device).manual_seed(self._pair_seed)
        first = torch.randint(0, num_tokens, (num_pairs,), device=device, generator=self._pair_generator)
        offset = torch.randint(1, num_tokens, (num_pairs,), device=device, generator=self._pair_generator)
        second = (first + offset) % num_tokens
        if token_mask is None:
            weights = torch.ones(num_pairs, device=device)
        else:
            weights = (token_mask[first] & token_mask[second]).float()
        return (first, second), weights

    # -- running counters ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def commit(
        self, decision: RoutingDecision, inputs: torch.Tensor, token_mask: torch.Tensor | None, training: bool
    ) -> None:
        """Fold one forward's decision into the counters (after the forward; see the module docstring)."""
        if not training and not self.track_statistics:
            return
        selection = decision.selection_mask(self.num_choices)
        if training:
            if self.learned:
                counts = masked_sum(selection, token_mask)
                if self._selection_counts is None:
                    self._selection_counts = _fresh_zeros(counts.shape, counts.device)
                elif self._selection_counts.device != counts.device:  # the model moved: keep the counts
                    self._selection_counts = self._selection_counts.to(counts.device)
                self._selection_counts += counts
            self.router.commit(decision, token_mask)
        if self.track_statistics:
            self._update_statistics(decision, selection, inputs, token_mask)

    def _update_statistics(
        self,
        decision: RoutingDecision,
        selection: torch.Tensor,
        inputs: torch.Tensor,
        token_mask: torch.Tensor | None,
    ) -> None:
        device = selection.device
        if self._statistics is None:
            self.reset_statistics(device)
        elif self._statistics["tokens"].device != device:  # the model moved: keep the window
            self._statistics = {name: value.to(device) for name, value in self._statistics.items()}
        stats = self._statistics
        valid = torch.ones(selection.shape[0], device=device) if token_mask is None else token_mask.float()
        selections = masked_sum(selection, token_mask)
        if decision.router_probs is None:  # COMET: uniform over the k kept units / blocks (k is the same for all)
            per_token = selection.sum(dim=-1).clamp_min(1.0)
            entropy = torch.log2(per_token)
            gate_sum = selections / per_token.max()
        else:
            probs = decision.router_probs.detach().float()
            entropy = -torch.special.xlogy(probs, probs).sum(dim=-1) / math.log(2)
            gate_sum = masked_sum(probs, token_mask)
        stats["tokens"] += valid.sum()
        stats["selections"] += selections
        stats["gate_sum"] += gate_sum
        stats["entropy_sum"] += (entropy * valid).sum()
        dropped = decision.extras.get("dropped")
        if dropped is not None:
            stats["dropped"] += (dropped.float() * valid).sum()
        # mask overlap (Jaccard) between token pairs vs. cosine similarity of their inputs
        (first, second), weights = self._sample_pairs(selection.shape[0], STATISTICS_PAIRS, token_mask, device)
        if first.numel():
            sel_i, sel_j = selection[first], selection[second]
            union = torch.maximum(sel_i, sel_j).sum(dim=-1)
            overlap = (sel_i * sel_j).sum(dim=-1) / union.clamp_min(1.0)
            cosine = torch.nn.functional.cosine_similarity(inputs[first].float(), inputs[second].float(), dim=-1)
            stats["pairs"] += weights.sum()
            stats["overlap_sum"] += (weights * overlap).sum()
            stats["similarity_sum"] += (weights * cosine).sum()
            stats["overlap_sq"] += (weights * overlap.square()).sum()
            stats["similarity_sq"] += (weights * cosine.square()).sum()
            stats["cross"] += (weights * overlap * cosine).sum()

    def reset_statistics(self, device: torch.device | None = None) -> None:
        """Start a fresh statistics window."""
        if device is None:
            device = self.experts_module.up_proj.device
        scalars = ("tokens", "entropy_sum", "dropped", "pairs", "overlap_sum", "similarity_sum")
        scalars += ("overlap_sq", "similarity_sq", "cross")
        stats = {name: _fresh_zeros((), device) for name in scalars}
        stats["selections"] = _fresh_zeros((self.num_choices,), device)
        stats["gate_sum"] = _fresh_zeros((self.num_choices,), device)
        self._statistics = stats

    def statistics_tensors(self) -> dict[str, torch.Tensor]:
        """The raw accumulators (sums, so they can be all-reduced across ranks before `routing_statistics`)."""
        if self._statistics is None:
            self.reset_statistics()
        return self._statistics

    def routing_statistics(self) -> dict[str, float | int | list[float] | None]:
        """This layer's routing statistics over the current window (host sync; call at logging time).

        Keys: ``tokens``; ``tokens_per_expert`` (per unit for unit-level COMET); ``max_load_share`` /
        ``min_load_share`` (share of the routed (token, slot) pairs; 1/E is perfect balance); ``dead_experts``
        (never selected in the window); ``gate_entropy`` (mean per-token entropy H_s of the gate, bits);
        ``usage_entropy`` (entropy H_u of the mean gate, bits) and its maximum ``max_usage_entropy``;
        ``dropped_tokens`` (capacity overflow); ``mask_overlap`` (mean Jaccard overlap of the selections of random
        token pairs) and ``overlap_similarity_correlation`` (Pearson correlation of that overlap with the pair's
        input cosine similarity; COMET's claim is that it is positive). ``None`` where a window has no data.
        """
        stats = {name: value.double().cpu() for name, value in self.statistics_tensors().items()}
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

    @property
    def selection_counts(self) -> torch.Tensor:
        """(E,) tokens routed to each expert in training since the last merge (what expert merging ranks by)."""
        if self._selection_counts is None:
            self._selection_counts = _fresh_zeros((self.num_choices,), self.experts_module.up_proj.device)
        return self._selection_counts

    def reset_selection_counts(self) -> None:
        self._selection_counts = None

    # -- expert merging (Park 2024) ------------------------------------------------------------------------------
    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor indexed by expert on dim 0 that defines an expert: the packed weights and router key maps."""
        experts = self.experts_module  # not a PEFT wrapper's adapter tensors
        tensors = {name: param for name, param in experts.named_parameters(prefix="experts") if param.dim() >= 1}
        tensors.pop("experts.output_bias", None)
        for name, tensor in self.router.expert_parameters().items():
            tensors[f"router.{name}"] = tensor
        return tensors

    @torch.no_grad()
    def merge_experts(self, source_a: int, source_b: int, into: int, how: str = "mean") -> ExpertMerge:
        """Overwrite expert ``into`` with the combination of experts ``source_a`` and ``source_b`` and reset the
        selection counts (Park 2024, methods.md §3.4). ``how="mean"`` averages the parameters; ``"count_weighted"``
        weights them by the sources' selection counts (plain mean when both are 0). The router's row for ``into`` is
        left as is (the router learns the new expert's role afterwards); attentive key maps are merged with the
        experts. Returns the changed tensors so the caller can reset their optimizer state."""
        if not self.learned:
            raise ValueError(
                f"layer {self.layer_idx} uses routing='comet': its experts are overlapping unit masks of one FFN with "
                "no separate expert weights, so there is nothing to merge."
            )
        if how not in MERGE_METHODS:
            raise ValueError(f"how={how!r} is not a merge method; choose one of {', '.join(MERGE_METHODS)}.")
        num_experts = self.experts_module.num_experts
        for name, index in (("source_a", source_a), ("source_b", source_b), ("into", into)):
            if not 0 <= index < num_experts:
                raise ValueError(f"{name}={index} is outside [0, {num_experts - 1}] (layer {self.layer_idx}).")
        if source_a == source_b:
            raise ValueError(f"source_a and source_b are both {source_a}: merging needs two different experts.")
        weight_a = weight_b = 0.5
        if how == "count_weighted":
            counts = self.selection_counts
            total = float(counts[source_a] + counts[source_b])
            if total > 0:
                weight_a = float(counts[source_a]) / total
                weight_b = 1.0 - weight_a
        changed = self.expert_tensors()
        for tensor in changed.values():
            tensor[into] = weight_a * tensor[source_a] + weight_b * tensor[source_b]  # RHS is computed first
        self.reset_selection_counts()
        return ExpertMerge(self.layer_idx, (source_a, source_b), into, how, parameters=changed)


def _fresh_zeros(shape, device) -> torch.Tensor:
    """A float32 zero tensor that stays a normal tensor even when created under ``torch.inference_mode``."""
    with torch.inference_mode(False):
        return torch.zeros(shape, device=device, dtype=torch.float32)


class RoutingCollector:
    """Gathers the routing decisions of one model forward and derives aux losses and router logits from them.

    Args:
        attention_mask: the model's 2-D (batch, seq) mask; positions equal to 0 are padding and are left out of
            every aux loss and statistic. ``None`` (or a 4-D custom mask) counts every token.
    """

    def __init__(self, attention_mask: torch.Tensor | None = None):
        self.attention_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        self.records: list[tuple[CometMoEBlock, RoutingDecision, torch.Size, torch.Tensor]] = []
        self._layer_losses: list[tuple[CometMoEBlock, dict[str, torch.Tensor]]] | None = None

    def record(
        self, block: CometMoEBlock, decision: RoutingDecision, batch_shape: torch.Size, inputs: torch.Tensor
    ) -> None:
        self.records.append((block, decision, batch_shape, inputs))
        self._layer_losses = None

    def token_mask(self, batch_shape: torch.Size) -> torch.Tensor | None:
        """Flat (T,) bool mask of the non-padding tokens of a block input of shape ``batch_shape``."""
        if self.attention_mask is None or len(batch_shape) != 2 or self.attention_mask.shape[0] != batch_shape[0]:
            return None
        # With a KV cache the mask covers past + current tokens; the block sees only the current ones.
        return self.attention_mask[:, -batch_shape[1] :].reshape(-1).bool()

    def layer_losses(self) -> list[tuple[CometMoEBlock, dict[str, torch.Tensor]]]:
        """Per MoE layer that has any: the block and its unweighted aux losses over non-padding tokens (computed
        once per forward, so sampled regularisers are consistent between callers)."""
        if self._layer_losses is None:
            result = []
            for block, decision, batch_shape, inputs in self.records:
                losses = block.aux_losses(decision, inputs, self.token_mask(batch_shape))
                if losses:
                    result.append((block, losses))
            self._layer_losses = result
        return self._layer_losses

    def aux_loss(self) -> torch.Tensor | None:
        """Weighted aux loss: mean over MoE layers of ``sum_name coef[name] * loss[name]``; ``None`` if no router has one."""
        weighted = [
            sum(block.loss_weights[name] * value for name, value in losses.items())
            for block, losses in self.layer_losses()
        ]
        return torch.stack(weighted).mean() if weighted else None

    def router_logits(self) -> tuple[torch.Tensor, ...]:
        """Router scores of every MoE layer in forward order, each (T, E) (or (T, F) for COMET)."""
        return tuple(decision.router_logits for _, decision, _, _ in self.records)

    def commit(self, training: bool) -> None:
        """Fold every recorded decision into its block's counters and its router's running state."""
        for block, decision, batch_shape, inputs in self.records:
            block.commit(decision, inputs.detach(), self.token_mask(batch_shape), training)


_ACTIVE_COLLECTOR: ContextVar[RoutingCollector | None] = ContextVar("hf_comet_routing_collector", default=None)


def active_collector() -> RoutingCollector | None:
    """The collector of the forward that is running, if any."""
    return _ACTIVE_COLLECTOR.get()


@contextmanager
def collect_routing(attention_mask: torch.Tensor | None = None) -> Iterator[RoutingCollector]:
    """Collect the routing decisions of the MoE blocks that run inside this context."""
    collector = RoutingCollector(attention_mask)
    token = _ACTIVE_COLLECTOR.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE_COLLECTOR.reset(token)


__all__ = ["CometMoEBlock", "ExpertMerge", "RoutingCollector", "active_collector", "collect_routing"]
