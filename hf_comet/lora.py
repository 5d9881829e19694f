"""LoRA on hf_comet models with PEFT: sensible default targets per family and routing.

Packed experts are 3-D parameters, so PEFT adapts them through ``target_parameters`` (one rank-r pair per expert,
``lora.ParamWrapper``; it reads the experts' ``is_transposed`` layout flag), while attention projections are ordinary
``target_modules``. ParamWrapper refuses ``fan_in_fan_out``, ``lora_dropout > 0``, DoRA and ``lora_bias``; GPT-2's
attention is ``Conv1D``, which forces ``fan_in_fan_out=True`` on the whole config, so on GPT-2 attention and experts
cannot share one LoraConfig (transformers-v5-notes §5): adapt one of them, or add two adapters.
"""

from __future__ import annotations

from typing import Any

from .modeling import FAMILY_ADAPTERS

EXPERT_PARAMETERS = ["experts.up_proj", "experts.down_proj"]
PARTS = ("attention", "experts")


def lora_targets(model, parts: tuple[str, ...] | list[str] = ("attention", "experts")) -> dict[str, Any]:
    """``target_modules`` / ``target_parameters`` (and ``fan_in_fan_out``) for a LoraConfig on ``model``.

    ``parts`` chooses among ``"attention"`` (query/key/value/output projections) and ``"experts"`` (the packed
    expert weights of every MoE block, COMET's single unit group included). Routers are never adapted (COMET's is
    frozen by design; put a learned router in ``modules_to_save`` to train it fully). Raises ``ValueError`` for GPT-2
    with both parts, which PEFT cannot combine in one config.
    """
    family = getattr(model, "family", None)  # the family's facts (`FamilyAdapter`): attention targets, Conv1D
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"model_type={model_type!r} is not an hf_comet family; expected one of {', '.join(FAMILY_ADAPTERS)}."
        )
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts={parts} is not allowed; choose from {PARTS}.")
    if family.attention_fan_in_fan_out and set(parts) == set(PARTS):
        raise ValueError(
            f"{family.display_name}'s attention is Conv1D, which makes PEFT set fan_in_fan_out=True, and PEFT cannot "
            "adapt packed experts with fan_in_fan_out: use parts=('attention',) or parts=('experts',), or two adapters."
        )
    targets: dict[str, Any] = {"target_modules": [], "target_parameters": []}
    if "attention" in parts:
        targets["target_modules"] = list(family.attention_modules)
        if family.attention_fan_in_fan_out:
            targets["fan_in_fan_out"] = True
    if "experts" in parts:
        targets["target_parameters"] = list(EXPERT_PARAMETERS)
    return targets


def lora_config(model, parts: tuple[str, ...] | list[str] = ("attention", "experts"), r: int = 8, **kwargs):
    """A `peft.LoraConfig` with `lora_targets` (``lora_dropout=0``: ParamWrapper requires it for experts)."""
    from peft import LoraConfig

    targets = lora_targets(model, parts)
    settings = {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, **targets, **kwargs}
    return LoraConfig(**settings)


__all__ = ["lora_config", "lora_targets"]
