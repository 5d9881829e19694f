"""hf_comet: mixture-of-experts FFNs (COMET and learned gating) for GPT-2, ViT and BERT in Hugging Face Transformers.

Importing the package registers every config and model with the Auto classes, so ``AutoConfig.for_model``,
``AutoModel*.from_config`` and ``AutoModel*.from_pretrained`` work with the ``comet_*`` model types.
"""

from __future__ import annotations

import transformers
from transformers import AutoConfig

from .convert import convert_to_moe
from .distill import attentive_to_softmax_gates, distill_attentive_gates
from .hub import Sharing
from .merging import ExpertMerge, merge_experts, merge_most_used_into_least_used, reset_merged_optimizer_state
from .modeling import (
    FAMILIES,
    ROUTINGS,
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
    CometMoEBlock,
    CometPreTrainedMixin,
    CometRouter,
    CometViTConfig,
    CometViTForImageClassification,
    CometViTForMaskedImageModeling,
    CometViTModel,
    MoEBlock,
    PackedExperts,
    Router,
    RoutingDecision,
    TopKRouter,
    register_router,
)
from .modeling.moe_routers import AttentiveRouter, DeepMoEGate, DeepRouter, NoisyTopKRouter, SwitchRouter

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Register each family's config and heads with the matching transformers Auto classes (idempotent)."""
    for model_type, (config_class, auto_classes) in FAMILIES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        for auto_name, model_class in auto_classes.items():
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)


_register_auto_classes()
CometPreTrainedMixin.sharing = Sharing()  # model cards at save time, and push_to_hub with them (hf_comet.hub)

__all__ = [
    "ROUTINGS",
    "AttentiveRouter",
    "DeepMoEGate",
    "DeepRouter",
    "ExpertMerge",
    "MoEBlock",
    "PackedExperts",
    "Router",
    "merge_experts",
    "merge_most_used_into_least_used",
    "register_router",
    "NoisyTopKRouter",
    "SwitchRouter",
    "attentive_to_softmax_gates",
    "convert_to_moe",
    "distill_attentive_gates",
    "reset_merged_optimizer_state",
    "CometBertConfig",
    "CometBertForCausalLM",
    "CometBertForMultipleChoice",
    "CometBertForNextSentencePrediction",
    "CometBertForPreTraining",
    "CometBertForQuestionAnswering",
    "CometGPT2DoubleHeadsModel",
    "CometGPT2ForQuestionAnswering",
    "CometGPT2ForTokenClassification",
    "CometViTForMaskedImageModeling",
    "CometBertForMaskedLM",
    "CometBertForSequenceClassification",
    "CometBertForTokenClassification",
    "CometBertModel",
    "CometGPT2Config",
    "CometGPT2ForCausalLM",
    "CometGPT2ForSequenceClassification",
    "CometGPT2Model",
    "CometMoEBlock",
    "CometRouter",
    "CometViTConfig",
    "CometViTForImageClassification",
    "CometViTModel",
    "RoutingDecision",
    "TopKRouter",
    "__version__",
]
