"""The part of hf_comet that travels with saved checkpoints: a flat folder of sibling modules (see design.md).

Every public name loads on first use (PEP 562): ``import hf_comet`` imports only the configs (``configuration_comet``,
``routing_names``) from here; the models, routers and experts (torch modules and ``transformers.modeling_utils``) load
when one of their names is first read. Like every file here, this one imports no hf_comet module outside ``modeling/``.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports below only name what __getattr__ exports)

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_NAMES: dict[str, tuple[str, ...]] = {
    "configuration_comet": ("CometBertConfig", "CometGPT2Config", "CometMoEConfigMixin", "CometViTConfig"),
    "routing_names": ("LEARNED_ROUTINGS", "MIXTURE_ROUTINGS", "ROUTER_CLASSES", "ROUTINGS", "register_router"),
    "family_adapter": ("DenseFFN", "FamilyAdapter", "FFNKey"),
    "modeling_comet_bert": (
        "CometBertForCausalLM",
        "CometBertForMaskedLM",
        "CometBertForMultipleChoice",
        "CometBertForNextSentencePrediction",
        "CometBertForPreTraining",
        "CometBertForQuestionAnswering",
        "CometBertForSequenceClassification",
        "CometBertForTokenClassification",
        "CometBertModel",
        "CometBertPreTrainedModel",
    ),
    "modeling_comet_common": ("CometPreTrainedMixin",),
    "modeling_comet_gpt2": (
        "CometGPT2DoubleHeadsModel",
        "CometGPT2ForCausalLM",
        "CometGPT2ForQuestionAnswering",
        "CometGPT2ForSequenceClassification",
        "CometGPT2ForTokenClassification",
        "CometGPT2Model",
        "CometGPT2PreTrainedModel",
    ),
    "modeling_comet_vit": (
        "CometViTForImageClassification",
        "CometViTForMaskedImageModeling",
        "CometViTModel",
        "CometViTPreTrainedModel",
    ),
    "moe_block": ("MoEBlock", "RoutingCollector", "collect_routing"),
    "moe_experts": ("PackedExperts", "run_experts"),
    "moe_routers": (
        "AttentiveRouter",
        "CometRouter",
        "DeepMoEGate",
        "NoisyTopKRouter",
        "Router",
        "RoutingDecision",
        "SwitchRouter",
        "TopKRouter",
    ),
}
_FAMILY_MODULES = ("modeling_comet_gpt2", "modeling_comet_vit", "modeling_comet_bert")
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name == "FAMILY_ADAPTERS":
        modules = (importlib.import_module(f"{__name__}.{module}") for module in _FAMILY_MODULES)
        value = {module.FAMILY.model_type: module.FAMILY for module in modules}
    elif name == "FAMILIES":
        adapters = globals().get("FAMILY_ADAPTERS") or __getattr__("FAMILY_ADAPTERS")
        value = {t: (family.config_class, family.auto_classes) for t, family in adapters.items()}
    elif name in _MODULE_OF:
        value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Stored once, so every reader holds the same dict (a family added to it reaches conversion).
    return globals().setdefault(name, value)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


FAMILY_ADAPTERS: dict[str, Any]
"""model type -> the family's facts (`FamilyAdapter`: FFN layout, stock classes, LoRA targets, display name). The one
list of families, read from each family module's ``FAMILY`` (`_FAMILY_MODULES`): a new family is one more module
there and one more entry in `hf_comet.auto_registration.AUTO_CLASSES`."""

FAMILIES: dict[str, tuple[type, dict[str, type]]]
"""model type -> (config class, {Auto class name: model class}), derived from `FAMILY_ADAPTERS` (what ``import
hf_comet`` registers with the Auto classes, lazily: `hf_comet.auto_registration`)."""

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` loads these
    from .configuration_comet import CometBertConfig, CometGPT2Config, CometMoEConfigMixin, CometViTConfig
    from .family_adapter import DenseFFN, FamilyAdapter, FFNKey
    from .modeling_comet_bert import (
        CometBertForCausalLM,
        CometBertForMaskedLM,
        CometBertForMultipleChoice,
        CometBertForNextSentencePrediction,
        CometBertForPreTraining,
        CometBertForQuestionAnswering,
        CometBertForSequenceClassification,
        CometBertForTokenClassification,
        CometBertModel,
        CometBertPreTrainedModel,
    )
    from .modeling_comet_common import CometPreTrainedMixin
    from .modeling_comet_gpt2 import (
        CometGPT2DoubleHeadsModel,
        CometGPT2ForCausalLM,
        CometGPT2ForQuestionAnswering,
        CometGPT2ForSequenceClassification,
        CometGPT2ForTokenClassification,
        CometGPT2Model,
        CometGPT2PreTrainedModel,
    )
    from .modeling_comet_vit import (
        CometViTForImageClassification,
        CometViTForMaskedImageModeling,
        CometViTModel,
        CometViTPreTrainedModel,
    )
    from .moe_block import MoEBlock, RoutingCollector, collect_routing
    from .moe_experts import PackedExperts, run_experts
    from .moe_routers import (
        AttentiveRouter,
        CometRouter,
        DeepMoEGate,
        NoisyTopKRouter,
        Router,
        RoutingDecision,
        SwitchRouter,
        TopKRouter,
    )
    from .routing_names import LEARNED_ROUTINGS, MIXTURE_ROUTINGS, ROUTER_CLASSES, ROUTINGS, register_router

__all__ = sorted([*_MODULE_OF, "FAMILIES", "FAMILY_ADAPTERS"])
