"""Configurations of the hf_comet MoE models: the upstream GPT-2 / ViT / BERT configs plus the MoE fields.

This file travels with every saved checkpoint (``trust_remote_code=True``), so it imports only the standard
library, ``transformers`` and sibling modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import BertConfig, GPT2Config, ViTConfig

from .routing_names import LEARNED_ROUTINGS, MIXTURE_ROUTINGS, ROUTER_CLASSES, ROUTINGS, comet_num_active

_NO_GATE = "the sample-similarity regulariser needs gate probabilities, which routing='comet' does not have; leave it at 0"
FIELD_HINTS = {
    "mixture_top_k": "use num_experts_per_tok for the other learned routers",
    "num_experts_per_tok": "switch always sends a token to one expert; attentive and deep use mixture_top_k",
    "similarity_beta_s": _NO_GATE,
    "similarity_beta_d": _NO_GATE,
}
"""Extra advice for a routing-specific field set under a routing that does not read it."""


CONVERSION_METHODS = ("comet", "upcycle", "split")
"""Values of the ``conversion_method`` provenance field: the names of `hf_comet.convert.METHODS` (the converter
checks at import that its registry is exactly this)."""
SPLIT_METHODS = ("contiguous", "random", "kmeans")
"""Values of the ``split_method`` provenance field: the names of `hf_comet.convert.SPLIT_METHODS`."""


@dataclass(frozen=True)
class FieldRule:
    """What one MoE config field accepts: its kind, its range or choices, and whether every routing reads it.

    ``kind`` is ``"int"`` (an ``int``, never a ``bool``), ``"float"`` (an ``int`` or ``float``, never a ``bool``,
    finite), ``"bool"`` (``True``/``False`` only), ``"str"`` or ``"layers"`` (a non-empty list of distinct block
    indices). ``low``/``high`` bound numbers (``low_open``/``high_open``: the bound itself is excluded); ``choices``
    is a sequence (or a callable returning one) of the strings allowed; ``optional`` also allows ``None``.
    ``common``: every routing reads the field; otherwise the routings that read it are those whose router lists it
    in ``config_fields``, and it is refused at a non-default value under any other routing.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    optional: bool = False
    common: bool = False

    def allowed(self, config=None) -> str:
        """What is allowed, in words (for error messages)."""
        if self.kind == "bool":
            what = "a bool (True or False)"
        elif self.kind == "str":
            choices = self.choices() if callable(self.choices) else self.choices
            what = f"one of {', '.join(repr(c) for c in choices)}" if choices is not None else "a string"
        elif self.kind == "layers":
            n = getattr(config, "num_hidden_layers", None) if config is not None else None
            where = f"[0, {n - 1}]" if n else "[0, num_hidden_layers - 1]"
            what = f"a non-empty list of distinct int block indices in {where}"
        else:
            what = "an int (not a bool)" if self.kind == "int" else "a finite number (int or float, not a bool)"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                what += f" in {left}{self.low:g}, {self.high:g}{right}"
            elif self.low is not None:
                what += f" {'>' if self.low_open else '>='} {self.low:g}"
        return what + (", or None" if self.optional else "")

    def check(self, name: str, value, config=None) -> None:
        """Raise ``ValueError`` naming ``name``, ``value`` and what is allowed unless ``value`` fits this rule."""
        if value is None and self.optional:
            return
        if not self._fits(value, config):
            raise ValueError(f"{name}={value!r} is not allowed: {name} must be {self.allowed(config)}.")

    def _fits(self, value, config) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            choices = self.choices() if callable(self.choices) else self.choices
            return isinstance(value, str) and (choices is None or value in choices)
        if self.kind == "layers":
            if not isinstance(value, (list, tuple)) or not value:
                return False
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in value) or len(set(value)) != len(value):
                return False
            n = getattr(config, "num_hidden_layers", None) if config is not None else None
            return all(i >= 0 and (n is None or i < n) for i in value)
        if isinstance(value, bool):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if self.kind == "float" and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


MOE_FIELD_RULES: dict[str, FieldRule] = {
    "routing": FieldRule("str", choices=lambda: tuple(ROUTINGS), common=True),
    "num_experts": FieldRule("int", low=1),
    "num_experts_per_tok": FieldRule("int", low=1),
    "norm_topk_prob": FieldRule("bool"),
    "moe_intermediate_size": FieldRule("int", low=1, optional=True),
    "comet_keep_rate": FieldRule("float", low=0, high=1, low_open=True),
    "moe_layers": FieldRule("layers", optional=True, common=True),
    "router_aux_loss_coef": FieldRule("float", low=0),
    "router_z_loss_coef": FieldRule("float", low=0),
    "output_router_logits": FieldRule("bool", common=True),
    "routing_seed": FieldRule("int", low=0, high=2**63 - 1, common=True),
    "comet_block_size": FieldRule("int", low=1),
    "comet_router": FieldRule("str", choices=("full", "structured")),
    "comet_router_rank": FieldRule("int", low=1),
    "capacity_factor": FieldRule("float", low=0, low_open=True, optional=True),
    "router_jitter_noise": FieldRule("float", low=0, high=1, high_open=True),
    "gate_hidden_size": FieldRule("int", low=1),
    "mixture_top_k": FieldRule("int", low=1, optional=True),
    "deep_constraint_steps": FieldRule("int", low=0),
    "deep_constraint_margin": FieldRule("float", low=0),
    "similarity_beta_s": FieldRule("float", low=0),
    "similarity_beta_d": FieldRule("float", low=0),
    "similarity_num_pairs": FieldRule("int", low=1),
    "expert_output_bias": FieldRule("str", choices=("per_expert", "shared")),
    "router_scale": FieldRule("float", low=0, low_open=True),
    "converted_from": FieldRule("str", optional=True, common=True),
    "conversion_method": FieldRule("str", choices=CONVERSION_METHODS, optional=True, common=True),
    "split_method": FieldRule("str", choices=SPLIT_METHODS, optional=True, common=True),
    "conversion_seed": FieldRule("int", low=0, high=2**63 - 1, optional=True, common=True),
}
"""Type and range of every MoE field (checked at construction, at loading and on assignment); the cross-field rules
are in `CometMoEConfigMixin.validate_moe_config` and each router's ``validate_config``."""

CROSS_FIELDS = frozenset(
    {"n_layer", "num_hidden_layers", "n_inner", "n_embd", "intermediate_size", "chunk_size_feed_forward"}
)
"""Upstream fields the MoE rules depend on (the FFN width, the number of blocks): assigning one re-validates."""


def routings_reading(name: str) -> tuple[str, ...]:
    """The routings whose router reads field ``name`` (every routing for a common field)."""
    if MOE_FIELD_RULES[name].common:
        return tuple(ROUTER_CLASSES)
    return tuple(routing for routing, cls in ROUTER_CLASSES.items() if name in cls.config_fields)


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
        output_router_logits: return every MoE layer's gate logits as ``router_logits`` (``None`` for COMET, which
            has no gate) and transformers' load-balancing loss as ``aux_loss`` (``topk``, ``switch``), as
            transformers' native MoE models do.
        routing_seed: seed of every random routing quantity: the COMET projections and the token pairs of the
            similarity regulariser and the overlap statistic; recorded so a model built from this config routes the
            same everywhere.
        comet_block_size: COMET only. 1 (default) masks single FFN units, as in the paper. ``b > 1`` is block-COMET:
            the projection scores blocks of ``b`` consecutive units (experts = disjoint slices of the FFN), keeps the
            top ``comet_keep_rate`` fraction of blocks per token with weight 1 and runs only those. Must divide the
            FFN width.
        comet_router: COMET only. ``"full"`` (default, the paper's): the projection V is a dense (units x d) matrix
            and each token keeps its global top k. ``"structured"`` (hf_comet's extension, off by default) is a
            cheaper fixed router: V = B A of rank ``comet_router_rank``, and at unit level exactly
            ``keep_rate * g`` units are kept in every group of ``g`` consecutive units (pairs at keep 0.5: one
            comparison per pair, a random hyperplane), so the router costs about ``r (d + F)`` per token instead of
            ``F d`` and needs no top-k over F. ``hf-comet bench`` measures its cost and how well it keeps the
            overlap-similarity property.
        comet_router_rank: rank r of the ``"structured"`` COMET router (capped at the hidden size).
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
    comet_router: str = "full"
    comet_router_rank: int = 64
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
        self.__dict__["_moe_checked"] = True  # from now on every assignment of an MoE field is checked

    def validate_moe_config(self) -> None:
        """Raise ``ValueError`` naming the first MoE field that is out of range, its value and what is allowed.

        Every field's type and range come from `MOE_FIELD_RULES`; then the cross-field rules every routing shares;
        then a routing-specific field set to a non-default value under a routing that does not read it is refused
        (which routings read a field is each router's ``config_fields``); last, the router checks the fields it
        owns (``Router.validate_config``).
        """
        for name, rule in MOE_FIELD_RULES.items():
            rule.check(name, getattr(self, name), self)
        router_class = ROUTER_CLASSES[self.routing]
        if router_class.has_trainable_gate and self.moe_intermediate_size is None and self.ffn_width % self.num_experts:
            raise ValueError(
                f"num_experts={self.num_experts!r} does not divide the FFN width {self.ffn_width} "
                f"({self._ffn_width_field}); pick num_experts dividing it or set moe_intermediate_size explicitly."
            )
        self._refuse_fields_the_routing_ignores(router_class)
        router_class.validate_config(self)

    def _refuse_fields_the_routing_ignores(self, router_class) -> None:
        for name, rule in MOE_FIELD_RULES.items():
            if rule.common or name in router_class.config_fields:
                continue
            value, default = getattr(self, name), MOE_FIELD_DEFAULTS[name]
            if value == default:
                continue
            readers = routings_reading(name)
            if not readers:
                where = "no registered routing"
            elif len(readers) == 1:
                where = f"routing={readers[0]!r}"
            else:
                where = f"routing in {tuple(readers)}"
            hint = FIELD_HINTS.get(name, f"leave it at {default!r} (or choose a routing that reads it)")
            raise ValueError(f"{name}={value!r} only applies to {where} (got routing={self.routing!r}); {hint}.")

    # -- checked assignment ----------------------------------------------------------------------------------------
    def __setattr__(self, name, value):
        if not self.__dict__.get("_moe_checked") or (name not in MOE_FIELD_RULES and name not in CROSS_FIELDS):
            super().__setattr__(name, value)  # construction, loading internals, upstream-only fields
            return
        if name in MOE_FIELD_RULES:
            MOE_FIELD_RULES[name].check(name, value, self)  # the value alone, before it is stored
        self._assign_and_validate({name: value})

    def update_moe(self, **fields) -> None:
        """Assign several fields at once, then validate once: a change that needs two fields together (e.g. the
        routing and a field only the new routing reads). On a ``ValueError`` every field keeps its old value."""
        for name, value in fields.items():
            if name in MOE_FIELD_RULES:
                MOE_FIELD_RULES[name].check(name, value, self)
        self._assign_and_validate(fields)

    def update(self, config_dict: dict) -> None:
        """Upstream ``update``, made atomic: the fields are assigned together and validated once (`update_moe`)."""
        self.update_moe(**config_dict)

    def _assign_and_validate(self, fields: dict) -> None:
        missing = object()
        old = {name: getattr(self, name, missing) for name in fields}
        checked = self.__dict__.get("_moe_checked", False)
        self.__dict__["_moe_checked"] = False  # plain stores while the batch is assigned
        try:
            for name, value in fields.items():
                setattr(self, name, value)
            if checked:
                self.validate_moe_config()
        except BaseException:
            for name, value in old.items():
                if value is missing:
                    self.__dict__.pop(self.attribute_map.get(name, name), None)
                else:
                    setattr(self, name, value)
            raise
        finally:
            self.__dict__["_moe_checked"] = checked

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Upstream ``from_dict``, with MoE overrides (``from_pretrained(path, routing=..., ...)``) merged into the
        loaded fields before the config is built, so they are validated together like a new config."""
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in MOE_FIELD_RULES}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    def _remove_keys_not_serialized(self, d: dict) -> None:
        super()._remove_keys_not_serialized(d)
        d.pop("_moe_checked", None)


MOE_FIELD_DEFAULTS = {name: CometMoEConfigMixin.__dataclass_fields__[name].default for name in MOE_FIELD_RULES}
"""The default of every MoE field: a default value is never refused (checkpoints serialise every field)."""
assert set(MOE_FIELD_RULES) == set(CometMoEConfigMixin.__dataclass_fields__), "every MoE field needs a rule"


def experts_tp_plan(block: str) -> dict[str, str]:
    """Tensor-parallel plan entries of the `PackedExperts` under ``block`` (a MoE block's module path).

    Every expert is split along its intermediate units: ``up_proj`` (E, I, d) ``colwise`` (dim 1), ``up_proj_bias``
    (E, I) and ``down_proj`` (E, d, I) ``rowwise`` (transformers' rowwise shards any parameter not named ``bias`` on
    its last dim: the units), and the experts module gets ``comet_tp_experts`` (`moe_experts.CometExpertsTensorParallel`:
    the router stays replicated, each rank runs its units of the global decision, the partial outputs are
    all-reduced and the replicated output biases count once). docs/decisions.md, "Parallelism plans"."""
    return {
        f"{block}.experts.up_proj": "colwise",
        f"{block}.experts.up_proj_bias": "rowwise",
        f"{block}.experts.down_proj": "rowwise",
        f"{block}.experts": "comet_tp_experts",
    }


INFERENCE_IGNORED_KEYS = ["cache", "past_key_values", "router_logits", "aux_loss", "router_aux_loss", "router_losses"]
"""Output fields Trainer's evaluation and prediction drop, so metrics receive plain logits: the KV cache (``cache`` in
transformers 5, Trainer's own default; ``past_key_values`` before) and every routing field."""


@strict
class CometGPT2Config(CometMoEConfigMixin, GPT2Config):
    """GPT-2 config with MoE feed-forward blocks (model type ``comet_gpt2``); see `CometMoEConfigMixin`."""

    model_type = "comet_gpt2"
    # GPT-2's attention and dense FFNs are Conv1D (weight (in, out)), which transformers' colwise/rowwise styles do
    # not shard (they need nn.Linear's `out_features` / `in_features`): only the experts are sharded.
    base_model_tp_plan = experts_tp_plan("h.*.mlp")
    keys_to_ignore_at_inference = INFERENCE_IGNORED_KEYS
    _ffn_width_field = "n_inner"

    @property
    def ffn_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@strict
class CometViTConfig(CometMoEConfigMixin, ViTConfig):
    """ViT config with MoE feed-forward blocks (model type ``comet_vit``); see `CometMoEConfigMixin`."""

    model_type = "comet_vit"
    base_model_tp_plan = {
        "layers.*.attention.q_proj": "colwise",
        "layers.*.attention.k_proj": "colwise",
        "layers.*.attention.v_proj": "colwise",
        "layers.*.attention.o_proj": "rowwise",
        "layers.*.mlp.fc1": "colwise",  # dense blocks (not in moe_layers)
        "layers.*.mlp.fc2": "rowwise",
        **experts_tp_plan("layers.*.mlp"),
    }
    keys_to_ignore_at_inference = INFERENCE_IGNORED_KEYS


@strict
class CometBertConfig(CometMoEConfigMixin, BertConfig):
    """BERT config with MoE feed-forward blocks (model type ``comet_bert``); see `CometMoEConfigMixin`."""

    model_type = "comet_bert"
    base_model_tp_plan = {
        "encoder.layer.*.attention.self.query": "colwise",
        "encoder.layer.*.attention.self.key": "colwise",
        "encoder.layer.*.attention.self.value": "colwise",
        "encoder.layer.*.attention.output.dense": "rowwise",
        "encoder.layer.*.intermediate.dense": "colwise",  # dense blocks (not in moe_layers)
        "encoder.layer.*.output.dense": "rowwise",
        **experts_tp_plan("encoder.layer.*.intermediate"),
    }
    keys_to_ignore_at_inference = INFERENCE_IGNORED_KEYS

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
    "experts_tp_plan",
]
