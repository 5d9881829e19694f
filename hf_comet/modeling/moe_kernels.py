"""Our own expert execution, in torch ops only (CPU and CUDA): the bucketed top-k kernel and the masked activation.

Why (issue 12, measured by ``hf-comet bench``): transformers' ``grouped_mm`` experts path gathers a full-size bias
matrix per routed row (its backward is a scatter-add), multiplies by all-ones weights for block-COMET, and on CPU
``_grouped_mm`` is a loop of one matmul per expert anyway; the unit-COMET mask was a float tensor kept for backward
next to the activation's input. Here:

* `bucketed_experts`: tokens are sorted by expert once; each expert runs its two GEMMs on its contiguous slice with
  the bias fused (``addmm``), and the activation (`FusedActivation`) runs once over every bucket's rows between the
  two rounds of GEMMs (forward and backward alike); block-COMET's all-ones weights and zero
  biases are skipped; the backward is hand-written per bucket. Each token's k slot outputs (and input gradients) are
  summed in an order fixed by the plan, never by atomics: ``index_add_`` on CPU, where it runs serially over the
  index, a permutation and a sum on other devices, so results are the same bits on every run. It saves the
  gathered inputs, pre-activations and activations (and the slot outputs when the weights need a gradient).
* `masked_activation`: ``act(h) * mask`` for unit-level COMET whose backward keeps only what the dense FFN keeps.
  Masked-off pre-activations are replaced by a sentinel (``-40``) where the activation and its derivative are both
  exactly 0 (GELU, tanh-GELU and ReLU in every float dtype), so the saved tensor *is* the mask: no mask tensor is saved
  and the gradient of a masked unit is exactly 0.

Activations: ``gelu_new`` (GPT-2) is the tanh-approximate GELU, computed here by torch's fused kernel
(``F.gelu(approximate="tanh")``, within 3e-7 of transformers' eight-kernel formula); ``gelu`` and
``gelu_pytorch_tanh`` are torch's own; ``relu`` likewise. Any other activation runs through plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.activations import ACT2FN

from .slab_kernel import slab_products

FUSED_ACTIVATIONS = {
    "gelu": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "relu": "relu",
}
"""Activations with a fused torch kernel and backward: name -> GELU approximation ("none", "tanh") or "relu"."""

MASK_SENTINEL = -40.0
"""Pre-activation value of a masked-off unit in `masked_activation`: GELU, tanh-GELU and ReLU and their derivatives
are exactly 0 there in float64, float32, bfloat16 and float16 (tested), so the unit contributes 0 forward and backward."""


class FusedActivation(nn.Module):
    """An activation by name, with torch's fused kernel where one computes the same function (`FUSED_ACTIVATIONS`);
    other names are transformers' ``ACT2FN`` modules. ``kind`` is the fused kind or None."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.kind = FUSED_ACTIVATIONS.get(name)
        self.module = None if self.kind is not None else ACT2FN[name]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return F.relu(hidden)
        if self.kind is not None:
            return F.gelu(hidden, approximate=self.kind)
        return self.module(hidden)

    def forward_into(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """``out[...] = act(hidden)`` without a temporary (fused kinds)."""
        if self.kind == "relu":
            torch.clamp(hidden, min=0, out=out)
        elif self.kind is not None:
            torch.ops.aten.gelu.out(hidden, approximate=self.kind, out=out)
        else:
            out.copy_(self.module(hidden))

    def backward(self, grad: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """d act(hidden) / d hidden times ``grad`` (fused kinds by torch's backward kernels, others by autograd)."""
        if self.kind == "relu":
            return torch.ops.aten.threshold_backward(grad, hidden, 0)
        if self.kind is not None:
            return torch.ops.aten.gelu_backward(grad, hidden, approximate=self.kind)
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_(True)
            (result,) = torch.autograd.grad(self.module(leaf), leaf, grad)
        return result

    def extra_repr(self) -> str:
        return f"{self.name!r}, fused={self.kind is not None}"


class _MaskedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, mask: torch.Tensor, activation: FusedActivation) -> torch.Tensor:
        # h * m + sentinel * (m - 1): h exactly where kept, the sentinel where masked (m is 0/1)
        masked = torch.mul(hidden, mask).add_(mask - 1, alpha=-MASK_SENTINEL)
        ctx.activation = activation
        ctx.save_for_backward(masked)
        return activation(masked)

    @staticmethod
    @once_differentiable  # a second derivative through it raises instead of being silently wrong
    def backward(ctx, grad: torch.Tensor):
        (masked,) = ctx.saved_tensors
        return ctx.activation.backward(grad, masked), None, None


def masked_activation(hidden: torch.Tensor, mask: torch.Tensor, activation: FusedActivation) -> torch.Tensor:
    """``activation(hidden) * mask`` for a 0/1 ``mask`` of ``hidden``'s shape; backward saves one tensor of the
    activation input's size (fused activations) and gives masked units exactly 0 gradient."""
    mask = mask.to(hidden.dtype)
    if activation.kind is None:  # no sentinel is known to be exact for it: plain autograd (keeps the mask too)
        return activation(hidden) * mask
    return _MaskedActivation.apply(hidden, mask, activation)


def _buckets(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, its rows in bucket order) for every expert that received rows."""
    buckets, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            buckets.append((expert, slice(start, start + count)))
            start += count
    return buckets


def _bucketed_forward(hidden, up, up_bias, down, down_bias, weights, plan, activation, keep=True):
    """The kernel's forward: (T, d) output and what the backward needs (``keep=False``: inference, nothing kept).

    Every bucket's first GEMM writes its rows of one (S, I) pre-activation, the activation runs once over all of it
    (one parallel region instead of one per bucket: 5-10 % of a BERT-base FFN at keep 0.25 here), then every
    bucket's second GEMM. At inference the activation is applied in place (fused activations; others make one
    temporary) and the outputs overwrite the gathered inputs (every first GEMM has read its rows before any second
    GEMM writes them), so the kernel itself makes no second (S, I) or (S, d) buffer."""
    slot_token, perm, counts, num_top_k = plan
    selected = hidden.index_select(0, slot_token)  # (S, d), rows grouped by expert
    buckets = _buckets(counts)
    pre = selected.new_empty(selected.shape[0], up.shape[1])
    for expert, rows in buckets:
        torch.addmm(up_bias[expert], selected[rows], up[expert].t(), out=pre[rows])
    act = torch.empty_like(pre) if keep else pre
    activation.forward_into(pre, act)
    outputs = selected.new_empty(selected.shape[0], down.shape[1]) if keep else selected
    for expert, rows in buckets:
        if down_bias is None:
            torch.mm(act[rows], down[expert].t(), out=outputs[rows])
        else:
            torch.addmm(down_bias[expert], act[rows], down[expert].t(), out=outputs[rows])
    if weights is None:
        weighted = outputs
    elif keep:
        weighted = outputs * weights.reshape(-1)[perm].unsqueeze(-1)
    else:
        weighted = outputs.mul_(weights.reshape(-1)[perm].unsqueeze(-1))
    combined = _combine(weighted, slot_token, perm, hidden.shape[0], num_top_k)
    if not keep:
        return combined, None
    return combined, (selected, up, down, pre, act, outputs if weights is not None else None, weights)


class _BucketedExperts(torch.autograd.Function):
    """Sparse top-k experts on buckets of contiguous rows; see `bucketed_experts`."""

    @staticmethod
    def forward(ctx, hidden, up, up_bias, down, down_bias, weights, plan, activation):
        combined, saved = _bucketed_forward(hidden, up, up_bias, down, down_bias, weights, plan, activation)
        ctx.plan = plan
        ctx.activation = activation
        ctx.has_down_bias = down_bias is not None
        ctx.save_for_backward(*saved)
        ctx.num_tokens = hidden.shape[0]
        return combined

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        selected, up, down, pre, act, outputs, weights = ctx.saved_tensors
        slot_token, perm, counts, num_top_k = ctx.plan
        activation = ctx.activation
        need = ctx.needs_input_grad
        grad_slots = grad_output.index_select(0, slot_token)  # every slot's token gradient, in bucket order
        grad_weights = None
        if weights is not None:
            if need[5]:
                grad_sorted = (grad_slots * outputs).sum(-1)
                grad_weights = torch.empty_like(grad_sorted)
                grad_weights[perm] = grad_sorted  # a permutation: each element written once
                grad_weights = grad_weights.view_as(weights)
            grad_slots = grad_slots * weights.reshape(-1)[perm].unsqueeze(-1)
        grad_selected = torch.empty_like(grad_slots) if need[0] else None  # every row is written below
        grad_up = torch.empty_like(up) if need[1] else None
        grad_up_bias = up.new_empty(up.shape[:2]) if need[2] else None
        grad_down = torch.empty_like(down) if need[3] else None
        grad_down_bias = down.new_empty(down.shape[:2]) if (need[4] and ctx.has_down_bias) else None
        for expert, count in enumerate(counts):
            if count == 0:  # an expert without tokens: zero gradient
                for grad in (grad_up, grad_up_bias, grad_down, grad_down_bias):
                    if grad is not None:
                        grad[expert].zero_()
        buckets = _buckets(counts)
        below = grad_up is not None or grad_up_bias is not None or grad_selected is not None  # need grad_pre
        grad_act = torch.empty_like(pre) if below else None
        for expert, rows in buckets:
            grad_out = grad_slots[rows]
            if grad_down is not None:
                torch.mm(grad_out.t(), act[rows], out=grad_down[expert])
            if grad_down_bias is not None:
                torch.sum(grad_out, 0, out=grad_down_bias[expert])
            if below:
                torch.mm(grad_out, down[expert], out=grad_act[rows])
        if not below:
            buckets = []
        else:
            grad_pre = activation.backward(grad_act, pre)  # once over every bucket, like the forward's activation
            del grad_act  # one (S, I) gradient alive at a time, as with the per-bucket version
        for expert, rows in buckets:
            if grad_up is not None:
                torch.mm(grad_pre[rows].t(), selected[rows], out=grad_up[expert])
            if grad_up_bias is not None:
                torch.sum(grad_pre[rows], 0, out=grad_up_bias[expert])
            if grad_selected is not None:
                torch.mm(grad_pre[rows], up[expert], out=grad_selected[rows])
        grad_hidden = None
        if grad_selected is not None:
            grad_hidden = _combine(grad_selected, slot_token, perm, ctx.num_tokens, num_top_k)
        return grad_hidden, grad_up, grad_up_bias, grad_down, grad_down_bias, grad_weights, None, None


INDEX_ADD_MIN_ELEMENTS = 1 << 15
"""Below this many slot elements the CPU ``index_add_`` (a parallel ``scatter_add``: ~90 us of thread wake-up for
one decoded token) loses to the permutation and sum."""


def _combine(rows: torch.Tensor, slot_token: torch.Tensor, perm: torch.Tensor, num_tokens: int, num_top_k: int):
    """Rows in bucket order (S, d) summed per token (T, d), in an order fixed by the plan.

    On CPU ``index_add_`` (serial over the index, so deterministic; 2.4x faster than the alternative here); on
    other devices, whose ``index_add_`` adds atomically, the rows are put back in slot order by the permutation (an
    ``index_put`` without accumulation) and each token's k slots are summed."""
    if rows.device.type == "cpu" and rows.numel() >= INDEX_ADD_MIN_ELEMENTS:
        return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, slot_token, rows)
    unpermuted = torch.empty_like(rows)
    unpermuted[perm] = rows
    if num_top_k == 1:
        return unpermuted
    return unpermuted.view(num_tokens, num_top_k, rows.shape[1]).sum(dim=1)  # no -1: T may be 0


def bucketing_plan(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """Sort the (T, k) slots by expert once: (token of each sorted slot, the sort permutation, rows per expert, k).
    The per-expert counts come to the host (one sync): the buckets are sliced by them."""
    flat = top_k_index.reshape(-1)
    _, perm = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return perm // top_k_index.shape[1], perm, counts, top_k_index.shape[1]


def bucketed_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    up: torch.Tensor,
    up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor | None,
    activation: FusedActivation,
) -> torch.Tensor:
    """``sum_k w_k * (act(x W1_e^T + b1_e) W2_e^T + b2_e)`` over each token's k experts: (T, d) -> (T, d).

    ``top_k_weights=None`` means weight 1 (block-COMET: no multiply) and ``down_bias=None`` no per-expert output bias
    (a shared one is added by the caller). Under autocast everything runs in the autocast dtype, as autocast's own
    matmuls would; gradients reach the float32 parameters through the casts.
    """
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    tensors = [hidden, up, up_bias, down, down_bias, top_k_weights]
    tensors = [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]
    plan = bucketing_plan(top_k_index, up.shape[0])
    with torch.autocast(device_type=device_type, enabled=False):
        if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
            return _bucketed_forward(*tensors, plan, activation, keep=False)[0]  # inference: no autograd node
        return _BucketedExperts.apply(*tensors, plan, activation)


def unit_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (E, d, I) with the same values laid out unit-major: strides (d I, 1, d), each expert's slab I rows
    of d, as ``up_proj[e]`` is. MKL's fp32 matrix-vector product reads a (d, I) slab with I = 384 at about 9 GB/s
    here and the same bytes in rows of d = 768 at about 15 GB/s (`slab_experts`' down projection, the larger half of
    a decoded token's FFN time); the other kernels take either layout (their GEMMs read it transposed)."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


def is_unit_major(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (E, d, I) is laid out as `unit_major` makes it (any layout when d or I is 1)."""
    return weight.transpose(-1, -2).is_contiguous()


def slab_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    up: torch.Tensor,
    up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor | None,
    activation: FusedActivation,
    compiled: bool = True,
) -> torch.Tensor:
    """`bucketed_experts`' function for a few tokens at inference (decoding): every kept expert of every token runs
    as two matrix-vector products on its own contiguous slabs, ``up[e]`` (I, d) and ``down[e]`` (d, I), so only the
    kept experts' weights are read, once, and nothing is gathered or sorted. ``down`` is read fastest `unit_major`
    (`PackedExperts` lays its own out so before its first slab call); any layout gives the same values.

    A decoded token is memory-bound: a gather of the kept slabs into one tensor (for one batched call) would read
    and write them, twice the traffic of reading them in place, so the loop over the k kept slabs stays (k calls of
    ``addmv`` each; the indices come to the host once, free on CPU, where `choose_execution` runs it). The output
    rows accumulate in slot order, so the result does not depend on the thread count. No autograd node: callers use it
    under ``no_grad`` only.

    fp32 on CPU runs the compiled kernel (`hf_comet.modeling.slab_kernel`: each slab read as one sequential stream,
    about twice MKL's rate) where the machine could build it; the loop below (``compiled=False``) is the fallback
    and the reference.
    """
    if compiled:
        native = slab_products(hidden, top_k_index, top_k_weights, up, up_bias, down, down_bias, activation)
        if native is not None:
            return native
    output = hidden.new_zeros(hidden.shape)
    indices = top_k_index.tolist()
    weights = None if top_k_weights is None else top_k_weights.to(hidden.dtype).tolist()
    for token, experts in enumerate(indices):
        row, out = hidden[token], output[token]
        for slot, expert in enumerate(experts):
            weight = 1.0 if weights is None else weights[token][slot]
            if weight == 0.0:  # a slot a capacity limit dropped contributes nothing
                continue
            pre = torch.addmv(up_bias[expert], up[expert], row)
            activation.forward_into(pre, pre)
            out.addmv_(down[expert], pre, alpha=weight)
            if down_bias is not None:
                out.add_(down_bias[expert], alpha=weight)
    return output


__all__ = [
    "FUSED_ACTIVATIONS",
    "MASK_SENTINEL",
    "FusedActivation",
    "bucketed_experts",
    "bucketing_plan",
    "masked_activation",
    "is_unit_major",
    "slab_experts",
    "unit_major",
]
