"""Routers: each one only decides which FFN units or experts a token uses (router × experts, see ``moe_block``).

Contract shared by every router:

* ``expert_layout(config) -> (num_experts, expert_width)``: how the FFN units are grouped into packed experts.
* ``forward(hidden_states (T, d)) -> RoutingDecision``: a unit mask (T, F), top-k indices and weights, or dense
  mixture weights (T, E). Routers with ``reads_expert_activations`` (attentive) also receive every expert's
  intermediate activations (T, E, I).
* ``aux_losses(decision, token_mask) -> dict[str, Tensor]``: the router's unweighted auxiliary losses, computed over
  the tokens where ``token_mask`` is true (padding excluded); ``loss_weights`` holds their coefficients.
* ``commit(decision, token_mask)``: called once per training forward, after it, for routers with running state
  (``deep``'s assignment totals). Never called during activation-checkpointing recompute.
* ``expert_parameters()``: router tensors indexed by expert on dim 0 that belong to the experts (attentive key maps),
  so expert merging moves them with the experts.

No router knows which model family hosts it. This file travels with saved checkpoints: torch and transformers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_comet import comet_num_active


@dataclass
class RoutingDecision:
    """What a router decided for a flat batch of T tokens.

    Exactly one of ``unit_mask``, ``top_k_index``/``top_k_weights`` and ``expert_weights`` says how to combine.

    Attributes:
        router_logits: the router's raw scores, (T, E) for learned routers, (T, F) projection scores for COMET
            ((T, F / comet_block_size) for block-COMET).
        unit_mask: binary (T, F) mask over the FFN units (unit-level COMET).
        top_k_index: (T, k) chosen experts.
        top_k_weights: (T, k) combine weights of the chosen experts (0 for tokens dropped by a capacity limit).
        expert_weights: (T, E) dense mixture weights (attentive/deep without ``mixture_top_k``).
        router_probs: (T, E) float32 gate distribution the router combines with (rows sum to 1); ``None`` for COMET.
        extras: router-specific tensors its aux losses or the statistics need (e.g. ``dropped`` (T,) bool for Switch,
            ``load`` (T, E) for noisy top-k).
    """

    router_logits: torch.Tensor
    unit_mask: torch.Tensor | None = None
    top_k_index: torch.Tensor | None = None
    top_k_weights: torch.Tensor | None = None
    expert_weights: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def selection_mask(self, num_choices: int) -> torch.Tensor:
        """(T, num_choices) float 0/1: which experts (or units) each token was routed to.

        Dense mixtures count their highest-weight expert, so usage statistics and merge counts stay comparable
        with top-1/top-k routers. Tokens dropped by a capacity limit select nothing.
        """
        if self.unit_mask is not None:
            return self.unit_mask.float()
        if self.top_k_index is not None:
            selected = torch.zeros(
                self.top_k_index.shape[0], num_choices, device=self.top_k_index.device, dtype=torch.float32
            )
            selected.scatter_(1, self.top_k_index, 1.0)
            dropped = self.extras.get("dropped")
            if dropped is not None:
                selected = selected * (~dropped).unsqueeze(-1)
            return selected
        weights = self.expert_weights
        return F.one_hot(weights.argmax(dim=-1), num_choices).float()


# -- loss functions (pure, tested against hand computations) -------------------------------------------------------
def masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (T, ...) over dim 0, counting only rows where ``token_mask`` (T,) is true."""
    if token_mask is None:
        return values.mean(dim=0)
    weights = token_mask.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(dim=0) / weights.sum().clamp_min(1.0)


def masked_sum(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of ``values`` (T, ...) over dim 0, counting only rows where ``token_mask`` (T,) is true."""
    if token_mask is None:
        return values.sum(dim=0)
    return (values * token_mask.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))).sum(dim=0)


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


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (unbiased variance), as in Shazeer et al. 2017.

    0 for a single value; ``eps`` keeps an all-zero vector finite.
    """
    values = values.float()
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var() / (values.mean().square() + eps)


def noisy_top_k_load(
    clean_logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: torch.Tensor, top_values: torch.Tensor, k: int
) -> torch.Tensor:
    """Smooth load estimator of noisy top-k gating (Shazeer et al. 2017, appendix A): per token and expert, the
    probability that the expert is in the top k when only its own noise is re-drawn.

    ``top_values`` (T, k + 1) are the k+1 largest noisy logits. An expert currently in the top k stays in if its noisy
    logit beats the (k+1)-th value; one outside gets in if it beats the k-th. Returns (T, E) probabilities.
    """
    threshold_if_in = top_values[:, k : k + 1]
    threshold_if_out = top_values[:, k - 1 : k]
    is_in = noisy_logits > threshold_if_in
    prob_if_in = torch.special.ndtr((clean_logits - threshold_if_in) / noise_std)  # no validation, no host sync
    prob_if_out = torch.special.ndtr((clean_logits - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out)


def sample_similarity_loss(
    inputs: torch.Tensor,
    gates: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    beta_s: float,
    beta_d: float,
    pair_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample-similarity regulariser L_s of Krishnamurthy et al. 2023 on token pairs (methods.md §2.5, §2.9).

    For pairs (i, j) with distance ``D_ij = ||u_i - u_j|| / max_pairs ||u - u'||`` between the FFN inputs::

        S_same = 1 / E        * mean_pairs  sum_e        g_e(i) g_e(j)  D_ij
        S_diff = 1 / (E(E-1)) * mean_pairs  sum_{e!=e'}  g_e(i) g_e'(j) D_ij
        L_s    = beta_s * S_same - beta_d * S_diff

    Distant tokens that share an expert are penalised, distant tokens on different experts rewarded. We take means
    over sampled pairs where the authors' code sums over all B^2 pairs and divides only the beta_d term by B^2, so
    our beta_s equals theirs times B^2 (their MNIST attentive setting beta_s=1e-6 at B=512 is about 0.26 here) and
    beta_d is theirs. ``sum_{e!=e'}`` is computed as ``sum_e g_e(i) * sum_e g_e(j) - sum_e g_e(i) g_e(j)``, O(E).
    ``pair_weights`` (P,) zero out pairs that touch padding.
    """
    first, second = pairs
    num_experts = gates.shape[-1]
    if first.numel() == 0 or num_experts < 2:
        return gates.new_zeros((), dtype=torch.float32)
    weights = torch.ones_like(first, dtype=torch.float32) if pair_weights is None else pair_weights.float()
    distance = (inputs[first].float() - inputs[second].float()).norm(dim=-1).detach()
    distance = distance / (distance * weights).max().clamp_min(1e-12)
    gates_i, gates_j = gates[first].float(), gates[second].float()
    same = (gates_i * gates_j).sum(dim=-1)
    different = gates_i.sum(dim=-1) * gates_j.sum(dim=-1) - same
    normaliser = weights.sum().clamp_min(1.0)
    s_same = (weights * distance * same).sum() / normaliser / num_experts
    s_diff = (weights * distance * different).sum() / normaliser / (num_experts * (num_experts - 1))
    return beta_s * s_same - beta_d * s_diff


def _top_k_renormalised(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``scores`` (T, E) and the softmax over the survivors (float32): weights sum to 1 per token."""
    top_scores, top_index = scores.topk(k, dim=-1)
    return top_index, top_scores.float().softmax(dim=-1)


# -- routers ---------------------------------------------------------------------------------------------------------
class Router(nn.Module):
    """Base class of all routers: see the module docstring for the contract."""

    loss_weights: dict[str, float] = {}
    reads_expert_activations: bool = False
    accepts_token_mask: bool = False  # forward(hidden_states, token_mask=...) with the (T,) non-padding mask

    @classmethod
    def expert_layout(cls, config) -> tuple[int, int]:
        """Learned routers gate ``num_experts`` experts of ``expert_intermediate_size`` units (COMET overrides)."""
        return config.num_experts, config.expert_intermediate_size

    def aux_losses(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary losses of this decision (none by default)."""
        return {}

    def refresh_state(self) -> None:
        """Called at the start of every routed model forward, before routing (routers with running state)."""

    def commit(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> None:
        """Update running state after a training forward (never during activation-checkpointing recompute)."""

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        """Router tensors indexed by expert on dim 0 that travel with their expert when experts are merged."""
        return {}


class CometRouter(Router):
    """COMET (Shaier et al., ICLR 2025): a fixed random projection picks, per token, which FFN units are on.

    ``scores = u @ V^T`` with V of shape (F, d), entries U(-1/sqrt(d), 1/sqrt(d)), drawn once from the config's
    ``routing_seed`` and the layer index (in ``_init_weights``) and stored as a persistent buffer, so checkpoints
    carry it and it is never redrawn. The mask keeps exactly ``k = max(1, floor(keep_rate * F))`` units per token
    (``topk`` + scatter: ties do not inflate k, unlike the official code's ``>=`` threshold). The mask is binary,
    applied after the activation, not rescaled, and identical in training and evaluation. No parameters, no
    gradient, no auxiliary loss.

    Block-COMET (``comet_block_size = b > 1``, our extension): V has F / b rows, one per block of b consecutive
    units; each token keeps the top ``max(1, floor(keep_rate * F / b))`` blocks with weight 1. The blocks are the
    packed experts, so only the kept blocks are computed; the FFN's output bias is added once (as in the dense FFN).
    """

    def __init__(self, config, layer_idx: int, hidden_size: int):
        super().__init__()
        self.block_size = config.comet_block_size
        num_groups = config.ffn_width // self.block_size
        self.layer_idx = layer_idx
        self.num_active = comet_num_active(config.comet_keep_rate, num_groups)
        self.register_buffer("projection", torch.empty(num_groups, hidden_size), persistent=True)

    @classmethod
    def expert_layout(cls, config) -> tuple[int, int]:
        if config.comet_block_size > 1:
            return config.ffn_width // config.comet_block_size, config.comet_block_size
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
        if self.block_size > 1:
            keep = scores.topk(self.num_active, dim=-1, sorted=False).indices
            return RoutingDecision(
                router_logits=scores, top_k_index=keep, top_k_weights=torch.ones_like(keep, dtype=scores.dtype)
            )
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
        self.scale = float(config.router_scale)
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.loss_weights = {
            "load_balancing_loss": float(config.router_aux_loss_coef),
            "z_loss": float(config.router_z_loss_coef),
        }

    def forward(self, hidden_states: torch.Tensor) -> RoutingDecision:
        logits = F.linear(hidden_states, self.weight)
        probs = logits.float().softmax(dim=-1)
        top_weights, top_index = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        if self.scale != 1.0:
            top_weights = top_weights * self.scale
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


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017): ``H = u W_g^T + eps * (softplus(u W_n^T) + 1e-2)`` in training,
    ``eps ~ N(0, 1)``; keep the k largest of H and softmax over them (zero elsewhere). No noise in evaluation.

    Both ``W_g`` and ``W_n`` start at zero (the paper's initialisation: all experts equal, routing by noise at first).
    The 1e-2 noise floor follows MoE-Adapters. Aux losses, each weighted by ``router_aux_loss_coef``:
    ``importance_loss = cv^2(sum_tokens gates)`` and ``load_loss = cv^2(sum_tokens P(e in top-k))`` with the smooth
    load estimator of `noisy_top_k_load` (the hard count when noise is off or k = E).
    """

    noise_floor = 1e-2

    def __init__(self, config, layer_idx: int, hidden_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.noise_weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.scale = float(config.router_scale)
        coef = float(config.router_aux_loss_coef)
        self.loss_weights = {"importance_loss": coef, "load_loss": coef, "z_loss": float(config.router_z_loss_coef)}

    def forward(self, hidden_states: torch.Tensor) -> RoutingDecision:
        clean = F.linear(hidden_states, self.weight).float()
        noisy = self.training and self.top_k < self.num_experts
        if noisy:
            noise_std = F.softplus(F.linear(hidden_states, self.noise_weight).float()) + self.noise_floor
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        top_values, top_index = logits.topk(min(self.top_k + 1, self.num_experts), dim=-1)
        top_k_index = top_index[:, : self.top_k]
        top_k_weights = top_values[:, : self.top_k].softmax(dim=-1)
        gates = torch.zeros_like(logits).scatter(1, top_k_index, top_k_weights)
        if self.scale != 1.0:
            top_k_weights = top_k_weights * self.scale  # the combine weights; the gate distribution stays a softmax
        if noisy:
            load = noisy_top_k_load(clean, logits, noise_std, top_values, self.top_k)
        else:
            load = (gates > 0).float()
        return RoutingDecision(
            router_logits=logits,
            top_k_index=top_k_index,
            top_k_weights=top_k_weights.to(hidden_states.dtype),
            router_probs=gates,
            extras={"load": load},
        )

    def aux_losses(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        losses = {
            "importance_loss": cv_squared(masked_sum(decision.router_probs, token_mask)),
            "load_loss": cv_squared(masked_sum(decision.extras["load"], token_mask)),
        }
        if self.loss_weights["z_loss"] > 0:
            losses["z_loss"] = router_z_loss(decision.router_logits, token_mask)
        return losses


class SwitchRouter(Router):
    """Switch Transformer routing (Fedus et al. 2021): top-1 of ``softmax(u @ W^T)``, output scaled by that
    probability (not renormalised).

    In training the router input is multiplied by ``U(1 - eps, 1 + eps)`` jitter (``router_jitter_noise``). With
    ``capacity_factor``, in training, each expert takes at most ``ceil(capacity_factor * T / E)`` of the T
    non-padding tokens of the forward, first come first served in token order (padding takes no place in a queue);
    the rest are dropped: their FFN output is zero, so they ride the residual connection (``extras["dropped"]``,
    counted by the statistics). Evaluation and generation are dropless, so a token's output never depends on the
    other tokens of the batch or on the KV cache. Dropless by default. Aux losses: the Switch load-balancing loss
    (on the pre-capacity assignment) and the optional z-loss.
    """

    accepts_token_mask = True

    def __init__(self, config, layer_idx: int, hidden_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.capacity_factor = config.capacity_factor
        self.jitter_noise = float(config.router_jitter_noise)
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.loss_weights = {
            "load_balancing_loss": float(config.router_aux_loss_coef),
            "z_loss": float(config.router_z_loss_coef),
        }

    def capacity(self, num_tokens: int) -> int | None:
        """Tokens each expert accepts per training forward of ``num_tokens`` tokens, or ``None`` when dropless."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

    def capacity_tensor(self, token_mask: torch.Tensor) -> torch.Tensor:
        """`capacity` over the non-padding tokens, as a 0-d tensor (no host sync)."""
        valid = token_mask.sum().to(torch.float64)
        return torch.ceil(self.capacity_factor * valid / self.num_experts).clamp_min(1)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> RoutingDecision:
        """``token_mask`` (T,) bool marks non-padding tokens; only they queue for expert capacity."""
        router_input = hidden_states
        if self.training and self.jitter_noise > 0:
            jitter = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            router_input = hidden_states * jitter
        logits = F.linear(router_input, self.weight)
        probs = logits.float().softmax(dim=-1)
        top_prob, top_index = probs.max(dim=-1)
        extras = {}
        capacity = self.capacity(hidden_states.shape[0]) if self.training else None
        if capacity is not None:
            one_hot = F.one_hot(top_index, self.num_experts)
            if token_mask is not None:
                one_hot = one_hot * token_mask.unsqueeze(-1)
                capacity = self.capacity_tensor(token_mask)
            position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # 1-based place in the expert's queue
            dropped = position > capacity
            top_prob = top_prob.masked_fill(dropped, 0.0)
            extras["dropped"] = dropped
        return RoutingDecision(
            router_logits=logits,
            top_k_index=top_index.unsqueeze(-1),
            top_k_weights=top_prob.unsqueeze(-1).to(hidden_states.dtype),
            router_probs=probs,
            extras=extras,
        )

    aux_losses = TopKRouter.aux_losses  # the Switch load-balancing loss (pre-capacity assignment) and the z-loss


class AttentiveRouter(Router):
    """Attentive gating (Krishnamurthy et al. 2023, §2.3; transformer mapping §2.9): the gate attends over experts.

    Per token: query ``q = W_q ReLU(A u + a)`` from a small gate trunk (width H = ``gate_hidden_size``), one key per
    expert ``k_e = W_k^(e) z_e`` from that expert's own intermediate activations ``z_e`` (width I; a per-expert key
    map because I need not equal H), scores ``q . k_e / sqrt(H)`` and ``p = softmax(scores)``. The block mixes the
    expert outputs with p; with ``mixture_top_k`` only the k best-scoring experts are kept, renormalised (§2.4).

    **Every expert runs for every token, by construction** (even with ``mixture_top_k``): the keys need each
    expert's activations. So this router is dense in training and inference; `hf_comet.distill_attentive_gates`
    swaps it for a plain softmax gate afterwards to restore sparse inference (§2.6). Gradients reach the trunk, W_q,
    the key maps and the experts' first layers through p. Aux loss: ``importance_loss = (std/mean)^2`` of the summed
    gate values (unbiased std, as in the authors' code), weighted by ``router_aux_loss_coef`` (the paper: 0.2).
    """

    reads_expert_activations = True

    def __init__(self, config, layer_idx: int, hidden_size: int):
        super().__init__()
        num_experts, expert_width = self.expert_layout(config)
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.top_k = config.mixture_top_k
        self.gate_hidden_size = config.gate_hidden_size
        self.gate_proj = nn.Linear(hidden_size, config.gate_hidden_size)
        self.query = nn.Linear(config.gate_hidden_size, config.gate_hidden_size, bias=False)
        self.key_proj = nn.Parameter(torch.empty(num_experts, config.gate_hidden_size, expert_width))
        self.loss_weights = {"importance_loss": float(config.router_aux_loss_coef)}

    def forward(self, hidden_states: torch.Tensor, expert_activations: torch.Tensor) -> RoutingDecision:
        """``expert_activations``: (T, E, I) post-activation intermediate units of every expert."""
        query = self.query(F.relu(self.gate_proj(hidden_states)))  # (T, H)
        keys = torch.einsum("tei,ehi->teh", expert_activations, self.key_proj.to(expert_activations.dtype))
        scores = torch.einsum("th,teh->te", query, keys) / math.sqrt(self.gate_hidden_size)
        if self.top_k is None or self.top_k == self.num_experts:
            weights = scores.float().softmax(dim=-1)
        else:
            top_index, top_weights = _top_k_renormalised(scores, self.top_k)
            weights = torch.zeros_like(scores, dtype=torch.float32).scatter(1, top_index, top_weights)
        return RoutingDecision(
            router_logits=scores, expert_weights=weights.to(hidden_states.dtype), router_probs=weights
        )

    def aux_losses(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"importance_loss": cv_squared(masked_sum(decision.router_probs, token_mask))}

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        return {"key_proj": self.key_proj}


class DeepRouter(Router):
    """Deep mixture of experts gate (Eigen, Ranzato & Sutskever 2013, §4.5 mapping): per layer
    ``g = softmax(B ReLU(A u + a) + b)`` (hidden width ``gate_hidden_size``), a dense soft mixture of every expert
    (``mixture_top_k`` keeps the k largest, renormalised, and then only those experts run). Stacked blocks give the
    paper's layer-2-gate-sees-layer-1-mixture structure.

    Balancing constraint (paper §3; our choices where it is silent, methods.md §4.2): during the first
    ``deep_constraint_steps`` training forwards the router keeps running totals ``G_e`` of the gate values it used
    (non-padding tokens). Before a batch, every expert with ``G_e - mean(G) > margin * mean(G)`` is switched off for
    that batch and the gate is renormalised over the others (vectorised form: G frozen during the batch; the expert
    at or below the mean always stays on). After the phase the constraint is lifted and never comes back: the step
    counter is a persistent buffer, so a reloaded checkpoint stays lifted. No aux loss.
    """

    def __init__(self, config, layer_idx: int, hidden_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.mixture_top_k
        self.constraint_steps = config.deep_constraint_steps
        self.margin = float(config.deep_constraint_margin)
        self.gate_proj = nn.Linear(hidden_size, config.gate_hidden_size)
        self.gate_out = nn.Linear(config.gate_hidden_size, config.num_experts)
        self.register_buffer("assignment_totals", torch.zeros(config.num_experts), persistent=True)
        self.register_buffer("constraint_steps_done", torch.zeros((), dtype=torch.long), persistent=True)
        self._totals_snapshot: torch.Tensor | None = None
        self._on_snapshot: torch.Tensor | None = None

    def _apply(self, fn, recurse: bool = True):
        # The running totals count tokens: in fp16 they overflow at 65504 and in bf16 they stop growing past 2^8
        # relative steps. Keep them float32 whatever dtype the model is cast to.
        result = super()._apply(fn, recurse)
        if self.assignment_totals.dtype != torch.float32:
            self.assignment_totals = self.assignment_totals.float()
        return result

    @property
    def constraint_active(self) -> bool:
        """Whether the balancing constraint still applies (reads one scalar from the device: not for hot paths)."""
        return bool(self._constraint_on())

    def _constraint_on(self) -> torch.Tensor:
        return self.constraint_steps_done < self.constraint_steps  # 0-d bool tensor: no host sync

    def lift_constraint(self) -> None:
        """End the constraint phase now, for good."""
        self.constraint_steps_done.clamp_(min=self.constraint_steps)
        self._on_snapshot = None

    def refresh_state(self) -> None:
        # Freeze G and the phase for this forward, so activation-checkpointing recompute (which runs after commit
        # has updated both) sees exactly what the forward saw.
        self._totals_snapshot = self.assignment_totals.detach().clone()
        self._on_snapshot = self._constraint_on().clone()

    def allowed_experts(self) -> torch.Tensor:
        """(E,) bool: experts the constraint leaves on for the next batch."""
        totals = self._totals_snapshot if self._totals_snapshot is not None else self.assignment_totals
        mean = totals.mean()
        return (totals - mean) <= self.margin * mean

    def forward(self, hidden_states: torch.Tensor) -> RoutingDecision:
        logits = self.gate_out(F.relu(self.gate_proj(hidden_states)))
        gates = logits.float().softmax(dim=-1)
        if self.training and self.constraint_steps > 0:
            constrained = gates * self.allowed_experts().to(gates.dtype)
            constrained = constrained / constrained.sum(dim=-1, keepdim=True)
            on = self._on_snapshot if self._on_snapshot is not None else self._constraint_on()
            gates = torch.where(on, constrained, gates)
        if self.top_k is None or self.top_k == self.num_experts:
            return RoutingDecision(
                router_logits=logits, expert_weights=gates.to(hidden_states.dtype), router_probs=gates
            )
        top_weights, top_index = gates.topk(self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        used = torch.zeros_like(gates).scatter(1, top_index, top_weights)
        return RoutingDecision(
            router_logits=logits,
            top_k_index=top_index,
            top_k_weights=top_weights.to(hidden_states.dtype),
            router_probs=used,
        )

    @torch.no_grad()
    def commit(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> None:
        if self.constraint_steps == 0:
            return
        on = self._constraint_on()
        increment = masked_sum(decision.router_probs.detach().float(), token_mask)
        self.assignment_totals += increment * on.to(increment.dtype)
        self.constraint_steps_done += on.long()


ROUTER_CLASSES: dict[str, type[Router]] = {
    "comet": CometRouter,
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "attentive": AttentiveRouter,
    "deep": DeepRouter,
}
"""``config.routing`` value -> router class."""

__all__ = [
    "ROUTER_CLASSES",
    "AttentiveRouter",
    "CometRouter",
    "DeepRouter",
    "NoisyTopKRouter",
    "Router",
    "RoutingDecision",
    "SwitchRouter",
    "TopKRouter",
    "cv_squared",
    "load_balancing_loss",
    "masked_mean",
    "masked_sum",
    "noisy_top_k_load",
    "router_z_loss",
    "sample_similarity_loss",
]
