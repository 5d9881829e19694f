"""BERT with mixture-of-experts FFNs (model type ``comet_bert``).

Only the FFN differs from upstream. BERT splits its FFN over two modules; for every block in
``config.moe_layers``, ``layer.intermediate`` becomes a `MoEBlock` (both projections) and ``layer.output``
becomes `CometBertOutput`, which keeps upstream's dropout and post-LN ``LayerNorm(h + input)`` under the same
names and drops the dense projection. Embeddings, attention, pooler and heads are upstream modules; each head is
built by upstream's own constructor around a `CometBertModel` (`upstream_init`), and forward passes are upstream's,
wrapped to add routing outputs and the aux loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    MultipleChoiceModelOutput,
    NextSentencePredictorOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.models.bert.modeling_bert import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForPreTrainingOutput,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
    BertPreTrainedModel,
)

from .configuration_comet import CometBertConfig
from .family_adapter import FamilyAdapter
from .modeling_comet_common import CometPreTrainedMixin, MoEOutputFields, register_family, routed_forward, upstream_init
from .moe_block import MoEBlock


@dataclass
class CometBertModelOutput(MoEOutputFields, MoeModelOutputWithPast, BaseModelOutputWithPoolingAndCrossAttentions):
    """`BaseModelOutputWithPoolingAndCrossAttentions` that is a transformers `MoeModelOutputWithPast`, plus the
    routing fields (`MoEOutputFields`)."""


@dataclass
class CometBertMaskedLMOutput(MoEOutputFields, MaskedLMOutput):
    """`MaskedLMOutput` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometBertSequenceClassifierOutput(MoEOutputFields, SequenceClassifierOutput):
    """`SequenceClassifierOutput` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometBertTokenClassifierOutput(MoEOutputFields, TokenClassifierOutput):
    """`TokenClassifierOutput` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometBertForPreTrainingOutput(MoEOutputFields, BertForPreTrainingOutput):
    """`BertForPreTrainingOutput` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometBertCausalLMOutput(MoEOutputFields, MoeCausalLMOutputWithPast, CausalLMOutputWithCrossAttentions):
    """`CausalLMOutputWithCrossAttentions` that is a transformers `MoeCausalLMOutputWithPast`, plus the routing
    fields."""


@dataclass
class CometBertNextSentencePredictorOutput(MoEOutputFields, NextSentencePredictorOutput):
    """`NextSentencePredictorOutput` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometBertMultipleChoiceOutput(MoEOutputFields, MultipleChoiceModelOutput):
    """`MultipleChoiceModelOutput` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometBertQuestionAnsweringOutput(MoEOutputFields, QuestionAnsweringModelOutput):
    """`QuestionAnsweringModelOutput` plus the routing fields (`MoEOutputFields`)."""


class CometBertOutput(nn.Module):
    """The part of `BertOutput` after the FFN: ``LayerNorm(dropout(ffn_out) + input)``; same parameter names."""

    def __init__(self, config: CometBertConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


class CometBertPreTrainedModel(CometPreTrainedMixin, BertPreTrainedModel):
    config_class = CometBertConfig
    config: CometBertConfig


class CometBertModel(CometBertPreTrainedModel, BertModel):
    """`BertModel` whose FFNs in ``config.moe_layers`` are MoE blocks."""

    def __init__(self, config: CometBertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        for layer_idx, layer in enumerate(self.encoder.layer):
            if config.is_moe_layer(layer_idx):
                layer.intermediate = MoEBlock(config, layer_idx, config.hidden_size, config.hidden_act)
                layer.output = CometBertOutput(config)
        self.post_init()

    forward = routed_forward(BertModel.forward, CometBertModelOutput)


class CometBertForMaskedLM(CometBertPreTrainedModel, BertForMaskedLM):
    """`BertForMaskedLM` on a `CometBertModel`.

    ``accepts_loss_kwargs = False`` (as for every BERT head): the upstream loss is a per-batch mean, so Trainer
    must divide it by the gradient-accumulation steps itself.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: CometBertConfig):
        upstream_init(self, BertForMaskedLM, config, BertModel=CometBertModel)

    forward = routed_forward(BertForMaskedLM.forward, CometBertMaskedLMOutput)


class CometBertForSequenceClassification(CometBertPreTrainedModel, BertForSequenceClassification):
    """`BertForSequenceClassification` on a `CometBertModel`."""

    accepts_loss_kwargs = False

    def __init__(self, config: CometBertConfig):
        upstream_init(self, BertForSequenceClassification, config, BertModel=CometBertModel)

    forward = routed_forward(BertForSequenceClassification.forward, CometBertSequenceClassifierOutput)


class CometBertForTokenClassification(CometBertPreTrainedModel, BertForTokenClassification):
    """`BertForTokenClassification` on a `CometBertModel`."""

    accepts_loss_kwargs = False

    def __init__(self, config: CometBertConfig):
        upstream_init(self, BertForTokenClassification, config, BertModel=CometBertModel)

    forward = routed_forward(BertForTokenClassification.forward, CometBertTokenClassifierOutput)


class CometBertForPreTraining(CometBertPreTrainedModel, BertForPreTraining):
    """`BertForPreTraining` (masked LM + next-sentence prediction; ``loss`` is their sum) on a `CometBertModel`."""

    accepts_loss_kwargs = False

    def __init__(self, config: CometBertConfig):
        upstream_init(self, BertForPreTraining, config, BertModel=CometBertModel)

    forward = routed_forward(BertForPreTraining.forward, CometBertForPreTrainingOutput)


class CometBertForCausalLM(CometBertPreTrainedModel, BertLMHeadModel):
    """`BertLMHeadModel` (BERT as a causal LM: set ``is_decoder=True``) on a `CometBertModel`; its loss honours
    ``num_items_in_batch`` like GPT-2's, so the aux loss is weighted by the micro-batch's share of the tokens."""

    def __init__(self, config: CometBertConfig):
        upstream_init(self, BertLMHeadModel, config, BertModel=CometBertModel)

    forward = routed_forward(BertLMHeadModel.forward, CometBertCausalLMOutput)


class CometBertForNextSentencePrediction(CometBertPreTrainedModel, BertForNextSentencePrediction):
    """`BertForNextSentencePrediction` on a `CometBertModel`."""

    accepts_loss_kwargs = False

    def __init__(self, config: CometBertConfig):
        upstream_init(self, BertForNextSentencePrediction, config, BertModel=CometBertModel)

    forward = routed_forward(BertForNextSentencePrediction.forward, CometBertNextSentencePredictorOutput)


class CometBertForMultipleChoice(CometBertPreTrainedModel, BertForMultipleChoice):
    """`BertForMultipleChoice` on a `CometBertModel`: the encoder runs on (batch × choices, seq), and routing
    statistics and aux losses leave out the padding of every choice."""

    accepts_loss_kwargs = False

    def __init__(self, config: CometBertConfig):
        upstream_init(self, BertForMultipleChoice, config, BertModel=CometBertModel)

    forward = routed_forward(BertForMultipleChoice.forward, CometBertMultipleChoiceOutput)


class CometBertForQuestionAnswering(CometBertPreTrainedModel, BertForQuestionAnswering):
    """`BertForQuestionAnswering` (extractive: start/end logits) on a `CometBertModel`."""

    accepts_loss_kwargs = False

    def __init__(self, config: CometBertConfig):
        upstream_init(self, BertForQuestionAnswering, config, BertModel=CometBertModel)

    forward = routed_forward(BertForQuestionAnswering.forward, CometBertQuestionAnsweringOutput)


AUTO_CLASSES = {
    "AutoModel": CometBertModel,
    "AutoModelForPreTraining": CometBertForPreTraining,
    "AutoModelForMaskedLM": CometBertForMaskedLM,
    "AutoModelForCausalLM": CometBertForCausalLM,
    "AutoModelForNextSentencePrediction": CometBertForNextSentencePrediction,
    "AutoModelForMultipleChoice": CometBertForMultipleChoice,
    "AutoModelForQuestionAnswering": CometBertForQuestionAnswering,
    "AutoModelForSequenceClassification": CometBertForSequenceClassification,
    "AutoModelForTokenClassification": CometBertForTokenClassification,
    "AutoModelForTextEncoding": CometBertModel,  # as upstream: BERT as the text encoder of a multimodal model
}
register_family(CometBertPreTrainedModel, AUTO_CLASSES)

# -- family facts: what conversion, LoRA and model cards know about BERT (family_adapter.py) -------------------------


FAMILY = FamilyAdapter(
    model_type="comet_bert",
    display_name="BERT",
    config_class=CometBertConfig,
    stock_config_class=BertConfig,
    auto_classes=AUTO_CLASSES,
    # anchored on `.layer.N.output.dense`: `attention.output.dense` must never match (notes §3.3)
    ffn_key_pattern=r"((?:.*\.)?layer\.(\d+))\.(intermediate|output)\.dense\.(weight|bias)",
    moe_module="intermediate",  # the MoE block holds both projections; `output` keeps dropout + residual + LayerNorm
    ffn_projections={"intermediate": "up", "output": "down"},
    # the attention output is `attention.output.dense`; the FFN's `output.dense` of dense blocks must not match
    attention_modules=("query", "key", "value", "attention.output.dense"),
)
CometBertPreTrainedModel.family = FAMILY

__all__ = [
    "CometBertForCausalLM",
    "CometBertForMaskedLM",
    "CometBertForMultipleChoice",
    "CometBertForNextSentencePrediction",
    "CometBertForPreTraining",
    "CometBertForQuestionAnswering",
    "CometBertForSequenceClassification",
    "CometBertForTokenClassification",
    "CometBertModel",
    "CometBertOutput",
    "CometBertPreTrainedModel",
]
