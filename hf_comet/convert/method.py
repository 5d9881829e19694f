"""What every conversion method is: a `ConversionMethod` that knows its routings, its config defaults and how it maps
one block's dense FFN into packed experts (copies of the whole FFN, or disjoint slices of its units)."""

from __future__ import annotations

from typing import Any

import torch

from ..io import UserError
from ..modeling.configuration_comet import LEARNED_ROUTINGS, ROUTER_CLASSES
from ..modeling.family_adapter import DenseFFN


class ConversionError(UserError):
    """The source or the options cannot be converted; raised before anything is built or written (a
    `~hf_comet.io.UserError`, so a ``ValueError``)."""


def hash_block(name: str) -> int:
    """A stable per-block offset for seeds (Python's ``hash`` of a string changes between processes)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 1_000_003


def config_default(config_class: type, field: str) -> Any:
    """The default of ``field`` as ``config_class`` declares it (configs are dataclasses)."""
    return config_class.__dataclass_fields__[field].default


def copy_experts(ffn: DenseFFN, num_experts: int) -> dict[str, torch.Tensor]:
    """``num_experts`` copies of the whole FFN: ``up_proj`` (E, F, d), ``up_proj_bias`` (E, F), ``down_proj`` (E, d, F)."""
    return {
        "up_proj": ffn.up_weight.expand(num_experts, *ffn.up_weight.shape).clone(),
        "up_proj_bias": ffn.up_bias.expand(num_experts, *ffn.up_bias.shape).clone(),
        "down_proj": ffn.down_weight.expand(num_experts, *ffn.down_weight.shape).clone(),
    }


def slice_experts(ffn: DenseFFN, order: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """``num_experts`` disjoint slices of the FFN's units: expert e holds units ``order[e * F/E : (e + 1) * F/E]``
    (``up_proj`` (E, F/E, d), ``up_proj_bias`` (E, F/E), ``down_proj`` (E, d, F/E))."""
    width = ffn.width // num_experts
    down = ffn.down_weight
    return {
        "up_proj": ffn.up_weight[order].reshape(num_experts, width, -1).clone(),
        "up_proj_bias": ffn.up_bias[order].reshape(num_experts, width).clone(),
        "down_proj": down[:, order].reshape(down.shape[0], num_experts, width).permute(1, 0, 2).clone(),
    }


class ConversionMethod:
    """One way of turning a dense FFN into experts (``comet``, ``upcycle``, ``split``).

    A method names the routings it accepts, fills the config fields it determines, says whether its experts are
    slices of the FFN or copies of it, and maps one block's dense FFN (in ``nn.Linear`` layout, from the family
    adapter) into packed expert weights. The second projection's bias is placed by the caller (once, or per expert).
    Defaults here are those of the learned-routing methods; `CometConversion` overrides them.
    """

    name: str
    default_routing: str = "topk"
    routings: tuple[str, ...] = LEARNED_ROUTINGS
    routing_rule: str = f"needs a learned routing ({', '.join(LEARNED_ROUTINGS)})"
    """How the accepted routings read in an error message."""
    expert_width: str | None = None
    """What the method sets ``moe_intermediate_size`` to, in words, if it sets it (the user then may not)."""
    takes_split_method: bool = False
    """Whether ``split_method`` (the unit partition) applies."""

    def resolve_routing(self, routing: str | None) -> str:
        routing = routing or self.default_routing
        if routing not in self.routings:
            raise ConversionError(f"method={self.name!r} {self.routing_rule}, not routing={routing!r}.")
        return routing

    def config_defaults(self, *, ffn_width: int, fields: dict[str, Any], routing: str, config_class: type) -> dict:
        """Config fields this method sets unless ``fields`` (the user's) sets them; may refuse the fields."""
        return {}

    def slices(self, num_experts: int) -> bool:
        """Whether the experts are disjoint slices of the FFN (width F / E) rather than copies (width F)."""
        raise NotImplementedError

    def map_ffn(self, ffn: DenseFFN, num_experts: int, *, seed: int, split_method: str) -> dict[str, torch.Tensor]:
        """``up_proj``, ``up_proj_bias`` and ``down_proj`` of the block's experts; ``seed`` is the block's own."""
        raise NotImplementedError

    def init_routers(self, moe: torch.nn.Module, mapped: dict[str, torch.Tensor]) -> None:
        """Set router weights from the mapped experts once they are loaded (routers keep their init by default)."""

    sweep_label: str = "experts per token"
    """What `deviation_report`'s sweep varies, in words (a report's column header)."""

    def default_sweep(self, num_experts: int) -> list[float | int]:
        """The sweep a report runs when none is given: 1, 2, half and all of the experts per token."""
        return sorted({1, 2, max(1, num_experts // 2), num_experts})

    def sweep_problem(self, value: float, num_experts: int | None = None) -> str | None:
        """Why ``value`` cannot be a sweep setting (``None`` when it can); ``num_experts`` once the model is known."""
        if value < 1 or value != int(value):
            return f"with method {self.name} the sweep is of experts per token, >= 1"
        if num_experts is not None and value > num_experts:
            return f"more experts per token than the {num_experts} experts"
        return None

    def sweep_fields(self, fields: dict[str, Any], value: float | int) -> dict[str, Any]:
        """``fields`` with one setting of `deviation_report`'s sweep: experts per token (``num_experts_per_tok``, or
        ``mixture_top_k`` for the mixtures ``attentive``/``deep``; a routing that reads neither, such as ``switch``,
        cannot be swept)."""
        fields = dict(fields)
        routing = self.resolve_routing(fields.get("routing"))
        reads = ROUTER_CLASSES[routing].config_fields
        if "num_experts_per_tok" in reads:
            fields["num_experts_per_tok"] = int(value)
        elif "mixture_top_k" in reads:
            fields.pop("num_experts_per_tok", None)
            fields["mixture_top_k"] = int(value)
        else:
            raise ConversionError(
                f"routing={routing!r} has no experts-per-token setting (it reads neither num_experts_per_tok nor "
                "mixture_top_k): there is nothing to sweep; leave out the report or pick another routing."
            )
        return fields


__all__ = ["ConversionError", "ConversionMethod", "config_default", "copy_experts", "hash_block", "slice_experts"]
