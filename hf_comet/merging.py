"""Expert merging by usage frequency (Park 2024): which experts merge, how, and their optimizer state afterwards.

The model only counts (each MoE block's ``selection_counts``, the tokens routed to each expert in training) and
says which tensors define an expert (``MoEBlock.expert_tensors``); the policy lives here, outside the checkpoint
code: ranking, the DDP all-reduce of the counts, the arithmetic of a merge and the optimizer reset.

With PEFT LoRA on the experts (``target_parameters``), a merge combines the **effective** experts: each source's
base rows plus its adapter delta (``scaling * B_e A_e`` of every adapter that wraps the experts) are averaged into
the base rows of the merged expert, and that expert's ``lora_B`` slice is zeroed (its ``lora_A`` slice is kept, so
the adapter goes on learning for it, as from PEFT's own zero-``B`` init). The merged expert's effective weight is
then exactly the merge of the sources' effective weights: nothing a source learned in its adapter is dropped, and no
stale delta of the merged-into expert survives. The frozen base tensors are changed in place by the merge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .modeling.moe_block import MoEBlock
from .modeling.moe_experts import PackedExperts

MERGE_METHODS = ("mean", "count_weighted")
"""How `merge_experts` combines two experts."""

SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq")
"""Per-element state that estimates the gradient scale: the merged expert inherits its sources' mean."""


@dataclass
class ExpertMerge:
    """One expert merge: ``into`` was overwritten by a combination of ``sources``.

    ``parameters`` maps qualified parameter names to the tensors whose slice ``[into]`` changed (packed expert
    weights, attentive key maps, and LoRA factors of adapted experts): reset the optimizer state of exactly those
    slices (`reset_merged_optimizer_state`).
    """

    layer_idx: int
    sources: tuple[int, int]
    into: int
    how: str
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    num_experts: int = 0


def _blocks(model: nn.Module) -> list[MoEBlock]:
    return [module for module in model.modules() if isinstance(module, MoEBlock)]


def _block(model: nn.Module, layer_idx: int) -> MoEBlock:
    blocks = {block.layer_idx: block for block in _blocks(model)}
    if layer_idx not in blocks:
        raise ValueError(f"layer {layer_idx} has no MoE block; MoE layers are {sorted(blocks)}.")
    return blocks[layer_idx]


def expert_slice(name: str, tensor: torch.Tensor, expert: int, num_experts: int) -> torch.Tensor:
    """The view of ``tensor`` that belongs to ``expert``: row ``expert`` of a packed (E, ...) tensor; for PEFT's
    ParamWrapper factors, rows ``expert * r : (expert + 1) * r`` of ``lora_A`` (E * r, in) and the columns
    ``expert::E`` of ``lora_B`` (out, r * E), which PEFT interleaves."""
    if ".lora_A." in name:
        return tensor.view(num_experts, -1, tensor.shape[-1])[expert]
    if ".lora_B." in name:
        return tensor.view(tensor.shape[0], -1, num_experts)[:, :, expert]
    return tensor[expert]


def _lora_wrappers(block: MoEBlock) -> list[nn.Module]:
    """PEFT ParamWrappers around the block's packed experts (one per adapted parameter), outermost first."""
    wrappers, module = [], block.experts
    while not isinstance(module, PackedExperts) and hasattr(module, "get_base_layer"):
        if hasattr(module, "lora_A") and hasattr(module, "parameter_name"):
            wrappers.append(module)
        module = module.base_layer
    return wrappers


def global_counts(block: MoEBlock) -> torch.Tensor:
    """The block's selection counts summed over every rank of the default process group (local ones otherwise)."""
    counts = block.selection_counts
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.clone()
        torch.distributed.all_reduce(counts)
        block.selection_counts.copy_(counts)  # count_weighted merges read them too
    return counts


@torch.no_grad()
def merge_block_experts(
    block: MoEBlock, source_a: int, source_b: int, into: int, how: str = "mean"
) -> ExpertMerge:
    """Overwrite expert ``into`` of ``block`` with the combination of ``source_a`` and ``source_b`` and reset the
    block's selection counts (Park 2024, methods.md §3.4). ``how="mean"`` averages; ``"count_weighted"`` weights
    by the sources' selection counts (plain mean when both are 0). The router's row for ``into`` is left as is (the
    router learns the new expert's role afterwards); attentive key maps and LoRA factors merge with the experts.
    Returns the changed tensors (block-relative names) so the caller can reset their optimizer state."""
    if not block.learned:
        routing = block.router.routing
        raise ValueError(f"layer {block.layer_idx} uses routing={routing!r}: {_why_not_mergeable(routing)}, so there "
                         "is nothing to merge.")  # fmt: skip
    if how not in MERGE_METHODS:
        raise ValueError(f"how={how!r} is not a merge method; choose one of {', '.join(MERGE_METHODS)}.")
    num_experts = block.experts_module.num_experts
    for name, index in (("source_a", source_a), ("source_b", source_b), ("into", into)):
        if not 0 <= index < num_experts:
            raise ValueError(f"{name}={index} is outside [0, {num_experts - 1}] (layer {block.layer_idx}).")
    if source_a == source_b:
        raise ValueError(f"source_a and source_b are both {source_a}: merging needs two different experts.")
    weight_a = weight_b = 0.5
    if how == "count_weighted":
        counts = block.selection_counts
        total = float(counts[source_a] + counts[source_b])
        if total > 0:
            weight_a = float(counts[source_a]) / total
            weight_b = 1.0 - weight_a
    changed = block.expert_tensors()
    wrappers = _lora_wrappers(block)
    deltas = {name: torch.zeros_like(tensor) for name, tensor in changed.items()}
    for wrapper in wrappers:  # the adapters' per-expert deltas, in the packed tensors' layout
        delta = deltas[f"experts.{wrapper.parameter_name}"]
        for adapter in wrapper.lora_A:
            delta += wrapper.get_delta_weight(adapter).to(delta.dtype)
    for name, tensor in changed.items():
        effective_a = tensor[source_a] + deltas[name][source_a]
        effective_b = tensor[source_b] + deltas[name][source_b]
        tensor[into] = weight_a * effective_a + weight_b * effective_b
    for wrapper in wrappers:
        prefix = f"experts.{wrapper.parameter_name}"
        for adapter, module in wrapper.lora_B.items():
            expert_slice(".lora_B.", module.weight, into, num_experts).zero_()
            changed[f"{prefix}.lora_B.{adapter}.weight"] = module.weight
            changed[f"{prefix}.lora_A.{adapter}.weight"] = wrapper.lora_A[adapter].weight
    block.reset_selection_counts()
    return ExpertMerge(block.layer_idx, (source_a, source_b), into, how, changed, num_experts)


def _qualify(model: nn.Module, merge: ExpertMerge) -> ExpertMerge:
    names = {id(param): name for name, param in model.named_parameters()}
    merge.parameters = {names.get(id(t), name): t for name, t in merge.parameters.items()}
    return merge


def merge_experts(
    model: nn.Module, layer_idx: int, source_a: int, source_b: int, into: int, how: str = "mean"
) -> ExpertMerge:
    """Overwrite expert ``into`` of MoE layer ``layer_idx`` with the merge of ``source_a`` and ``source_b``; see
    `merge_block_experts`. ``parameters`` of the result carry model-qualified names."""
    block = _block(model, layer_idx)
    if how == "count_weighted" and block.learned:
        global_counts(block)  # every rank must weight the sources alike
    return _qualify(model, merge_block_experts(block, source_a, source_b, into, how=how))


def _why_not_mergeable(routing: str) -> str:
    """Why a block of a routing without a trainable gate has nothing to merge."""
    if routing == "comet":
        return "COMET's experts are overlapping unit masks of one FFN with no separate expert weights"
    return "a fixed routing has no trainable gate to learn the merged expert's role and keeps no selection counts"


def merge_most_used_into_least_used(model: nn.Module, how: str = "mean") -> list[ExpertMerge]:
    """In every learned-gating layer, merge the two most selected experts into the least selected other one
    (ties go to the lower index) and reset the counts (Park 2024, methods.md §3.4). Layers with no training
    forward since their last merge are skipped. Then reset the optimizer state of the returned parameters'
    slices (`reset_merged_optimizer_state`). Under torch.distributed the counts are summed over ranks first, so
    every rank merges the same experts: call it on every rank at the same step."""
    learned = [block for block in _blocks(model) if block.learned]
    if not learned:
        routings = sorted({block.router.routing for block in _blocks(model)})
        raise ValueError(
            f"this model has no learned-gating MoE layer (routing {' and '.join(map(repr, routings))}): "
            + "; ".join(f"under {r!r} {_why_not_mergeable(r)}" for r in routings) + ", so there is nothing to merge."
        )
    num_experts = learned[0].experts_module.num_experts
    if num_experts < 3:
        raise ValueError(
            f"num_experts={num_experts}: merging the two most used experts into a third needs at least 3 experts per "
            "layer."
        )
    merges = []
    for block in learned:
        counts = global_counts(block).tolist()
        if sum(counts) == 0:
            continue
        ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
        source_a, source_b = ranked[0], ranked[1]
        into = min((e for e in range(len(counts)) if e not in (source_a, source_b)), key=lambda e: (counts[e], e))
        merges.append(_qualify(model, merge_block_experts(block, source_a, source_b, into, how=how)))
    return merges


@torch.no_grad()
def reset_merged_optimizer_state(optimizer: torch.optim.Optimizer, merges: Iterable[ExpertMerge]) -> int:
    """Give every overwritten expert slice fresh optimizer state (methods.md §3.6: stale moments misdirect it).

    First moments and momentum buffers of the ``[into]`` slice are zeroed, so no stale direction survives. Second
    moments (Adam's ``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``) become the mean of the two sources' instead of
    zero: Adam's ``step`` is one scalar per packed tensor, shared with the experts that were not merged, so its bias
    correction is already ~1 and a zeroed second moment would make the first updates ``(1 - beta1) / sqrt(1 -
    beta2)`` (about 3x) larger than normal. With the sources' scale they start about ``1 - beta1`` (10x) smaller and
    warm up like a fresh Adam. LoRA factors of adapted experts are reset slice by slice the same way. Returns the
    number of state tensors touched.
    """
    touched = 0
    for merge in merges:
        source_a, source_b = merge.sources
        for name, param in merge.parameters.items():
            state = optimizer.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if not torch.is_tensor(value) or value.shape != param.shape:
                    continue  # scalars such as `step` are shared by every expert of the tensor
                target = expert_slice(name, value, merge.into, merge.num_experts)
                if key in SECOND_MOMENT_KEYS:
                    first = expert_slice(name, value, source_a, merge.num_experts)
                    second = expert_slice(name, value, source_b, merge.num_experts)
                    target.copy_((first + second) / 2)
                else:
                    target.zero_()
                touched += 1
    return touched


__all__ = [
    "MERGE_METHODS",
    "ExpertMerge",
    "expert_slice",
    "global_counts",
    "merge_block_experts",
    "merge_experts",
    "merge_most_used_into_least_used",
    "reset_merged_optimizer_state",
]
