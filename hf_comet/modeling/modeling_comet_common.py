"""What the three model families share: weight init of the MoE modules, output fields, the routed forward wrapper
and the complete ``auto_map`` written at save time. Travels with checkpoints (torch/transformers imports only).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .moe_block import MoEBlock, active_collector, collect_routing
from .moe_experts import PackedExperts
from .moe_routers import Router


@dataclass
class MoEOutputFields:
    """Fields every hf_comet output adds to its upstream output class.

    Attributes:
        aux_loss: the weighted router aux loss (mean over MoE layers of coef × loss); it is already part of ``loss``
            in training mode. ``None`` for routers without aux losses (COMET).
        router_logits: per MoE layer the router scores, when ``output_router_logits`` is set.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class CometPreTrainedMixin:
    """Mixed into each family's ``PreTrainedModel``: MoE weight init, experts-kernel policy, routing statistics and
    the complete ``auto_map`` at save time. Nothing here knows the Hub or training: hf_comet plugs those in through
    ``sharing`` (see `hf_comet.hub`)."""

    _can_set_experts_implementation_cached_value = True  # the experts class lives in a sibling file (notes §2.2)
    _comet_auto_classes: ClassVar[dict[str, type]] = {}  # Auto class name -> our class, filled by each modeling file
    sharing: ClassVar[Any] = None
    """Set by ``import hf_comet`` (`hf_comet.hub.Sharing`): writes the model card when saving and pushes it to the
    Hub. ``None`` where a checkpoint runs as remote code without the package: upstream behaviour."""

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PackedExperts):
            module.init_weights(self.config, self.config.initializer_range * self._down_proj_std_factor)
        elif isinstance(module, Router):
            module.init_weights(self.config)

    @property
    def _down_proj_std_factor(self) -> float:
        """Scale of the output projection's init relative to ``initializer_range`` (GPT-2 overrides it)."""
        return 1.0

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        if requested_experts == "batched_mm":
            raise ValueError(
                "experts_implementation='batched_mm' is refused by hf_comet: it gathers a weight matrix per token and "
                "exhausts memory at training sizes; use 'grouped_mm' (default) or 'eager'."
            )
        return super().get_correct_experts_implementation(requested_experts)

    # -- routing statistics ----------------------------------------------------------------------------------------
    def moe_blocks(self) -> list[MoEBlock]:
        """The model's MoE blocks in layer order."""
        return [module for module in self.modules() if isinstance(module, MoEBlock)]

    def routing_statistics(self, reset: bool = False) -> dict[int, dict]:
        """Per MoE layer (by block index) the routing statistics accumulated since the last reset (see
        `RoutingStatistics.summary` for the keys). Statistics accumulate in every routed forward, training and
        evaluation, without host syncs; reading them syncs once per layer. ``reset`` starts a fresh window."""
        result = {block.layer_idx: block.routing_statistics() for block in self.moe_blocks()}
        if reset:
            self.reset_routing_statistics()
        return result

    def reset_routing_statistics(self) -> None:
        """Start a fresh statistics window in every MoE layer."""
        for block in self.moe_blocks():
            block.reset_statistics()

    # -- saving ----------------------------------------------------------------------------------------------------
    def complete_auto_map(self) -> dict[str, str]:
        """``auto_map`` naming the config and every Auto class of this family, so any head loads remotely."""
        auto_map = {"AutoConfig": f"{type(self.config).__module__.rsplit('.', 1)[-1]}.{type(self.config).__name__}"}
        for auto_name, cls in self._comet_auto_classes.items():
            auto_map[auto_name] = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
        return auto_map

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        """Upstream ``save_pretrained``, writing the complete ``auto_map`` (upstream writes only the saved class);
        with hf_comet installed also the model card (and ``push_to_hub=True`` uploads it)."""
        self.config.auto_map = self.complete_auto_map()
        upstream = super().save_pretrained
        if self.sharing is None:
            return upstream(save_directory, is_main_process, *args, **kwargs)
        return self.sharing.save_pretrained(self, upstream, save_directory, is_main_process, *args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """Upstream ``push_to_hub``; with hf_comet installed the uploaded card is the hf_comet model card."""
        if self.sharing is None:
            return super().push_to_hub(*args, **kwargs)
        return self.sharing.push_to_hub(self, *args, **kwargs)


def routed_forward(upstream_forward, output_class):
    """Wrap an upstream ``forward`` so it collects routing, adds the aux loss and returns ``output_class``.

    The wrapper keeps the upstream signature (``inspect.signature`` follows ``__wrapped__``), so Trainer finds the
    label names and generation its inputs. It accepts ``output_router_logits``. The aux loss joins ``loss`` only in
    training mode; when Trainer passes ``num_items_in_batch`` to a head that honours it, the aux loss is weighted by
    this micro-batch's share of the loss items, so gradient accumulation does not multiply it.
    A call nested inside another routed forward (the base model inside a head) runs upstream unchanged.
    """
    names = list(inspect.signature(upstream_forward).parameters)[1:]  # positional order after self

    @functools.wraps(upstream_forward)
    def forward(self, *args, **kwargs):
        output_router_logits = kwargs.pop("output_router_logits", None)
        if active_collector() is not None:
            return upstream_forward(self, *args, **kwargs)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = self.config.return_dict
        arguments = {**dict(zip(names, args, strict=False)), **kwargs}

        with collect_routing(arguments.get("attention_mask")) as collector:
            outputs = upstream_forward(self, *args, return_dict=True, **kwargs)
        aux_loss = collector.aux_loss()
        collector.commit(self.training)
        fields = dict(outputs)
        if "loss" in fields and aux_loss is not None and self.training:
            fields["loss"] = fields["loss"] + aux_loss * aux_loss_share(
                self, arguments.get("labels"), kwargs.get("num_items_in_batch"), kwargs.get("shift_labels")
            )
        result = output_class(
            **fields,
            aux_loss=aux_loss,
            router_logits=collector.router_logits() if output_router_logits else None,
        )
        return result if return_dict else result.to_tuple()

    return forward


def loss_item_share(
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int,
    causal: bool,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """This micro-batch's counted label positions (not -100; shifted for causal LMs) over ``num_items_in_batch``."""
    counted = shift_labels
    if counted is None:
        counted = labels[..., 1:] if causal else labels
    return counted.ne(-100).sum().to(torch.float32) / num_items_in_batch


def aux_loss_share(
    model,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor | float:
    """This micro-batch's share of the loss items when the task loss is a sum over ``num_items_in_batch``, else 1.

    Weighting the aux loss by it makes it count once per optimizer step under gradient accumulation, like the task
    loss (transformers-v5-notes §4). Also used by `hf_comet.training.CometTrainer` for losses it computes itself.
    """
    if num_items_in_batch is None or labels is None or not getattr(model, "accepts_loss_kwargs", True):
        return 1.0
    return loss_item_share(labels, num_items_in_batch, model.loss_type == "ForCausalLM", shift_labels)


def register_family(pretrained_class: type, auto_classes: dict[str, type]) -> None:
    """Record a family's Auto classes (for the complete ``auto_map``) and mark each class for remote-code saving."""
    pretrained_class._comet_auto_classes = auto_classes
    for auto_name, cls in auto_classes.items():
        cls.register_for_auto_class(auto_name)


__all__ = ["CometPreTrainedMixin", "MoEOutputFields", "aux_loss_share", "loss_item_share", "register_family", "routed_forward"]
