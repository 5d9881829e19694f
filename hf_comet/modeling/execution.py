"""How a routing decision runs: the one function that picks it (`choose_execution`) and its measured thresholds.

Every decision of every router runs through `hf_comet.modeling.moe_experts.run_experts`, which asks
`choose_execution` once and does what it says (MegaBlocks' "the kernel choice is one function"):

* ``"mixture"``: dense mixture weights (attentive, deep): every expert's activations, mixed;
* ``"masked_dense"``: a unit mask (unit-level COMET), or weight-1 blocks (block-COMET) keeping more than
  ``dense_block_fraction`` of the blocks: one FFN over every unit, the dropped ones masked;
* ``"slabs"``: few tokens at inference on CPU (decoding) under the default ``experts_implementation``: each kept
  expert's two contiguous weight slabs read in place (`hf_comet.modeling.moe_kernels.slab_experts`: the compiled
  kernel of `hf_comet.modeling.slab_kernel` on fp32, else a torch loop), while the routed (token, expert) pairs
  number at most ``slab_max_pairs_per_expert`` times the experts (``loop_slab_max_pairs_per_expert`` on the loop);
* otherwise an experts kernel: ``"bucketed"`` (ours, the default), ``"grouped_mm"`` or ``"eager"`` as the config's
  ``experts_implementation`` asks, with ``grouped_mm`` for compiled code (the bucketed kernel needs host-side counts)
  and ``eager`` where ``grouped_mm`` cannot take the weights' strides.

The thresholds are measurements, not constants: ``hf-comet bench execution --calibrate`` measures the
crossovers on this machine at GPT-2-small shapes and writes them (``{"thresholds": {...}, "measured": {...}}``) to `thresholds_path` (``HF_COMET_EXECUTION``, else
``$HF_HOME/hf_comet/execution.json``), which `thresholds` reads once per process. Without that file the defaults are
the values the same command measured on the reference machine (2 cores, `docs/speed.md`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from .slab_kernel import kernel_takes

MIXTURE, MASKED_DENSE, SLABS = "mixture", "masked_dense", "slabs"
KERNELS = ("bucketed", "grouped_mm", "eager")
"""The experts kernels a top-k decision may run on (``experts_implementation`` names)."""
EXECUTIONS = (MIXTURE, MASKED_DENSE, SLABS, *KERNELS)


@dataclasses.dataclass(frozen=True)
class ExecutionThresholds:
    """The crossovers `choose_execution` uses, as ``hf-comet bench execution`` measured them.

    Attributes:
        dense_block_fraction: weight-1 block decisions keeping more than this fraction of the blocks run as masked
            dense compute (the kernels copy each token once per kept block, which costs more than the FLOPs saved
            once most blocks are on).
        slab_max_pairs_per_expert: at inference on CPU, a top-k decision whose routed (token, expert) pairs number
            at most this many times the experts runs on per-token slabs by the compiled kernel
            (`hf_comet.modeling.slab_kernel`); above it the bucketed kernel, which reads each kept expert's weights
            once for all its tokens, wins.
        loop_slab_max_pairs_per_expert: the same crossover for slabs on the torch loop, which runs where the
            compiled kernel does not (no C compiler, ``HF_COMET_NATIVE_SLABS=0``, weights other than fp32).
    """

    dense_block_fraction: float = 0.875
    slab_max_pairs_per_expert: float = 8.0
    loop_slab_max_pairs_per_expert: float = 2.0

    def __post_init__(self) -> None:
        for name in ("dense_block_fraction", "slab_max_pairs_per_expert", "loop_slab_max_pairs_per_expert"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}={value!r} must be a number, not {type(value).__name__}.")
        if not 0 < self.dense_block_fraction <= 1:
            raise ValueError(f"dense_block_fraction={self.dense_block_fraction!r} must be in (0, 1].")
        for name in ("slab_max_pairs_per_expert", "loop_slab_max_pairs_per_expert"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be 0 or more.")


def thresholds_path() -> str:
    """Where the measured thresholds live: ``HF_COMET_EXECUTION``, else ``$HF_HOME/hf_comet/execution.json``."""
    if os.environ.get("HF_COMET_EXECUTION"):
        return os.environ["HF_COMET_EXECUTION"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hf_comet", "execution.json")


_LOADED: list[ExecutionThresholds] = []
"""The thresholds read by `thresholds` (at most one entry): a plain global, which compiled code can read."""


def thresholds() -> ExecutionThresholds:
    """The thresholds of this machine (read once per process), or the defaults where none were measured. A file
    that cannot be read or holds other fields is ignored with a warning: execution stays correct either way. Inside
    ``torch.compile`` nothing is read (a file system call cannot be traced): the thresholds already read, else the
    defaults. ``thresholds.cache_clear()`` makes the next call read the file again."""
    if _LOADED:
        return _LOADED[0]
    if torch.compiler.is_compiling():
        return ExecutionThresholds()
    _LOADED.append(_read_thresholds())
    return _LOADED[0]


def _read_thresholds() -> ExecutionThresholds:
    path = thresholds_path()  # written by hf_comet.bench (this file is copied into checkpoints: no package imports)
    if not os.path.isfile(path):
        if os.environ.get("HF_COMET_EXECUTION"):  # named on purpose: say it was not used
            _warn(f"hf_comet: HF_COMET_EXECUTION={path!r} is not a file; using the default execution thresholds.")
        return ExecutionThresholds()
    try:
        with open(path, encoding="utf-8") as handle:
            return ExecutionThresholds(**json.load(handle)["thresholds"])
    except (OSError, ValueError, TypeError, KeyError) as error:
        _warn(f"hf_comet: ignoring the execution thresholds in {path} ({error}); using the defaults. Re-measure them "
              "with `hf-comet bench execution --calibrate`.")  # fmt: skip
        return ExecutionThresholds()


def _warn(message: str) -> None:
    from transformers.utils import logging

    logging.get_logger(__name__).warning(message)


thresholds.cache_clear = _LOADED.clear  # the functools.lru_cache spelling, for callers that re-read the file


def choose_execution(experts, decision, hidden_states: torch.Tensor | None = None) -> str:
    """How ``decision`` runs on ``experts`` (a `PackedExperts`): one of `EXECUTIONS` (see the module docstring).

    ``hidden_states`` (T, d), when given, lets decoding-sized inference batches run on slabs; without it the choice
    is the one for any number of tokens.
    """
    if decision.unit_mask is not None:
        return MASKED_DENSE
    if decision.expert_weights is not None:
        return MIXTURE
    weights = None if decision.uniform_weights else decision.top_k_weights
    return top_k_execution(experts, decision.top_k_index.shape, decision.uniform_weights, hidden_states, weights)


def top_k_execution(
    experts,
    shape: tuple[int, int],
    uniform_weights: bool,
    hidden_states: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> str:
    """`choose_execution` for a top-k decision of ``shape`` (T, k); ``uniform_weights``: every weight is 1;
    ``weights``: the combine weights the experts will multiply by (a learned router's need gradients in training)."""
    limits = thresholds()
    num_tokens, top_k = shape
    if uniform_weights and top_k > limits.dense_block_fraction * experts.num_experts:
        return MASKED_DENSE
    implementation = getattr(experts.config, "_experts_implementation", None) or "bucketed"
    if implementation == "bucketed" and hidden_states is not None and _slab_ready(experts, hidden_states, weights):
        native = slab_kernel_runs(experts, hidden_states)
        limit = limits.slab_max_pairs_per_expert if native else limits.loop_slab_max_pairs_per_expert
        if num_tokens * top_k <= limit * experts.num_experts:
            return SLABS  # ours, like the default kernel: an explicitly requested kernel is always the one that runs
    if implementation == "bucketed" and not torch.compiler.is_compiling():
        return "bucketed"
    dtype = experts.up_proj.dtype if hidden_states is None else hidden_states.dtype
    if implementation in ("bucketed", "grouped_mm") and not experts.grouped_mm_fits(dtype):
        return "eager"
    return "grouped_mm" if implementation == "bucketed" else implementation


def slab_kernel_runs(experts, hidden_states: torch.Tensor) -> bool:
    """Whether slabs would run on the compiled kernel (`hf_comet.modeling.slab_kernel.kernel_takes`: fp32, the
    layouts it reads, the kernel built on this machine) rather than on the torch loop."""
    down_bias = None if experts.output_bias is not None else experts.down_proj_bias
    return kernel_takes(hidden_states, experts.up_proj, experts.up_proj_bias, experts.down_proj, down_bias)


def _slab_ready(experts, hidden_states: torch.Tensor, weights: torch.Tensor | None = None) -> bool:
    """Slabs run inference only (they build no autograd node: under grad mode nothing that enters them may need a
    gradient, the combine weights and every expert tensor included), on CPU, in the weights' own dtype (no autocast
    cast of every expert), outside compiled code, and not on DTensor weights. Under tensor parallelism transformers
    hands the forward local shards, on which slabs compute what the kernel would."""
    weight = experts.up_proj
    if torch.is_grad_enabled():
        tensors = (hidden_states, weights, weight, experts.up_proj_bias, experts.down_proj, experts.down_proj_bias,
                   experts.output_bias)  # fmt: skip
        if any(t is not None and t.requires_grad for t in tensors):
            return False
    return (
        hidden_states.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and hidden_states.dtype == weight.dtype
        and type(weight) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()  # a trace would record neither the kernel's calls nor the loop's
    )


__all__ = [
    "EXECUTIONS",
    "KERNELS",
    "ExecutionThresholds",
    "choose_execution",
    "slab_kernel_runs",
    "top_k_execution",
    "thresholds",
    "thresholds_path",
]
