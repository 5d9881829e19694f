"""Routers: each one only decides which FFN units or experts a token uses (router × experts, see ``moe_block``).

A router is one class that knows everything about its routing (the peft-style "one method, one class" contract):

* ``routing``: its name in ``config.routing``; `register_router` adds it to ``ROUTER_CLASSES``, from which the
  config's allowed values and the learned / mixture sets are derived (all three live in the torch-free
  ``routing_names``, which the config imports; they stay importable from here).
* class-level facts read from a config, before any model exists: ``expert_layout(config) -> (num_experts,
  expert_width)`` (how the FFN units are grouped into packed experts), ``num_choices(config)`` (what its statistics
  count), ``shares_output_bias(config)`` (experts that are slices of one FFN add its second bias once),
  ``has_trainable_gate``, ``config_fields`` (the routing-specific config fields it reads), ``validate_config(config)``
  (range checks of those fields, raising ``ValueError`` naming field and value) and ``describe(config)`` (one line
  for model cards).
* ``init_weights(config)``: its parameters' and buffers' initial values (called by the model's ``_init_weights``;
  uses ``transformers.initialization`` so loaded weights are never overwritten).
* one forward for every router: ``forward(hidden_states (T, d), token_mask=None, experts=None) -> RoutingDecision``.
  ``token_mask`` (T,) marks non-padding tokens (``None``: all are real); ``experts`` is the block's packed experts
  module (possibly wrapped by PEFT), for routers that read expert activations: ``experts(hidden_states)`` returns
  every expert's intermediate activations (T, E, I).
* ``aux_losses(decision, token_mask) -> dict[str, Tensor]``: unweighted auxiliary losses over non-padding tokens;
  ``loss_weights`` holds their coefficients.
* ``refresh_state()`` before and ``commit(decision, token_mask, valid)`` after a routed training forward, for routers
  with running state (``deep``'s assignment totals; ``valid`` is False for a non-finite decision, which must change
  nothing); never during activation-checkpointing recompute.
* ``expert_parameters()``: router tensors indexed by expert on dim 0 that belong to the experts (attentive key maps),
  so expert merging moves them with the experts.
* ``reads_token_ids``: routers keyed by the token itself (``hash``) take ``forward(..., token_ids=(T,) int64)``; the
  block hands them the model's ``input_ids`` (or the position index, for families without token ids) of the
  routed forward, and ``check_inputs(config, arguments)`` refuses a model call that lacks them before any work.

No router knows which model family hosts it. This file travels with saved checkpoints: torch and transformers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .routing_names import (
    LEARNED_ROUTINGS,
    MIXTURE_ROUTINGS,
    ROUTER_CLASSES,
    ROUTINGS,
    RoutingNames,
    comet_num_active,
    register_router,
)


def mixtral_load_balancing_loss(*args, **kwargs) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (Mixtral's), imported on first use: its module pulls in
    ``transformers.modeling_utils`` (seconds), which a config, which reads the router registry, must not pay."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(*args, **kwargs)


if TYPE_CHECKING:
    from .configuration_comet import CometMoEConfigMixin


def mix_seed(seed: int, layer_idx: int, offset: int = 0) -> int:
    """The per-layer seed of a random routing quantity: ``seed * 1_000_003 + layer_idx + offset``.

    ``offset`` separates streams of one layer (0: the COMET projection; `PAIR_SEED_OFFSET`: sampled token pairs).
    """
    return seed * 1_000_003 + layer_idx + offset


PAIR_SEED_OFFSET = 7_919
"""`mix_seed` offset of the token-pair sampler of the similarity regulariser and the overlap statistic."""
HASH_SEED_OFFSET = 104_729
"""`mix_seed` offset of hash routing's per-layer hash (`HashRouter`)."""
HASH_MODULUS = 2**31


def hash31(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer mixing hash of int64 ``x`` in [0, 2^31) (multiply-xorshift rounds; every product stays below
    2^62, so int64 arithmetic never overflows). Used for sampling token pairs and for hash routing."""
    for multiplier, increment, shift in ((1_103_515_245, 12_345, 16), (1_664_525, 1_013_904_223, 13), (69_069, 1, 16)):
        x = (x * multiplier + increment) % HASH_MODULUS
        x = x ^ (x >> shift)
    return x


def hash_token_ids(token_ids: torch.Tensor, seed: int, num_buckets: int) -> torch.Tensor:
    """``token_ids`` (any shape, integers) -> int64 buckets in [0, num_buckets): a fixed pseudo-random function of
    (seed, id) alone, the same on every device and in every batch (Roller et al.'s "Random Hash")."""
    keys = (seed % HASH_MODULUS + (token_ids.long() % HASH_MODULUS) * 2_654_435_761) % HASH_MODULUS
    return hash31(keys) % num_buckets


@dataclass
class RoutingDecision:
    """What a router decided for a flat batch of T tokens.

    Exactly one execution form says how to combine (checked on construction): ``unit_mask`` (unit-level COMET),
    ``top_k_index`` with ``top_k_weights`` (sparse routing), or ``expert_weights`` (a dense mixture).

    Attributes:
        router_logits: the router's raw scores (T, C) over its C choices: experts for learned routers, FFN units for
            COMET, blocks for block-COMET.
        gate_probs: (T, E) float32 **pre-selection** gate distribution of a learned router: the softmax over every
            expert before any top-k, capacity or renormalisation (rows sum to 1; for ``noisy_topk`` the softmax of
            the noisy logits, for ``deep`` the constrained gate). ``None`` for COMET, which has no distribution.
            The gate entropy statistic and the similarity regulariser are defined on it for every router.
        unit_mask: binary (T, F) mask over the FFN units (unit-level COMET).
        top_k_index: (T, k) chosen experts.
        top_k_weights: (T, k) combine weights of the chosen experts (0 for tokens dropped by a capacity limit).
        expert_weights: (T, E) dense mixture combine weights (attentive, deep without ``mixture_top_k``).
        uniform_weights: every kept choice has combine weight exactly 1 (COMET blocks): the experts may run the
            decision as masked dense compute.
        expert_activations: (T, E, I) activations the router already computed (attentive), reused by the experts.
        extras: router-specific tensors its aux losses or the statistics need (e.g. ``dropped`` (T,) bool for Switch,
            ``load`` (T, E) for noisy top-k).
    """

    router_logits: torch.Tensor
    gate_probs: torch.Tensor | None = None
    unit_mask: torch.Tensor | None = None
    top_k_index: torch.Tensor | None = None
    top_k_weights: torch.Tensor | None = None
    expert_weights: torch.Tensor | None = None
    uniform_weights: bool = False
    expert_activations: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        forms = (self.unit_mask is not None) + (self.top_k_index is not None) + (self.expert_weights is not None)
        if forms != 1:
            raise ValueError(
                "a RoutingDecision needs exactly one execution form (unit_mask, top_k_index + top_k_weights, or "
                f"expert_weights); got {forms}."
            )
        if (self.top_k_index is None) != (self.top_k_weights is None):
            raise ValueError("top_k_index and top_k_weights go together.")
        if self.top_k_index is not None and self.top_k_index.shape != self.top_k_weights.shape:
            raise ValueError(
                f"top_k_index {tuple(self.top_k_index.shape)} and top_k_weights {tuple(self.top_k_weights.shape)} "
                "must have the same (tokens, k) shape."
            )
        if self.gate_probs is not None and self.gate_probs.dtype != torch.float32:
            raise ValueError(f"gate_probs must be float32 (got {self.gate_probs.dtype}).")

    def combine_weights(self, num_choices: int) -> torch.Tensor:
        """(T, num_choices) float32 weights the experts' outputs are combined with (zero where not selected)."""
        if self.expert_weights is not None:
            return self.expert_weights.float()
        if self.unit_mask is not None:
            return self.unit_mask.float()
        weights = torch.zeros(
            self.top_k_index.shape[0], num_choices, device=self.top_k_index.device, dtype=torch.float32
        )
        return weights.scatter(1, self.top_k_index, self.top_k_weights.float())

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
    router_logits: torch.Tensor, num_experts: int, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one layer, ``E * sum_e f_e * P_e`` (Fedus et al. 2021, eq. 4-6),
    computed by transformers' own ``load_balancing_loss_func`` (Mixtral's) and divided by ``top_k``.

    ``f_e`` is the fraction of (token, slot) pairs the softmax top-k sends to expert e and ``P_e`` the mean router
    probability of e, both over non-padding tokens. transformers' ``f_e`` sum to k, so its balanced value is k; ours is
    1.0 for any k, so one ``router_aux_loss_coef`` means the same pressure at every k (docs/decisions.md).
    """
    if token_mask is None:
        return mixtral_load_balancing_loss((router_logits.float(),), num_experts, top_k) / top_k
    # A batch of padding only would be 0 / 0 there; count its rows instead and zero the loss (no host sync, and the
    # gradient stays finite), as our masked means do.
    any_real = token_mask.any()
    value = mixtral_load_balancing_loss((router_logits.float(),), num_experts, top_k, token_mask | ~any_real)
    return value * any_real / top_k


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


# -- the contract ----------------------------------------------------------------------------------------------------
class Router(nn.Module):
    """Base class of all routers: see the module docstring for the contract."""

    routing: ClassVar[str] = ""
    has_trainable_gate: ClassVar[bool] = True
    config_fields: ClassVar[tuple[str, ...]] = ()
    """Routing-specific config fields this router reads; any other routing-specific field (`MOE_FIELD_RULES`) is
    refused at a non-default value under this routing. Learned routers list `LEARNED_FIELDS` too."""
    fixed_fields: ClassVar[dict[str, object]] = {}
    """Config fields whose value this routing fixes (Switch: ``num_experts_per_tok`` is 1): the config stores and
    reports that value, accepts it and the field's default (read as unset) and refuses any other."""
    citation: ClassVar[str] = ""
    """What a model card cites for this routing."""
    gate_logits: ClassVar[bool] = True
    """Whether ``RoutingDecision.router_logits`` are gate logits over experts in transformers' sense ((T, E), what
    ``load_balancing_loss_func`` takes): the outputs' ``router_logits``. COMET's unit/block scores are not."""
    native_aux_loss: ClassVar[bool] = False
    """Whether this router trains transformers' load-balancing loss (Mixtral's ``load_balancing_loss_func``), so the
    outputs' ``aux_loss`` holds it as transformers' native MoE models do."""
    reads_token_ids: ClassVar[bool] = False
    """Whether ``forward`` takes ``token_ids`` (T,) int64, what each token is keyed by (``hash``): the block passes
    them (see the module docstring)."""

    loss_weights: dict[str, float]

    def __init__(self, config: CometMoEConfigMixin, layer_idx: int, hidden_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.loss_weights = {}

    # -- facts about a config (class level: no model needed) ---------------------------------------------------
    @classmethod
    def expert_layout(cls, config: CometMoEConfigMixin) -> tuple[int, int]:
        """Learned routers gate ``num_experts`` experts of ``expert_intermediate_size`` units (COMET overrides)."""
        return config.num_experts, config.expert_intermediate_size

    @classmethod
    def num_choices(cls, config: CometMoEConfigMixin) -> int:
        """How many choices the statistics and selection counts count (the experts, by default)."""
        return cls.expert_layout(config)[0]

    @classmethod
    def shares_output_bias(cls, config: CometMoEConfigMixin) -> bool:
        """Whether the experts add one shared output bias once per token instead of one bias each."""
        return config.expert_output_bias == "shared" and cls.expert_layout(config)[0] > 1

    @classmethod
    def validate_config(cls, config: CometMoEConfigMixin) -> None:
        """Raise ``ValueError`` naming the first field this router reads that is out of range (none by default)."""

    @classmethod
    def check_inputs(cls, config: CometMoEConfigMixin, arguments: dict) -> None:
        """Raise ``ValueError`` before a model forward whose ``arguments`` (name -> value) lack what this router
        reads (nothing by default)."""

    @classmethod
    def describe(cls, config: CometMoEConfigMixin) -> str:
        """One line for model cards: how this routing works with ``config``."""
        raise NotImplementedError

    @classmethod
    def describe_experts(cls, config: CometMoEConfigMixin) -> str:
        num_experts, width = cls.expert_layout(config)
        return f"{num_experts} experts of width {width}"

    # -- state ---------------------------------------------------------------------------------------------------
    def init_weights(self, config: CometMoEConfigMixin) -> None:
        """Set every parameter and buffer of this router to its initial value (``transformers.initialization``)."""

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, experts: nn.Module | None = None
    ) -> RoutingDecision:
        raise NotImplementedError

    def aux_losses(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary losses of this decision (none by default)."""
        return {}

    def refresh_state(self) -> None:
        """Called at the start of every routed model forward, before routing (routers with running state)."""

    def commit(self, decision: RoutingDecision, token_mask: torch.Tensor | None, valid: torch.Tensor) -> None:
        """Update running state after a training forward (never during activation-checkpointing recompute).

        ``valid`` is a 0-d bool tensor, False for a non-finite decision: the state must then stay as it was (decide
        with ``torch.where`` on the device, not with a host sync)."""

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        """Router tensors indexed by expert on dim 0 that travel with their expert when experts are merged."""
        return {}


def _layers(config: CometMoEConfigMixin) -> str:
    return "every block" if config.moe_layers is None else f"blocks {config.moe_layers}"


def _learned_description(config: CometMoEConfigMixin, words: str) -> str:
    return f"Learned routing in {_layers(config)}: {words}; aux-loss weight {config.router_aux_loss_coef:g}."


# -- the routers -----------------------------------------------------------------------------------------------------
@register_router
class CometRouter(Router):
    """COMET (Shaier et al., ICLR 2025): a fixed random projection picks, per token, which FFN units are on.

    ``scores = u @ V^T`` with V of shape (F, d), entries U(-1/sqrt(d), 1/sqrt(d)), drawn once from the config's
    ``routing_seed`` and the layer index (`mix_seed`) and stored as a persistent buffer, so checkpoints carry it and it
    is never redrawn (``__init__`` draws it, ``init_weights`` reproduces the same values). The mask keeps exactly
    ``k = max(1, floor(keep_rate * F))`` units per token (``topk`` + scatter: ties do not inflate k, unlike the
    official code's ``>=`` threshold). The mask is binary, applied after the activation, not rescaled, and identical
    in training and evaluation. No parameters, no gradient, no auxiliary loss.

    Block-COMET (``comet_block_size = b > 1``, our extension): V has F / b rows, one per block of b consecutive
    units; each token keeps the top ``max(1, floor(keep_rate * F / b))`` blocks with weight 1. The blocks are the
    packed experts, so only the kept blocks are computed; the FFN's output bias is added once (as in the dense FFN).

    Fitted router (``comet_router="fitted"``, set by `hf_comet.convert.sparsify`): the same scores plus a per-block
    bias, ``u @ V^T + c``, where V and c (the persistent ``projection_bias`` buffer) were fitted by ridge least
    squares to the dense FFN's block importance on calibration tokens (MoEfication's learned router, in closed form).
    Both are frozen and saved with the weights; ``init_weights`` draws the seeded V and a zero c for a fresh model
    and, through ``transformers.initialization``, leaves loaded values alone.
    """

    routing = "comet"
    citation = "Shaier, Y. et al. *Conditionally Overlapping Mixture of ExperTs.* ICLR 2025."
    has_trainable_gate = False
    gate_logits = False  # its scores rank F units (or F / b blocks), not experts: no router_logits in the outputs
    config_fields = ("comet_keep_rate", "comet_block_size", "comet_router", "comet_router_rank")

    def __init__(self, config: CometMoEConfigMixin, layer_idx: int, hidden_size: int):
        super().__init__(config, layer_idx, hidden_size)
        self.block_size = config.comet_block_size
        num_groups = config.ffn_width // self.block_size
        self.num_active = comet_num_active(config.comet_keep_rate, num_groups)
        self.seed = config.routing_seed
        self.structured = config.comet_router == "structured"
        self.fitted = config.comet_router == "fitted"
        self.group_size, self.group_keep = (
            structured_groups(num_groups, self.num_active) if self.structured and self.block_size == 1 else (0, 0)
        )
        if self.structured:
            rank = min(config.comet_router_rank, hidden_size)
            projection, projection_in = self.draw_structured(num_groups, hidden_size, rank)
            self.register_buffer("projection", projection, persistent=True)
            self.register_buffer("projection_in", projection_in, persistent=True)
        else:
            self.register_buffer("projection", self.draw_projection(num_groups, hidden_size), persistent=True)
            self.projection_in = None
        if self.fitted:
            self.register_buffer("projection_bias", torch.zeros(num_groups), persistent=True)
        else:
            self.projection_bias = None

    @classmethod
    def expert_layout(cls, config: CometMoEConfigMixin) -> tuple[int, int]:
        if config.comet_block_size > 1:
            return config.ffn_width // config.comet_block_size, config.comet_block_size
        return 1, config.ffn_width  # unit-level COMET: the whole FFN is one group of units, masked per token

    @classmethod
    def num_choices(cls, config: CometMoEConfigMixin) -> int:
        num_experts, width = cls.expert_layout(config)
        return num_experts if config.comet_block_size > 1 else width  # blocks, or single FFN units

    @classmethod
    def shares_output_bias(cls, config: CometMoEConfigMixin) -> bool:
        return config.comet_block_size > 1  # the blocks are slices of one FFN

    @classmethod
    def validate_config(cls, config: CometMoEConfigMixin) -> None:
        if config.comet_block_size > 1 and config.ffn_width % config.comet_block_size:
            raise ValueError(
                f"comet_block_size={config.comet_block_size} does not divide the FFN width {config.ffn_width} "
                f"({config._ffn_width_field}); pick a divisor of it."
            )

    @classmethod
    def describe(cls, config: CometMoEConfigMixin) -> str:
        if config.comet_block_size > 1:
            groups = config.ffn_width // config.comet_block_size
            what = f"blocks of {config.comet_block_size} units ({groups} blocks)"
        else:
            what = f"units of the FFN (width {config.ffn_width})"
        router = "a frozen random projection"
        if config.comet_router == "structured":
            router = f"a frozen random rank-{config.comet_router_rank} projection (hf_comet's structured router)"
        elif config.comet_router == "fitted":
            router = (
                "a frozen projection and bias fitted by least squares to the dense FFN's block importance on "
                "calibration data (hf_comet.convert.sparsify; MoEfication's learned router)"
            )
        seed = "" if config.comet_router == "fitted" else f"seed {config.routing_seed}, "
        return (
            f"COMET routing in {_layers(config)}: {router} of each token's FFN input ({seed}stored in the "
            f"checkpoint) keeps the top {config.comet_keep_rate:g} fraction of "
            f"the {what} per token, weight 1. No trainable router, no auxiliary loss."
        )

    def draw_projection(self, num_units: int | None = None, hidden_size: int | None = None) -> torch.Tensor:
        """V drawn reproducibly from the routing seed and this router's layer index (on CPU: every device agrees)."""
        if num_units is None:
            num_units, hidden_size = self.projection.shape
        generator = torch.Generator(device="cpu").manual_seed(mix_seed(self.seed, self.layer_idx))
        bound = hidden_size**-0.5
        return torch.empty(num_units, hidden_size).uniform_(-bound, bound, generator=generator)

    def draw_structured(self, num_units: int, hidden_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The structured router's factors ``V = B A``: B (units, r) and A (r, d), U(-1/sqrt(fan-in), 1/sqrt(fan-in)),
        from the same seed stream as the full projection."""
        generator = torch.Generator(device="cpu").manual_seed(mix_seed(self.seed, self.layer_idx))
        projection_in = torch.empty(rank, hidden_size).uniform_(
            -(hidden_size**-0.5), hidden_size**-0.5, generator=generator
        )
        projection = torch.empty(num_units, rank).uniform_(-(rank**-0.5), rank**-0.5, generator=generator)
        return projection, projection_in

    def init_weights(self, config: CometMoEConfigMixin) -> None:
        self.seed = config.routing_seed
        if self.structured:
            rank, hidden_size = self.projection_in.shape
            projection, projection_in = self.draw_structured(self.projection.shape[0], hidden_size, rank)
            init.copy_(self.projection, projection)
            init.copy_(self.projection_in, projection_in)
        else:
            init.copy_(self.projection, self.draw_projection())
        if self.projection_bias is not None:  # a fresh fitted router starts as the random one (zero bias)
            init.zeros_(self.projection_bias)

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The router's scores (T, units or blocks): ``u V^T``, ``(u A^T) B^T`` for the structured router, or
        ``u V^T + c`` for the fitted one."""
        if self.projection_in is not None:
            hidden_states = F.linear(hidden_states, self.projection_in.to(hidden_states.dtype))
        bias = None if self.projection_bias is None else self.projection_bias.to(hidden_states.dtype)
        return F.linear(hidden_states, self.projection.to(hidden_states.dtype), bias)

    def set_keep_rate(self, keep_rate: float) -> None:
        """Keep ``keep_rate`` of the units (or blocks) per token from the next forward on: the same projection at
        another k (a keep-rate schedule; ``keep_rate=1.0`` is the dense FFN). The structured router regroups its
        exact selection for the new k, or falls back to top-k of its scores where no grouping fits."""
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate={keep_rate!r} must be a number in (0, 1].")
        num_groups = self.projection.shape[0]
        self.num_active = comet_num_active(keep_rate, num_groups)
        self.group_size, self.group_keep = (
            structured_groups(num_groups, self.num_active) if self.structured and self.block_size == 1 else (0, 0)
        )

    @torch.no_grad()
    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, experts: nn.Module | None = None
    ) -> RoutingDecision:
        scores = self.scores(hidden_states)
        if self.block_size > 1:
            keep = scores.topk(self.num_active, dim=-1, sorted=False).indices
            return RoutingDecision(
                router_logits=scores,
                top_k_index=keep,
                top_k_weights=torch.ones_like(keep, dtype=scores.dtype),
                uniform_weights=True,
            )
        if self.num_active == scores.shape[-1]:
            mask = torch.ones_like(scores)
        elif self.group_size:
            mask = grouped_selection(scores, self.group_size, self.group_keep)
        else:
            keep = scores.topk(self.num_active, dim=-1, sorted=False).indices
            mask = torch.zeros_like(scores).scatter_(-1, keep, 1.0)
        return RoutingDecision(router_logits=scores, unit_mask=mask)


def structured_groups(num_units: int, num_active: int) -> tuple[int, int]:
    """(g, m) for the structured router's selection: the smallest group size ``g`` in 2..16 dividing ``num_units``
    such that keeping ``m`` of every ``g`` consecutive units keeps exactly ``num_active`` in all; (0, 0) when none does
    (or every unit is kept): then the structured router selects with a global top-k, like the full one."""
    for group in range(2, 17):
        if num_units % group == 0 and (num_active * group) % num_units == 0:
            keep = num_active * group // num_units
            if 1 <= keep < group:
                return group, keep
    return 0, 0


def grouped_selection(scores: torch.Tensor, group_size: int, group_keep: int) -> torch.Tensor:
    """0/1 mask (T, n) keeping the ``group_keep`` highest scores of every ``group_size`` consecutive units.

    Pairs (keep 1 of 2) are one comparison: unit 2j is on exactly when ``(v_2j - v_2j+1) . u >= 0``, a random
    hyperplane, so two tokens at angle theta share each pair's choice with probability 1 - theta / pi (SimHash).
    """
    num_tokens, num_units = scores.shape
    grouped = scores.view(num_tokens, num_units // group_size, group_size)
    if group_size == 2:
        first = (grouped[..., 0] >= grouped[..., 1]).to(scores.dtype)
        return torch.stack((first, 1 - first), dim=-1).view(num_tokens, num_units)
    if group_keep == 1:
        keep = grouped.argmax(dim=-1, keepdim=True)
    elif group_keep == group_size - 1:
        mask = torch.ones_like(grouped).scatter_(-1, grouped.argmin(dim=-1, keepdim=True), 0.0)
        return mask.view(num_tokens, num_units)
    else:
        keep = grouped.topk(group_keep, dim=-1, sorted=False).indices
    return torch.zeros_like(grouped).scatter_(-1, keep, 1.0).view(num_tokens, num_units)


LEARNED_FIELDS = (
    "num_experts",
    "moe_intermediate_size",
    "similarity_beta_s",
    "similarity_beta_d",
    "similarity_num_pairs",
    "expert_output_bias",
)
"""Config fields every learned router in this file reads (its experts, the similarity regulariser, the bias)."""


def check_top_k(config: CometMoEConfigMixin) -> None:
    """``num_experts_per_tok`` must not exceed ``num_experts`` (``topk``, ``noisy_topk``)."""
    if config.num_experts_per_tok > config.num_experts:
        raise ValueError(
            f"num_experts_per_tok={config.num_experts_per_tok!r} must be between 1 and num_experts="
            f"{config.num_experts}."
        )


@register_router
class TopKRouter(Router):
    """Learned softmax top-k gate (Mixtral style): ``softmax(u @ W^T)`` in float32, keep the k largest.

    With ``norm_topk_prob`` the kept probabilities are renormalised to sum to 1 (Mixtral; this makes E identical
    experts reproduce the dense FFN exactly). ``router_scale`` multiplies the kept weights. Aux losses: the Switch
    load-balancing loss and the ST-MoE z-loss.
    """

    routing = "topk"
    native_aux_loss = True
    citation = "Fedus, W., Zoph, B., Shazeer, N. *Switch Transformers.* JMLR 2022 (load-balancing loss)."
    config_fields = (
        *LEARNED_FIELDS,
        "num_experts_per_tok",
        "norm_topk_prob",
        "router_scale",
        "router_aux_loss_coef",
        "router_z_loss_coef",
    )

    @classmethod
    def validate_config(cls, config: CometMoEConfigMixin) -> None:
        check_top_k(config)

    def __init__(self, config: CometMoEConfigMixin, layer_idx: int, hidden_size: int):
        super().__init__(config, layer_idx, hidden_size)
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.scale = float(config.router_scale)
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.loss_weights = {
            "load_balancing_loss": float(config.router_aux_loss_coef),
            "z_loss": float(config.router_z_loss_coef),
        }

    @classmethod
    def describe(cls, config: CometMoEConfigMixin) -> str:
        return _learned_description(
            config,
            f"a learned softmax gate sends each token to its top {config.num_experts_per_tok} of "
            f"{cls.describe_experts(config)}",
        )

    def init_weights(self, config: CometMoEConfigMixin) -> None:
        init.normal_(self.weight, mean=0.0, std=config.initializer_range)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, experts: nn.Module | None = None
    ) -> RoutingDecision:
        logits = F.linear(hidden_states, self.weight)
        probs = logits.float().softmax(dim=-1)
        top_weights, top_index = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        if self.scale != 1.0:
            top_weights = top_weights * self.scale
        return RoutingDecision(
            router_logits=logits,
            gate_probs=probs,
            top_k_index=top_index,
            top_k_weights=top_weights.to(hidden_states.dtype),
        )

    def aux_losses(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        losses = {
            "load_balancing_loss": load_balancing_loss(decision.router_logits, self.num_experts, self.top_k, token_mask)
        }
        if self.loss_weights["z_loss"] > 0:
            losses["z_loss"] = router_z_loss(decision.router_logits, token_mask)
        return losses


@register_router
class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017): ``H = u W_g^T + eps * (softplus(u W_n^T) + 1e-2)`` in training,
    ``eps ~ N(0, 1)``; keep the k largest of H and softmax over them (zero elsewhere). No noise in evaluation.

    Both ``W_g`` and ``W_n`` start at zero (the paper's initialisation: all experts equal, routing by noise at first).
    The 1e-2 noise floor follows MoE-Adapters. Aux losses, each weighted by ``router_aux_loss_coef``:
    ``importance_loss = cv^2(sum_tokens G)`` over the sparse gates G (the combine weights; cv^2 ignores
    ``router_scale``) and ``load_loss = cv^2(sum_tokens P(e in top-k))`` with the smooth load estimator of
    `noisy_top_k_load` (the hard count when noise is off or k = E). ``gate_probs`` is the softmax of H over all
    experts.
    """

    routing = "noisy_topk"
    citation = "Shazeer, N. et al. *Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer.* ICLR 2017."
    config_fields = (
        *LEARNED_FIELDS,
        "num_experts_per_tok",
        "router_scale",
        "router_aux_loss_coef",
        "router_z_loss_coef",
    )

    @classmethod
    def validate_config(cls, config: CometMoEConfigMixin) -> None:
        check_top_k(config)

    noise_floor = 1e-2

    def __init__(self, config: CometMoEConfigMixin, layer_idx: int, hidden_size: int):
        super().__init__(config, layer_idx, hidden_size)
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.noise_weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.scale = float(config.router_scale)
        coef = float(config.router_aux_loss_coef)
        self.loss_weights = {"importance_loss": coef, "load_loss": coef, "z_loss": float(config.router_z_loss_coef)}

    @classmethod
    def describe(cls, config: CometMoEConfigMixin) -> str:
        return _learned_description(
            config,
            f"a noisy top-{config.num_experts_per_tok} gate (Shazeer et al.) over {cls.describe_experts(config)}",
        )

    def init_weights(self, config: CometMoEConfigMixin) -> None:
        init.zeros_(self.weight)  # Shazeer et al. 2017: both gate matrices start at zero
        init.zeros_(self.noise_weight)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, experts: nn.Module | None = None
    ) -> RoutingDecision:
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
        if noisy:
            load = noisy_top_k_load(clean, logits, noise_std, top_values, self.top_k)
        else:
            load = torch.zeros_like(logits).scatter(1, top_k_index, (top_k_weights > 0).float())
        if self.scale != 1.0:
            top_k_weights = top_k_weights * self.scale  # the combine weights; the gate distribution stays a softmax
        return RoutingDecision(
            router_logits=logits,
            gate_probs=logits.softmax(dim=-1),
            top_k_index=top_k_index,
            top_k_weights=top_k_weights.to(hidden_states.dtype),
            extras={"load": load},
        )

    def aux_losses(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        losses = {
            "importance_loss": cv_squared(masked_sum(decision.combine_weights(self.num_experts), token_mask)),
            "load_loss": cv_squared(masked_sum(decision.extras["load"], token_mask)),
        }
        if self.loss_weights["z_loss"] > 0:
            losses["z_loss"] = router_z_loss(decision.router_logits, token_mask)
        return losses


@register_router
class SwitchRouter(Router):
    """Switch Transformer routing (Fedus et al. 2021): top-1 of ``softmax(u @ W^T)``, output scaled by that
    probability (not renormalised).

    In training the router input is multiplied by ``U(1 - eps, 1 + eps)`` jitter (``router_jitter_noise``). With
    ``capacity_factor``, in training, each expert takes at most ``ceil(capacity_factor * T / E)`` of the T
    non-padding tokens of the forward, first come first served in token order (padding takes no place in a queue);
    the rest are dropped: their FFN output is zero (no expert bias, not even a shared one), so they ride the residual
    connection (``extras["dropped"]``, counted by the statistics). Evaluation and generation are dropless, so a
    token's output never depends on the other tokens of the batch or on the KV cache. Dropless by default. Aux
    losses: the Switch load-balancing loss (on the pre-capacity assignment) and the optional z-loss.
    """

    routing = "switch"
    fixed_fields = {"num_experts_per_tok": 1}  # top-1: the config reports it, as transformers' MoE configs do
    native_aux_loss = True
    citation = "Fedus, W., Zoph, B., Shazeer, N. *Switch Transformers.* JMLR 2022."
    config_fields = (
        *LEARNED_FIELDS,
        "capacity_factor",
        "router_jitter_noise",
        "router_aux_loss_coef",
        "router_z_loss_coef",
    )

    def __init__(self, config: CometMoEConfigMixin, layer_idx: int, hidden_size: int):
        super().__init__(config, layer_idx, hidden_size)
        self.num_experts = config.num_experts
        self.capacity_factor = config.capacity_factor
        self.jitter_noise = float(config.router_jitter_noise)
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.loss_weights = {
            "load_balancing_loss": float(config.router_aux_loss_coef),
            "z_loss": float(config.router_z_loss_coef),
        }

    @classmethod
    def validate_config(cls, config: CometMoEConfigMixin) -> None:
        if config.capacity_factor is not None and (
            isinstance(config.capacity_factor, bool) or config.capacity_factor <= 0
        ):
            raise ValueError(f"capacity_factor={config.capacity_factor!r} must be > 0, or None for dropless.")

    @classmethod
    def describe(cls, config: CometMoEConfigMixin) -> str:
        capacity = f", capacity factor {config.capacity_factor:g}" if config.capacity_factor else ", dropless"
        return _learned_description(config, f"a Switch top-1 gate over {cls.describe_experts(config)}{capacity}")

    def init_weights(self, config: CometMoEConfigMixin) -> None:
        init.normal_(self.weight, mean=0.0, std=config.initializer_range)

    def capacity(self, num_tokens: int | torch.Tensor) -> int | torch.Tensor | None:
        """Tokens each expert accepts in a training forward of ``num_tokens`` real tokens (an int, or a 0-d tensor
        counted on the device, with no host sync), or ``None`` when dropless."""
        if self.capacity_factor is None:
            return None
        if torch.is_tensor(num_tokens):
            return torch.ceil(self.capacity_factor * num_tokens.to(torch.float64) / self.num_experts).clamp_min(1)
        return max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, experts: nn.Module | None = None
    ) -> RoutingDecision:
        router_input = hidden_states
        if self.training and self.jitter_noise > 0:
            jitter = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            router_input = hidden_states * jitter
        logits = F.linear(router_input, self.weight)
        probs = logits.float().softmax(dim=-1)
        top_prob, top_index = probs.max(dim=-1)
        extras = {}
        if self.training and self.capacity_factor is not None:
            one_hot = F.one_hot(top_index, self.num_experts)
            if token_mask is None:
                capacity = self.capacity(hidden_states.shape[0])
            else:
                one_hot = one_hot * token_mask.unsqueeze(-1)
                capacity = self.capacity(token_mask.sum())
            position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # 1-based place in the expert's queue
            dropped = position > capacity
            top_prob = top_prob.masked_fill(dropped, 0.0)
            extras["dropped"] = dropped
        return RoutingDecision(
            router_logits=logits,
            gate_probs=probs,
            top_k_index=top_index.unsqueeze(-1),
            top_k_weights=top_prob.unsqueeze(-1).to(hidden_states.dtype),
            extras=extras,
        )

    top_k = 1
    aux_losses = TopKRouter.aux_losses  # the Switch load-balancing loss (pre-capacity assignment) and the z-loss


class MixtureRouter(Router):
    """A router that mixes every expert by default and keeps the ``mixture_top_k`` best when it is set."""

    @classmethod
    def validate_config(cls, config: CometMoEConfigMixin) -> None:
        if config.mixture_top_k is not None and not 1 <= config.mixture_top_k <= config.num_experts:
            raise ValueError(
                f"mixture_top_k={config.mixture_top_k} must be between 1 and num_experts={config.num_experts}, or None."
            )


@register_router
class AttentiveRouter(MixtureRouter):
    """Attentive gating (Krishnamurthy et al. 2023, §2.3; transformer mapping §2.9): the gate attends over experts.

    Per token: query ``q = W_q ReLU(A u + a)`` from a small gate trunk (width H = ``gate_hidden_size``), one key per
    expert ``k_e = W_k^(e) z_e`` from that expert's own intermediate activations ``z_e`` (width I; a per-expert key
    map because I need not equal H), scores ``q . k_e / sqrt(H)`` and ``p = softmax(scores)`` (``gate_probs``). The
    block mixes the expert outputs with p; with ``mixture_top_k`` only the k best-scoring experts are kept,
    renormalised (§2.4).

    **Every expert runs for every token, by construction** (even with ``mixture_top_k``): the keys need each
    expert's activations, which the router asks of the experts module and hands on in the decision. So this router
    is dense in training and inference; `hf_comet.distill_attentive_gates` swaps it for a plain softmax gate
    afterwards to restore sparse inference (§2.6). Gradients reach the trunk, W_q, the key maps and the experts'
    first layers through p. Aux loss: ``importance_loss = (std/mean)^2`` of the summed combine weights (unbiased
    std, as in the authors' code), weighted by ``router_aux_loss_coef`` (the paper: 0.2).
    """

    routing = "attentive"
    citation = "Krishnamurthy, Y., Watkins, C., Gärtner, T. *Improving Expert Specialization in Mixture of Experts.* arXiv:2302.14703, 2023."
    config_fields = (*LEARNED_FIELDS, "gate_hidden_size", "mixture_top_k", "router_aux_loss_coef")

    def __init__(self, config: CometMoEConfigMixin, layer_idx: int, hidden_size: int):
        super().__init__(config, layer_idx, hidden_size)
        num_experts, expert_width = self.expert_layout(config)
        self.num_experts = num_experts
        self.top_k = config.mixture_top_k
        self.gate_hidden_size = config.gate_hidden_size
        self.gate_proj = nn.Linear(hidden_size, config.gate_hidden_size)
        self.query = nn.Linear(config.gate_hidden_size, config.gate_hidden_size, bias=False)
        self.key_proj = nn.Parameter(torch.empty(num_experts, config.gate_hidden_size, expert_width))
        self.loss_weights = {"importance_loss": float(config.router_aux_loss_coef)}

    @classmethod
    def describe(cls, config: CometMoEConfigMixin) -> str:
        return _learned_description(
            config,
            f"an attentive gate (query from a {config.gate_hidden_size}-unit trunk, keys from each expert) mixing "
            f"{cls.describe_experts(config)}",
        )

    def init_weights(self, config: CometMoEConfigMixin) -> None:
        init.normal_(self.key_proj, mean=0.0, std=config.initializer_range)  # gate_proj/query: upstream Linear init

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, experts: nn.Module | None = None
    ) -> RoutingDecision:
        if experts is None:
            raise ValueError("routing='attentive' reads the experts' activations: pass experts=<the experts module>.")
        expert_activations = experts(hidden_states)  # (T, E, I), through forward so PEFT wrappers apply
        query = self.query(F.relu(self.gate_proj(hidden_states)))  # (T, H)
        keys = torch.einsum("tei,ehi->teh", expert_activations, self.key_proj.to(expert_activations.dtype))
        scores = torch.einsum("th,teh->te", query, keys) / math.sqrt(self.gate_hidden_size)
        probs = scores.float().softmax(dim=-1)
        if self.top_k is None or self.top_k == self.num_experts:
            weights = probs
        else:
            top_index, top_weights = _top_k_renormalised(scores, self.top_k)
            weights = torch.zeros_like(scores, dtype=torch.float32).scatter(1, top_index, top_weights)
        return RoutingDecision(
            router_logits=scores,
            gate_probs=probs,
            expert_weights=weights.to(hidden_states.dtype),
            expert_activations=expert_activations,
        )

    def aux_losses(self, decision: RoutingDecision, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"importance_loss": cv_squared(masked_sum(decision.combine_weights(self.num_experts), token_mask))}

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        return {"key_proj": self.key_proj}


@register_router
class DeepMoEGate(MixtureRouter):
    """Deep mixture of experts gate (Eigen, Ranzato & Sutskever 2013, §4.5 mapping): per layer
    ``g = softmax(B ReLU(A u + a) + b)`` (hidden width ``gate_hidden_size``), a dense soft mixture of every expert
    (``mixture_top_k`` keeps the k largest, renormalised, and then only those experts run). Stacked blocks give the
    paper's layer-2-gate-sees-layer-1-mixture structure.

    Balancing constraint (paper §3; our choices where it is silent, methods.md §4.2): during the first
    ``deep_constraint_steps`` training forwards the router keeps running totals ``G_e`` of the gate values it used
    (its combine weights, non-padding tokens). Before a batch, every expert with ``G_e - mean(G) > margin * mean(G)``
    is switched off for that batch and the gate is renormalised over the others (vectorised form: G frozen during the
    batch; the expert at or below the mean always stays on). After the phase the constraint is lifted and never comes
    back: the step counter is a persistent buffer, so a reloaded checkpoint stays lifted. No aux loss.

    ``driven_by_callback``: `hf_comet.training.DeepConstraintCallback` counts optimizer steps and lifts the
    constraint itself; set this flag so the router's own forward counter never ends the phase first.
    """

    routing = "deep"
    citation = "Eigen, D., Ranzato, M., Sutskever, I. *Learning Factored Representations in a Deep Mixture of Experts.* arXiv:1312.4314, 2013."
    config_fields = (
        *LEARNED_FIELDS,
        "gate_hidden_size",
        "mixture_top_k",
        "deep_constraint_steps",
        "deep_constraint_margin",
    )

    def __init__(self, config: CometMoEConfigMixin, layer_idx: int, hidden_size: int):
        super().__init__(config, layer_idx, hidden_size)
        self.num_experts = config.num_experts
        self.top_k = config.mixture_top_k
        self.constraint_steps = config.deep_constraint_steps
        self.margin = float(config.deep_constraint_margin)
        self.driven_by_callback = False
        self.gate_proj = nn.Linear(hidden_size, config.gate_hidden_size)
        self.gate_out = nn.Linear(config.gate_hidden_size, config.num_experts)
        self.register_buffer("assignment_totals", torch.zeros(config.num_experts, dtype=torch.float64), persistent=True)
        self.register_buffer("constraint_steps_done", torch.zeros((), dtype=torch.long), persistent=True)
        self._totals_snapshot: torch.Tensor | None = None
        self._on_snapshot: torch.Tensor | None = None

    @classmethod
    def describe(cls, config: CometMoEConfigMixin) -> str:
        return _learned_description(
            config,
            f"a two-layer softmax gate ({config.gate_hidden_size} hidden units, Deep MoE) mixing "
            f"{cls.describe_experts(config)}",
        )

    def init_weights(self, config: CometMoEConfigMixin) -> None:
        init.zeros_(self.assignment_totals)  # gate_proj / gate_out are nn.Linear: upstream init
        init.zeros_(self.constraint_steps_done)

    def _apply(self, fn, recurse: bool = True):
        # The running totals count gate mass over tokens: in fp16 they overflow at 65504, in bf16 they stop growing
        # past 2^8 relative steps and in fp32 past 2^24. Keep them float64 whatever dtype the model is cast to
        # (checkpoints of the first release hold float32 totals; loading upcasts them).
        result = super()._apply(fn, recurse)
        if self.assignment_totals.dtype != torch.float64:
            self.assignment_totals = self.assignment_totals.double()
        return result

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "assignment_totals"
        if key in state_dict and state_dict[key].dtype != torch.float64:
            state_dict[key] = state_dict[key].double()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def constraint_active(self) -> bool:
        """Whether the balancing constraint still applies (reads one scalar from the device: not for hot paths)."""
        return bool(self._constraint_on())

    def _constraint_on(self) -> torch.Tensor:
        if self.driven_by_callback:  # only lift_constraint ends the phase
            return self.constraint_steps_done >= 0
        return self.constraint_steps_done < self.constraint_steps  # 0-d bool tensor: no host sync

    def lift_constraint(self) -> None:
        """End the constraint phase now, for good."""
        self.driven_by_callback = False
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

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, experts: nn.Module | None = None
    ) -> RoutingDecision:
        logits = self.gate_out(F.relu(self.gate_proj(hidden_states)))
        gates = logits.float().softmax(dim=-1)
        if self.training and (self.constraint_steps > 0 or self.driven_by_callback):
            constrained = gates * self.allowed_experts().to(gates.dtype)
            constrained = constrained / constrained.sum(dim=-1, keepdim=True)
            on = self._on_snapshot if self._on_snapshot is not None else self._constraint_on()
            gates = torch.where(on, constrained, gates)
        if self.top_k is None or self.top_k == self.num_experts:
            return RoutingDecision(router_logits=logits, gate_probs=gates, expert_weights=gates.to(hidden_states.dtype))
        top_weights, top_index = gates.topk(self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return RoutingDecision(
            router_logits=logits,
            gate_probs=gates,
            top_k_index=top_index,
            top_k_weights=top_weights.to(hidden_states.dtype),
            extras={"used_gates": torch.zeros_like(gates).scatter(1, top_index, top_weights)},
        )

    @torch.no_grad()
    def commit(self, decision: RoutingDecision, token_mask: torch.Tensor | None, valid: torch.Tensor) -> None:
        if self.constraint_steps == 0 and not self.driven_by_callback:
            return
        on = self._constraint_on() & valid  # a non-finite decision neither counts nor advances the phase
        used = decision.extras.get("used_gates", decision.gate_probs)  # the float32 gate values the block combined
        increment = masked_sum(used.detach().to(self.assignment_totals.dtype), token_mask)
        self.assignment_totals += torch.where(on, increment, torch.zeros_like(increment))
        self.constraint_steps_done += on.long()



NEEDS_TOKEN_IDS = (
    "routing='hash' sends each token to the expert a fixed hash of its input token id picks, so the model needs "
    "input_ids"
)


@register_router
class HashRouter(Router):
    """Hash routing (Roller et al. 2021, "Hash Layers"): each token goes to one expert picked by a fixed hash of its
    input token id, with weight 1. No router parameters, no gate probabilities, no auxiliary loss, no gradient.

    The hash (our choices, docs/decisions.md): Roller et al.'s "Random Hash", a fixed pseudo-random map
    ``id -> expert``, computed as `hash_token_ids` of the id with the per-layer seed
    ``mix_seed(routing_seed, layer_idx, HASH_SEED_OFFSET)``: a different hash in every layer, i.i.d. uniform over the
    ``num_experts`` experts across ids (balanced in expectation over the vocabulary, not over token frequency; we do
    not fit the paper's frequency-balanced variant, which needs corpus counts). It is a pure function of the config
    and the id: nothing is stored in the checkpoint, every device agrees, and a cached ``generate`` (which feeds only
    the new ids) routes each token as the uncached forward does.

    What a token is keyed by: text families (GPT-2, BERT; any config with ``vocab_size``) use the ``input_ids`` of
    the model call, which the routed forward hands to the blocks (`hf_comet.collect_routing`), so a call with
    ``inputs_embeds`` and no ``input_ids`` is refused before any work. ViT has no token ids: there the key is the
    patch position index (CLS = 0, patches 1..N in raster order), so routing is a fixed function of position.

    ``num_experts_per_tok`` is fixed at 1 (top-1, as in the paper); the experts are ``num_experts`` experts of
    ``moe_intermediate_size`` units (or an even split of the FFN). Selection counts for expert merging are not kept
    (merging is for trainable gates).
    """

    routing = "hash"
    citation = "Roller, S., Sukhbaatar, S., Szlam, A., Weston, J. *Hash Layers For Large Sparse Models.* NeurIPS 2021."
    has_trainable_gate = False
    gate_logits = False  # its one-hot scores are no gate: no router_logits in the outputs
    reads_token_ids = True
    fixed_fields = {"num_experts_per_tok": 1}  # top-1: the config reports it, as for switch
    config_fields = ("num_experts", "moe_intermediate_size", "expert_output_bias")

    def __init__(self, config: CometMoEConfigMixin, layer_idx: int, hidden_size: int):
        super().__init__(config, layer_idx, hidden_size)
        self.num_experts = config.num_experts
        self.top_k = 1
        self.seed = mix_seed(config.routing_seed, layer_idx, HASH_SEED_OFFSET)
        self.keyed_by_position = self.keyed_by(config) == "position"

    @staticmethod
    def keyed_by(config: CometMoEConfigMixin) -> str:
        """``"token"`` (the input token id) for families with a vocabulary, ``"position"`` (the patch index) for ViT."""
        return "token" if getattr(config, "vocab_size", None) is not None else "position"

    @classmethod
    def validate_config(cls, config: CometMoEConfigMixin) -> None:
        if config.moe_intermediate_size is None and config.ffn_width % config.num_experts:
            raise ValueError(
                f"num_experts={config.num_experts!r} does not divide the FFN width {config.ffn_width} "
                f"({config._ffn_width_field}); pick num_experts dividing it or set moe_intermediate_size explicitly."
            )

    @classmethod
    def check_inputs(cls, config: CometMoEConfigMixin, arguments: dict) -> None:
        if cls.keyed_by(config) == "token" and arguments.get("input_ids") is None:
            given = " (got inputs_embeds only)" if arguments.get("inputs_embeds") is not None else ""
            raise ValueError(f"{NEEDS_TOKEN_IDS}{given}; call it with input_ids.")

    @classmethod
    def describe(cls, config: CometMoEConfigMixin) -> str:
        key = "input token id" if cls.keyed_by(config) == "token" else "patch position (CLS = 0)"
        return (
            f"Hash routing in {_layers(config)} (Roller et al.): each token goes to one of "
            f"{cls.describe_experts(config)}, picked by a fixed random hash of its {key} (seed {config.routing_seed}, "
            "a different hash per layer), weight 1. No router parameters, no auxiliary loss."
        )

    def expert_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The expert (int64, same shape) each token id (or position) is routed to in this layer."""
        return hash_token_ids(token_ids, self.seed, self.num_experts)

    @torch.no_grad()
    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        experts: nn.Module | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> RoutingDecision:
        if token_ids is None:
            raise ValueError(f"{NEEDS_TOKEN_IDS}: pass token_ids=<(tokens,) ids> (the model's forward does).")
        if token_ids.shape != hidden_states.shape[:1]:
            raise ValueError(
                f"token_ids of shape {tuple(token_ids.shape)} do not match the {hidden_states.shape[0]} tokens routed."
            )
        index = self.expert_of(token_ids.to(hidden_states.device)).unsqueeze(-1)
        return RoutingDecision(
            router_logits=F.one_hot(index.squeeze(-1), self.num_experts).to(hidden_states.dtype),
            top_k_index=index,
            top_k_weights=torch.ones_like(index, dtype=hidden_states.dtype),
        )


__all__ = [
    "LEARNED_ROUTINGS",
    "MIXTURE_ROUTINGS",
    "MixtureRouter",
    "PAIR_SEED_OFFSET",
    "ROUTER_CLASSES",
    "LEARNED_FIELDS",
    "ROUTINGS",
    "RoutingNames",
    "AttentiveRouter",
    "CometRouter",
    "DeepMoEGate",
    "HASH_SEED_OFFSET",
    "HashRouter",
    "NoisyTopKRouter",
    "Router",
    "RoutingDecision",
    "SwitchRouter",
    "TopKRouter",
    "comet_num_active",
    "cv_squared",
    "hash_token_ids",
    "load_balancing_loss",
    "masked_mean",
    "masked_sum",
    "mix_seed",
    "noisy_top_k_load",
    "register_router",
    "router_z_loss",
    "sample_similarity_loss",
]
