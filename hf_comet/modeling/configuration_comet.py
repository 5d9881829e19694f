"""Configurations of the hf_comet MoE models: the upstream GPT-2 / ViT / BERT configs plus the MoE fields.

This file travels with every saved checkpoint (``trust_remote_code=True``), so it imports only the standard
library, ``transformers`` and sibling modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import BertConfig, GPT2Config, ViTConfig

ROUTINGS = ("comet", "topk")
"""Values accepted by ``config.routing``."""


def comet_num_active(keep_rate: float, num_units: int) -> int:
    """Units kept per token by COMET: ``k = max(1, floor(keep_rate * num_units))`` (Shaier et al., official code).

    A relative tolerance of 1e-9 guards the floor against binary rounding (``0.29 * 100 = 28.999...``).
    """
    return max(1, math.floor(keep_rate * num_units * (1 + 1e-9)))


@dataclass(kw_only=True)
class CometMoEConfigMixin:
    """MoE fields shared by the three families, and their validation.

    Args:
        routing: ``"comet"`` (fixed random projection picks ``comet_keep_rate`` of the FFN units per token; no
            trainable gate, no aux loss) or ``"topk"`` (Mixtral-style learned softmax top-k over ``num_experts``).
        num_experts: experts per MoE layer for learned routers.
        num_experts_per_tok: experts each token is sent to (top-k).
        norm_topk_prob: renormalise the kept top-k probabilities to sum to 1 (Mixtral); needed for exact upcycling.
        moe_intermediate_size: width of one expert. ``None`` splits the dense FFN width evenly over
            ``num_experts`` (same parameter count as the dense model); set it to the FFN width for full-size experts.
        comet_keep_rate: fraction of FFN units kept per token by COMET, in (0, 1].
        moe_layers: indices of the blocks whose FFN becomes an MoE block; ``None`` means every block.
        router_aux_loss_coef: weight of the load-balancing loss (learned routers only).
        router_z_loss_coef: weight of the ST-MoE router z-loss (learned routers only; 0 disables it).
        output_router_logits: return every MoE layer's router scores as ``router_logits``.
        routing_seed: seed of every random routing quantity (the COMET projections); recorded so a model built from
            this config gets the same routing everywhere.
    """

    routing: str = "comet"
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    moe_intermediate_size: int | None = None
    comet_keep_rate: float | int = 0.5
    moe_layers: list[int] | None = None
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.0
    output_router_logits: bool = False
    routing_seed: int = 0

    _ffn_width_field = "intermediate_size"  # config field that holds the FFN width, named in error messages

    # -- family hooks --------------------------------------------------------------------------------------------
    @property
    def ffn_width(self) -> int:
        """Width F of the dense FFN (its number of intermediate units)."""
        return self.intermediate_size

    # -- derived quantities --------------------------------------------------------------------------------------
    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` gets an MoE FFN."""
        return self.moe_layers is None or layer_idx in self.moe_layers

    @property
    def expert_intermediate_size(self) -> int:
        """Width of one learned-routing expert (``moe_intermediate_size`` or an even split of the FFN)."""
        if self.moe_intermediate_size is not None:
            return self.moe_intermediate_size
        return self.ffn_width // self.num_experts

    # -- validation ----------------------------------------------------------------------------------------------
    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_moe_config()

    def validate_moe_config(self) -> None:
        """Raise ``ValueError`` naming the first MoE field that is out of range, and what is allowed."""
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} is not supported; choose one of {', '.join(ROUTINGS)}.")
        if isinstance(self.comet_keep_rate, bool) or not 0.0 < self.comet_keep_rate <= 1.0:
            raise ValueError(
                f"comet_keep_rate={self.comet_keep_rate!r} must be in (0, 1] (the fraction of units kept)."
            )
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_experts={self.num_experts}."
            )
        n_layers = self.num_hidden_layers
        if self.moe_layers is not None:
            if len(self.moe_layers) == 0:
                raise ValueError("moe_layers=[] selects no block; pass None for every block or a list of indices.")
            bad = [i for i in self.moe_layers if not 0 <= i < n_layers]
            if bad:
                raise ValueError(
                    f"moe_layers={self.moe_layers} has {bad} outside [0, {n_layers - 1}] (num layers {n_layers})."
                )
            if len(set(self.moe_layers)) != len(self.moe_layers):
                raise ValueError(f"moe_layers={self.moe_layers} repeats a block index.")
        if self.moe_intermediate_size is not None and self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be >= 1 or None.")
        if self.routing == "topk" and self.moe_intermediate_size is None and self.ffn_width % self.num_experts:
            raise ValueError(
                f"the FFN width {self.ffn_width} ({self._ffn_width_field}) is not divisible by num_experts="
                f"{self.num_experts}; pick num_experts dividing it or set moe_intermediate_size explicitly."
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")


@strict
class CometGPT2Config(CometMoEConfigMixin, GPT2Config):
    """GPT-2 config with MoE feed-forward blocks (model type ``comet_gpt2``); see `CometMoEConfigMixin`."""

    model_type = "comet_gpt2"
    keys_to_ignore_at_inference = ["past_key_values", "router_logits", "aux_loss"]
    _ffn_width_field = "n_inner"

    @property
    def ffn_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@strict
class CometViTConfig(CometMoEConfigMixin, ViTConfig):
    """ViT config with MoE feed-forward blocks (model type ``comet_vit``); see `CometMoEConfigMixin`."""

    model_type = "comet_vit"
    keys_to_ignore_at_inference = ["router_logits", "aux_loss"]


@strict
class CometBertConfig(CometMoEConfigMixin, BertConfig):
    """BERT config with MoE feed-forward blocks (model type ``comet_bert``); see `CometMoEConfigMixin`."""

    model_type = "comet_bert"
    keys_to_ignore_at_inference = ["router_logits", "aux_loss"]

    def validate_moe_config(self) -> None:
        super().validate_moe_config()
        if self.chunk_size_feed_forward:
            raise ValueError(
                f"chunk_size_feed_forward={self.chunk_size_feed_forward} is not supported by comet_bert (routing "
                "statistics need whole sequences); use 0."
            )


CometGPT2Config.register_for_auto_class()
CometViTConfig.register_for_auto_class()
CometBertConfig.register_for_auto_class()

__all__ = [
    "ROUTINGS",
    "CometBertConfig",
    "CometGPT2Config",
    "CometMoEConfigMixin",
    "CometViTConfig",
    "comet_num_active",
]
