"""Packed experts: the FFN units grouped into E experts, one tensor per weight with a leading expert dimension.

Layout is ``nn.Linear``'s (out, in) for every family: ``up_proj`` (E, I, d), ``up_proj_bias`` (E, I),
``down_proj`` (E, d, I), ``down_proj_bias`` (E, d). GPT-2's ``Conv1D`` (in, out) weights are transposed by the
family adapter when converting. Sparse execution goes through transformers' experts-implementation kernels
(``grouped_mm`` by default, ``eager`` below); unit-masked execution (COMET) is ``masked_dense_forward``; dense
mixtures (attentive, deep) run every expert with ``expert_activations`` + ``mix``.

With ``shared_output_bias`` (block-COMET, whose experts are slices of one FFN) the experts have no bias of their own
on the output: ``down_proj_bias`` is a zero buffer (the kernels still read it) and ``output_bias`` (d,) is added once
per token by the block, exactly as the dense FFN adds its second bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation


@use_experts_implementation(has_gate=False, has_bias=True, is_transposed=False)
class CometExperts(nn.Module):
    """E two-layer FFNs ``act(u W1_e^T + b1_e) W2_e^T + b2_e`` stored packed; no gating (GPT-2/ViT/BERT FFNs)."""

    def __init__(
        self,
        config,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        shared_output_bias: bool = False,
    ):
        super().__init__()
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
        self.act_fn = ACT2FN[activation]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Eager kernel: loop over the experts that received tokens. (T, d), (T, k), (T, k) -> (T, d)."""
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.bincount(top_k_index.flatten(), minlength=self.num_experts).nonzero().flatten().tolist()
        for expert in hit:
            token_idx, slot = torch.where(top_k_index == expert)
            h = self.act_fn(F.linear(hidden_states[token_idx], self.up_proj[expert], self.up_proj_bias[expert]))
            y = F.linear(h, self.down_proj[expert], self.down_proj_bias[expert])
            output.index_add_(0, token_idx, y * top_k_weights[token_idx, slot, None].to(y.dtype))
        return output

    def masked_dense_forward(self, hidden_states: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
        """Every unit of the experts at once, as one FFN of width E * I, intermediate activations multiplied by
        ``unit_mask`` (T, E * I) after the activation, with no rescaling.

        Used by unit-level COMET (E = 1) and by block-COMET when most blocks are kept (the experts are then consecutive
        slices of one FFN and this is cheaper than gathering each token once per kept block). Per-expert output
        biases are added with the mask's per-expert weight; block-COMET's are zero and its bias is ``output_bias``.
        """
        if self.num_experts == 1:
            h = self.act_fn(F.linear(hidden_states, self.up_proj[0], self.up_proj_bias[0]))
            return F.linear(h * unit_mask.to(h.dtype), self.down_proj[0], self.down_proj_bias[0])
        width = self.num_experts * self.intermediate_size
        up = self.up_proj.reshape(width, self.hidden_size)
        down = self.down_proj.permute(1, 0, 2).reshape(self.hidden_size, width)
        h = self.act_fn(F.linear(hidden_states, up, self.up_proj_bias.reshape(width)))
        return F.linear(h * unit_mask.to(h.dtype), down)

    def expert_activations(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Every expert's post-activation intermediate units: (T, d) -> (T, E, I). Dense: E x the work of one expert."""
        pre = torch.einsum("td,eid->tei", hidden_states, self.up_proj) + self.up_proj_bias
        return self.act_fn(pre)

    def mix(self, activations: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        """``sum_e w_e (z_e W2_e^T + b2_e)`` from `expert_activations` (T, E, I) and weights (T, E) -> (T, d)."""
        weights = expert_weights.to(activations.dtype)
        output = torch.einsum("tei,edi->td", activations * weights.unsqueeze(-1), self.down_proj)
        return output + weights @ self.down_proj_bias


_kernel_forward = CometExperts.forward  # transformers' experts-implementation dispatch (eager / grouped_mm)


def _forward(
    self,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor | None = None,
    top_k_weights: torch.Tensor | None = None,
    *,
    unit_mask: torch.Tensor | None = None,
    expert_weights: torch.Tensor | None = None,
    activations_only: bool = False,
) -> torch.Tensor:
    """Every way the block runs the experts goes through ``forward``, so wrappers of the module see all of them
    (PEFT's ``ParamWrapper`` applies LoRA to ``up_proj``/``down_proj`` only while the wrapped forward runs):

    * ``top_k_index``/``top_k_weights``: sparse routing through the experts kernels;
    * ``unit_mask`` (T, E * I): masked dense compute (COMET);
    * ``activations_only``: every expert's intermediate units (T, E, I) of ``hidden_states`` (attentive keys);
    * ``expert_weights`` (T, E): dense mixture; ``hidden_states`` are then the (T, E, I) activations if 3-D.

    The shared output bias (block-COMET, split experts) is added here, once per token.
    """
    if activations_only:
        return self.expert_activations(hidden_states)
    if unit_mask is not None:
        output = self.masked_dense_forward(hidden_states, unit_mask)
    elif expert_weights is not None:
        activations = hidden_states if hidden_states.dim() == 3 else self.expert_activations(hidden_states)
        output = self.mix(activations, expert_weights)
    else:
        output = _kernel_forward(self, hidden_states, top_k_index, top_k_weights)
    if self.output_bias is not None:
        output = output + self.output_bias
    return output


CometExperts.forward = _forward

__all__ = ["CometExperts"]
