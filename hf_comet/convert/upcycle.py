"""``upcycle`` (Komatsuzaki et al. 2023): every expert is a copy of the dense FFN.

``moe_intermediate_size`` becomes the FFN width; the router keeps its small random normal init (std
``initializer_range``, seeded by ``seed``). Exact with renormalised top-k (``norm_topk_prob=True``,
``topk``/``noisy_topk``) and for the dense mixtures (``attentive``, ``deep``), whose weights sum to 1; not for
``switch`` (output × p < 1).
"""

from __future__ import annotations

from typing import Any

import torch

from ..modeling.family_adapter import DenseFFN
from .method import ConversionMethod, copy_experts


class UpcycleConversion(ConversionMethod):
    name = "upcycle"
    expert_width = "the FFN width"

    def config_defaults(self, *, ffn_width: int, fields: dict[str, Any], routing: str, config_class: type) -> dict:
        return {"moe_intermediate_size": ffn_width}

    def slices(self, num_experts: int) -> bool:
        return False

    def map_ffn(self, ffn: DenseFFN, num_experts: int, *, seed: int, split_method: str) -> dict[str, torch.Tensor]:
        return copy_experts(ffn, num_experts)


UPCYCLE = UpcycleConversion()

__all__ = ["UPCYCLE", "UpcycleConversion"]
