"""``comet``: the FFN is kept as it is and the frozen random projection is added (Shaier et al. 2025).

COMET routes the FFN's own units, so the dense FFN becomes one group of units; block-COMET
(``comet_block_size > 1``) cuts it into consecutive blocks, each an expert. Exact for ``comet_keep_rate=1.0``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..modeling.family_adapter import DenseFFN
from .method import ConversionMethod, copy_experts, slice_experts


class CometConversion(ConversionMethod):
    name = "comet"
    default_routing = "comet"
    routings = ("comet",)
    routing_rule = "uses routing='comet'"

    def slices(self, num_experts: int) -> bool:
        return num_experts > 1  # block-COMET: blocks of units

    def map_ffn(self, ffn: DenseFFN, num_experts: int, *, seed: int, split_method: str) -> dict[str, torch.Tensor]:
        if not self.slices(num_experts):
            return copy_experts(ffn, num_experts)
        return slice_experts(ffn, torch.arange(ffn.width), num_experts)  # block-COMET blocks are consecutive units

    sweep_label = "comet_keep_rate"

    def default_sweep(self, num_experts: int) -> list[float | int]:
        return [0.25, 0.5, 0.75, 1.0]

    def sweep_problem(self, value: float, num_experts: int | None = None) -> str | None:
        return None if 0 < value <= 1 else "a COMET keep rate is in (0, 1]"

    def sweep_fields(self, fields: dict[str, Any], value: float | int) -> dict[str, Any]:
        return {**fields, "comet_keep_rate": value}


COMET = CometConversion()

__all__ = ["COMET", "CometConversion"]
