"""GPT-2 with mixture-of-experts FFNs (model type ``comet_gpt2``).

Only the FFN differs from upstream: ``transformer.h[i].mlp`` becomes a `CometMoEBlock` (router × experts, plus
GPT-2's output dropout) for every block in ``config.moe_layers``; attention, embeddings and heads are the upstream
modules, and the heads' forward passes are upstream's, wrapped to add routing outputs and the aux loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    SequenceClassifierOutputWithPast,
)
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
)

from .configuration_comet import CometGPT2Config
from .modeling_comet_common import CometPreTrainedMixin, MoEOutputFields, register_family, routed_forward
from .moe_block import MoEBlock


@dataclass
class CometGPT2ModelOutput(MoEOutputFields, BaseModelOutputWithPastAndCrossAttentions):
    """`BaseModelOutputWithPastAndCrossAttentions` plus ``aux_loss`` and ``router_logits``."""


@dataclass
class CometGPT2CausalLMOutput(MoEOutputFields, CausalLMOutputWithCrossAttentions):
    """`CausalLMOutputWithCrossAttentions` plus ``aux_loss`` and ``router_logits``."""


@dataclass
class CometGPT2SequenceClassifierOutput(MoEOutputFields, SequenceClassifierOutputWithPast):
    """`SequenceClassifierOutputWithPast` plus ``aux_loss`` and ``router_logits``."""


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

    def __init__(self, config: CometGPT2Config):
        GPT2PreTrainedModel.__init__(self, config)
        self.transformer = CometGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    forward = routed_forward(GPT2LMHeadModel.forward, CometGPT2CausalLMOutput)


class CometGPT2ForSequenceClassification(CometGPT2PreTrainedModel, GPT2ForSequenceClassification):
    """`GPT2ForSequenceClassification` on a `CometGPT2Model`.

    ``accepts_loss_kwargs = False``: the upstream loss is a per-batch mean that ignores ``num_items_in_batch``, so
    Trainer must divide it (and the aux loss in it) by the gradient-accumulation steps itself.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: CometGPT2Config):
        GPT2PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.transformer = CometGPT2Model(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()

    forward = routed_forward(GPT2ForSequenceClassification.forward, CometGPT2SequenceClassifierOutput)


AUTO_CLASSES = {
    "AutoModel": CometGPT2Model,
    "AutoModelForCausalLM": CometGPT2ForCausalLM,
    "AutoModelForSequenceClassification": CometGPT2ForSequenceClassification,
}
register_family(CometGPT2PreTrainedModel, AUTO_CLASSES)

__all__ = [
    "CometGPT2ForCausalLM",
    "CometGPT2ForSequenceClassification",
    "CometGPT2Model",
    "CometGPT2PreTrainedModel",
]
