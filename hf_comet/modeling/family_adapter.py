"""What the code around a model family needs to know about it (GPT-2, ViT, BERT), in one place per family.

Each family file ends with ``FAMILY = FamilyAdapter(...)`` and sets it on its ``PreTrainedModel`` class as
``family``, so ``model.family`` answers for every model of the family, one loaded with remote code included: this
file travels with checkpoints (torch and transformers imports only). An adapter knows where the FFN sits in the
family's state dict, how its weights are laid out, which upstream classes ours extend, which attention modules LoRA
adapts and how the family is named; it knows nothing about routing. Conversion (``hf_comet.convert``), LoRA
(``hf_comet.lora``) and model cards read these facts instead of keeping their own tables per family.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import PretrainedConfig, PreTrainedModel


class FFNKey(NamedTuple):
    """Where a dense state-dict key sits in its family's FFN."""

    block: str
    """Path of the module the MoE block replaces in our model (e.g. ``transformer.h.1.mlp``)."""
    layer: int
    role: str
    """``"up"`` (first projection, d -> F) or ``"down"`` (second projection, F -> d)."""
    kind: str
    """``"weight"`` or ``"bias"``."""


@dataclass(frozen=True)
class DenseFFN:
    """One block's dense FFN in ``nn.Linear`` layout: up ``(F, d)`` and ``(F,)``, down ``(d, F)`` and ``(d,)``."""

    layer: int
    up_weight: torch.Tensor
    up_bias: torch.Tensor
    down_weight: torch.Tensor
    down_bias: torch.Tensor

    @property
    def width(self) -> int:
        """F, the number of units (intermediate neurons)."""
        return self.up_weight.shape[0]


def upstream_class(model_class: type) -> type:
    """The stock transformers model class that ``model_class`` extends (its one direct base from transformers)."""
    bases = [
        base
        for base in model_class.__bases__
        if base.__module__.startswith("transformers.") and issubclass(base, PreTrainedModel)
    ]
    if len(bases) != 1:
        raise TypeError(
            f"{model_class.__name__} must extend exactly one stock transformers model class (found "
            f"{[base.__name__ for base in bases]}): conversion maps that class's checkpoints onto it."
        )
    return bases[0]


@dataclass(frozen=True, eq=False)
class FamilyAdapter:
    """The facts of one model family. Nothing here is about routing.

    Args:
        model_type: our model type (``"comet_gpt2"``).
        display_name: the family's name in prose (``"GPT-2"``), e.g. in model cards.
        config_class: our config class (its dataclass defaults are the MoE defaults conversion uses).
        stock_config_class: the upstream config class (``GPT2Config``); its ``model_type`` is the upstream one.
        auto_classes: Auto class name -> our model class. Each of our classes extends one stock class (e.g.
            ``CometGPT2ForCausalLM`` extends ``GPT2LMHeadModel``): `stock_heads` is derived from those bases.
            ``import hf_comet`` registers them without importing them, from the light table
            ``hf_comet.auto_registration.AUTO_CLASSES`` (module and class names), which must list the same classes (tested).
        other_classes: our heads whose stock class has no Auto class (GPT-2's ``GPT2DoubleHeadsModel``): loaded by
            class, converted and saved like the others; in `stock_heads` their key is our class name.
        ffn_key_pattern: regex over a dense state-dict key, fully matched, with four groups: the prefix of the block
            (``transformer.h.1``), the layer index, the projection module (a key of ``ffn_projections``) and
            ``weight`` or ``bias``. It must match the FFN's two projections and nothing else (never attention).
        moe_module: name of the block's module that our model replaces by the MoE block (``"mlp"``; BERT's
            ``"intermediate"``, whose sibling ``output`` keeps only dropout, residual and LayerNorm).
        ffn_projections: projection module -> ``"up"`` (d -> F) or ``"down"`` (F -> d).
        conv1d_ffn: the dense FFN is ``Conv1D`` (GPT-2), which stores weights as (in, out); packed experts use
            ``nn.Linear``'s (out, in), so conversion transposes them.
        ffn_width_field: the config field holding the FFN width F.
        ffn_width_fallback: F when that field is ``None`` (GPT-2: ``n_inner=None`` means ``4 * n_embd``).
        attention_modules: ``target_modules`` of LoRA on the attention projections (query/key/value/output).
        attention_fan_in_fan_out: the attention projections are ``Conv1D``, so PEFT needs ``fan_in_fan_out=True``
            for them (GPT-2), which it refuses for packed experts in the same config.
        batches_need_pad_token: sequence classification pools the last non-pad token, so a batch of more than one
            sequence needs ``pad_token_id`` (GPT-2).
    """

    model_type: str
    display_name: str
    config_class: type
    stock_config_class: type
    auto_classes: Mapping[str, type]
    ffn_key_pattern: str
    moe_module: str
    ffn_projections: Mapping[str, str]
    other_classes: tuple[type, ...] = ()
    conv1d_ffn: bool = False
    ffn_width_field: str = "intermediate_size"
    ffn_width_fallback: Callable[[Any], int] | None = None
    attention_modules: tuple[str, ...] = ()
    attention_fan_in_fan_out: bool = False
    batches_need_pad_token: bool = False

    def __post_init__(self):
        if sorted(self.ffn_projections.values()) != ["down", "up"]:
            raise ValueError(f"{self.model_type}: ffn_projections must name one 'up' and one 'down' projection.")
        if re.compile(self.ffn_key_pattern).groups != 4:
            raise ValueError(f"{self.model_type}: ffn_key_pattern needs 4 groups (prefix, layer, module, kind).")
        for model_class in self.model_classes.values():
            upstream_class(model_class)  # each of our classes names its stock base (TypeError otherwise)

    # -- classes -------------------------------------------------------------------------------------------------
    @property
    def upstream_model_type(self) -> str:
        """The stock family's model type (``"gpt2"``)."""
        return self.stock_config_class.model_type

    @property
    def model_classes(self) -> dict[str, type]:
        """Class name -> each of our model classes of this family (Auto-registered and `other_classes`)."""
        classes = {cls.__name__: cls for cls in self.auto_classes.values()}
        return classes | {cls.__name__: cls for cls in self.other_classes}

    @property
    def heads(self) -> dict[str, type]:
        """Head key -> our class: the Auto class name for registered heads (the first one where a class has two,
        e.g. GPT-2's LM head is also ``AutoModelForPreTraining``), our class name for `other_classes`."""
        heads: dict[str, type] = {}
        for auto_name, cls in self.auto_classes.items():
            if cls not in heads.values():
                heads[auto_name] = cls
        return heads | {cls.__name__: cls for cls in self.other_classes}

    @property
    def stock_heads(self) -> dict[str, str]:
        """Stock class name -> the head key (see `heads`) of our class that extends it (``GPT2LMHeadModel`` ->
        ``AutoModelForCausalLM``): every head conversion accepts."""
        return {upstream_class(cls).__name__: head for head, cls in self.heads.items()}

    def head_class(self, head: str) -> type:
        """Our class for a head key of `heads` (``CometGPT2ForCausalLM`` for ``AutoModelForCausalLM``)."""
        return self.heads[head]

    def stock_class(self, head: str) -> type:
        """The stock class our head ``head`` extends (``GPT2LMHeadModel`` for ``AutoModelForCausalLM``)."""
        return upstream_class(self.head_class(head))

    @property
    def main_input_name(self) -> str:
        """``input_ids`` or ``pixel_values``."""
        return self.auto_classes["AutoModel"].main_input_name

    # -- the FFN -------------------------------------------------------------------------------------------------
    def ffn_width(self, config: PretrainedConfig) -> int:
        """F, the dense FFN's width, read from a config of this family (stock or ours)."""
        width = getattr(config, self.ffn_width_field)
        return width if width is not None else self.ffn_width_fallback(config)

    def ffn_key(self, key: str) -> FFNKey | None:
        """Where ``key`` of a dense state dict sits in an FFN, or ``None`` for every other weight."""
        match = re.fullmatch(self.ffn_key_pattern, key)
        if match is None:
            return None
        prefix, layer, module, kind = match.groups()
        return FFNKey(f"{prefix}.{self.moe_module}", int(layer), self.ffn_projections[module], kind)

    def linear_layout(self, value: torch.Tensor, kind: str) -> torch.Tensor:
        """A dense FFN weight in ``nn.Linear``'s (out, in) layout (a view; biases unchanged)."""
        return value.t() if self.conv1d_ffn and kind == "weight" else value

    def separate_ffns(
        self, dense_state: Mapping[str, torch.Tensor], is_moe_layer: Callable[[int], bool]
    ) -> tuple[dict[str, torch.Tensor], dict[str, DenseFFN]]:
        """Split a dense state dict into the weights that stay as they are (every FFN of a block where
        ``is_moe_layer(layer)`` is false included) and the dense FFN of every other block, in ``nn.Linear`` layout,
        keyed by the path of the module the MoE block replaces. Both keep the state dict's order."""
        kept: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[str, Any]] = {}
        for key, value in dense_state.items():
            where = self.ffn_key(key)
            if where is None or not is_moe_layer(where.layer):
                kept[key] = value
                continue
            parts.setdefault(where.block, {"layer": where.layer})[f"{where.role}_{where.kind}"] = self.linear_layout(
                value, where.kind
            )
        return kept, {block: DenseFFN(**weights) for block, weights in parts.items()}


__all__ = ["DenseFFN", "FFNKey", "FamilyAdapter", "upstream_class"]
