"""The MoE feed-forward block (router × experts) and the collector of one model forward's routing decisions.

A block reads top to bottom as router → experts → record: the router decides (`moe_routers`), the experts run the
decision (`moe_experts.run_experts`), and the decision is handed to the active `RoutingCollector`. After the model
forward the collector computes every layer's aux losses over the non-padding tokens and *commits* the decisions:
routing statistics (`moe_statistics`), expert selection counts (for merging) and router running state (Deep-MoE
totals) are updated then, once per forward. Activation-checkpointing recompute runs outside the collector, so it
replays the forward exactly and counts nothing twice.

The active collector lives in a context variable (threads and nested calls do not mix) that turns into a plain
global while ``torch.compile`` traces (Dynamo cannot trace ``ContextVar.get``; transformers' output capturing does
the same), so compiled forwards, training steps and ``generate`` need no graph break.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .configuration_comet import CometMoEConfigMixin
from .moe_experts import PackedExperts
from .moe_routers import (
    HASH_MODULUS,
    NEEDS_TOKEN_IDS,
    PAIR_SEED_OFFSET,
    ROUTER_CLASSES,
    Router,
    RoutingDecision,
    hash_token_ids,
    masked_sum,
    mix_seed,
    mixtral_load_balancing_loss,
)
from .moe_routers import sample_similarity_loss as similarity_loss
from .moe_statistics import STATISTICS_PAIRS, RoutingStatistics, new_counter


class MoEBlock(nn.Module):
    """One FFN turned into router × experts: ``(..., d) -> (..., d)``, a drop-in for the family's FFN.

    ``dropout`` is applied to the output for families whose dense FFN owns its output dropout (GPT-2).
    """

    def __init__(
        self, config: CometMoEConfigMixin, layer_idx: int, hidden_size: int, activation: str, dropout: float = 0.0
    ):
        super().__init__()
        router_class = ROUTER_CLASSES[config.routing]
        num_experts, expert_width = router_class.expert_layout(config)
        self.layer_idx = layer_idx
        self.hidden_size = hidden_size
        self.router = router_class(config, layer_idx, hidden_size)
        self.experts = PackedExperts(
            config,
            num_experts,
            hidden_size,
            expert_width,
            activation,
            shared_output_bias=router_class.shares_output_bias(config),
        )
        self.dropout = nn.Dropout(dropout)
        self.num_choices = router_class.num_choices(config)  # what the statistics count
        self.similarity_betas = (float(config.similarity_beta_s), float(config.similarity_beta_d))
        self.similarity_num_pairs = config.similarity_num_pairs
        self.track_statistics = True
        self._pair_seed = mix_seed(config.routing_seed, layer_idx, PAIR_SEED_OFFSET)
        self._pair_draws: torch.Tensor | None = None
        self._statistics: RoutingStatistics | None = None
        self._selection_counts: torch.Tensor | None = None
        self._recompute_token_mask: torch.Tensor | None = None
        self._recompute_token_ids: torch.Tensor | None = None
        self.register_buffer("routing_record", self.expected_record(config), persistent=True)

    def expected_record(self, config) -> torch.Tensor:
        """What this block's weights are for (`RECORD_FIELDS`), as an int64 tensor saved with the weights: a
        checkpoint whose config.json no longer matches it is refused at load (``CometPreTrainedMixin``)."""
        router_class = type(self.router)
        num_experts, width = router_class.expert_layout(config)
        values = {
            "routing": routing_code(router_class.routing),
            "num_experts": num_experts,
            "expert_width": width,
            "num_choices": router_class.num_choices(config),
            "comet_block_size": config.comet_block_size if not router_class.has_trainable_gate else 1,
            "units_kept": getattr(self.router, "num_active", 0),
            "routing_seed": config.routing_seed,
            "layer_idx": self.layer_idx,
            "projection_crc32": projection_checksum(getattr(self.router, "projection", None)),
        }
        return torch.tensor([values[name] for name in RECORD_FIELDS], dtype=torch.long)

    @property
    def loss_weights(self) -> dict[str, float]:
        """Coefficient of each aux loss this block reports (the router's, plus the similarity regulariser's)."""
        weights = dict(self.router.loss_weights)
        if any(self.similarity_betas):
            weights["similarity_loss"] = 1.0  # the betas are applied inside the loss
        return weights

    def replace_router(self, router: Router) -> None:
        """Swap in another router over the same experts (used by gate distillation)."""
        self.router = router

    @property
    def learned(self) -> bool:
        """Whether this block has a trainable gate over experts (everything but COMET)."""
        return self.router.has_trainable_gate

    @property
    def experts_module(self) -> PackedExperts:
        """The packed experts, also when a wrapper (PEFT's ParamWrapper) sits around them."""
        experts = self.experts
        while not isinstance(experts, PackedExperts) and hasattr(experts, "get_base_layer"):
            experts = experts.get_base_layer()
        return experts

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]
        tokens = hidden_states.reshape(-1, self.hidden_size)
        collector = active_collector()
        if collector is not None:
            self.router.refresh_state()
            token_mask = collector.token_mask(batch_shape)
            self._recompute_token_mask = token_mask
        else:
            token_mask = self._token_mask_outside_a_routed_forward(batch_shape)
        if self.router.reads_token_ids:
            token_ids = self._token_ids(batch_shape, collector, tokens.device)
            decision = self.router(tokens, token_mask=token_mask, experts=self.experts, token_ids=token_ids)
        else:
            decision = self.router(tokens, token_mask=token_mask, experts=self.experts)
        output = self.experts(tokens, decision)
        if collector is not None:
            collector.record(self, decision, batch_shape, tokens)
        return self.dropout(output.view(*batch_shape, self.hidden_size))

    def _token_ids(
        self, batch_shape: torch.Size, collector: RoutingCollector | None, device: torch.device
    ) -> torch.Tensor:
        """Flat (T,) int64 keys for a router that reads them (hash routing): the position index along the sequence
        for a router keyed by position (ViT: CLS = 0), else the ``input_ids`` of the routed forward (the collector
        holds them for exactly that forward; activation-checkpointing recompute reuses the last forward's, as for
        the token mask). A block called outside a model forward has no ids: refused."""
        if getattr(self.router, "keyed_by_position", False):
            if len(batch_shape) != 2:
                raise ValueError(f"routing by position needs (batch, sequence) tokens, got shape {tuple(batch_shape)}.")
            return torch.arange(batch_shape[1], device=device).expand(batch_shape).reshape(-1)
        if collector is not None:
            token_ids = collector.token_ids(batch_shape)
            self._recompute_token_ids = token_ids
            return token_ids
        token_ids = self._recompute_token_ids
        if token_ids is None or token_ids.numel() != batch_shape.numel() or torch._C._current_graph_task_id() < 0:
            raise ValueError(f"{NEEDS_TOKEN_IDS}, which reach the MoE blocks only inside the model's forward: call the "
                             "model with input_ids, not the block on its own.")  # fmt: skip
        return token_ids

    def _token_mask_outside_a_routed_forward(self, batch_shape: torch.Size) -> torch.Tensor | None:
        """Activation-checkpointing recompute (it runs inside backward, without the collector) must route as the
        forward did: it gets the mask of the last routed forward. Any other call outside a routed forward (a
        block called on its own) has no padding information."""
        mask = self._recompute_token_mask
        if mask is None or mask.numel() != batch_shape.numel() or torch._C._current_graph_task_id() < 0:
            return None
        return mask

    # -- losses --------------------------------------------------------------------------------------------------
    def aux_losses(
        self, decision: RoutingDecision, inputs: torch.Tensor, token_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The router's unweighted aux losses plus the sample-similarity regulariser L_s when its betas are set
        (on ``gate_probs``, the pre-selection gate distribution, for every learned router)."""
        losses = self.router.aux_losses(decision, token_mask)
        if any(self.similarity_betas) and decision.gate_probs is not None:
            pairs, weights = self._sample_pairs(inputs.shape[0], self.similarity_num_pairs, token_mask, inputs.device)
            losses["similarity_loss"] = similarity_loss(
                inputs, decision.gate_probs, pairs, *self.similarity_betas, pair_weights=weights
            )
        return losses

    def _sample_pairs(
        self, num_tokens: int, num_pairs: int, token_mask: torch.Tensor | None, device: torch.device
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``num_pairs`` pseudo-random pairs of distinct tokens and per-pair weights that are 0 where a pair touches
        padding (no host sync to filter them).

        The pairs come from a counter-based hash of (layer seed, draw counter, pair index), not from a
        ``torch.Generator``: the global RNG (training noise) is untouched, the stream is the same on every device,
        its whole state is one integer (``pair_draws``), and ``torch.compile`` traces it without a graph break.
        """
        if num_tokens < 2:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return (empty, empty), torch.zeros(0, device=device)
        if self._pair_draws is None:
            self._pair_draws = _fresh_long(device)
        elif self._pair_draws.device != device:
            self._pair_draws = self._pair_draws.to(device)
        index = torch.arange(2 * num_pairs, device=device, dtype=torch.long)
        draws = hash_token_ids(self._pair_draws * (2 * num_pairs) + index, self._pair_seed, HASH_MODULUS)
        self._pair_draws += 1
        first = draws[:num_pairs] % num_tokens
        second = (first + 1 + draws[num_pairs:] % (num_tokens - 1)) % num_tokens
        if token_mask is None:
            weights = torch.ones(num_pairs, device=device)
        else:
            weights = (token_mask[first] & token_mask[second]).float()
        return (first, second), weights

    @property
    def pair_draws(self) -> int:
        """How many pair draws this block made (the whole state of its pair sampler)."""
        return 0 if self._pair_draws is None else int(self._pair_draws)

    @pair_draws.setter
    def pair_draws(self, value: int) -> None:
        self._pair_draws = torch.tensor(int(value), dtype=torch.long, device=self.experts_module.up_proj.device)

    # -- running counters ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def commit(
        self, decision: RoutingDecision, inputs: torch.Tensor, token_mask: torch.Tensor | None, training: bool
    ) -> None:
        """Fold one forward's decision into the counters (after the forward; see the module docstring).

        A decision that is not finite (a NaN or inf in the block's inputs or gate, a NaN score, e.g. from one bad
        sample or an fp16 overflow the grad scaler will skip) enters no running state: selection counts, router
        state and statistics stay as they were, and the statistics count it (``non_finite_decisions``). Decided on
        the device, without a host sync.
        """
        if not training and not self.track_statistics:
            return
        # One float32 sum per tensor instead of boolean passes (bool kernels are slow on CPU): a NaN or inf anywhere
        # makes the sum non-finite. -inf scores are legal (their sum is -inf, not NaN; +inf and -inf together give
        # NaN, and +inf is never a legal score). Inputs whose float32 sum overflows (beyond 3e38) count as non-finite.
        valid = torch.isfinite(torch.sum(inputs, dtype=torch.float32))
        valid = valid & ~torch.isnan(torch.sum(decision.router_logits, dtype=torch.float32))
        if decision.gate_probs is not None:
            valid = valid & torch.isfinite(torch.sum(decision.gate_probs, dtype=torch.float32))
        selection = decision.selection_mask(self.num_choices)
        if training:
            if self.learned:
                counts = masked_sum(selection, token_mask).round().long()
                counts = torch.where(valid, counts, torch.zeros_like(counts))
                self.selection_counts.add_(counts.to(self.selection_counts.device))
            self.router.commit(decision, token_mask, valid)
        if self.track_statistics:
            pairs = self._sample_pairs(selection.shape[0], STATISTICS_PAIRS, token_mask, selection.device)
            self.statistics(selection.device).update(decision, selection, inputs, token_mask, pairs, valid)

    def statistics(self, device: torch.device | None = None) -> RoutingStatistics:
        """This block's statistics window (created on first use; moved along when the model moves)."""
        if device is None:
            device = self.experts_module.up_proj.device
        if self._statistics is None:
            self._statistics = RoutingStatistics(self.num_choices, device)
        elif self._statistics.device != device:
            self._statistics.to(device)
        return self._statistics

    def reset_statistics(self, device: torch.device | None = None) -> None:
        """Start a fresh statistics window."""
        self._statistics = None
        self.statistics(device)

    def statistics_tensors(self) -> dict[str, torch.Tensor]:
        """The raw accumulators (sums, so they can be all-reduced across ranks before `routing_statistics`)."""
        return self.statistics().tensors

    def routing_statistics(self) -> dict[str, float | int | list[float] | None]:
        """This layer's routing statistics over the current window (see `RoutingStatistics.summary`)."""
        return self.statistics().summary()

    @property
    def selection_counts(self) -> torch.Tensor:
        """(E,) int64 tokens routed to each expert in training since the last reset (what expert merging ranks by)."""
        device = self.experts_module.up_proj.device
        if self._selection_counts is None:
            self._selection_counts = new_counter(self.num_choices, device)
        elif self._selection_counts.device != device:  # the model moved: keep the counts
            self._selection_counts = self._selection_counts.to(device)
        return self._selection_counts

    def reset_selection_counts(self) -> None:
        self._selection_counts = None

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor indexed by expert on dim 0 that defines an expert: the packed weights and router key maps
        (block-relative names). What expert merging (`hf_comet.merging`) combines."""
        experts = self.experts_module  # not a PEFT wrapper's adapter tensors
        tensors = {name: param for name, param in experts.named_parameters(prefix="experts") if param.dim() >= 1}
        tensors.pop("experts.output_bias", None)
        for name, tensor in self.router.expert_parameters().items():
            tensors[f"router.{name}"] = tensor
        return tensors


RECORD_FIELDS = (
    "routing",
    "num_experts",
    "expert_width",
    "num_choices",
    "comet_block_size",
    "units_kept",
    "routing_seed",
    "layer_idx",
    "projection_crc32",
)
"""The structural facts ``MoEBlock.routing_record`` stores (``routing`` as `routing_code`; ``units_kept`` is COMET's k
per token, 0 for learned routers; ``projection_crc32`` the CRC-32 of COMET's frozen projection, 0 for learned
routers: byte damage that keeps the file's size is caught for the one tensor that is never trained)."""


def projection_checksum(projection: torch.Tensor | None) -> int:
    """CRC-32 of a frozen routing tensor's float32 bytes (0 when there is none or it is not materialised)."""
    if projection is None or projection.device.type == "meta":
        return 0
    return zlib.crc32(projection.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def routing_code(name: str) -> int:
    """A stable integer for a routing name (CRC-32), so the record is a plain int64 tensor."""
    return zlib.crc32(name.encode())


def describe_record(record: list[int]) -> dict[str, int | str]:
    """A saved record as field -> value, the routing by name where it is registered."""
    values: dict[str, int | str] = dict(zip(RECORD_FIELDS, record, strict=True))
    names = {routing_code(name): name for name in ROUTER_CLASSES}
    values["routing"] = names.get(int(values["routing"]), f"<unregistered routing code {values['routing']}>")
    return values


def _fresh_long(device) -> torch.Tensor:
    """A 0-d int64 zero that stays a normal tensor even when created under ``torch.inference_mode``."""
    if torch.compiler.is_compiling():
        return torch.zeros((), dtype=torch.long, device=device)
    with torch.inference_mode(False):
        return torch.zeros((), dtype=torch.long, device=device)


class RoutingCollector:
    """Gathers the routing decisions of one model forward and derives aux losses and router logits from them.

    Args:
        attention_mask: the model's (batch, seq) mask, or (batch, choices, seq) for multiple-choice heads, which run
            the encoder on (batch * choices, seq); positions equal to 0 are padding and are left out of every aux
            loss and statistic. ``None`` (or a 4-D custom mask) counts every token.
        input_ids: the model call's token ids, flattened to (rows, seq) like the mask, for routers keyed by them
            (hash routing); held for this forward only. With a KV cache they are the new tokens, as the blocks see.
    """

    def __init__(self, attention_mask: torch.Tensor | None = None, input_ids: torch.Tensor | None = None):
        self.attention_mask, self.input_ids = self._rows(attention_mask, input_ids)
        self.from_model = False  # set by a model's own forward (its nested calls then use it as it is)
        self.records: list[tuple[MoEBlock, RoutingDecision, torch.Size, torch.Tensor]] = []
        self._layer_losses: list[tuple[MoEBlock, dict[str, torch.Tensor]]] | None = None

    def record(self, block: MoEBlock, decision: RoutingDecision, batch_shape: torch.Size, inputs: torch.Tensor) -> None:
        self.records.append((block, decision, batch_shape, inputs))
        self._layer_losses = None

    def token_mask(self, batch_shape: torch.Size) -> torch.Tensor | None:
        """Flat (T,) bool mask of the non-padding tokens of a block input of shape ``batch_shape``."""
        if self.attention_mask is None or len(batch_shape) != 2 or self.attention_mask.shape[0] != batch_shape[0]:
            return None
        # With a KV cache the mask covers past + current tokens; the block sees only the current ones.
        return self.attention_mask[:, -batch_shape[1] :].reshape(-1).bool()

    @staticmethod
    def _rows(attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """The mask and ids as (rows, seq), as the encoder sees them: multiple choice's (batch, choices, seq)
        flattened, a (seq,) call made one row; a mask of any other shape (4-D custom) counts every token (None)."""
        if attention_mask is not None and attention_mask.dim() == 3:
            attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = None
        if input_ids is not None and input_ids.dim() != 2:
            input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        return attention_mask, input_ids

    @contextmanager
    def forward_inputs(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None) -> Iterator[None]:
        """For one model forward inside a caller's `collect_routing`: that forward's padding mask and ids, where the
        caller gave none (so hash routing and padding-aware statistics work inside it too), restored after."""
        before = self.attention_mask, self.input_ids
        mask, ids = self._rows(attention_mask, input_ids)
        self.attention_mask = mask if before[0] is None else before[0]
        self.input_ids = ids if before[1] is None else before[1]
        try:
            yield
        finally:
            self.attention_mask, self.input_ids = before

    def token_ids(self, batch_shape: torch.Size) -> torch.Tensor:
        """Flat (T,) int64 ids of a block input of shape ``batch_shape`` (refused when the call had none or they do
        not line up with the block's tokens)."""
        if self.input_ids is None:
            raise ValueError(f"{NEEDS_TOKEN_IDS}; this forward had none (call the model with input_ids).")
        if tuple(self.input_ids.shape) != tuple(batch_shape):
            raise ValueError(
                f"input_ids of shape {tuple(self.input_ids.shape)} do not line up with the MoE block's tokens "
                f"{tuple(batch_shape)}: routing='hash' needs one id per token."
            )
        return self.input_ids.reshape(-1)

    def layer_losses(self) -> list[tuple[MoEBlock, dict[str, torch.Tensor]]]:
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

    def router_aux_loss(self) -> torch.Tensor | None:
        """Weighted aux loss (the outputs' ``router_aux_loss``): mean over MoE layers of ``sum_name coef[name] * loss[name]``; ``None`` if no router has one."""
        weighted = []
        for block, losses in self.layer_losses():
            coefficients = block.loss_weights
            weighted.append(sum(coefficients[name] * value for name, value in losses.items()))
        return torch.stack(weighted).mean() if weighted else None

    def router_logits(self) -> tuple[torch.Tensor, ...] | None:
        """Gate logits of every MoE layer in forward order, each (T, E); ``None`` when the router has no gate over
        experts (COMET, whose scores are per unit or block: `scores`)."""
        if not self.records or not all(block.router.gate_logits for block, _, _, _ in self.records):
            return None
        return self.scores()

    def scores(self) -> tuple[torch.Tensor, ...]:
        """Router scores of every MoE layer in forward order: (T, E) gate logits, or COMET's (T, F) unit / (T, F / b)
        block scores."""
        return tuple(decision.router_logits for _, decision, _, _ in self.records)

    def native_aux_loss(self) -> torch.Tensor | None:
        """transformers' ``load_balancing_loss_func`` over every MoE layer's gate logits and the padding mask, as
        transformers' native MoE models return it in ``aux_loss`` (unweighted), for routers that train that loss;
        ``None`` otherwise."""
        if not self.records or not all(block.router.native_aux_loss for block, _, _, _ in self.records):
            return None
        router = self.records[0][0].router
        token_mask = self.token_mask(self.records[0][2])
        logits = tuple(decision.router_logits.float() for _, decision, _, _ in self.records)
        return mixtral_load_balancing_loss(logits, router.num_experts, router.top_k, token_mask)

    def losses_by_name(self) -> dict[str, torch.Tensor] | None:
        """Each unweighted aux term by name, mean over the MoE layers that report it; ``None`` when there are none."""
        by_name: dict[str, list[torch.Tensor]] = {}
        for _, losses in self.layer_losses():
            for name, value in losses.items():
                by_name.setdefault(name, []).append(value)
        return {name: torch.stack(values).mean() for name, values in by_name.items()} or None

    def commit(self, training: bool) -> None:
        """Fold every recorded decision into its block's counters and its router's running state.

        Commits of concurrent forwards (threads sharing one model) are serialised by one lock, so no update is
        lost; inside ``torch.compile`` (which cannot trace a lock) forwards are assumed to run one at a time.
        """
        if torch.compiler.is_compiling():
            self._commit(training)
            return
        with _COMMIT_LOCK:
            self._commit(training)

    def _commit(self, training: bool) -> None:
        for block, decision, batch_shape, inputs in self.records:
            block.commit(decision, inputs.detach(), self.token_mask(batch_shape), training)


class _CompilableContextVar:
    """A `ContextVar` that becomes a plain global while ``torch.compile`` traces (as transformers' output capturing
    does): Dynamo cannot trace ``ContextVar.get``. Thread-safe except inside compiled code."""

    def __init__(self, name: str):
        self.context_var: ContextVar = ContextVar(name, default=None)
        self.global_value = None
        self.compiling = False

    def get(self):
        if self.compiling or torch.compiler.is_compiling():
            return self.global_value
        return self.context_var.get()

    def set(self, value):
        if torch.compiler.is_compiling():
            self.global_value, self.compiling = value, True
            return None
        return self.context_var.set(value)

    def reset(self, token) -> None:
        if self.compiling or token is None:
            self.global_value, self.compiling = None, False
        else:
            self.context_var.reset(token)


_ACTIVE_COLLECTOR = _CompilableContextVar("hf_comet_routing_collector")
_COMMIT_LOCK = threading.Lock()  # module level: models stay deep-copyable and picklable


def active_collector() -> RoutingCollector | None:
    """The collector of the forward that is running, if any."""
    return _ACTIVE_COLLECTOR.get()


@contextmanager
def collect_routing(
    attention_mask: torch.Tensor | None = None, input_ids: torch.Tensor | None = None
) -> Iterator[RoutingCollector]:
    """Collect the routing decisions of the MoE blocks that run inside this context (``input_ids``: for routers
    keyed by the token ids, `RoutingCollector`)."""
    collector = RoutingCollector(attention_mask, input_ids)
    token = _ACTIVE_COLLECTOR.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE_COLLECTOR.reset(token)


__all__ = [
    "RECORD_FIELDS",
    "MoEBlock",
    "RoutingCollector",
    "active_collector",
    "collect_routing",
    "describe_record",
    "routing_code",
]
