"""The part of hf_comet that travels with saved checkpoints: a flat folder of sibling modules (see design.md)."""

from .configuration_comet import CometBertConfig, CometGPT2Config, CometMoEConfigMixin, CometViTConfig
from .family_adapter import DenseFFN, FamilyAdapter, FFNKey
from .modeling_comet_bert import (
    FAMILY as BERT_FAMILY,
)
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
    FAMILY as GPT2_FAMILY,
)
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
    FAMILY as VIT_FAMILY,
)
from .modeling_comet_vit import (
    CometViTForImageClassification,
    CometViTForMaskedImageModeling,
    CometViTModel,
    CometViTPreTrainedModel,
)
from .moe_block import CometMoEBlock, MoEBlock, RoutingCollector, collect_routing
from .moe_experts import CometExperts, PackedExperts, run_experts
from .moe_routers import (
    LEARNED_ROUTINGS,
    MIXTURE_ROUTINGS,
    ROUTER_CLASSES,
    ROUTINGS,
    AttentiveRouter,
    CometRouter,
    DeepMoEGate,
    DeepRouter,
    NoisyTopKRouter,
    Router,
    RoutingDecision,
    SwitchRouter,
    TopKRouter,
    register_router,
)

FAMILY_ADAPTERS: dict[str, FamilyAdapter] = {
    family.model_type: family for family in (GPT2_FAMILY, VIT_FAMILY, BERT_FAMILY)
}
"""model type -> the family's facts (`FamilyAdapter`: FFN layout, stock classes, LoRA targets, display name). The one
list of families: a new family is one more entry here."""

FAMILIES = {model_type: (family.config_class, family.auto_classes) for model_type, family in FAMILY_ADAPTERS.items()}
"""model type -> (config class, {Auto class name: model class}), derived from `FAMILY_ADAPTERS` (what ``import
hf_comet`` registers with the Auto classes)."""

__all__ = [
    "LEARNED_ROUTINGS",
    "MIXTURE_ROUTINGS",
    "AttentiveRouter",
    "DeepMoEGate",
    "DeepRouter",
    "MoEBlock",
    "PackedExperts",
    "register_router",
    "run_experts",
    "NoisyTopKRouter",
    "SwitchRouter",
    "FAMILIES",
    "FAMILY_ADAPTERS",
    "DenseFFN",
    "FFNKey",
    "FamilyAdapter",
    "ROUTER_CLASSES",
    "ROUTINGS",
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
    "CometBertPreTrainedModel",
    "CometExperts",
    "CometGPT2Config",
    "CometGPT2ForCausalLM",
    "CometGPT2ForSequenceClassification",
    "CometGPT2Model",
    "CometGPT2PreTrainedModel",
    "CometMoEBlock",
    "CometMoEConfigMixin",
    "CometPreTrainedMixin",
    "CometRouter",
    "CometViTConfig",
    "CometViTForImageClassification",
    "CometViTModel",
    "CometViTPreTrainedModel",
    "Router",
    "RoutingCollector",
    "RoutingDecision",
    "TopKRouter",
    "collect_routing",
]
