"""`sparsify`: a dense GPT-2 / ViT / BERT model -> a block-COMET model fitted to the dense FFN on calibration data.

Two levers on top of ``convert_to_moe(method="comet", comet_block_size=b)``, both from MoEfication (Zhang et al.
2022), both measured before any fine-tuning (docs/decisions.md, "Sparsify defaults"):

* ``cluster="coactivation"``: the FFN's units are grouped into F/b blocks of units that fire together on the
  calibration tokens (balanced k-means, `balanced_kmeans`, over each unit's L2-normalised positive activations) and
  permuted so each block is a run of consecutive units, which the comet conversion then slices. A permutation of
  units changes nothing at keep 1.0 (the sum over units is reordered only). ``"none"`` keeps consecutive units.
* ``router="fitted"``: the COMET projection V (blocks x d) and a per-block bias are fitted in closed form (centred
  ridge least squares) so that ``x @ V^T + bias`` predicts each block's importance: the L2 norm of the block's
  contribution to the FFN output, divided by the token's mean over blocks and centred per token (top-k ignores a
  per-token scale and shift; this keeps loud tokens from dominating the fit). Stored as ``comet_router="fitted"``.
  ``"random"`` keeps COMET's frozen random projection.

Only block importance relative to the other blocks of the same token matters, so both targets and the router are
per token; the captured inputs are the dense model's, so later layers are fitted on dense (not sparsified) inputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedModel

from ..modeling import FAMILY_ADAPTERS, FamilyAdapter
from ..modeling.configuration_comet import SPARSIFY_CLUSTERS
from .core import _load_dense, convert_to_moe, family_of_model_type, map_dense_state_dict, stock_to_ours
from .method import ConversionError, hash_block
from .split import balanced_kmeans

CLUSTERS = SPARSIFY_CLUSTERS
"""``cluster`` of `sparsify`: ``"none"`` (consecutive units) or ``"coactivation"`` (units that fire together)."""
ROUTERS = ("random", "fitted")
"""``router`` of `sparsify`: ``"random"`` (COMET's frozen random projection) or ``"fitted"`` (least squares)."""
DEFAULT_CLUSTER = "coactivation"
DEFAULT_ROUTER = "fitted"
RIDGE = 1e-3
"""Ridge of the router fit, relative to the mean variance of the (centred) FFN inputs."""
MAX_FEATURE_TOKENS = 8192
"""Calibration tokens (a seeded sample) that make up each unit's co-activation feature vector."""
CHUNK = 2048
"""Tokens per chunk when block importances are computed (memory: chunk x blocks x d)."""
_RESERVED = {
    "comet_block_size": "block_size",
    "comet_keep_rate": "keep_rate",
    "comet_router": "router",
    "sparsify_cluster": "cluster",
    "method": "sparsify (always method='comet')",
    "split_method": "cluster",
}


# -- checks, before any work -----------------------------------------------------------------------------------------
def _source_family(dense: PreTrainedModel | str | os.PathLike) -> tuple[Any, FamilyAdapter]:
    """The source's config and family; refuses what has no sparsifiable FFN (reads only the config of a folder)."""
    if isinstance(dense, PreTrainedModel):
        config = dense.config
    else:
        try:
            config = AutoConfig.from_pretrained(str(dense))
        except (OSError, ValueError, StrictDataclassError) as error:
            raise ConversionError(f"cannot read a transformers config from {str(dense)!r}: {error}") from error
    model_type = getattr(config, "model_type", None)
    upstream = ", ".join(family.upstream_model_type for family in FAMILY_ADAPTERS.values())
    family = family_of_model_type(model_type)
    if family is not None and model_type == family.model_type:
        raise ConversionError(
            f"the source is already an hf_comet model (model_type={model_type!r}): its FFN is experts now; "
            f"sparsify the dense {family.upstream_model_type} checkpoint it was converted from."
        )
    if family is None:
        raise ConversionError(
            f"model_type={model_type!r} has no FFN sparsify knows how to convert; supported sources are dense "
            f"{upstream} models (any head convert_to_moe accepts)."
        )
    if isinstance(dense, PreTrainedModel) and type(dense).__name__ not in stock_to_ours():
        raise ConversionError(
            f"{type(dense).__name__} has no hf_comet counterpart; supported sources: {', '.join(stock_to_ours())}."
        )
    return config, family


def _check_sizes(keep_rate: float, block_size: int, width: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 2 <= block_size <= width:
        raise ConversionError(
            f"block_size={block_size!r} must be an integer from 2 to the FFN width {width} (sparsify builds "
            "block-COMET; unit-level COMET is convert_to_moe(..., method='comet'))."
        )
    if width % block_size:
        divisors = [width // n for n in (64, 32, 16, 8, 4, 2) if width % n == 0 and width // n >= 2]
        divisors = divisors or [d for d in range(2, width + 1) if width % d == 0][:8]
        raise ConversionError(
            f"block_size={block_size} does not divide the FFN width {width}; pick a divisor of it, e.g. "
            f"{', '.join(map(str, divisors))}."
        )
    blocks = width // block_size
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
        raise ConversionError(f"keep_rate={keep_rate!r} must be a number in (0, 1] (the share of blocks kept).")
    if math.floor(keep_rate * blocks * (1 + 1e-9)) < 1:
        raise ConversionError(
            f"keep_rate={keep_rate:g} keeps floor({keep_rate:g} x {blocks} blocks) = 0 blocks per token; the "
            f"smallest keep rate with {blocks} blocks of {block_size} units is 1/{blocks} = {1 / blocks:.4g}."
        )


def _calibration_batches(calibration: Any, needed: bool, main_input: str) -> list[Mapping[str, Any]]:
    """The calibration data as a list of input dicts (a single dict is one batch); refuses missing or empty data."""
    if calibration is None:
        if needed:
            raise ConversionError(
                "calibration=None, but cluster='coactivation' and router='fitted' need the dense model's activations: "
                f"pass model inputs (a dict such as {{{main_input!r}: ...}} or an iterable of them); only "
                "cluster='none', router='random' needs none."
            )
        return []
    batches = [calibration] if isinstance(calibration, Mapping) else None
    if batches is None:
        if isinstance(calibration, (str, bytes, torch.Tensor)) or not isinstance(calibration, Iterable):
            raise ConversionError(
                f"calibration must be a dict of model inputs ({{{main_input!r}: tensor, ...}}) or an iterable of "
                f"them, not {type(calibration).__name__}."
            )
        batches = list(calibration)
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise ConversionError(f"calibration batches must be dicts of model inputs, not {type(batch).__name__}.")
        inputs = batch.get(main_input, batch.get("inputs_embeds"))
        if not isinstance(inputs, torch.Tensor):
            raise ConversionError(
                f"a calibration batch has no {main_input!r} tensor (keys: {sorted(batch)}); the source reads "
                f"{main_input!r}."
            )
        if inputs.numel() == 0:
            raise ConversionError(f"a calibration batch's {main_input!r} is empty (shape {tuple(inputs.shape)}).")
    if needed and not batches:
        raise ConversionError(
            "calibration is empty, but cluster='coactivation' and router='fitted' need the dense model's activations; "
            "only cluster='none', router='random' needs none."
        )
    masks = [batch.get("attention_mask") for batch in batches]
    if needed and all(isinstance(mask, torch.Tensor) and not bool(mask.bool().any()) for mask in masks):
        raise ConversionError(
            "calibration has no real token: every attention_mask is 0 (padding only), and the fit reads the dense "
            "model's activations on real tokens; give rows with real tokens."
        )
    return batches


# -- calibration -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_ffn_inputs(
    dense: PreTrainedModel, family: FamilyAdapter, batches: list[Mapping[str, Any]], blocks: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``dense`` (eval mode, no grad) and return, per MoE block path (as in our model), the
    FFN's input hidden states of every non-padding token, (T, d) in float32."""
    wanted = set(blocks)
    captured: dict[str, list[torch.Tensor]] = {block: [] for block in wanted}
    current_mask: list[torch.Tensor | None] = [None]

    def hook(block: str):
        def capture(module, args):
            hidden = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            mask = current_mask[0]
            if mask is not None and mask.numel() == hidden.shape[0]:
                hidden = hidden[mask.reshape(-1).to(hidden.device) != 0]
            captured[block].append(hidden)

        return capture

    handles, found = [], set()
    for name, module in dense.named_modules():
        where = family.ffn_key(f"{name}.weight")
        if where is not None and where.role == "up" and where.block in wanted:
            handles.append(module.register_forward_pre_hook(hook(where.block)))
            found.add(where.block)
    if found != wanted:
        for handle in handles:
            handle.remove()
        raise ConversionError(f"the dense model has no FFN module at {sorted(wanted - found)} to calibrate.")
    was_training = dense.training
    dense.eval()
    device = next(dense.parameters()).device
    try:
        for batch in batches:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
            current_mask[0] = inputs.get("attention_mask")
            dense(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        dense.train(was_training)
    return {block: torch.cat(parts) for block, parts in captured.items()}


# -- the two levers --------------------------------------------------------------------------------------------------
def coactivation_order(activations: torch.Tensor, blocks: int, generator: torch.Generator) -> torch.Tensor:
    """Unit order that makes each run of F/blocks consecutive units a co-activation cluster (MoEfication): unit i's
    feature is its positive activation over (a sample of at most `MAX_FEATURE_TOKENS`) calibration tokens,
    L2-normalised; balanced k-means groups them into ``blocks`` equal clusters."""
    tokens = activations.shape[0]
    if tokens > MAX_FEATURE_TOKENS:
        activations = activations[torch.randperm(tokens, generator=generator)[:MAX_FEATURE_TOKENS]]
    features = torch.nn.functional.normalize(activations.clamp(min=0).t().float().cpu(), dim=1)
    return balanced_kmeans(features, blocks, generator)


def block_importance(activations: torch.Tensor, down_weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """(T, blocks): the L2 norm of each block's contribution to the FFN output, ``||h_blk W_down_blk^T||``, for
    activations (T, F) and the second projection (d, F) in nn.Linear layout; blocks are consecutive units."""
    tokens, width = activations.shape
    down = down_weight.float().reshape(down_weight.shape[0], blocks, width // blocks)
    out = torch.empty(tokens, blocks, device=activations.device)
    for start in range(0, tokens, CHUNK):
        part = activations[start : start + CHUNK].reshape(-1, blocks, width // blocks)
        out[start : start + CHUNK] = torch.einsum("tnb,dnb->tnd", part, down).norm(dim=-1)
    return out


def router_target(importance: torch.Tensor) -> torch.Tensor:
    """What the fitted router regresses: importance over the token's mean importance, centred per token."""
    relative = importance / importance.mean(dim=-1, keepdim=True).clamp(min=1e-12)
    return relative - relative.mean(dim=-1, keepdim=True)


def fit_router(inputs: torch.Tensor, target: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred ridge least squares: V (blocks, d) and bias (blocks,) minimising ``||x V^T + bias - target||^2 +
    lambda ||V||^2`` with ``lambda = ridge * T * mean variance of x`` (the bias is not penalised); in float64."""
    x, y = inputs.double(), target.double()
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.t() @ xc
    penalty = ridge * gram.diagonal().mean().clamp(min=1e-12)
    solution = torch.linalg.solve(
        gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), xc.t() @ yc
    )  # (d, blocks)
    return solution.t().float(), (y_mean - x_mean @ solution).float()


def _permuted_state(
    state: dict[str, torch.Tensor], family: FamilyAdapter, orders: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with each block's FFN units in ``orders[block]`` order (first projection's rows and bias, second
    projection's columns), in the family's own layout (GPT-2's Conv1D is (in, out))."""
    permuted = dict(state)
    for key, value in state.items():
        where = family.ffn_key(key)
        if where is None or where.block not in orders or (where.role, where.kind) == ("down", "bias"):
            continue
        order = orders[where.block].to(value.device)
        linear = family.linear_layout(value, where.kind)  # up (F, d) / (F,), down (d, F)
        linear = linear[order] if where.role == "up" else linear[:, order]
        permuted[key] = family.linear_layout(linear, where.kind).contiguous()
    return permuted


# -- the public function ---------------------------------------------------------------------------------------------
def sparsify(
    dense: PreTrainedModel | str | os.PathLike,
    keep_rate: float,
    block_size: int,
    calibration: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None,
    *,
    cluster: str = DEFAULT_CLUSTER,
    router: str = DEFAULT_ROUTER,
    seed: int = 0,
    **moe_fields: Any,
) -> PreTrainedModel:
    """Convert a dense GPT-2 / ViT / BERT model into a block-COMET model whose blocks and router fit the dense FFN.

    Args:
        dense: a stock transformers model of GPT-2, ViT or BERT (any head `convert_to_moe` accepts) or a folder it
            was saved to. It is not modified.
        keep_rate: share of the F / ``block_size`` blocks each token runs, in (0, 1]; it must keep at least one block.
        block_size: units per block (``comet_block_size``), a divisor of the FFN width F from 2 to F.
        calibration: model inputs run once through the dense model: a dict of tensors (``{"input_ids": ...,
            "attention_mask": ...}``, ``{"pixel_values": ...}``) or an iterable of them; padded tokens
            (``attention_mask == 0``) are left out. Needed unless ``cluster="none", router="random"``.
        cluster: ``"coactivation"`` (default) groups units that fire together into blocks; ``"none"`` keeps
            consecutive units (plain block-COMET).
        router: ``"fitted"`` (default) fits the projection and a per-block bias to the dense FFN's block importance
            (``comet_router="fitted"``); ``"random"`` keeps COMET's frozen random projection.
        seed: seed of the clustering and of the conversion (``conversion_seed``).
        **moe_fields: other MoE config fields (``moe_layers``, ``routing_seed``, ...).

    The defaults are the pair that kept the dense model's output best before fine-tuning in our measurement
    (docs/decisions.md, "Sparsify defaults"). The config records ``sparsify_cluster`` and ``comet_router``; `deviation`
    compares the result with the dense model. Returns the model in eval mode. Raises `ConversionError` before any work
    on bad input (a keep rate that keeps no block, a block size that does not divide F, missing calibration, unknown
    names, a source whose FFN cannot be sparsified).
    """
    if cluster not in CLUSTERS:
        raise ConversionError(f"cluster={cluster!r} is not a clustering; choose one of {', '.join(CLUSTERS)}.")
    if router not in ROUTERS:
        raise ConversionError(f"router={router!r} is not a sparsify router; choose one of {', '.join(ROUTERS)}.")
    reserved = sorted(set(moe_fields) & set(_RESERVED))
    if reserved:
        raise ConversionError(
            f"{reserved[0]}={moe_fields[reserved[0]]!r} is set by sparsify; use its argument {_RESERVED[reserved[0]]}."
        )
    config, family = _source_family(dense)
    _check_sizes(keep_rate, block_size, family.ffn_width(config))
    needed = cluster != "none" or router != "random"
    batches = _calibration_batches(calibration, needed, family.main_input_name)

    model, _ = _load_dense(dense)
    fields = dict(moe_fields, comet_block_size=block_size, comet_keep_rate=keep_rate, sparsify_cluster=cluster)
    if router == "fitted":
        fields["comet_router"] = "fitted"
    moe = convert_to_moe(model, "comet", seed=seed, **fields)
    if not needed:
        return moe
    state = model.state_dict()
    _, ffns = family.separate_ffns(state, moe.config.is_moe_layer)
    inputs = capture_ffn_inputs(model, family, batches, ffns)
    num_blocks = family.ffn_width(config) // block_size
    orders: dict[str, torch.Tensor] = {}
    activations: dict[str, torch.Tensor] = {}
    for block, ffn in ffns.items():
        act = moe.get_submodule(block).experts_module.act_fn
        x = inputs[block]
        h = act(torch.nn.functional.linear(x, ffn.up_weight.float().to(x.device), ffn.up_bias.float().to(x.device)))
        activations[block] = h
        if cluster == "coactivation":
            generator = torch.Generator().manual_seed(seed + hash_block(block))
            orders[block] = coactivation_order(h, num_blocks, generator)
    with torch.no_grad():
        if orders:
            permuted = _permuted_state(state, family, orders)
            mapped = map_dense_state_dict(permuted, moe, method="comet", seed=seed)
            experts = {key: value for key, value in mapped.items() if ".experts." in key}
            moe.load_state_dict(experts, strict=False)
        for block, ffn in ffns.items():
            module = moe.get_submodule(block)
            if router == "fitted":
                order = orders.get(block)
                h = activations[block] if order is None else activations[block][:, order.to(activations[block].device)]
                down = ffn.down_weight if order is None else ffn.down_weight[:, order]
                target = router_target(block_importance(h, down.to(h.device), num_blocks))
                projection, bias = fit_router(inputs[block], target)
                module.router.projection.copy_(projection)
                module.router.projection_bias.copy_(bias)
            module.routing_record.copy_(module.expected_record(moe.config))
    return moe.eval()


@torch.no_grad()
def deviation(
    dense: PreTrainedModel, converted: PreTrainedModel, inputs: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """How far ``converted`` is from ``dense`` on ``inputs`` (before any fine-tuning): ``relative_error`` (Frobenius
    norm of the main output's difference over the dense output's; per-token outputs at the positions the attention
    mask keeps), ``max_abs_error``, ``mean_abs_error``,
    ``argmax_agreement`` (share of positions with the dense argmax, for outputs with a last dim > 1), and when
    ``inputs`` carry ``labels`` the task metrics of both (``dense_eval_loss``, ``eval_loss``, ``dense_accuracy``,
    ``accuracy``, and perplexities for causal LMs, as `deviation_report` computes them)."""
    from .report import _task_metrics

    forward = {k: v for k, v in inputs.items() if k != "labels"}
    modes = dense.training, converted.training
    dense.eval()
    converted.eval()
    try:
        reference, output = dense(**forward)[0].float(), converted(**forward)[0].float()
        mask = forward.get("attention_mask")
        if mask is not None and reference.dim() >= 3 and tuple(mask.shape) == tuple(reference.shape[:2]):
            real = mask.to(reference.device) != 0  # per-token outputs: padded positions are not compared
            reference, output = reference[real], output[real]
        difference = output - reference
        row = {
            "relative_error": float(difference.norm() / reference.norm().clamp(min=1e-12)),
            "max_abs_error": float(difference.abs().max()),
            "mean_abs_error": float(difference.abs().mean()),
        }
        if reference.dim() >= 2 and reference.shape[-1] > 1:
            row["argmax_agreement"] = float((output.argmax(-1) == reference.argmax(-1)).float().mean())
        if "labels" in inputs:
            row.update({f"dense_{key}": value for key, value in _task_metrics(dense, dict(inputs)).items()})
            row.update(_task_metrics(converted, dict(inputs)))
    finally:
        dense.train(modes[0])
        converted.train(modes[1])
    return row


__all__ = [
    "CLUSTERS",
    "DEFAULT_CLUSTER",
    "DEFAULT_ROUTER",
    "ROUTERS",
    "block_importance",
    "capture_ffn_inputs",
    "coactivation_order",
    "deviation",
    "fit_router",
    "router_target",
    "sparsify",
]
