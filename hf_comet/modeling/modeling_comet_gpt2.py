"""GPT-2 with mixture-of-experts FFNs (model type ``comet_gpt2``).

Only the FFN differs from upstream: ``transformer.h[i].mlp`` becomes a `MoEBlock` (router × experts, plus
GPT-2's output dropout) for every block in ``config.moe_layers``; attention, embeddings and heads are the upstream
modules. Each head is built by upstream's own constructor around a `CometGPT2Model` (`upstream_init`), and its
forward pass is upstream's, wrapped to add routing outputs and the aux loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import GenerationMixin, GPT2Config
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2DoubleHeadsModel,
    GPT2DoubleHeadsModelOutput,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
)

from .configuration_comet import CometGPT2Config
from .family_adapter import FamilyAdapter
from .modeling_comet_common import CometPreTrainedMixin, MoEOutputFields, register_family, routed_forward, upstream_init
from .moe_block import MoEBlock


@dataclass
class CometGPT2ModelOutput(MoEOutputFields, MoeModelOutputWithPast, BaseModelOutputWithPastAndCrossAttentions):
    """`BaseModelOutputWithPastAndCrossAttentions` that is a transformers `MoeModelOutputWithPast`, plus the routing
    fields (`MoEOutputFields`)."""


@dataclass
class CometGPT2CausalLMOutput(MoEOutputFields, MoeCausalLMOutputWithPast, CausalLMOutputWithCrossAttentions):
    """`CausalLMOutputWithCrossAttentions` that is a transformers `MoeCausalLMOutputWithPast` (field order kept:
    ``(loss, logits, ...)`` as tuples), plus the routing fields."""


@dataclass
class CometGPT2SequenceClassifierOutput(MoEOutputFields, SequenceClassifierOutputWithPast):
    """`SequenceClassifierOutputWithPast` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometGPT2TokenClassifierOutput(MoEOutputFields, TokenClassifierOutput):
    """`TokenClassifierOutput` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometGPT2QuestionAnsweringOutput(MoEOutputFields, QuestionAnsweringModelOutput):
    """`QuestionAnsweringModelOutput` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometGPT2DoubleHeadsModelOutput(MoEOutputFields, GPT2DoubleHeadsModelOutput):
    """`GPT2DoubleHeadsModelOutput` plus the routing fields (`MoEOutputFields`)."""


class CometGPT2PreTrainedModel(CometPreTrainedMixin, GPT2PreTrainedModel):
    config_class = CometGPT2Config
    config: CometGPT2Config

    @property
    def _down_proj_std_factor(self) -> float:
        return 1.0 / math.sqrt(2 * self.config.n_layer)  # GPT-2's scaled init of residual output projections


class CometGPT2Model(CometGPT2PreTrainedModel, GPT2Model):
    """`GPT2Model` whose FFNs in ``config.moe_layers`` are MoE blocks."""

    def __init__(self, config: CometGPT2Config):
        super().__init__(config)
        for layer_idx, block in enumerate(self.h):
            if config.is_moe_layer(layer_idx):
                block.mlp = MoEBlock(
                    config, layer_idx, config.n_embd, config.activation_function, dropout=config.resid_pdrop
                )
        self.post_init()

    forward = routed_forward(GPT2Model.forward, CometGPT2ModelOutput)


class CometGPT2ForCausalLM(CometGPT2PreTrainedModel, GPT2LMHeadModel, GenerationMixin):
    """`GPT2LMHeadModel` on a `CometGPT2Model`; ``loss`` includes the router aux loss in training mode."""

    _tp_plan = {"lm_head": "colwise_gather_output"}  # tied to the vocabulary-sharded `wte` (the config's plan)

    def __init__(self, config: CometGPT2Config):
        upstream_init(self, GPT2LMHeadModel, config, GPT2Model=CometGPT2Model)

    forward = routed_forward(GPT2LMHeadModel.forward, CometGPT2CausalLMOutput)

    def generate(self, *args, routing_statistics: bool = False, **kwargs):
        """`GenerationMixin.generate`, by default with the routing-statistics windows paused: decoding runs one token
        per forward, where folding every decision into the windows cost ~6 % of a GPT-2 small token (docs/decisions.md,
        "Decoding"); the windows keep what training and evaluation forwards put there. ``routing_statistics=True``
        counts the decoding forwards too."""
        blocks = [] if routing_statistics else self.moe_blocks()
        saved = [block.track_statistics for block in blocks]
        for block in blocks:
            block.track_statistics = False
        try:
            return super().generate(*args, **kwargs)
        finally:
            for block, value in zip(blocks, saved, strict=True):
                block.track_statistics = value


class CometGPT2ForSequenceClassification(CometGPT2PreTrainedModel, GPT2ForSequenceClassification):
    """`GPT2ForSequenceClassification` on a `CometGPT2Model`.

    ``accepts_loss_kwargs = False``: the upstream loss is a per-batch mean that ignores ``num_items_in_batch``, so
    Trainer must divide it (and the aux loss in it) by the gradient-accumulation steps itself.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: CometGPT2Config):
        upstream_init(self, GPT2ForSequenceClassification, config, GPT2Model=CometGPT2Model)

    forward = routed_forward(GPT2ForSequenceClassification.forward, CometGPT2SequenceClassifierOutput)


class CometGPT2ForTokenClassification(CometGPT2PreTrainedModel, GPT2ForTokenClassification):
    """`GPT2ForTokenClassification` on a `CometGPT2Model` (per-batch mean loss, so ``accepts_loss_kwargs = False``)."""

    accepts_loss_kwargs = False

    def __init__(self, config: CometGPT2Config):
        upstream_init(self, GPT2ForTokenClassification, config, GPT2Model=CometGPT2Model)

    forward = routed_forward(GPT2ForTokenClassification.forward, CometGPT2TokenClassifierOutput)


class CometGPT2ForQuestionAnswering(CometGPT2PreTrainedModel, GPT2ForQuestionAnswering):
    """`GPT2ForQuestionAnswering` (extractive: start/end logits) on a `CometGPT2Model`."""

    accepts_loss_kwargs = False

    def __init__(self, config: CometGPT2Config):
        upstream_init(self, GPT2ForQuestionAnswering, config, GPT2Model=CometGPT2Model)

    forward = routed_forward(GPT2ForQuestionAnswering.forward, CometGPT2QuestionAnsweringOutput)


class CometGPT2DoubleHeadsModel(CometGPT2PreTrainedModel, GPT2DoubleHeadsModel):
    """`GPT2DoubleHeadsModel` (language modelling + multiple choice) on a `CometGPT2Model`.

    Transformers registers this head with no Auto class, and neither do we: load it by class
    (``CometGPT2DoubleHeadsModel.from_pretrained``). Its two losses are returned apart, as upstream; in training the
    aux loss joins ``loss`` (the LM loss) when there is one, else ``mc_loss``, so ``loss + mc_loss`` counts it once.
    """

    accepts_loss_kwargs = False
    aux_loss_fields = ("loss", "mc_loss")
    _tp_plan = {"lm_head": "colwise_gather_output"}  # tied to the vocabulary-sharded `wte` (the config's plan)

    def __init__(self, config: CometGPT2Config):
        upstream_init(self, GPT2DoubleHeadsModel, config, GPT2Model=CometGPT2Model)

    forward = routed_forward(GPT2DoubleHeadsModel.forward, CometGPT2DoubleHeadsModelOutput)


AUTO_CLASSES = {
    "AutoModel": CometGPT2Model,
    "AutoModelForCausalLM": CometGPT2ForCausalLM,
    "AutoModelForPreTraining": CometGPT2ForCausalLM,  # as upstream: GPT-2's pre-training head is the LM head
    "AutoModelForSequenceClassification": CometGPT2ForSequenceClassification,
    "AutoModelForTokenClassification": CometGPT2ForTokenClassification,
    "AutoModelForQuestionAnswering": CometGPT2ForQuestionAnswering,
}
OTHER_CLASSES = (CometGPT2DoubleHeadsModel,)
"""Heads upstream registers with no Auto class: loaded by class, converted and saved like the others."""
register_family(CometGPT2PreTrainedModel, AUTO_CLASSES)

# -- family facts: what conversion, LoRA and model cards know about GPT-2 (family_adapter.py) -----------------------


FAMILY = FamilyAdapter(
    model_type="comet_gpt2",
    display_name="GPT-2",
    config_class=CometGPT2Config,
    stock_config_class=GPT2Config,
    auto_classes=AUTO_CLASSES,
    other_classes=OTHER_CLASSES,
    ffn_key_pattern=r"((?:.*\.)?h\.(\d+))\.mlp\.(c_fc|c_proj)\.(weight|bias)",
    moe_module="mlp",
    ffn_projections={"c_fc": "up", "c_proj": "down"},
    conv1d_ffn=True,  # Conv1D stores (in, out)
    ffn_width_field="n_inner",
    ffn_width_fallback=lambda config: 4 * config.n_embd,
    attention_modules=("c_attn", "attn.c_proj"),
    attention_fan_in_fan_out=True,  # GPT-2's attention is Conv1D too
    batches_need_pad_token=True,  # sequence classification pools the last non-pad token
)
CometGPT2PreTrainedModel.family = FAMILY

__all__ = [
    "CometGPT2DoubleHeadsModel",
    "CometGPT2ForCausalLM",
    "CometGPT2ForQuestionAnswering",
    "CometGPT2ForSequenceClassification",
    "CometGPT2ForTokenClassification",
    "CometGPT2Model",
    "CometGPT2PreTrainedModel",
]
