"""Dense GPT-2 / ViT / BERT checkpoints -> hf_comet MoE models, by an explicit state-dict mapping.

The dense model is loaded with its stock transformers class (which applies upstream renames such as ViT's legacy
names), our model is built from a config derived from it, and every non-FFN weight and the head are copied unchanged;
the FFN weights of the converted blocks are mapped into packed experts (transformers-v5-notes §1.5, §3.5: no weight
conversion is registered under our model types, so our checkpoints always save in their own layout).

Methods (methods.md §6):

* ``comet``: the FFN is kept as it is (one group of units) and the frozen projection is added. Exact for
  ``comet_keep_rate=1.0``.
* ``upcycle`` (Komatsuzaki et al. 2023): every expert is a copy of the dense FFN (``moe_intermediate_size`` = FFN
  width); the router keeps its small random normal init (std ``initializer_range``, seeded by ``seed``). Exact with
  renormalised top-k (``norm_topk_prob=True``, ``topk``/``noisy_topk``) and for the dense mixtures (``attentive``,
  ``deep``), whose weights sum to 1; not for ``switch`` (output × p < 1).
* ``split`` (MoEfication, Zhang et al. 2022; LLaMA-MoE): the FFN units are partitioned into ``num_experts`` slices
  (``contiguous``, seeded ``random``, or balanced ``kmeans`` on the L2-normalised first-layer weights); the second
  bias is added once (``expert_output_bias="shared"``). For ``topk``/``noisy_topk`` the router starts as a near-zero
  centroid router (input-dependent choice, uniform weights) and ``router_scale`` is set to ``num_experts_per_tok`` so
  each selected slice gets weight ~1: exact when every expert is active (k = E). Other routings mix slices with
  weights summing to 1 and are not exact.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from .modeling import FAMILIES
from .modeling.configuration_comet import LEARNED_ROUTINGS

METHODS = ("comet", "upcycle", "split")
SPLIT_METHODS = ("contiguous", "random", "kmeans")

STOCK_TO_OURS = {
    "GPT2Model": ("comet_gpt2", "AutoModel"),
    "GPT2LMHeadModel": ("comet_gpt2", "AutoModelForCausalLM"),
    "GPT2ForSequenceClassification": ("comet_gpt2", "AutoModelForSequenceClassification"),
    "ViTModel": ("comet_vit", "AutoModel"),
    "ViTForImageClassification": ("comet_vit", "AutoModelForImageClassification"),
    "BertModel": ("comet_bert", "AutoModel"),
    "BertForMaskedLM": ("comet_bert", "AutoModelForMaskedLM"),
    "BertForSequenceClassification": ("comet_bert", "AutoModelForSequenceClassification"),
    "BertForTokenClassification": ("comet_bert", "AutoModelForTokenClassification"),
}
"""Stock class we convert from -> (our model type, Auto class of the same head)."""

# (regex over the dense key -> block prefix, projection name, weight|bias), MoE module name, projection -> up/down
FFN_KEYS = {
    "comet_gpt2": (r"((?:.*\.)?h\.(\d+))\.mlp\.(c_fc|c_proj)\.(weight|bias)", "mlp", {"c_fc": "up", "c_proj": "down"}),
    "comet_vit": (r"((?:.*\.)?layers\.(\d+))\.mlp\.(fc1|fc2)\.(weight|bias)", "mlp", {"fc1": "up", "fc2": "down"}),
    # anchored on `.layer.N.output.dense`: `attention.output.dense` must never match (notes §3.3)
    "comet_bert": (
        r"((?:.*\.)?layer\.(\d+))\.(intermediate|output)\.dense\.(weight|bias)",
        "intermediate",
        {"intermediate": "up", "output": "down"},
    ),
}
UPSTREAM_MODEL_TYPES = {"gpt2": "comet_gpt2", "vit": "comet_vit", "bert": "comet_bert"}


class ConversionError(ValueError):
    """The source or the options cannot be converted; raised before anything is built or written."""


def _load_dense(source: PreTrainedModel | str | os.PathLike) -> tuple[PreTrainedModel, str | None]:
    if isinstance(source, PreTrainedModel):
        return source, getattr(source, "name_or_path", None) or None
    path = str(source)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot read a transformers config from {path!r}: {error}") from error
    architectures = getattr(config, "architectures", None) or []
    if config.model_type not in UPSTREAM_MODEL_TYPES or not architectures:
        raise ConversionError(
            f"{path!r} holds model_type={config.model_type!r} ({architectures or 'no architectures'}); supported "
            f"sources are dense {', '.join(UPSTREAM_MODEL_TYPES)} checkpoints saved by transformers."
        )
    _check_head(architectures[0])
    if os.path.isdir(path):
        path = os.path.abspath(path)  # a local source is recorded as an absolute path, never mistaken for a repo id
    return getattr(transformers, architectures[0]).from_pretrained(path), path


def _check_head(class_name: str) -> None:
    if class_name not in STOCK_TO_OURS:
        raise ConversionError(
            f"{class_name} has no hf_comet counterpart; supported sources: {', '.join(STOCK_TO_OURS)}."
        )


def _moe_config(dense: PreTrainedModel, method: str, fields: dict[str, Any], provenance: dict[str, Any]):
    family, _ = STOCK_TO_OURS[type(dense).__name__]
    config_dict = dense.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        config_dict.pop(key, None)
    routing = fields.pop("routing", None)
    if method == "comet":
        routing = routing or "comet"
        if routing != "comet":
            raise ConversionError(f"method='comet' uses routing='comet', not routing={routing!r}.")
    else:
        routing = routing or "topk"
        if routing not in LEARNED_ROUTINGS:
            raise ConversionError(
                f"method={method!r} needs a learned routing ({', '.join(LEARNED_ROUTINGS)}), not routing={routing!r}."
            )
    base = FAMILIES[family][0]
    if family == "comet_gpt2":
        ffn_width = dense.config.n_inner or 4 * dense.config.n_embd
    else:
        ffn_width = dense.config.intermediate_size
    if method in ("upcycle", "split") and "moe_intermediate_size" in fields:
        raise ConversionError(
            f"moe_intermediate_size is set by method={method!r} (upcycle: the FFN width; split: FFN width / "
            "num_experts); leave it out."
        )
    defaults: dict[str, Any] = {}
    if method == "upcycle":
        defaults["moe_intermediate_size"] = ffn_width
    if method == "split":
        experts = fields.get("num_experts", 8)  # the config's default
        if experts < 1 or ffn_width % experts:
            raise ConversionError(
                f"num_experts={experts} does not divide the FFN width {ffn_width}; split needs equal slices: pick a "
                "divisor of the FFN width."
            )
        defaults["expert_output_bias"] = "shared"
        if routing in ("topk", "noisy_topk"):
            defaults["router_scale"] = fields.get("num_experts_per_tok", 2)
    unknown = sorted(set(fields) - set(base.__dataclass_fields__))
    if unknown:
        raise ConversionError(f"{unknown} are not {family} config fields; see CometMoEConfigMixin.")
    try:
        return AutoConfig.for_model(family, **{**config_dict, **defaults, **fields, "routing": routing, **provenance})
    except (ValueError, TypeError) as error:
        raise ConversionError(str(error)) from error


@torch.no_grad()
def _partition(up_weight: torch.Tensor, num_experts: int, split_method: str, seed: int) -> torch.Tensor:
    """(F,) unit order: expert e takes units ``order[e * F/E : (e + 1) * F/E]``. ``up_weight`` is (F, d)."""
    num_units = up_weight.shape[0]
    if split_method == "contiguous":
        return torch.arange(num_units)
    generator = torch.Generator().manual_seed(seed)
    if split_method == "random":
        return torch.randperm(num_units, generator=generator)
    return balanced_kmeans(torch.nn.functional.normalize(up_weight.float(), dim=1), num_experts, generator)


def balanced_kmeans(points: torch.Tensor, clusters: int, generator: torch.Generator, iters: int = 15) -> torch.Tensor:
    """Balanced k-means (MoEfication's parameter clustering): equal-size clusters of ``points`` (N, d).

    Centroids start at random points; each round assigns points greedily by increasing distance to clusters that
    still have room (capacity N / clusters), then recomputes the centroids. Returns the point order grouped by
    cluster (cluster c holds ``order[c * N/clusters : (c + 1) * N/clusters]``).
    """
    num, capacity = points.shape[0], points.shape[0] // clusters
    centroids = points[torch.randperm(num, generator=generator)[:clusters]].clone()
    assignment = torch.zeros(num, dtype=torch.long)
    for _ in range(iters):
        distance = torch.cdist(points, centroids)  # (N, C)
        order = distance.flatten().argsort()
        taken = torch.zeros(num, dtype=torch.bool)
        room = torch.full((clusters,), capacity)
        new = torch.empty(num, dtype=torch.long)
        for flat in order.tolist():
            point, cluster = divmod(flat, clusters)
            if not taken[point] and room[cluster] > 0:
                taken[point] = True
                room[cluster] -= 1
                new[point] = cluster
                if not room.any():
                    break
        if torch.equal(new, assignment):
            break
        assignment = new
        for c in range(clusters):
            centroids[c] = points[assignment == c].mean(dim=0)
    return torch.cat([torch.nonzero(assignment == c).flatten() for c in range(clusters)])


def convert_to_moe(
    dense: PreTrainedModel | str | os.PathLike,
    method: str = "comet",
    *,
    split_method: str | None = None,
    seed: int = 0,
    **moe_fields: Any,
) -> PreTrainedModel:
    """Convert a dense GPT-2 / ViT / BERT model (or a checkpoint path) into our MoE model with the same head.

    Args:
        dense: a stock transformers model (``GPT2Model``, ``GPT2LMHeadModel``, ``GPT2ForSequenceClassification``,
            ``ViTModel``, ``ViTForImageClassification``, ``BertModel``, ``BertForMaskedLM``,
            ``BertForSequenceClassification``, ``BertForTokenClassification``) or a folder it was saved to.
        method: ``"comet"``, ``"upcycle"`` or ``"split"`` (module docstring).
        split_method: for ``split``: ``"contiguous"``, ``"random"`` (seeded) or ``"kmeans"`` (balanced, seeded).
        seed: seed of the conversion's random choices; recorded as ``conversion_seed``.
        **moe_fields: MoE config fields (``routing``, ``num_experts``, ``num_experts_per_tok``, ``moe_layers``,
            ``comet_keep_rate``, ...). ``moe_layers`` picks the blocks that convert; the others stay dense.

    Returns our model in eval mode; its config records the provenance (``converted_from``, ``conversion_method``,
    ``split_method``, ``conversion_seed``). Raises `ConversionError` before any work on bad input.
    """
    if method not in METHODS:
        raise ConversionError(f"method={method!r} is not a conversion; choose one of {', '.join(METHODS)}.")
    if split_method is not None and method != "split":
        raise ConversionError(f"split_method={split_method!r} only applies to method='split' (got {method!r}).")
    split_method = split_method or "contiguous"
    if split_method not in SPLIT_METHODS:
        raise ConversionError(
            f"split_method={split_method!r} is not supported; choose one of {', '.join(SPLIT_METHODS)}."
        )
    if isinstance(dense, PreTrainedModel):
        _check_head(type(dense).__name__)
    model, source = _load_dense(dense)
    provenance = {
        "converted_from": source,
        "conversion_method": method,
        "split_method": split_method if method == "split" else None,
        "conversion_seed": seed,
    }
    config = _moe_config(model, method, dict(moe_fields), provenance)
    family, head = STOCK_TO_OURS[type(model).__name__]
    torch.manual_seed(seed)
    moe = getattr(transformers, head).from_config(config)
    mapped = map_dense_state_dict(model.state_dict(), moe, method=method, split_method=split_method, seed=seed)
    missing, unexpected = moe.load_state_dict(mapped, strict=False)
    if unexpected:
        raise ConversionError(f"dense weights with no place in the MoE model: {unexpected[:5]}")
    allowed_missing = re.compile(r".*\.router\..*")
    left = [key for key in missing if not allowed_missing.fullmatch(key)]
    if left:
        raise ConversionError(f"MoE weights the dense model does not provide: {left[:5]}")
    if method == "split":
        _init_split_routers(moe, mapped)
    return moe.eval()


SPLIT_ROUTER_NORM = 1e-6
"""Norm of a split router's rows: the direction of each expert's centroid (MoEfication's similarity router), so the
choice of experts depends on the input, at a scale where the gate is uniform to ~1e-6 and the k = E model stays exact."""


@torch.no_grad()
def _init_split_routers(moe: PreTrainedModel, mapped: dict[str, torch.Tensor]) -> None:
    """Split routers start as near-zero centroid routers: row e points at the mean of expert e's L2-normalised
    first-layer rows. Noise gates start at zero (the noisy gate's own init); other gates keep their init."""
    for name, module in moe.named_modules():
        if not hasattr(module, "router") or not hasattr(module, "experts_module"):
            continue
        weight = getattr(module.router, "weight", None)
        up = mapped.get(f"{name}.experts.up_proj")
        if weight is None or up is None:
            continue
        centroids = torch.nn.functional.normalize(up.float(), dim=-1).mean(dim=1)  # (E, d)
        weight.copy_(torch.nn.functional.normalize(centroids, dim=-1) * SPLIT_ROUTER_NORM)
        noise = getattr(module.router, "noise_weight", None)
        if noise is not None:
            noise.zero_()


@torch.no_grad()
def map_dense_state_dict(
    dense_state: dict[str, torch.Tensor],
    moe: PreTrainedModel,
    method: str = "comet",
    split_method: str = "contiguous",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The dense state dict in the MoE model's layout: non-FFN weights (and FFNs of non-MoE blocks) unchanged, FFN
    weights of MoE blocks copied into every expert (one group for COMET, E copies when ``moe_intermediate_size`` is
    the FFN width) or sliced into E experts by the unit partition of ``split_method``."""
    family = moe.config.model_type
    pattern, block_name, which = FFN_KEYS[family]
    moe_state = moe.state_dict()
    ffn: dict[str, dict[str, torch.Tensor]] = {}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in dense_state.items():
        match = re.fullmatch(pattern, key)
        if match is None or not moe.config.is_moe_layer(int(match.group(2))):
            mapped[key] = value
            continue
        prefix, _, module, kind = match.groups()
        if family == "comet_gpt2" and kind == "weight":
            value = value.t()  # Conv1D stores (in, out); experts use nn.Linear's (out, in)
        ffn.setdefault(f"{prefix}.{block_name}", {})[f"{which[module]}_{kind}"] = value
    for block, weights in ffn.items():
        up, up_bias = weights["up_weight"], weights["up_bias"]  # (F, d), (F,)
        down, down_bias = weights["down_weight"], weights["down_bias"]  # (d, F), (d,)
        experts, width, _ = moe_state[f"{block}.experts.up_proj"].shape
        sliced = method == "split" or (method == "comet" and experts > 1)  # split experts or block-COMET blocks
        expected = (experts, up.shape[0] // experts) if sliced else (experts, up.shape[0])
        if (experts, width) != expected:
            raise ConversionError(
                f"{block}: the MoE model's experts are {experts} x {width} units but method={method!r} needs "
                f"{expected[0]} x {expected[1]} from an FFN of width {up.shape[0]}."
            )
        if sliced:  # slices of the FFN (block-COMET blocks are always contiguous)
            partition = split_method if method == "split" else "contiguous"
            order = _partition(up, experts, partition, seed + hash_block(block))
            mapped[f"{block}.experts.up_proj"] = up[order].reshape(experts, width, -1).clone()
            mapped[f"{block}.experts.up_proj_bias"] = up_bias[order].reshape(experts, width).clone()
            mapped[f"{block}.experts.down_proj"] = (
                down[:, order].reshape(down.shape[0], experts, width).permute(1, 0, 2).clone()
            )
        else:  # copies of the whole FFN
            mapped[f"{block}.experts.up_proj"] = up.expand(experts, *up.shape).clone()
            mapped[f"{block}.experts.up_proj_bias"] = up_bias.expand(experts, *up_bias.shape).clone()
            mapped[f"{block}.experts.down_proj"] = down.expand(experts, *down.shape).clone()
        if f"{block}.experts.output_bias" in moe_state:
            mapped[f"{block}.experts.output_bias"] = down_bias.clone()
        else:
            mapped[f"{block}.experts.down_proj_bias"] = down_bias.expand(experts, *down_bias.shape).clone()
    return mapped


def hash_block(name: str) -> int:
    """A stable per-block offset for seeds (Python's ``hash`` of a string changes between processes)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 1_000_003


# -- deviation report -----------------------------------------------------------------------------------------------
def probe_inputs(config, batch: int = 4, seq_len: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random inputs of the right kind for a model of ``config`` (token ids or pixel values)."""
    generator = torch.Generator().manual_seed(seed)
    if config.model_type in ("vit", "comet_vit"):
        shape = (batch, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", seq_len)
    seq_len = min(seq_len, positions)
    if getattr(config, "pad_token_id", None) is None and config.model_type in ("gpt2", "comet_gpt2"):
        batch = 1  # GPT-2 sequence classification refuses batches > 1 without a pad token
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _task_metrics(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss and accuracy (and perplexity for causal LMs) of ``model`` on a labelled batch."""
    outputs = model(**batch)
    metrics = {"eval_loss": float(outputs.loss)}
    logits, labels = outputs.logits, batch["labels"]
    if getattr(model, "loss_type", None) == "ForCausalLM" or type(model).__name__.endswith(("LMHeadModel", "CausalLM")):
        metrics["perplexity"] = float(torch.exp(outputs.loss))
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    metrics["accuracy"] = float((logits.argmax(-1)[valid] == labels[valid]).float().mean())
    return metrics


@torch.no_grad()
def deviation_report(
    dense: PreTrainedModel | str | os.PathLike,
    method: str,
    sweep: list[float | int],
    inputs: dict[str, torch.Tensor] | None = None,
    split_method: str | None = None,
    seed: int = 0,
    **moe_fields: Any,
) -> list[dict[str, float]]:
    """How far the converted model is from the dense one before any training, for a sweep of COMET keep rates
    (``method="comet"``) or of experts per token (``upcycle``/``split``). Per setting: the max and mean absolute
    difference of the main output (logits, or the last hidden state), and for classification/LM heads the share of
    positions whose argmax prediction agrees with the dense model's. When ``inputs`` carry ``labels`` (an evaluation
    set), the task metrics of the dense model (setting ``"dense"``) and of every converted one are added: loss,
    accuracy, and perplexity for causal LMs."""
    model, _ = _load_dense(dense)
    model.eval()
    inputs = inputs or probe_inputs(model.config)
    labelled = "labels" in inputs
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    reference = model(**forward_inputs)[0]
    rows = []
    if labelled:
        rows.append({"setting": "dense", "max_abs_error": 0.0, "mean_abs_error": 0.0, **_task_metrics(model, inputs)})
    for value in sweep:
        fields = dict(moe_fields)
        if method == "comet":
            fields["comet_keep_rate"] = value
        else:
            fields["num_experts_per_tok"] = int(value)
            if fields.get("routing") in ("attentive", "deep"):
                fields.pop("num_experts_per_tok")
                fields["mixture_top_k"] = int(value)
        converted = convert_to_moe(model, method, split_method=split_method, seed=seed, **fields)
        output = converted(**forward_inputs)[0]
        difference = (output - reference).abs()
        row = {"setting": value, "max_abs_error": float(difference.max()), "mean_abs_error": float(difference.mean())}
        if reference.dim() >= 2 and reference.shape[-1] > 1:
            row["argmax_agreement"] = float((output.argmax(-1) == reference.argmax(-1)).float().mean())
        if labelled:
            row.update(_task_metrics(converted, inputs))
        rows.append(row)
    return rows


__all__ = [
    "METHODS",
    "SPLIT_METHODS",
    "ConversionError",
    "balanced_kmeans",
    "convert_to_moe",
    "deviation_report",
    "map_dense_state_dict",
    "probe_inputs",
]
