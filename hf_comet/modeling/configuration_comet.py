"""Configurations of the hf_comet MoE models: the upstream GPT-2 / ViT / BERT configs plus the MoE fields.

This file travels with every saved checkpoint (``trust_remote_code=True``), so it imports only the standard
library, ``transformers`` and sibling modules.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import BertConfig, GPT2Config, ViTConfig

from .routing_names import LEARNED_ROUTINGS, MIXTURE_ROUTINGS, ROUTER_CLASSES, ROUTINGS, comet_num_active

_NO_GATE = "the sample-similarity regulariser needs gate probabilities, which a routing without a gate does not have; leave it at 0"
FIELD_HINTS = {
    "mixture_top_k": "use num_experts_per_tok for the other learned routers",
    "num_experts_per_tok": "attentive and deep use mixture_top_k",
    "similarity_beta_s": _NO_GATE,
    "similarity_beta_d": _NO_GATE,
}
"""Extra advice for a routing-specific field set under a routing that does not read it."""


CONVERSION_METHODS = ("comet", "upcycle", "split")
"""Values of the ``conversion_method`` provenance field: the names of `hf_comet.convert.METHODS` (the converter
checks at import that its registry is exactly this)."""
SPLIT_METHODS = ("contiguous", "random", "kmeans")
"""Values of the ``split_method`` provenance field: the names of `hf_comet.convert.SPLIT_METHODS`."""
SPARSIFY_CLUSTERS = ("none", "coactivation")
"""Values of the ``sparsify_cluster`` provenance field: the names of `hf_comet.convert.sparse.CLUSTERS`."""


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
    "comet_router": FieldRule("str", choices=("full", "structured", "fitted")),
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
    "sparsify_cluster": FieldRule("str", choices=SPARSIFY_CLUSTERS, optional=True, common=True),
}
"""Type and range of every MoE field (checked at construction, at loading and on assignment); the cross-field rules
are in `CometMoEConfigMixin.validate_moe_config` and each router's ``validate_config``."""

MOE_FIELD_ALIASES: dict[str, str] = {"num_local_experts": "num_experts"}
"""transformers' names for MoE fields of ours that mean exactly the same: Mixtral's (and GraniteMoe's, PhiMoE's)
``num_local_experts`` is our ``num_experts``, the experts of one MoE layer. An alias is accepted wherever the field
is (construction, ``from_pretrained`` overrides, ``config.json``, assignment, `update_moe`) and read back
(``config.num_local_experts``); it is serialised under our name only, and an alias given beside its field with a
different value is refused. Names transformers shares with us already (``num_experts_per_tok``, ``norm_topk_prob``,
``moe_intermediate_size``, ``router_aux_loss_coef``, ``router_z_loss_coef``, ``router_jitter_noise``,
``output_router_logits``) need no alias. Names that look alike but mean something else are not aliases: Qwen3-MoE's
``mlp_only_layers`` (the complement of ``moe_layers``), ``decoder_sparse_step``, Switch Transformers'
``expert_capacity`` (a token count, not our ``capacity_factor``) and ``router_bias``; they are refused as unknown MoE
names (`check_unknown_moe_names`)."""

MOE_NAME_WORDS = ("expert", "router", "routing", "moe", "comet", "topk", "top_k", "gate", "gating", "capacity")
"""Words that make an unknown keyword argument look like an MoE field (`check_unknown_moe_names`)."""

LOOKALIKE_NAMES = {
    "mlp_only_layers": "Qwen3-MoE's mlp_only_layers lists the dense blocks; set moe_layers to the MoE blocks instead",
    "decoder_sparse_step": "set moe_layers to the MoE blocks (e.g. every second one) instead",
    "expert_capacity": "Switch Transformers' token count; routing='switch' takes capacity_factor (a multiple of "
    "tokens / num_experts)",
    "router_bias": "our gates have no bias",
}
"""Other MoE implementations' names that mean something different from every field of ours: refused with advice."""

UPSTREAM_MOE_KWARGS = frozenset({"experts_implementation"})
"""Keyword arguments with an MoE word that transformers' own ``PreTrainedConfig`` consumes."""


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between ``a`` and ``b``."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _is_typo_of(name: str, field: str) -> bool:
    """Whether ``name`` is one edit from ``field`` (two for fields of 12 characters or more)."""
    return _edit_distance(name, field) <= (1 if len(field) < 12 else 2)


def check_unknown_moe_names(config_class: type, names: Iterable[str]) -> None:
    """Refuse, by name, every name in ``names`` that is not a field of ``config_class`` but looks like an MoE field.

    ``PreTrainedConfig`` stores any unknown keyword argument as a plain attribute, so a typo such as
    ``num_experts_per_token=2`` would otherwise pass silently and change nothing. The rule (our choice,
    docs/decisions.md): a name that is not a field of the class (upstream or ours), not an alias of one
    (`MOE_FIELD_ALIASES`, the class's ``attribute_map``), not private (``_...``) and not one transformers consumes
    (`UPSTREAM_MOE_KWARGS`) is refused with ``ValueError`` when it contains an MoE word (`MOE_NAME_WORDS`), is
    a typo of an MoE field (one edit away, two for names of 12 characters or more; the message names the field) or is another library's look-alike (`LOOKALIKE_NAMES`, with advice). Any other unknown name keeps transformers' behaviour (stored as an attribute), so
    transformers' own config tests and arbitrary user metadata still work. Assigning such a name after
    construction only warns (transformers' tests set arbitrary attributes on a built config).
    """
    known = set(config_class.__dataclass_fields__) | set(config_class.attribute_map) | set(MOE_FIELD_ALIASES)
    for name in names:
        if not isinstance(name, str) or name in known or name.startswith("_") or name in UPSTREAM_MOE_KWARGS:
            continue
        what = f"{name!r} is not a {config_class.model_type} config field"
        if name in LOOKALIKE_NAMES:
            raise ValueError(f"{what}: {LOOKALIKE_NAMES[name]}.")
        close = [field for field in (*MOE_FIELD_RULES, *MOE_FIELD_ALIASES) if _is_typo_of(name, field)]
        if not close and not any(word in name.lower() for word in MOE_NAME_WORDS):
            continue
        if close:
            raise ValueError(f"{what}; did you mean {close[0]!r}?")
        aliases = ", ".join(f"{alias} for {field}" for alias, field in MOE_FIELD_ALIASES.items())
        raise ValueError(f"{what}; the MoE fields are {', '.join(MOE_FIELD_RULES)} (aliases: {aliases}).")


def resolve_moe_aliases(fields: dict, config_class: type) -> dict:
    """``fields`` with every `MOE_FIELD_ALIASES` name replaced by our field name, after `check_unknown_moe_names`.

    Raises ``ValueError`` when an alias and its field are both given with different values."""
    check_unknown_moe_names(config_class, fields)
    resolved = dict(fields)
    for alias, field in MOE_FIELD_ALIASES.items():
        if alias not in resolved:
            continue
        value = resolved.pop(alias)
        if field in resolved and resolved[field] != value:
            raise ValueError(
                f"{alias}={value!r} and {field}={resolved[field]!r} disagree: {alias} is transformers' name for "
                f"{field}; give one of them."
            )
        resolved[field] = value
    return resolved


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
            experts; ``"hash"`` sends each token to one of ``num_experts`` experts by a fixed hash of its input
            token id (ViT: its patch position), with no router parameters and no aux loss (needs ``input_ids``).
        num_experts: experts per MoE layer for learned routers and ``hash`` (transformers' ``num_local_experts`` is
            accepted as an alias, `MOE_FIELD_ALIASES`).
        num_experts_per_tok: experts each token is sent to: set by ``topk`` and ``noisy_topk``; ``switch`` and
            ``hash`` fix it at 1 (the config reports 1; 1 and the default are accepted, anything else refused). ``attentive`` and
            ``deep`` choose with ``mixture_top_k`` instead; COMET has no experts in this sense (it keeps
            ``comet_keep_rate`` of the FFN units or blocks per token): both leave this field at its default, unread,
            and their cards do not list it.
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
        routing_seed: seed of every random routing quantity: the COMET projections, the per-layer hashes of
            ``hash`` and the token pairs of the similarity regulariser and the overlap statistic; recorded so a model
            built from this config routes the same everywhere.
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
            overlap-similarity property. ``"fitted"`` (set by `hf_comet.convert.sparsify`, MoEfication's learned
            router in closed form): V (blocks x d) and a per-block bias (the ``projection_bias`` buffer) are fitted
            by ridge least squares to predict each block's importance in the dense FFN on calibration tokens, then
            frozen and saved with the weights; a model built from a config alone starts from the random V and a zero
            bias until it is fitted or loaded.
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
        converted_from: provenance, set by `hf_comet.convert_to_moe`: the dense checkpoint's Hub repo id, or
            ``./<folder name>`` for a local folder (never an absolute path; a Hub-cache snapshot is its repo id).
        conversion_method: provenance, set by conversion: one of `CONVERSION_METHODS` (``"comet"``, ``"upcycle"``,
            ``"split"``), or ``None``; other values are refused.
        split_method: provenance of ``split`` conversion: one of `SPLIT_METHODS` (``"contiguous"``, ``"random"``,
            ``"kmeans"``), or ``None``; other values are refused.
        conversion_seed: provenance: the seed of the conversion's random choices (router init, unit partition).
        sparsify_cluster: provenance of `hf_comet.convert.sparsify`: how the FFN units were grouped into the COMET
            blocks, ``"none"`` (consecutive units) or ``"coactivation"`` (units that fire together on the calibration
            data, permuted next to each other), or ``None`` (not sparsified); other values are refused.
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
    sparsify_cluster: str | None = None

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
        self._store_fixed_fields()
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

    def _store_fixed_fields(self) -> None:
        """A field the routing fixes (``Router.fixed_fields``; Switch's ``num_experts_per_tok = 1``) still at its
        default (unset, or a checkpoint that recorded the default) takes the routing's value, so the config reports
        the truth; any other value is refused by `validate_moe_config`."""
        router_class = ROUTER_CLASSES.get(self.routing) if isinstance(self.routing, str) else None  # checked later
        for name, value in getattr(router_class, "fixed_fields", {}).items():
            if getattr(self, name) == MOE_FIELD_DEFAULTS[name]:
                self.__dict__[name] = value

    def _refuse_fields_the_routing_ignores(self, router_class) -> None:
        for name, fixed in getattr(router_class, "fixed_fields", {}).items():
            value = getattr(self, name)
            if value != fixed:
                raise ValueError(
                    f"{name}={value!r} is not allowed under routing={self.routing!r}, which fixes it at {fixed!r}; "
                    f"set {name}={fixed!r} or leave it unset."
                )
        for name, rule in MOE_FIELD_RULES.items():
            if name in getattr(router_class, "fixed_fields", {}):
                continue
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
        name = MOE_FIELD_ALIASES.get(name, name)
        if self.__dict__.get("_moe_checked") and name not in self.__dict__ and not hasattr(type(self), name):
            # a new attribute that looks like a mistyped MoE field: a warning, not an error, because transformers'
            # own tests and tools set arbitrary attributes after construction (``mlp_only_layers`` in
            # ``test_tp_plan_matches_params``); construction, loading and `update_moe` refuse it
            try:
                check_unknown_moe_names(type(self), [name])
            except ValueError as error:
                warnings.warn(f"{error} It is stored as a plain attribute and changes nothing.", stacklevel=2)
        if not self.__dict__.get("_moe_checked") or (name not in MOE_FIELD_RULES and name not in CROSS_FIELDS):
            super().__setattr__(name, value)  # construction, loading internals, upstream-only fields
            return
        if name in MOE_FIELD_RULES:
            MOE_FIELD_RULES[name].check(name, value, self)  # the value alone, before it is stored
        self._assign_and_validate({name: value})

    def update_moe(self, **fields) -> None:
        """Assign several fields at once, then validate once: a change that needs two fields together (e.g. the
        routing and a field only the new routing reads). On a ``ValueError`` every field keeps its old value.
        Aliases (`MOE_FIELD_ALIASES`) are accepted; unknown MoE-looking names are refused (`check_unknown_moe_names`)."""
        fields = resolve_moe_aliases(fields, type(self))
        for name, value in fields.items():
            if name in MOE_FIELD_RULES:
                MOE_FIELD_RULES[name].check(name, value, self)
        self._assign_and_validate(fields)

    def update(self, config_dict: dict) -> None:
        """Upstream ``update``, made atomic: the fields are assigned together and validated once (`update_moe`)."""
        self.update_moe(**config_dict)

    def _assign_and_validate(self, fields: dict) -> None:
        missing = object()
        fixed = {name for router_class in ROUTER_CLASSES.values() for name in getattr(router_class, "fixed_fields", {})}
        old = {name: getattr(self, name, missing) for name in (*fields, *fixed)}
        checked = self.__dict__.get("_moe_checked", False)
        self.__dict__["_moe_checked"] = False  # plain stores while the batch is assigned
        try:
            for name, value in fields.items():
                setattr(self, name, value)
            if checked:
                self._store_fixed_fields()
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
        loaded fields before the config is built, so they are validated together like a new config. An override wins
        over the file's value, under our name or its alias (`MOE_FIELD_ALIASES`); an unknown MoE-looking override is
        refused by name (`check_unknown_moe_names`) instead of being dropped silently."""
        check_unknown_moe_names(cls, [name for name in kwargs if name not in config_dict])
        moe_names = (*MOE_FIELD_RULES, *MOE_FIELD_ALIASES)
        overrides = resolve_moe_aliases({name: kwargs.pop(name) for name in list(kwargs) if name in moe_names}, cls)
        return super().from_dict({**resolve_moe_aliases(dict(config_dict), cls), **overrides}, **kwargs)

    def _remove_keys_not_serialized(self, d: dict) -> None:
        super()._remove_keys_not_serialized(d)
        d.pop("_moe_checked", None)


MOE_FIELD_DEFAULTS = {name: CometMoEConfigMixin.__dataclass_fields__[name].default for name in MOE_FIELD_RULES}
"""The default of every MoE field: a default value is never refused (checkpoints serialise every field)."""
assert set(MOE_FIELD_RULES) == set(CometMoEConfigMixin.__dataclass_fields__), "every MoE field needs a rule"


def accept_transformers_names(config_class: type) -> type:
    """Class decorator (outside ``@strict``): the constructor maps `MOE_FIELD_ALIASES` to our fields and refuses
    unknown MoE-looking keyword arguments (`resolve_moe_aliases`) before any field is set; the class reads aliases
    back through its ``attribute_map``."""
    config_class.attribute_map = {**config_class.attribute_map, **MOE_FIELD_ALIASES}
    init = config_class.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **resolve_moe_aliases(kwargs, type(self)))

    config_class.__init__ = __init__
    return config_class


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


class TensorParallelPlan:
    """A config's ``base_model_tp_plan``: every rule on the class, the rules for modules that exist on an instance.

    Read on the class (``CometBertConfig.base_model_tp_plan``) it is the whole plan, for a model with dense and MoE
    blocks. Read on a config (what transformers does when it builds a model) the dense-FFN rules are left out when
    every block is an MoE block (``moe_layers`` is ``None`` or lists them all): transformers' rule is that every entry
    of a plan names a module of the model (``test_tp_plan_matches_params``), and those modules then do not exist.
    """

    def __init__(self, shared: dict[str, str], dense_ffn: dict[str, str]):
        self.shared, self.dense_ffn = shared, dense_ffn

    def __get__(self, config, owner=None) -> dict[str, str]:
        if config is None or self._has_dense_block(config):
            return {**self.shared, **self.dense_ffn}
        return dict(self.shared)

    @staticmethod
    def _has_dense_block(config) -> bool:
        layers = getattr(config, "moe_layers", None)
        return layers is not None and len(set(layers)) < config.num_hidden_layers


INFERENCE_IGNORED_KEYS = ["cache", "past_key_values", "router_logits", "aux_loss", "router_aux_loss", "router_losses"]
"""Output fields Trainer's evaluation and prediction drop, so metrics receive plain logits: the KV cache (``cache`` in
transformers 5, Trainer's own default; ``past_key_values`` before) and every routing field."""


@accept_transformers_names
@strict
class CometGPT2Config(CometMoEConfigMixin, GPT2Config):
    """GPT-2 config with MoE feed-forward blocks (model type ``comet_gpt2``); see `CometMoEConfigMixin`."""

    model_type = "comet_gpt2"
    # GPT-2's attention and dense FFNs are Conv1D (weight (in, out)), which transformers' colwise/rowwise styles do
    # not shard (they need nn.Linear's `out_features` / `in_features`): the experts are sharded, and the token
    # embedding on the vocabulary (transformers' rule for any plan that shards more than the head; the tied `lm_head`
    # is `colwise_gather_output` in the LM heads' `_tp_plan`).
    base_model_tp_plan = TensorParallelPlan({"wte": "embedding_rowwise", **experts_tp_plan("h.*.mlp")}, {})
    keys_to_ignore_at_inference = INFERENCE_IGNORED_KEYS
    _ffn_width_field = "n_inner"

    @property
    def ffn_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@accept_transformers_names
@strict
class CometViTConfig(CometMoEConfigMixin, ViTConfig):
    """ViT config with MoE feed-forward blocks (model type ``comet_vit``); see `CometMoEConfigMixin`."""

    model_type = "comet_vit"
    # ViT's input embedding is a patch convolution, not a token embedding: replicated
    base_model_tp_plan = TensorParallelPlan(
        {
            "layers.*.attention.q_proj": "colwise",
            "layers.*.attention.k_proj": "colwise",
            "layers.*.attention.v_proj": "colwise",
            "layers.*.attention.o_proj": "rowwise",
            **experts_tp_plan("layers.*.mlp"),
        },
        {"layers.*.mlp.fc1": "colwise", "layers.*.mlp.fc2": "rowwise"},  # dense blocks (not in moe_layers)
    )
    keys_to_ignore_at_inference = INFERENCE_IGNORED_KEYS


@accept_transformers_names
@strict
class CometBertConfig(CometMoEConfigMixin, BertConfig):
    """BERT config with MoE feed-forward blocks (model type ``comet_bert``); see `CometMoEConfigMixin`."""

    model_type = "comet_bert"
    # embeddings stay replicated: the MLM decoder tied to the word embedding has a bias tied to another parameter
    # (`cls.predictions.bias`), which no transformers style shards with it
    base_model_tp_plan = TensorParallelPlan(
        {
            "encoder.layer.*.attention.self.query": "colwise",
            "encoder.layer.*.attention.self.key": "colwise",
            "encoder.layer.*.attention.self.value": "colwise",
            "encoder.layer.*.attention.output.dense": "rowwise",
            **experts_tp_plan("encoder.layer.*.intermediate"),
        },
        {"encoder.layer.*.intermediate.dense": "colwise", "encoder.layer.*.output.dense": "rowwise"},  # dense blocks
    )
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
    "TensorParallelPlan",
]
