"""ViT with mixture-of-experts FFNs (model type ``comet_vit``).

Only the FFN differs from upstream: ``vit.layers[i].mlp`` becomes a `MoEBlock` for every block in
``config.moe_layers`` (``ViTLayer`` keeps its own dropout and residual); patch embeddings, attention and the
classifier are the upstream modules. Each head is built by upstream's own constructor around a `CometViTModel`
(`upstream_init`), and forward passes are upstream's, wrapped to add routing outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import ViTConfig
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
    MoeModelOutputWithPast,
)
from transformers.models.vit.modeling_vit import (
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
    ViTPreTrainedModel,
)

from .configuration_comet import CometViTConfig
from .family_adapter import FamilyAdapter
from .modeling_comet_common import CometPreTrainedMixin, MoEOutputFields, register_family, routed_forward, upstream_init
from .moe_block import MoEBlock


@dataclass
class CometViTModelOutput(MoEOutputFields, MoeModelOutputWithPast, BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` that is a transformers `MoeModelOutputWithPast` (its ``cache`` stays ``None``),
    plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometViTImageClassifierOutput(MoEOutputFields, ImageClassifierOutput):
    """`ImageClassifierOutput` plus the routing fields (`MoEOutputFields`)."""


@dataclass
class CometViTMaskedImageModelingOutput(MoEOutputFields, MaskedImageModelingOutput):
    """`MaskedImageModelingOutput` plus the routing fields (`MoEOutputFields`)."""


class CometViTPreTrainedModel(CometPreTrainedMixin, ViTPreTrainedModel):
    config_class = CometViTConfig
    config: CometViTConfig


class CometViTModel(CometViTPreTrainedModel, ViTModel):
    """`ViTModel` whose FFNs in ``config.moe_layers`` are MoE blocks."""

    def __init__(self, config: CometViTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
        for layer_idx, layer in enumerate(self.layers):
            if config.is_moe_layer(layer_idx):
                layer.mlp = MoEBlock(config, layer_idx, config.hidden_size, config.hidden_act)
        self.post_init()

    forward = routed_forward(ViTModel.forward, CometViTModelOutput)


class CometViTForImageClassification(CometViTPreTrainedModel, ViTForImageClassification):
    """`ViTForImageClassification` on a `CometViTModel`.

    ``accepts_loss_kwargs = False``: Trainer then averages every problem type (single-label, multi-label,
    regression) correctly under gradient accumulation by dividing the whole loss, aux loss included.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: CometViTConfig):
        upstream_init(self, ViTForImageClassification, config, ViTModel=CometViTModel)

    forward = routed_forward(ViTForImageClassification.forward, CometViTImageClassifierOutput)


class CometViTForMaskedImageModeling(CometViTPreTrainedModel, ViTForMaskedImageModeling):
    """`ViTForMaskedImageModeling` (SimMIM: reconstruct masked patches) on a `CometViTModel` with a mask token.

    Routing sees every patch, masked ones included (they are the mask token then), as the encoder does; the
    reconstruction loss is upstream's per-batch mean, so ``accepts_loss_kwargs = False``.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: CometViTConfig):
        upstream_init(self, ViTForMaskedImageModeling, config, ViTModel=CometViTModel)

    forward = routed_forward(ViTForMaskedImageModeling.forward, CometViTMaskedImageModelingOutput)


AUTO_CLASSES = {
    "AutoModel": CometViTModel,
    "AutoModelForImageClassification": CometViTForImageClassification,
    "AutoModelForMaskedImageModeling": CometViTForMaskedImageModeling,
}
register_family(CometViTPreTrainedModel, AUTO_CLASSES)

# -- family facts: what conversion, LoRA and model cards know about ViT (family_adapter.py) --------------------------


FAMILY = FamilyAdapter(
    model_type="comet_vit",
    display_name="ViT",
    config_class=CometViTConfig,
    stock_config_class=ViTConfig,
    auto_classes=AUTO_CLASSES,
    ffn_key_pattern=r"((?:.*\.)?layers\.(\d+))\.mlp\.(fc1|fc2)\.(weight|bias)",
    moe_module="mlp",
    ffn_projections={"fc1": "up", "fc2": "down"},
    attention_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
)
CometViTPreTrainedModel.family = FAMILY

__all__ = [
    "CometViTForImageClassification",
    "CometViTForMaskedImageModeling",
    "CometViTModel",
    "CometViTPreTrainedModel",
]
