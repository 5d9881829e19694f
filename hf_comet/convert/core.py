"""`convert_to_moe`: load the dense model, build ours from a config derived from it, map the state dict.

Every family fact (where the FFN sits, its layout, which stock classes we accept) comes from the family adapters
(``hf_comet.modeling.FAMILY_ADAPTERS``, ``model.family``); every method fact from `METHODS`.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, PreTrainedModel

from ..modeling import FAMILY_ADAPTERS, FamilyAdapter
from ..modeling.configuration_comet import CONVERSION_METHODS, resolve_moe_aliases
from ..modeling.configuration_comet import SPLIT_METHODS as CONFIG_SPLIT_METHODS
from .comet import COMET
from .companions import is_hub_id, read_conversion_source, recorded_source
from .method import ConversionError, ConversionMethod, hash_block
from .split import DEFAULT_SPLIT_METHOD, SPLIT, SPLIT_METHODS
from .upcycle import UPCYCLE

METHODS: dict[str, ConversionMethod] = {method.name: method for method in (COMET, UPCYCLE, SPLIT)}
if tuple(METHODS) != CONVERSION_METHODS or tuple(SPLIT_METHODS) != CONFIG_SPLIT_METHODS:  # one vocabulary
    raise RuntimeError(
        f"conversion registry {tuple(METHODS)} / {tuple(SPLIT_METHODS)} differs from the config's provenance values "
        f"{CONVERSION_METHODS} / {CONFIG_SPLIT_METHODS}: update configuration_comet.py with the registry."
    )
"""``method`` of `convert_to_moe` -> the method (its routings, config defaults and FFN mapping)."""


def stock_to_ours() -> dict[str, tuple[FamilyAdapter, str]]:
    """Stock class name we convert from -> (our family, the Auto class of the same head), from the adapters."""
    return {
        stock: (family, auto_name)
        for family in FAMILY_ADAPTERS.values()
        for stock, auto_name in family.stock_heads.items()
    }


def family_of_model_type(model_type: str) -> FamilyAdapter | None:
    """The family whose model type, ours (``comet_gpt2``) or the stock one (``gpt2``), is ``model_type``."""
    for family in FAMILY_ADAPTERS.values():
        if model_type in (family.model_type, family.upstream_model_type):
            return family
    return None


def conversion_method(name: str) -> ConversionMethod:
    if name not in METHODS:
        raise ConversionError(f"method={name!r} is not a conversion; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def _stock_head(class_name: str) -> tuple[FamilyAdapter, str]:
    heads = stock_to_ours()
    if class_name not in heads:
        raise ConversionError(f"{class_name} has no hf_comet counterpart; supported sources: {', '.join(heads)}.")
    return heads[class_name]


def _load_dense(source: PreTrainedModel | str | os.PathLike) -> tuple[PreTrainedModel, str | None]:
    if isinstance(source, PreTrainedModel):
        return source, getattr(source, "name_or_path", None) or None
    path = str(source)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, StrictDataclassError) as error:
        raise ConversionError(f"cannot read a transformers config from {path!r}: {error}") from error
    architectures = getattr(config, "architectures", None) or []
    upstream = [family.upstream_model_type for family in FAMILY_ADAPTERS.values()]
    if config.model_type not in upstream or not architectures:
        raise ConversionError(
            f"{path!r} holds model_type={config.model_type!r} ({architectures or 'no architectures'}); supported "
            f"sources are dense {', '.join(upstream)} checkpoints saved by transformers."
        )
    family, head = _stock_head(architectures[0])
    if os.path.isdir(path):
        path = os.path.abspath(path)  # a local source is read as an absolute path, never mistaken for a repo id
    stock_class = family.stock_class(head)
    try:  # mismatched shapes are reported (and refused below) rather than raised with a pointer to a hidden report
        model, report = stock_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, TypeError, ArithmeticError, SafetensorError, StrictDataclassError) as error:
        # missing, truncated or garbage weights, bad JSON, config values the model cannot be built with
        raise ConversionError(f"cannot load the weights of {path!r} as {stock_class.__name__}: {error}") from error
    check_load_report(report, family, stock_class.__name__, path)
    return model, path


def check_load_report(report: dict[str, Any], family: FamilyAdapter, class_name: str, path: str) -> None:
    """Refuse a dense source whose weights do not fill its class: a missing tensor (it would be random, and in an FFN
    every expert made from it random), a tensor of the wrong shape, or an unexpected FFN tensor (a source whose FFN
    is not where its class reads it). Any other unexpected tensor is unused by the dense model too: a warning."""

    def listed(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    fix = "re-save the source with save_pretrained from a complete model"
    missing = report.get("missing_keys") or ()
    if missing:
        raise ConversionError(
            f"{path!r} lacks {len(missing)} weight(s) {class_name} needs: {listed(missing)}; converting would fill "
            f"them (and every expert made from them) with random values; {fix}."
        )
    mismatched = report.get("mismatched_keys") or ()
    if mismatched:
        shapes = ", ".join(f"{key} {tuple(saved)} (needs {tuple(needed)})" for key, saved, needed in sorted(mismatched))
        raise ConversionError(f"{path!r} holds weights of the wrong shape for its config: {shapes}; {fix}.")
    if report.get("error_msgs"):
        raise ConversionError(f"{path!r}: loading {class_name} reported {report['error_msgs']}; {fix}.")
    unexpected = set(report.get("unexpected_keys") or ())
    ffn = {key for key in unexpected if family.ffn_key(key) is not None}
    if ffn:
        raise ConversionError(
            f"{path!r} holds FFN weights {class_name} does not read: {listed(ffn)}; the FFN the conversion maps would "
            f"not be the one in the file; {fix}."
        )
    if unexpected:
        warnings.warn(
            f"{path!r}: {class_name} does not use {len(unexpected)} saved tensor(s) ({listed(unexpected)}); "
            "they are left out of the conversion as the dense model leaves them out.",
            stacklevel=3,
        )


def _moe_config(
    dense: PreTrainedModel,
    family: FamilyAdapter,
    method: ConversionMethod,
    fields: dict[str, Any],
    provenance: dict[str, Any],
):
    config_dict = dense.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        config_dict.pop(key, None)
    try:  # transformers' names (num_local_experts) as the config takes them; MoE-looking typos refused by name
        fields = resolve_moe_aliases(fields, family.config_class)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    routing = method.resolve_routing(fields.pop("routing", None))
    if method.expert_width is not None and "moe_intermediate_size" in fields:
        raise ConversionError(
            f"moe_intermediate_size is set by method={method.name!r} ({method.expert_width}); leave it out."
        )
    defaults = method.config_defaults(
        ffn_width=family.ffn_width(dense.config), fields=fields, routing=routing, config_class=family.config_class
    )
    unknown = sorted(set(fields) - set(family.config_class.__dataclass_fields__))
    if unknown:
        raise ConversionError(f"{unknown} are not {family.model_type} config fields; see CometMoEConfigMixin.")
    try:
        return family.config_class(**{**config_dict, **defaults, **fields, "routing": routing, **provenance})
    except (ValueError, TypeError) as error:
        raise ConversionError(str(error)) from error


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
        dense: a stock transformers model of GPT-2, ViT or BERT, any head (``GPT2LMHeadModel``,
            ``GPT2DoubleHeadsModel``, ``ViTForMaskedImageModeling``, ``BertForPreTraining``, ...: every stock class
            one of our classes extends, `stock_to_ours`) or a folder it was saved to.
        method: ``"comet"``, ``"upcycle"`` or ``"split"`` (`METHODS`; each module's docstring says what it does).
        split_method: for ``split``: ``"contiguous"``, ``"random"`` (seeded) or ``"kmeans"`` (balanced, seeded).
        seed: seed of the conversion's random choices; recorded as ``conversion_seed``.
        **moe_fields: MoE config fields (``routing``, ``num_experts``, ``num_experts_per_tok``, ``moe_layers``,
            ``comet_keep_rate``, ...). ``moe_layers`` picks the blocks that convert; the others stay dense.

    Returns our model in eval mode; its config records the provenance (``converted_from``, ``conversion_method``,
    ``split_method``, ``conversion_seed``), and ``model.conversion_source`` (`ConversionSource`) what its
    ``save_pretrained`` carries over from the source: tokenizer, image-processor and generation-config files and the
    card's license, language, datasets and base model. Raises `ConversionError` before any work on bad input.
    """
    conversion = conversion_method(method)
    if split_method is not None and not conversion.takes_split_method:
        takers = " or ".join(repr(name) for name, m in METHODS.items() if m.takes_split_method)
        raise ConversionError(f"split_method={split_method!r} only applies to method={takers} (got {method!r}).")
    split_method = split_method or DEFAULT_SPLIT_METHOD
    if split_method not in SPLIT_METHODS:
        raise ConversionError(
            f"split_method={split_method!r} is not supported; choose one of {', '.join(SPLIT_METHODS)}."
        )
    if isinstance(dense, PreTrainedModel):
        _stock_head(type(dense).__name__)
    model, source = _load_dense(dense)
    family, head = _stock_head(type(model).__name__)
    provenance = {
        "converted_from": recorded_source(source),  # a Hub id or ./<folder name>, never an absolute path
        "conversion_method": method,
        "split_method": split_method if conversion.takes_split_method else None,
        "conversion_seed": seed,
    }
    config = _moe_config(model, family, conversion, dict(moe_fields), provenance)
    torch.manual_seed(seed)
    moe = family.head_class(head)._from_config(config)  # what AutoModel*.from_config builds
    mapped = map_dense_state_dict(model.state_dict(), moe, method=method, split_method=split_method, seed=seed)
    missing, unexpected = moe.load_state_dict(mapped, strict=False)
    if unexpected:
        raise ConversionError(f"dense weights with no place in the MoE model: {unexpected[:5]}")
    allowed_missing = re.compile(r".*\.router\..*|.*\.routing_record")  # the model builds both itself
    left = [key for key in missing if not allowed_missing.fullmatch(key)]
    if left:
        raise ConversionError(f"MoE weights the dense model does not provide: {left[:5]}")
    conversion.init_routers(moe, mapped)
    # tokenizer / processor / generation files and card metadata, written beside the weights when it is saved
    known = source and (os.path.isdir(source) or is_hub_id(source))
    moe.conversion_source = read_conversion_source(source if known else None)
    generation = moe.conversion_source.files.pop("generation_config.json", None)
    if generation is not None and getattr(moe, "generation_config", None) is not None:
        from transformers import GenerationConfig

        moe.generation_config = GenerationConfig.from_pretrained(generation.parent, config_file_name=generation.name)
    return moe.eval()


@torch.no_grad()
def map_dense_state_dict(
    dense_state: dict[str, torch.Tensor],
    moe: PreTrainedModel,
    method: str = "comet",
    split_method: str = DEFAULT_SPLIT_METHOD,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The dense state dict in the MoE model's layout: non-FFN weights (and FFNs of non-MoE blocks) unchanged, FFN
    weights of MoE blocks copied into every expert (one group for COMET, E copies when ``moe_intermediate_size`` is
    the FFN width) or sliced into E experts by the unit partition of ``split_method``. Where the FFN sits and how
    its weights are laid out is ``moe.family``'s (`FamilyAdapter`) business; nothing here knows a family."""
    family = getattr(moe, "family", None)
    if family is None:
        raise ConversionError(f"{type(moe).__name__} is not an hf_comet model: it has no family facts (`family`).")
    conversion = conversion_method(method)
    moe_state = moe.state_dict()
    mapped, ffns = family.separate_ffns(dense_state, moe.config.is_moe_layer)
    for block, ffn in ffns.items():
        experts, width, _ = moe_state[f"{block}.experts.up_proj"].shape
        expected = (experts, ffn.width // experts) if conversion.slices(experts) else (experts, ffn.width)
        if (experts, width) != expected:
            raise ConversionError(
                f"{block}: the MoE model's experts are {experts} x {width} units but method={method!r} needs "
                f"{expected[0]} x {expected[1]} from an FFN of width {ffn.width}."
            )
        packed = conversion.map_ffn(ffn, experts, seed=seed + hash_block(block), split_method=split_method)
        if f"{block}.experts.output_bias" in moe_state:  # the second bias added once
            packed["output_bias"] = ffn.down_bias.clone()
        else:
            packed["down_proj_bias"] = ffn.down_bias.expand(experts, *ffn.down_bias.shape).clone()
        mapped.update({f"{block}.experts.{name}": tensor for name, tensor in packed.items()})
    return mapped


__all__ = [
    "METHODS",
    "check_load_report",
    "conversion_method",
    "convert_to_moe",
    "family_of_model_type",
    "map_dense_state_dict",
    "stock_to_ours",
]
