"""Configurations of the hf_comet MoE models: the upstream GPT-2 / ViT / BERT configs plus the MoE fields.

This file travels with every saved checkpoint (``trust_remote_code=True``), so it imports only the standard
library, ``transformers`` and sibling modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import BertConfig, GPT2Config, ViTConfig

from .moe_routers import LEARNED_ROUTINGS, MIXTURE_ROUTINGS, ROUTER_CLASSES, ROUTINGS, comet_num_active

FIELD_HINTS = {"mixture_top_k": "use num_experts_per_tok for the other learned routers"}
"""Extra advice for a routing-specific field set under a routing that does not read it."""

EXCLUSIVE_FIELDS = ("comet_block_size", "capacity_factor", "mixture_top_k", "router_scale")
"""Routing-specific fields refused at a non-default value when the chosen routing does not read them (which routers
read a field is each router's ``config_fields``)."""

CONVERSION_METHODS = ("comet", "upcycle", "split")
"""Values of the ``conversion_method`` provenance field: the names of `hf_comet.convert.METHODS` (the converter
checks at import that its registry is exactly this)."""
SPLIT_METHODS = ("contiguous", "random", "kmeans")
"""Values of the ``split_method`` provenance field: the names of `hf_comet.convert.SPLIT_METHODS`."""


@dataclass(kw_only=True)
class CometMoEConfigMixin:
    """MoE fields shared by the three families, and their validation.

    Every field is documented once here, in the order of the dataclass; ``docs/config.md`` is generated from this
    section (`hf_comet.config_reference.config_field_reference`, checked by ``tests/test_docs.py``).

    Args:
        routing: which router decides: a routing name registered with `register_router` (``ROUTER_CLASSES``;
            ``hf-comet info`` lists them). ``"comet"`` is a frozen random projection that keeps ``comet_keep_rate``
            of the FFN units per token (no trainable gate, no aux loss); learned routings gate ``num_experts``
            experts.
        num_experts: experts per MoE layer for learned routers.
        num_experts_per_tok: experts each token is sent to by ``topk`` and ``noisy_topk``.
        norm_topk_prob: ``topk``: renormalise the kept probabilities to sum to 1 (Mixtral); needed for exact
            upcycling.
        moe_intermediate_size: width of one expert. ``None`` splits the dense FFN width evenly over
            ``num_experts`` (same parameter count as the dense model); set it to the FFN width for full-size experts.
        comet_keep_rate: fraction of FFN units (or blocks) kept per token by COMET, in (0, 1]:
            ``k = max(1, floor(rate * units))``.
        moe_layers: indices of the blocks whose FFN becomes an MoE block; ``None`` means every block.
        router_aux_loss_coef: weight of the router's balance losses (learned routers only): the Switch load-balancing
            loss (``topk``, ``switch``), importance + load cv^2 (``noisy_topk``), importance cv^2 (``attentive``;
            the paper used 0.2). ``deep`` balances with its constraint instead.
        router_z_loss_coef: weight of the ST-MoE router z-loss (``topk``, ``noisy_topk``, ``switch``; ST-MoE used
            1e-3; 0 disables it).
        output_router_logits: return every MoE layer's router scores as ``router_logits``.
        routing_seed: seed of every random routing quantity: the COMET projections and the token pairs of the
            similarity regulariser and the overlap statistic; recorded so a model built from this config routes the
            same everywhere.
        comet_block_size: COMET only. 1 (default) masks single FFN units, as in the paper. ``b > 1`` is block-COMET:
            the projection scores blocks of ``b`` consecutive units (experts = disjoint slices of the FFN), keeps the
            top ``comet_keep_rate`` fraction of blocks per token with weight 1 and runs only those. Must divide the
            FFN width.
        capacity_factor: ``switch`` only. ``None`` (default) is dropless; a float caps each expert at
            ``ceil(capacity_factor * tokens / num_experts)`` tokens per training forward, in token order. Dropped
            tokens get a zero FFN output (no output bias), so they pass through the residual connection, and are
            counted in the statistics.
        router_jitter_noise: ``switch`` only. Multiplicative jitter ``U(1 - eps, 1 + eps)`` on the router input in
            training (Fedus et al. 2021 used 1e-2); 0 disables it.
        gate_hidden_size: hidden width of the two-layer gate trunk of ``attentive`` (H, paper 32) and ``deep``
            (paper 20-50).
        mixture_top_k: ``attentive``/``deep`` only. ``None`` (default, paper-faithful) mixes every expert; ``k`` keeps
            the k highest-scoring experts with renormalised weights (for ``deep`` this also makes inference sparse;
            ``attentive`` must still run every expert to score it).
        deep_constraint_steps: ``deep`` only. Length of the balancing-constraint phase (Eigen et al. 2013, §3) in
            training forward passes of the layer; afterwards the constraint is lifted for good. 0 disables it.
        deep_constraint_margin: ``deep`` only. An expert whose running assignment total exceeds the mean total by more
            than ``margin * mean`` is switched off for the next batch.
        similarity_beta_s: weight of the same-expert term of the sample-similarity regulariser L_s (Krishnamurthy et
            al. 2023) on the gate distribution ``gate_probs``: distant tokens sharing an expert are penalised.
            Learned routers only; 0 disables.
        similarity_beta_d: weight of the different-expert reward of L_s: distant tokens sent to different experts.
        similarity_num_pairs: token pairs sampled per layer and forward for L_s (memory linear in this, not in T^2).
        expert_output_bias: ``"per_expert"`` (each expert has its own output bias, weighted like its output) or
            ``"shared"`` (one output bias added once per routed token, as in the dense FFN: experts that are slices
            of one FFN, from ``split`` conversion). Block-COMET always shares it.
        router_scale: ``topk``/``noisy_topk``: the kept gate weights are multiplied by this (LLaMA-MoE's score scale).
            ``split`` conversion sets it to ``num_experts_per_tok`` with renormalised weights, so a uniform gate gives
            each selected slice weight 1 and every-expert routing is exactly the dense FFN.
        converted_from: provenance, set by `hf_comet.convert_to_moe`: the dense checkpoint's path or repo id.
        conversion_method: provenance, set by conversion: one of `CONVERSION_METHODS` (``"comet"``, ``"upcycle"``,
            ``"split"``), or ``None``; other values are refused.
        split_method: provenance of ``split`` conversion: one of `SPLIT_METHODS` (``"contiguous"``, ``"random"``,
            ``"kmeans"``), or ``None``; other values are refused.
        conversion_seed: provenance: the seed of the conversion's random choices (router init, unit partition).
    """

    routing: str = "comet"
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    moe_intermediate_size: int | None = None
    comet_keep_rate: float | int = 0.5
    moe_layers: list[int] | None = None
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.0
    output_router_logits: bool = False
    routing_seed: int = 0
    comet_block_size: int = 1
    capacity_factor: float | int | None = None
    router_jitter_noise: float | int = 0.01
    gate_hidden_size: int = 32
    mixture_top_k: int | None = None
    deep_constraint_steps: int = 1000
    deep_constraint_margin: float | int = 0.1
    similarity_beta_s: float | int = 0.0
    similarity_beta_d: float | int = 0.0
    similarity_num_pairs: int = 1024
    expert_output_bias: str = "per_expert"
    router_scale: float | int = 1.0
    converted_from: str | None = None
    conversion_method: str | None = None
    split_method: str | None = None
    conversion_seed: int | None = None

    _ffn_width_field = "intermediate_size"  # config field that holds the FFN width, named in error messages

    # -- family hooks --------------------------------------------------------------------------------------------
    @property
    def ffn_width(self) -> int:
        """Width F of the dense FFN (its number of intermediate units)."""
        return self.intermediate_size

    # -- derived quantities --------------------------------------------------------------------------------------
    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` gets an MoE FFN."""
        return self.moe_layers is None or layer_idx in self.moe_layers

    @property
    def expert_intermediate_size(self) -> int:
        """Width of one learned-routing expert (``moe_intermediate_size`` or an even split of the FFN)."""
        if self.moe_intermediate_size is not None:
            return self.moe_intermediate_size
        return self.ffn_width // self.num_experts

    # -- validation ----------------------------------------------------------------------------------------------
    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_moe_config()

    def validate_moe_config(self) -> None:
        """Raise ``ValueError`` naming the first MoE field that is out of range, and what is allowed.

        Fields every routing reads are checked here; each router checks the fields it owns
        (``Router.validate_config``), and a routing-specific field set under a routing that does not read it is
        refused (`EXCLUSIVE_FIELDS`).
        """
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} is not supported; choose one of {', '.join(ROUTINGS)}.")
        router_class = ROUTER_CLASSES[self.routing]
        if isinstance(self.comet_keep_rate, bool) or not 0.0 < self.comet_keep_rate <= 1.0:
            raise ValueError(
                f"comet_keep_rate={self.comet_keep_rate!r} must be in (0, 1] (the fraction of units kept)."
            )
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_experts={self.num_experts}."
            )
        n_layers = self.num_hidden_layers
        if self.moe_layers is not None:
            if len(self.moe_layers) == 0:
                raise ValueError("moe_layers=[] selects no block; pass None for every block or a list of indices.")
            bad = [i for i in self.moe_layers if not 0 <= i < n_layers]
            if bad:
                raise ValueError(
                    f"moe_layers={self.moe_layers} has {bad} outside [0, {n_layers - 1}] (num layers {n_layers})."
                )
            if len(set(self.moe_layers)) != len(self.moe_layers):
                raise ValueError(f"moe_layers={self.moe_layers} repeats a block index.")
        if self.moe_intermediate_size is not None and self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be >= 1 or None.")
        if router_class.has_trainable_gate and self.moe_intermediate_size is None and self.ffn_width % self.num_experts:
            raise ValueError(
                f"the FFN width {self.ffn_width} ({self._ffn_width_field}) is not divisible by num_experts="
                f"{self.num_experts}; pick num_experts dividing it or set moe_intermediate_size explicitly."
            )
        for name in (
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "router_jitter_noise",
            "deep_constraint_margin",
            "deep_constraint_steps",
            "similarity_beta_s",
            "similarity_beta_d",
        ):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number >= 0.")
        if self.comet_block_size < 1:
            raise ValueError(f"comet_block_size={self.comet_block_size} must be >= 1 (1 = unit-level COMET).")
        if self.router_jitter_noise >= 1:
            raise ValueError(f"router_jitter_noise={self.router_jitter_noise} must be in [0, 1).")
        if self.gate_hidden_size < 1:
            raise ValueError(f"gate_hidden_size={self.gate_hidden_size} must be >= 1.")
        if self.similarity_num_pairs < 1:
            raise ValueError(f"similarity_num_pairs={self.similarity_num_pairs} must be >= 1.")
        if self.expert_output_bias not in ("per_expert", "shared"):
            raise ValueError(
                f"expert_output_bias={self.expert_output_bias!r} is not supported; choose 'per_expert' or 'shared'."
            )
        if isinstance(self.router_scale, bool) or not self.router_scale > 0:
            raise ValueError(f"router_scale={self.router_scale!r} must be a number > 0.")
        if self.conversion_method is not None and self.conversion_method not in CONVERSION_METHODS:
            raise ValueError(
                f"conversion_method={self.conversion_method!r} is not a conversion; use one of "
                f"{', '.join(CONVERSION_METHODS)} (or None)."
            )
        if self.split_method is not None and self.split_method not in SPLIT_METHODS:
            raise ValueError(
                f"split_method={self.split_method!r} is not a split method; use one of {', '.join(SPLIT_METHODS)} "
                "(or None)."
            )
        self._refuse_fields_the_routing_ignores(router_class)
        router_class.validate_config(self)

    def _refuse_fields_the_routing_ignores(self, router_class) -> None:
        defaults = {name: f.default for name, f in CometMoEConfigMixin.__dataclass_fields__.items()}
        for name in EXCLUSIVE_FIELDS:
            value = getattr(self, name)
            if value == defaults[name] or name in router_class.config_fields:
                continue
            readers = [routing for routing, cls in ROUTER_CLASSES.items() if name in cls.config_fields]
            where = f"routing={readers[0]!r}" if len(readers) == 1 else f"routing in {tuple(readers)}"
            hint = FIELD_HINTS.get(name, f"leave it at {defaults[name]!r}")
            raise ValueError(f"{name}={value!r} only applies to {where} (got routing={self.routing!r}); {hint}.")


@strict
class CometGPT2Config(CometMoEConfigMixin, GPT2Config):
    """GPT-2 config with MoE feed-forward blocks (model type ``comet_gpt2``); see `CometMoEConfigMixin`."""

    model_type = "comet_gpt2"
    keys_to_ignore_at_inference = ["past_key_values", "router_logits", "aux_loss"]
    _ffn_width_field = "n_inner"

    @property
    def ffn_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@strict
class CometViTConfig(CometMoEConfigMixin, ViTConfig):
    """ViT config with MoE feed-forward blocks (model type ``comet_vit``); see `CometMoEConfigMixin`."""

    model_type = "comet_vit"
    keys_to_ignore_at_inference = ["router_logits", "aux_loss"]


@strict
class CometBertConfig(CometMoEConfigMixin, BertConfig):
    """BERT config with MoE feed-forward blocks (model type ``comet_bert``); see `CometMoEConfigMixin`."""

    model_type = "comet_bert"
    keys_to_ignore_at_inference = ["router_logits", "aux_loss"]

    def validate_moe_config(self) -> None:
        super().validate_moe_config()
        if self.chunk_size_feed_forward:
            raise ValueError(
                f"chunk_size_feed_forward={self.chunk_size_feed_forward} is not supported by comet_bert (routing "
                "statistics need whole sequences); use 0."
            )


CometGPT2Config.register_for_auto_class()
CometViTConfig.register_for_auto_class()
CometBertConfig.register_for_auto_class()

__all__ = [
    "LEARNED_ROUTINGS",
    "MIXTURE_ROUTINGS",
    "ROUTINGS",
    "CometBertConfig",
    "CometGPT2Config",
    "CometMoEConfigMixin",
    "CometViTConfig",
    "comet_num_active",
]
