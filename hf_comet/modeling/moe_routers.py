"""Routers: each one only decides which FFN units or experts a token uses (router × experts, see ``moe_block``).

Contract shared by every router:

* ``expert_layout(config) -> (num_experts, expert_width)``: how the FFN units are grouped into packed experts.
* ``forward(hidden_states (T, d)) -> RoutingDecision``: either a unit mask (T, F) or top-k indices and weights.
* ``aux_losses(decision, token_mask) -> dict[str, Tensor]``: the router's unweighted auxiliary losses, computed over
  the tokens where ``token_mask`` is true (padding excluded); ``loss_weights`` holds their coefficients.

No router knows which model family hosts it. This file travels with saved checkpoints: torch and transformers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_comet import comet_num_active


@dataclass
class RoutingDecision:
    """What a router decided for a flat batch of T tokens.

    Attributes:
        router_logits: the router's raw scores, (T, E) for learned routers, (T, F) projection scores for COMET.
        unit_mask: binary (T, F) mask over the FFN units (COMET); ``None`` for expert routing.
        top_k_index: (T, k) chosen experts; ``None`` for unit masks.
        top_k_weights: (T, k) combine weights of the chosen experts.
        router_probs: (T, E) float32 routing probabilities used by the aux losses.
    """

    router_logits: torch.Tensor
    unit_mask: torch.Tensor | None = None
    top_k_index: torch.Tensor | None = None
    top_k_weights: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None


def masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (T, ...) over dim 0, counting only rows where ``token_mask`` (T,) is true."""
    if token_mask is None:
        return values.mean(dim=0)
    weights = token_mask.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(dim=0) / weights.sum().clamp_min(1.0)


def load_balancing_loss(
    router_probs: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (Fedus et al. 2021, eq. 4-6).

    ``f_e`` is the fraction of routed (token, slot) pairs sent to expert e (it sums to 1 over experts) and ``P_e``
    the mean router probability of e, both over non-padding tokens. A perfectly balanced router scores 1.0 for any
    top-k; this equals transformers' Mixtral ``load_balancing_loss_func`` for one layer divided by k.
    """
    dispatch = F.one_hot(top_k_index, num_experts).to(router_probs.dtype).mean(dim=1)  # (T, E), rows sum to 1
    fraction_routed = masked_mean(dispatch, token_mask)
    mean_prob = masked_mean(router_probs, token_mask)
    return num_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2`` (Zoph et al. 2022)."""
    return masked_mean(torch.logsumexp(router_logits.float(), dim=-1).square(), token_mask)


class Router(nn.Module):
    """Base class of all routers: see the module docstring for the contract."""

    loss_weights: dict[str, float] = {}

    @classmethod
    def expert_layout(cls, config) -> tuple[int, int]:
        raise NotImplementedError

    def aux_losses(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary losses of this decision (none by default)."""
        return {}


class CometRouter(Router):
    """COMET (Shaier et al., ICLR 2025): a fixed random projection picks, per token, which FFN units are on.

    ``scores = u @ V^T`` with V of shape (F, d), entries U(-1/sqrt(d), 1/sqrt(d)), drawn once from the config's
    ``routing_seed`` and the layer index (in ``_init_weights``) and stored as a persistent buffer, so checkpoints
    carry it and it is never redrawn. The mask keeps exactly ``k = max(1, floor(keep_rate * F))`` units per token
    (``topk`` + scatter: ties do not inflate k, unlike the official code's ``>=`` threshold). The mask is binary,
    applied after the activation, not rescaled, and identical in training and evaluation. No parameters, no
    gradient, no auxiliary loss.
    """

    def __init__(self, config, layer_idx: int, hidden_size: int):
        super().__init__()
        num_units = config.ffn_width
        self.layer_idx = layer_idx
        self.num_active = comet_num_active(config.comet_keep_rate, num_units)
        self.register_buffer("projection", torch.empty(num_units, hidden_size), persistent=True)

    @classmethod
    def expert_layout(cls, config) -> tuple[int, int]:
        return 1, config.ffn_width  # unit-level COMET: the whole FFN is one group of units, masked per token

    def reset_projection(self, seed: int) -> torch.Tensor:
        """Draw V reproducibly from ``seed`` and this router's layer index (on CPU, so every device agrees)."""
        num_units, hidden_size = self.projection.shape
        generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + self.layer_idx)
        bound = hidden_size**-0.5
        return torch.empty(num_units, hidden_size).uniform_(-bound, bound, generator=generator)

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor) -> RoutingDecision:
        scores = F.linear(hidden_states, self.projection.to(hidden_states.dtype))
        if self.num_active == scores.shape[-1]:
            mask = torch.ones_like(scores)
        else:
            keep = scores.topk(self.num_active, dim=-1, sorted=False).indices
            mask = torch.zeros_like(scores).scatter_(-1, keep, 1.0)
        return RoutingDecision(router_logits=scores, unit_mask=mask)


class TopKRouter(Router):
    """Learned softmax top-k gate (Mixtral style): ``softmax(u @ W^T)`` in float32, keep the k largest.

    With ``norm_topk_prob`` the kept probabilities are renormalised to sum to 1 (Mixtral; this makes E identical
    experts reproduce the dense FFN exactly). Aux losses: the Switch load-balancing loss and the ST-MoE z-loss.
    """

    def __init__(self, config, layer_idx: int, hidden_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.loss_weights = {
            "load_balancing_loss": float(config.router_aux_loss_coef),
            "z_loss": float(config.router_z_loss_coef),
        }

    @classmethod
    def expert_layout(cls, config) -> tuple[int, int]:
        return config.num_experts, config.expert_intermediate_size

    def forward(self, hidden_states: torch.Tensor) -> RoutingDecision:
        logits = F.linear(hidden_states, self.weight)
        probs = logits.float().softmax(dim=-1)
        top_weights, top_index = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return RoutingDecision(
            router_logits=logits,
            top_k_index=top_index,
            top_k_weights=top_weights.to(hidden_states.dtype),
            router_probs=probs,
        )

    def aux_losses(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        losses = {
            "load_balancing_loss": load_balancing_loss(
                decision.router_probs, decision.top_k_index, self.num_experts, token_mask
            )
        }
        if self.loss_weights["z_loss"] > 0:
            losses["z_loss"] = router_z_loss(decision.router_logits, token_mask)
        return losses


ROUTER_CLASSES: dict[str, type[Router]] = {"comet": CometRouter, "topk": TopKRouter}
"""``config.routing`` value -> router class; later routers register here."""

__all__ = [
    "ROUTER_CLASSES",
    "CometRouter",
    "Router",
    "RoutingDecision",
    "TopKRouter",
    "load_balancing_loss",
    "masked_mean",
    "router_z_loss",
]
