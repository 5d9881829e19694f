"""hf_comet: mixture-of-experts FFNs (COMET and learned gating) for GPT-2, ViT and BERT in Hugging Face Transformers.

Importing the package registers every config and model with the Auto classes, so ``AutoConfig.for_model``,
``AutoModel*.from_config``, ``AutoModel*.from_pretrained`` and pipelines work with the ``comet_*`` model types.

``import hf_comet`` imports neither torch nor transformers: the registration runs the moment transformers' Auto
modules load (a post-import hook; the models register lazily, `hf_comet.auto_registration`); every other public name (models, routers, conversion, merging,
distillation) loads on first use (PEP 562 ``__getattr__``). Model cards and ``push_to_hub`` are attached to the models
when their code loads (`hf_comet.hub`). Tooling (``hf_comet.training``, ``hf_comet.reproduce``, ``hf_comet.bench``,
the CLI) is never imported here.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports below only name what __getattr__ exports)

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from ._lazy import after_import, lazy_exports
from .auto_registration import install_auto_registration

__version__ = "0.1.0"

install_auto_registration()


def _attach_sharing(module: ModuleType) -> None:
    """Model cards at save time and ``push_to_hub`` with them (`hf_comet.hub`), plugged into the models as soon as
    their common module loads: never missing, however a model is imported, and no Hub code at ``import hf_comet``."""
    module.CometPreTrainedMixin.sharing = importlib.import_module(f"{__name__}.hub").Sharing()


after_import(f"{__name__}.modeling.modeling_comet_common", _attach_sharing)

_NAMES: dict[str, tuple[str, ...]] = {
    "convert": ("convert_to_moe",),
    "distill": ("attentive_to_softmax_gates", "distill_attentive_gates"),
    "hub": ("Sharing",),
    "merging": ("ExpertMerge", "merge_experts", "merge_most_used_into_least_used", "reset_merged_optimizer_state"),
    "modeling": (
        "FAMILIES",
        "ROUTINGS",
        "AttentiveRouter",
        "CometBertConfig",
        "CometBertForCausalLM",
        "CometBertForMaskedLM",
        "CometBertForMultipleChoice",
        "CometBertForNextSentencePrediction",
        "CometBertForPreTraining",
        "CometBertForQuestionAnswering",
        "CometBertForSequenceClassification",
        "CometBertForTokenClassification",
        "CometBertModel",
        "CometGPT2Config",
        "CometGPT2DoubleHeadsModel",
        "CometGPT2ForCausalLM",
        "CometGPT2ForQuestionAnswering",
        "CometGPT2ForSequenceClassification",
        "CometGPT2ForTokenClassification",
        "CometGPT2Model",
        "CometPreTrainedMixin",
        "CometRouter",
        "CometViTConfig",
        "CometViTForImageClassification",
        "CometViTForMaskedImageModeling",
        "CometViTModel",
        "DeepMoEGate",
        "MoEBlock",
        "NoisyTopKRouter",
        "PackedExperts",
        "Router",
        "RoutingDecision",
        "SwitchRouter",
        "TopKRouter",
        "register_router",
    ),
}
__getattr__, __dir__, _exports = lazy_exports(
    __name__,
    _NAMES,
    submodules=("bench", "cards", "cli", "config_reference", "convert", "data", "distill", "hub", "io", "lora",
                "merging", "metrics", "modeling", "reproduce", "training"),
)  # fmt: skip


if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` loads these
    from .convert import convert_to_moe
    from .distill import attentive_to_softmax_gates, distill_attentive_gates
    from .hub import Sharing
    from .merging import ExpertMerge, merge_experts, merge_most_used_into_least_used, reset_merged_optimizer_state
    from .modeling import (
        FAMILIES,
        ROUTINGS,
        AttentiveRouter,
        CometBertConfig,
        CometBertForCausalLM,
        CometBertForMaskedLM,
        CometBertForMultipleChoice,
        CometBertForNextSentencePrediction,
        CometBertForPreTraining,
        CometBertForQuestionAnswering,
        CometBertForSequenceClassification,
        CometBertForTokenClassification,
        CometBertModel,
        CometGPT2Config,
        CometGPT2DoubleHeadsModel,
        CometGPT2ForCausalLM,
        CometGPT2ForQuestionAnswering,
        CometGPT2ForSequenceClassification,
        CometGPT2ForTokenClassification,
        CometGPT2Model,
        CometPreTrainedMixin,
        CometRouter,
        CometViTConfig,
        CometViTForImageClassification,
        CometViTForMaskedImageModeling,
        CometViTModel,
        DeepMoEGate,
        MoEBlock,
        NoisyTopKRouter,
        PackedExperts,
        Router,
        RoutingDecision,
        SwitchRouter,
        TopKRouter,
        register_router,
    )

__all__ = [*_exports, "__version__"]
