"""Packed experts: the FFN units grouped into E experts, one tensor per weight with a leading expert dimension.

Layout is ``nn.Linear``'s (out, in) for every family: ``up_proj`` (E, I, d), ``up_proj_bias`` (E, I),
``down_proj`` (E, d, I), ``down_proj_bias`` (E, d). GPT-2's ``Conv1D`` (in, out) weights are transposed by the
family adapter when converting. Checkpoints always hold these shapes contiguous; in memory, the first decode on
slabs in eval mode lays ``down_proj`` out unit-major (same shape and values, strides (d I, 1, d): `PackedExperts.
lay_out_for_slabs`), which reads 1.6x faster one token at a time; ``train()`` and ``state_dict()`` lay it back out.

How a routing decision runs, and on which kernel, is chosen in one function, `hf_comet.modeling.execution.
choose_execution` (run by `run_experts`; MegaBlocks' "kernel choice is one function"): masked dense compute for unit
masks and for weight-1 block decisions that keep most blocks, a dense mixture for mixture weights, per-token weight
slabs for decoding-sized inference batches, and an experts kernel for other top-k decisions: ours, ``bucketed``
(`moe_kernels`), by default, or transformers' ``grouped_mm`` / ``eager`` (``experts_implementation=``), every one
called through `EXPERTS_FUNCTIONS` (or the module's eager loop). Its thresholds are measured by ``hf-comet bench``.
Every path goes through ``PackedExperts.forward``, so wrappers of the module (PEFT's ``ParamWrapper``, which applies
LoRA to ``up_proj``/``down_proj`` only while the wrapped forward runs) see them all.

Reproducibility: ``grouped_mm`` here is our `deterministic_grouped_mm_experts_forward`, not transformers' kernel of
that name. Transformers' kernel gathers the biases per routed row (``bias[expert_ids]``) and the hidden states per
slot (``hidden_states[perm // k]``); the backward of such a gather is ``index_put_(accumulate=True)`` with repeated
indices, which torch documents as nondeterministic on CPU unless ``torch.use_deterministic_algorithms(True)``: it
runs as a parallel atomic float add once the gradient has 32768 elements and more than one thread is on, so the
summation order, hence the last bits, changed from run to run and top-k training was not reproducible (issue 11
§6). Ours keeps the grouped matmuls and forms those two gathers so that no gradient element sums values in an
unordered way, with or without deterministic mode; the ``eager`` kernel was already deterministic.

With ``shared_output_bias`` (block-COMET and split experts, which are slices of one FFN) the experts have no bias of
their own on the output: ``down_proj_bias`` is a zero buffer (the kernels still read it) and ``output_bias`` (d,) is
added once per routed token, exactly as the dense FFN adds its second bias. A token that no expert takes (dropped
by Switch capacity) gets a zero output, bias included.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.integrations.moe import (
    ExpertsInterface,
    _grouped_linear,
    grouped_mm_experts_forward,
    use_experts_implementation,
)
from transformers.utils import logging
from transformers.utils.import_utils import is_torch_distributed_available

from .configuration_comet import CometMoEConfigMixin
from .execution import MASKED_DENSE, MIXTURE, SLABS, choose_execution, thresholds, top_k_execution
from .moe_kernels import FusedActivation, bucketed_experts, is_unit_major, masked_activation, slab_experts, unit_major
from .moe_routers import RoutingDecision

logger = logging.get_logger(__name__)


def _rows_of_experts(one_hot: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[expert_ids]`` as ``one_hot (S, E) @ table (E, n)`` in the table's dtype with autocast off, exact for finite values: its gradient
    ``one_hot^T @ grad`` is a matmul, whose summation order is fixed, where the gather's is an atomic scatter-add."""
    with torch.autocast(device_type=table.device.type, enabled=False):
        return one_hot.to(table.dtype) @ table


def deterministic_grouped_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Transformers' ``grouped_mm`` experts kernel with a backward that gives the same bits on every run.

    Same computation (rows sorted by expert, two grouped matmuls, weighted sum over the k slots); two gathers differ:
    each token is copied once per slot with ``expand`` (whose gradient sums the k slots in order) and then permuted
    (a gather without repeats: every gradient row receives one value), and the per-row biases are a one-hot matmul
    (`_rows_of_experts`). The sort is stable. Expert parallelism (sentinel rows) runs transformers' kernel.
    """
    if self._is_expert_parallel:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, hidden_dim = hidden_states.shape
    num_top_k = top_k_index.shape[-1]
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    per_slot = hidden_states.unsqueeze(1).expand(num_tokens, num_top_k, hidden_dim).reshape(-1, hidden_dim)
    selected = per_slot[perm]  # (S, d), S = T * k, grouped by expert
    sample_weights_g = top_k_weights.reshape(-1)[perm]
    # histc, as transformers' kernel (static shape for CUDA graphs; float on CPU/MPS, int on CUDA in deterministic mode)
    counted = expert_ids_g.float() if expert_ids_g.device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(counted, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    one_hot = F.one_hot(expert_ids_g, self.num_experts)
    proj = _grouped_linear(selected, self.up_proj, offsets) + _rows_of_experts(one_hot, self.up_proj_bias)
    proj = _grouped_linear(self.act_fn(proj), self.down_proj, offsets) + _rows_of_experts(one_hot, self.down_proj_bias)
    weighted = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    output = weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return output.to(hidden_states.dtype)


BUCKETED = "bucketed"
"""Our experts implementation (`hf_comet.modeling.moe_kernels.bucketed_experts`), the default."""


def bucketed_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`bucketed_experts` behind transformers' experts-function signature (`ExpertsInterface`)."""
    down_bias = None if self.output_bias is not None else self.down_proj_bias
    return bucketed_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        self.up_proj,
        self.up_proj_bias,
        self.down_proj,
        down_bias,
        self.act_fn,
    )


EXPERTS_FUNCTIONS = ExpertsInterface()
"""Transformers' experts implementations, with ``grouped_mm`` replaced by `deterministic_grouped_mm_experts_forward`,
plus ours, ``bucketed``."""
EXPERTS_FUNCTIONS["grouped_mm"] = deterministic_grouped_mm_experts_forward
EXPERTS_FUNCTIONS[BUCKETED] = bucketed_experts_forward


_SLAB_MARK = "_hf_comet_laid_out_for_slabs"
"""Set on a ``down_proj`` Parameter that `ExpertKernels.lay_out_for_slabs` laid out."""


@use_experts_implementation(experts_interface=EXPERTS_FUNCTIONS, has_gate=False, has_bias=True, is_transposed=False)
class ExpertKernels(nn.Module):
    """The packed parameters and the sparse top-k kernel ``(T, d), (T, k), (T, k) -> (T, d)``.

    ``forward`` is transformers' experts-implementation dispatch: ``config._experts_implementation`` picks
    ``grouped_mm`` (default; `deterministic_grouped_mm_experts_forward`) or ``eager`` (the loop below).
    `PackedExperts` is the module models hold.
    """

    def __init__(
        self,
        config: CometMoEConfigMixin,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        shared_output_bias: bool = False,
    ):
        super().__init__()
        thresholds()  # this machine's measured thresholds, read now: a compiled forward cannot read the file
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if shared_output_bias:
            self.register_buffer("down_proj_bias", torch.zeros(num_experts, hidden_size), persistent=False)
            self.output_bias = nn.Parameter(torch.empty(hidden_size))
        else:
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
            self.output_bias = None
        self.act_fn = FusedActivation(activation)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """``nn.Module``'s, after laying ``down_proj`` back out contiguous (`lay_out_for_slabs`), so the state
        dict's tensors share memory with the parameters as usual (EMA updates and in-place loads write through them)
        and every saver gets the checkpoint layout (safetensors' ``save_file``, which Accelerate's ``save_state``
        calls, refuses strided tensors). The next decode lays it out again, after which a state dict kept from
        before writes nowhere for that key. A parameter in shared memory is left in place and copied."""
        self._lay_out_contiguous()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "down_proj"
        if not keep_vars and key in destination and not destination[key].is_contiguous():  # shared since its layout
            destination[key] = destination[key].contiguous()

    def _lay_out_contiguous(self) -> None:
        """Lay a unit-major ``down_proj`` back out contiguous in place, unless it was moved to shared memory since
        (``share_memory()`` after a decode): a new storage would stop the other processes seeing its updates."""
        param = self._parameters.get("down_proj")
        if type(param) is nn.Parameter and not param.is_contiguous() and is_unit_major(param) and not param.is_shared():
            with torch.inference_mode(False), torch.no_grad():
                param.data = param.data.contiguous()

    def lay_out_for_slabs(self) -> bool:
        """Lay ``down_proj`` out `unit_major` in place (same Parameter, shape and values; only its memory order), so
        a decoded token's down slabs are read in rows of d, as the up slabs are; True when it is so laid out.

        Done by the first slab call in eval mode (`sparse_forward`), so only models that decode pay the copy, and
        undone by ``train()`` (FSDP's ``fully_shard`` refuses non-contiguous parameters) and by ``state_dict()``.
        Never done where the memory is not this module's own to reorder: a Parameter that views part of a storage
        (flattened by FSDP) or lives in shared memory (``share_memory_()``: other processes would stop seeing its
        updates), a DTensor, a parametrized weight (PEFT's LoRA on ``down_proj``), or weights swapped in per forward
        (Accelerate's offloading hooks: one on this module, or a second Parameter other than those laid out
        before, after which this module stops reordering; ``deepcopy`` drops the mark that tells them apart, so one
        is allowed). Two Parameters over one storage of exactly their size are not detected: laying one out unties
        them. The swap is not synchronised: a model shared by threads should decode once (or call this on each
        experts module) before serving, and not call ``state_dict()`` while serving. A decision of ours
        (``docs/decisions.md``, Decoding): the checkpoint format and the (E, d, I) shape stay.
        """
        param = self._parameters.get("down_proj")
        if self.training or type(param) is not nn.Parameter or param.device.type != "cpu" or hasattr(self, "_hf_hook"):
            return False
        if is_unit_major(param):
            return True
        # None: never laid out; n: laid out, n unmarked Parameters laid out since; False: stopped
        state = self.__dict__.get("_slab_layout")
        own = param.storage_offset() == 0 and param.untyped_storage().nbytes() == param.numel() * param.element_size()
        if state is False or not own or param.is_shared():
            return False
        if state is not None and not getattr(param, _SLAB_MARK, False):  # swapped in since, or a deepcopy's
            if state >= 1:  # a second one: a new Parameter per forward, whose copy would cost more than it saves
                self._slab_layout = False
                return False
            state += 1
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: training may follow a decode
            param.data = unit_major(param.data)
        setattr(param, _SLAB_MARK, True)
        self._slab_layout = 0 if state is None else state
        return True

    def train(self, mode: bool = True) -> ExpertKernels:
        """``nn.Module``'s; ``train()`` also lays a ``down_proj`` that `lay_out_for_slabs` made unit-major back
        out contiguous (same Parameter and values), the layout that FSDP and DDP's gradient buckets expect."""
        if mode:
            self._lay_out_contiguous()
            self.__dict__.pop("_slab_layout", None)  # a fresh start for the next stretch of inference
        return super().train(mode)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Eager kernel (`eager_forward`); transformers' dispatch replaces it by the configured kernel."""
        return self.eager_forward(hidden_states, top_k_index, top_k_weights)

    def eager_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Eager kernel: loop over the experts that received tokens; accumulates in the input's dtype."""
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.bincount(top_k_index.flatten(), minlength=self.num_experts).nonzero().flatten().tolist()
        for expert in hit:
            token_idx, slot = torch.where(top_k_index == expert)
            h = self.act_fn(F.linear(hidden_states[token_idx], self.up_proj[expert], self.up_proj_bias[expert]))
            y = F.linear(h, self.down_proj[expert], self.down_proj_bias[expert])
            # under autocast y is bf16/fp16 while the accumulator keeps the input's dtype
            output.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None].to(y.dtype)).to(output.dtype))
        return output


class PackedExperts(ExpertKernels):
    """E two-layer FFNs ``act(u W1_e^T + b1_e) W2_e^T + b2_e`` stored packed; no gating (GPT-2/ViT/BERT FFNs).

    ``forward(hidden_states, decision)`` runs a `RoutingDecision` (`run_experts`); ``forward(hidden_states)``
    returns every expert's intermediate activations (T, E, I) (what attentive gating keys on).
    """

    def forward(self, hidden_states: torch.Tensor, decision: RoutingDecision | None = None) -> torch.Tensor:
        if decision is None:
            return self.expert_activations(hidden_states)
        return run_experts(self, hidden_states, decision)

    def init_weights(self, config: CometMoEConfigMixin, down_proj_std: float) -> None:
        """Normal(0, ``initializer_range``) weights (``down_proj_std`` for the output projection), zero biases."""
        init.normal_(self.up_proj, mean=0.0, std=config.initializer_range)
        init.zeros_(self.up_proj_bias)
        init.normal_(self.down_proj, mean=0.0, std=down_proj_std)
        init.zeros_(self.down_proj_bias)
        if self.output_bias is not None:
            init.zeros_(self.output_bias)

    def sparse_forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor | None,
        execution: str | None = None,
    ) -> torch.Tensor:
        """A top-k decision on ``execution``: ``"slabs"`` or an experts kernel (``"bucketed"``, ``"grouped_mm"``,
        ``"eager"``, each `EXPERTS_FUNCTIONS`' entry of that name); ``None`` asks `choose_execution`.

        ``top_k_weights=None`` means weight 1 for every kept expert (block-COMET). The kernels other than ours take
        explicit weights, so ones are made for them. A ``grouped_mm`` that `choose_execution` turned into ``eager``
        (weight strides not multiples of 16 bytes) is said once."""
        if execution is None or execution == MASKED_DENSE:  # a direct call: a top-k kernel, never masked compute
            execution = top_k_execution(self, top_k_index.shape, False, hidden_states, top_k_weights)
        if execution == SLABS:
            self.lay_out_for_slabs()
            down_bias = None if self.output_bias is not None else self.down_proj_bias
            return slab_experts(
                hidden_states, top_k_index, top_k_weights, self.up_proj, self.up_proj_bias, self.down_proj, down_bias,
                self.act_fn,
            )  # fmt: skip
        if execution == BUCKETED:
            return EXPERTS_FUNCTIONS[BUCKETED](self, hidden_states, top_k_index, top_k_weights)
        if top_k_weights is None:
            top_k_weights = torch.ones(top_k_index.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        requested = getattr(self.config, "_experts_implementation", None) or BUCKETED
        if execution == "eager" and requested != "eager":
            logger.warning_once(
                f"hf_comet: experts of width {self.intermediate_size} and hidden size {self.hidden_size} in "
                f"{self.up_proj.dtype} do not fit grouped_mm (strides must be multiples of 16 bytes); running the "
                "eager experts kernel for them instead (same results, slower). Pick widths that are multiples of 8 to "
                "use grouped_mm."
            )
        if execution == "eager":  # the module's own loop (transformers registers no function under this name)
            return self.eager_forward(hidden_states, top_k_index, top_k_weights)
        return EXPERTS_FUNCTIONS[execution](self, hidden_states, top_k_index, top_k_weights)

    def grouped_mm_fits(self, dtype: torch.dtype) -> bool:
        """Whether ``grouped_mm`` can run these experts' weights and inputs of ``dtype`` (16-byte strides)."""
        sizes = (self.up_proj.shape[1], self.hidden_size)  # this rank's width under tensor parallelism
        itemsizes = {self.up_proj.dtype.itemsize, dtype.itemsize}  # no allocation on the forward path
        return all(size * itemsize % 16 == 0 for size in sizes for itemsize in itemsizes)

    def masked_dense_forward(self, hidden_states: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
        """Every unit of the experts at once, as one FFN of width E * I, intermediate activations multiplied by
        ``unit_mask`` (T, E * I) after the activation, with no rescaling.

        Used by unit-level COMET (E = 1) and by block-COMET when most blocks are kept (the experts are then consecutive
        slices of one FFN and this is cheaper than gathering each token once per kept block). Per-expert output
        biases are added with the mask's per-expert weight; block-COMET's are zero and its bias is ``output_bias``.
        """
        if self.num_experts == 1:
            h = F.linear(hidden_states, self.up_proj[0], self.up_proj_bias[0])
            return F.linear(masked_activation(h, unit_mask, self.act_fn), self.down_proj[0], self.down_proj_bias[0])
        width = self.up_proj.shape[0] * self.up_proj.shape[1]  # this rank's units under tensor parallelism
        up = self.up_proj.reshape(width, self.hidden_size)
        down = self.down_proj.permute(1, 0, 2).reshape(self.hidden_size, width)
        h = F.linear(hidden_states, up, self.up_proj_bias.reshape(width))
        return F.linear(masked_activation(h, unit_mask, self.act_fn), down)

    def expert_activations(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Every expert's post-activation intermediate units: (T, d) -> (T, E, I). Dense: E x the work of one expert."""
        pre = torch.einsum("td,eid->tei", hidden_states, self.up_proj) + self.up_proj_bias
        return self.act_fn(pre)

    def mix(self, activations: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        """``sum_e w_e (z_e W2_e^T + b2_e)`` from `expert_activations` (T, E, I) and weights (T, E) -> (T, d)."""
        weights = expert_weights.to(activations.dtype)
        output = torch.einsum("tei,edi->td", activations * weights.unsqueeze(-1), self.down_proj)
        return output + weights @ self.down_proj_bias.to(weights.dtype)


def run_experts(experts: PackedExperts, hidden_states: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
    """Run ``decision`` on ``hidden_states`` (T, d) the way `choose_execution` picks; (T, d) out. The shared output
    bias is added once per token that some expert takes."""
    execution = choose_execution(experts, decision, hidden_states)
    routed = None  # (T, 1) tokens that receive an expert's output, when some may receive none
    if execution == MIXTURE:
        activations = decision.expert_activations
        if activations is None:
            activations = experts.expert_activations(hidden_states)
        output = experts.mix(activations, decision.expert_weights)
    elif execution == MASKED_DENSE:
        unit_mask = decision.unit_mask
        if unit_mask is None:  # weight-1 blocks: the kept blocks' units
            block_mask = torch.zeros(hidden_states.shape[0], experts.num_experts, device=hidden_states.device)
            block_mask.scatter_(1, decision.top_k_index, 1.0)
            unit_mask = block_mask.repeat_interleave(experts.up_proj.shape[1], dim=1)  # local width under TP
        output = experts.masked_dense_forward(hidden_states, unit_mask)
    else:
        weights = None if decision.uniform_weights else decision.top_k_weights
        output = experts.sparse_forward(hidden_states, decision.top_k_index, weights, execution)
        dropped = decision.extras.get("dropped")
        if dropped is not None:
            routed = (~dropped).unsqueeze(-1)
    if experts.output_bias is not None:
        bias = experts.output_bias.to(output.dtype)
        output = output + bias if routed is None else torch.addcmul(output, routed.to(output.dtype), bias)
    return output


TP_EXPERTS_STYLE = "comet_tp_experts"
"""The tensor-parallel style of `PackedExperts` in the configs' ``base_model_tp_plan`` (`CometExpertsTensorParallel`)."""

try:  # transformers' TP machinery (private helpers included): without it only tensor parallelism is unavailable
    if not is_torch_distributed_available():
        raise ImportError("torch.distributed is not available")
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES, _AllReduceBackward
    from transformers.distributed.tensor_parallel import MoeExpertsParallel
except ImportError:  # the model still imports and runs; a tp_plan load then fails naming the unknown style
    MoeExpertsParallel = None

if MoeExpertsParallel is not None:

    class CometExpertsTensorParallel(MoeExpertsParallel):
        """Transformers' ``moe_tp_experts`` for `PackedExperts`, whose forward takes a `RoutingDecision`.

        The plan shards every expert along its intermediate units (``up_proj`` / ``up_proj_bias`` on dim 1, ``down_proj``
        on its last dim): each rank holds units ``[r * ceil(I / n), ...)`` of every expert and computes a partial output
        that transformers' style all-reduces. The router stays replicated, so every rank takes the same decision from
        the same full scores (unit-level COMET's global top-k over all F units included); this style hands the experts
        the rank's share of it: the slice of the unit mask (COMET) or of the router's expert activations (attentive),
        and the combine weights behind an all-reduce of their gradient (each rank sees a partial one). The output
        biases (``down_proj_bias``, block-COMET's ``output_bias``) are replicated and count once: rank 0 adds them,
        the others add zero, and their gradients are summed. ``forward(hidden_states)`` (the activations attentive
        gating keys on) is gathered back to all I units on every rank.
        """

        _BIASES = ("down_proj_bias", "output_bias")

        @staticmethod
        def _group(mesh):
            return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")

        @staticmethod
        def _local_units(module, mesh) -> slice:
            """This rank's units of each expert, as ``Shard`` splits them (``torch.chunk``: the last may be shorter)."""
            size = module.intermediate_size
            chunk = -(-size // mesh.size())
            start = min(mesh.get_local_rank() * chunk, size)
            return slice(start, min(start + chunk, size))

        def transform_inputs_pre_forward(self, module, args, kwargs, mesh):
            decision = args[1] if len(args) > 1 else kwargs.pop("decision", None)
            (hidden_states,), kwargs = super().transform_inputs_pre_forward(module, args[:1], kwargs, mesh)
            if torch.is_grad_enabled():
                self._sum_bias_gradients(module, mesh)
            if decision is None:
                return (hidden_states,), kwargs
            group, units = self._group(mesh), self._local_units(module, mesh)
            changes = {}
            for name in ("top_k_weights", "expert_weights"):
                if (weights := getattr(decision, name)) is not None:
                    changes[name] = _AllReduceBackward.apply(weights, group)
            if decision.unit_mask is not None:
                mask = decision.unit_mask
                experts_view = mask.view(mask.shape[0], module.num_experts, module.intermediate_size)
                changes["unit_mask"] = experts_view[:, :, units].reshape(mask.shape[0], -1)
            if decision.expert_activations is not None:
                changes["expert_activations"] = decision.expert_activations[..., units]
            return (hidden_states, dataclasses.replace(decision, **changes)), kwargs

        def _sum_bias_gradients(self, module, mesh) -> None:
            """All-reduce the replicated output biases' gradients (rank 0's is the whole one, the others' are 0)."""
            hooked = module.__dict__.setdefault("_comet_tp_hooked", {})
            group = self._group(mesh)
            for name in self._BIASES:
                param = module._parameters.get(name)
                if param is not None and param.requires_grad and hooked.get(name) is not param:
                    param.register_post_accumulate_grad_hook(lambda p: dist.all_reduce(p.grad, group=group))
                    hooked[name] = param

        @contextlib.contextmanager
        def context_around_forward(self, module, mesh):
            with super().context_around_forward(module, mesh):
                saved = {}
                if mesh.get_local_rank() != 0:
                    for name in self._BIASES:
                        if (param := module._parameters.get(name)) is not None:
                            saved[name] = param
                            local = param.to_local() if isinstance(param, DTensor) else param
                            module._parameters[name] = local * 0  # in the graph, so its gradient hook still fires
                try:
                    yield
                finally:
                    module._parameters.update(saved)

        def transform_output_post_forward(self, module, output, mesh, *args, **kwargs):
            # transformers >= 5.25 passes ``config=``; older releases do not: forward whatever the caller gave
            if output is not None and output.dim() == 3:  # forward(hidden_states): this rank's (T, E, I / n) units
                return self._from_local_last_dim_shard(output, mesh, module.intermediate_size).full_tensor()
            return super().transform_output_post_forward(module, output, mesh, *args, **kwargs)

    ALL_PARALLEL_STYLES.register(TP_EXPERTS_STYLE, CometExpertsTensorParallel())


__all__ = [
    "BUCKETED",
    "ExpertKernels",
    "TP_EXPERTS_STYLE",
    "PackedExperts",
    "EXPERTS_FUNCTIONS",
    "deterministic_grouped_mm_experts_forward",
    "run_experts",
]
