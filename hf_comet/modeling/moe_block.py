"""The MoE feed-forward block (router × experts) and the collector that turns routing decisions into aux losses.

A block never keeps routing state: while a model's forward runs, each block hands its `RoutingDecision` to the
active `RoutingCollector` (a context variable, so threads and nested calls do not mix). After the forward, the
collector computes every router's aux losses over the non-padding tokens and returns router logits on request.
Because the block computes the same thing whether or not a collector listens, activation-checkpointing recompute
(which runs outside the collector) replays the forward exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .moe_experts import CometExperts
from .moe_routers import ROUTER_CLASSES, RoutingDecision


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
        self.router = router_class(config, layer_idx, hidden_size)
        self.experts = CometExperts(config, num_experts, hidden_size, expert_width, activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]
        tokens = hidden_states.reshape(-1, self.hidden_size)
        decision = self.router(tokens)
        if decision.unit_mask is not None:
            output = self.experts.masked_dense_forward(tokens, decision.unit_mask)
        else:
            output = self.experts(tokens, decision.top_k_index, decision.top_k_weights)
        collector = _ACTIVE_COLLECTOR.get()
        if collector is not None:
            collector.record(self, decision, batch_shape)
        return self.dropout(output.view(*batch_shape, self.hidden_size))


class RoutingCollector:
    """Gathers the routing decisions of one model forward and derives aux losses and router logits from them.

    Args:
        attention_mask: the model's 2-D (batch, seq) mask; positions equal to 0 are padding and are left out of
            every aux loss. ``None`` (or a 4-D custom mask) counts every token.
    """

    def __init__(self, attention_mask: torch.Tensor | None = None):
        self.attention_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        self.records: list[tuple[CometMoEBlock, RoutingDecision, torch.Size]] = []

    def record(self, block: CometMoEBlock, decision: RoutingDecision, batch_shape: torch.Size) -> None:
        self.records.append((block, decision, batch_shape))

    def token_mask(self, batch_shape: torch.Size) -> torch.Tensor | None:
        """Flat (T,) bool mask of the non-padding tokens of a block input of shape ``batch_shape``."""
        if self.attention_mask is None or len(batch_shape) != 2 or self.attention_mask.shape[0] != batch_shape[0]:
            return None
        # With a KV cache the mask covers past + current tokens; the block sees only the current ones.
        return self.attention_mask[:, -batch_shape[1] :].reshape(-1).bool()

    def layer_losses(self) -> list[tuple[CometMoEBlock, dict[str, torch.Tensor]]]:
        """Per MoE layer that has any: the block and its router's unweighted aux losses over non-padding tokens."""
        result = []
        for block, decision, batch_shape in self.records:
            losses = block.router.aux_losses(decision, self.token_mask(batch_shape))
            if losses:
                result.append((block, losses))
        return result

    def aux_loss(self) -> torch.Tensor | None:
        """Weighted aux loss: mean over MoE layers of ``sum_name coef[name] * loss[name]``; ``None`` if no router has one."""
        weighted = [
            sum(block.router.loss_weights[name] * value for name, value in losses.items())
            for block, losses in self.layer_losses()
        ]
        return torch.stack(weighted).mean() if weighted else None

    def router_logits(self) -> tuple[torch.Tensor, ...]:
        """Router scores of every MoE layer in forward order, each (T, E) (or (T, F) for COMET)."""
        return tuple(decision.router_logits for _, decision, _ in self.records)


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


__all__ = ["CometMoEBlock", "RoutingCollector", "active_collector", "collect_routing"]
