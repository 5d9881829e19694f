"""What the three model families share: weight init of the MoE modules, output fields, the routed forward wrapper
and the complete ``auto_map`` written at save time. Travels with checkpoints (torch/transformers imports only).
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import __version__ as transformers_version
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import logging

from .moe_block import RECORD_FIELDS, MoEBlock, active_collector, collect_routing, describe_record
from .moe_experts import BUCKETED, PackedExperts
from .moe_routers import ROUTER_CLASSES, CometRouter, Router

logger = logging.get_logger(__name__)

RUNTIME_FIELDS = ("units_kept",)
"""Record fields a config may change on purpose, with a warning: COMET's k (the same weights at another keep rate,
e.g. a keep-rate schedule or ``from_pretrained(path, comet_keep_rate=...)``). Every other difference between the
record and the config is refused."""


class CheckpointMismatchError(ValueError):
    """An hf_comet checkpoint whose weights do not fit its config (or are missing or damaged): refused at load."""


@dataclass
class MoEOutputFields:
    """Fields every hf_comet output adds to its upstream output class (docs/decisions.md#moe-output-conventions).

    Attributes:
        aux_loss: what transformers' native MoE models hold: transformers' ``load_balancing_loss_func`` over every
            MoE layer's ``router_logits``, unweighted, when ``output_router_logits`` is set and the router trains that
            loss (``topk``, ``switch``); ``None`` otherwise.
        router_logits: per MoE layer the gate logits, (tokens, num_experts), when ``output_router_logits`` is set;
            ``None`` for COMET, which has no gate (its unit scores: `hf_comet.collect_routing`).
        router_aux_loss: the weighted aux loss that joins ``loss`` in training: mean over MoE layers of
            ``sum_name coef[name] * router_losses[name]``. ``None`` for routers without aux losses (COMET, Deep MoE).
        router_losses: each unweighted aux term by name (``load_balancing_loss``, ``z_loss``, ``importance_loss``,
            ``load_loss``, ``similarity_loss``), mean over the MoE layers that have it.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_aux_loss: torch.FloatTensor | None = None
    router_losses: dict[str, torch.FloatTensor] | None = None


class CometPreTrainedMixin:
    """Mixed into each family's ``PreTrainedModel``: MoE weight init, experts-kernel policy, routing statistics and
    the complete ``auto_map`` at save time. Nothing here knows the Hub or training: hf_comet plugs those in through
    ``sharing`` (see `hf_comet.hub`)."""

    _can_set_experts_implementation_cached_value = True  # the experts class lives in a sibling file (notes §2.2)
    _comet_auto_classes: ClassVar[dict[str, type]] = {}  # Auto class name -> our class, filled by each modeling file
    aux_loss_fields: ClassVar[tuple[str, ...]] = ("loss",)
    """Output fields the aux loss may join in training, first present wins (a head with two losses names both)."""
    sharing: ClassVar[Any] = None
    """Set by the hf_comet package as soon as this module loads (`hf_comet.hub.Sharing`, plugged in from outside, so
    this file never imports hf_comet): writes the model card when saving and pushes it to the Hub. ``None`` where a
    checkpoint runs as remote code without the package: upstream behaviour."""

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MoEBlock):
            init.copy_(module.routing_record, module.expected_record(self.config))
        elif isinstance(module, PackedExperts):
            module.init_weights(self.config, self.config.initializer_range * self._down_proj_std_factor)
        elif isinstance(module, Router):
            module.init_weights(self.config)

    @property
    def _down_proj_std_factor(self) -> float:
        """Scale of the output projection's init relative to ``initializer_range`` (GPT-2 overrides it)."""
        return 1.0

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        """Upstream's clean-up of the load report, then `check_routing_weights` (``from_pretrained`` refuses MoE
        weights that do not fit the config with `CheckpointMismatchError`)."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        check_routing_weights(self, loading_info)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Default (``None``) is our ``"bucketed"`` kernel (`hf_comet.modeling.moe_kernels`; ``hf-comet bench``
        measured it faster than transformers' kernels on CPU). Transformers' ``"grouped_mm"`` and ``"eager"`` stay
        selectable; ``"batched_mm"`` is refused."""
        if requested_experts is None or requested_experts == BUCKETED:
            return BUCKETED
        if requested_experts == "batched_mm":
            raise ValueError(
                "experts_implementation='batched_mm' is refused by hf_comet: it gathers a weight matrix per token and "
                f"exhausts memory at training sizes; use {BUCKETED!r} (default), 'grouped_mm' or 'eager'."
            )
        try:
            return super().get_correct_experts_implementation(requested_experts)
        except ValueError as error:
            raise ValueError(
                f"{error} hf_comet also accepts experts_implementation={BUCKETED!r} (its default)."
            ) from None

    # -- routing statistics ----------------------------------------------------------------------------------------
    def set_comet_keep_rate(self, keep_rate: float) -> None:
        """Run every COMET layer at ``keep_rate`` from the next forward on and record it in the config, so a save
        describes the model as it runs (same weights, another k: e.g. `hf_comet.training.KeepRateScheduleCallback`).
        Refused for a model without COMET routing."""
        if self.config.routing != "comet":
            raise ValueError(
                f"set_comet_keep_rate needs routing='comet'; this model routes with {self.config.routing!r}."
            )
        routers = [block.router for block in self.moe_blocks() if isinstance(block.router, CometRouter)]
        for router in routers:
            router.set_keep_rate(keep_rate)  # validates before anything changes
        self.config.comet_keep_rate = keep_rate

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
        for block in self.moe_blocks():  # the record describes the weights as they are now
            block.routing_record.copy_(block.expected_record(self.config))
        upstream = super().save_pretrained
        if self._auto_class is None:  # a head with no Auto class (GPT2DoubleHeadsModel): its code travels too
            upstream = functools.partial(_save_with_code, self, upstream)
        if self.sharing is None:
            return upstream(save_directory, is_main_process, *args, **kwargs)
        return self.sharing.save_pretrained(self, upstream, save_directory, is_main_process, *args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """Upstream ``push_to_hub``; with hf_comet installed the uploaded card is the hf_comet model card."""
        if self.sharing is None:
            return super().push_to_hub(*args, **kwargs)
        return self.sharing.push_to_hub(self, *args, **kwargs)


def _save_with_code(model, upstream_save, save_directory, is_main_process: bool = True, *args, **kwargs):
    """Upstream ``save_pretrained``, then (main process) the modeling files, which transformers copies only for
    classes registered with an Auto class; ``auto_map`` stays the family's (`complete_auto_map`). Upstream would
    push before the code is there, so ``push_to_hub=True`` pushes afterwards (``push_to_hub`` saves, with the code,
    into a temporary folder and uploads it)."""
    push = kwargs.pop("push_to_hub", False)
    hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "private", "create_pr") if key in kwargs}
    if push and "token" in kwargs:
        hub["token"] = kwargs["token"]
    result = upstream_save(save_directory, is_main_process, *args, **kwargs)
    if is_main_process:
        custom_object_save(model, save_directory)
        if push:
            model.push_to_hub(hub.pop("repo_id", str(save_directory).rstrip("/").split("/")[-1]), **hub)
    return result


def upstream_init(model: torch.nn.Module, upstream: type, *args: Any, **base_models: type) -> None:
    """Run ``upstream.__init__`` on ``model`` with each name in ``base_models`` resolved to our class.

    A stock head builds its base model by name (``self.transformer = GPT2Model(config)``). This runs upstream's own
    ``__init__`` body (its attributes, head modules, checks, warnings and ``post_init``, in upstream's order) with
    that name bound to ours (``GPT2Model=CometGPT2Model``): the runtime counterpart of what transformers' modular
    converter writes for a model that inherits a head from another family. No stock base model is built, not even on
    the meta device, and construction draws the same random numbers in the same order as upstream, so a seeded head
    is initialised as the upstream head would be around our base model. Nothing global is patched (transformers' own
    ``apply_patches`` rebinds module attributes process-wide, and transformers 5.0 lacks it), so it is thread-safe.
    The names are looked up afresh in upstream's module at each call, so anything patched there is honoured.

    Args:
        model: the instance being built (``self`` of our head's ``__init__``).
        upstream: the stock head class whose ``__init__`` runs (``GPT2LMHeadModel``).
        *args: upstream ``__init__``'s arguments (``config``).
        **base_models: stock class name -> our class to build in its place.

    Raises:
        TypeError: upstream's ``__init__`` does not itself build one of ``base_models`` by that name (a release that
            changed how the head is built, or wrapped its ``__init__``): hf_comet refuses to run a constructor it has
            not seen rather than build a stock base model or skip a wrapper.
    """
    function = upstream.__init__
    unknown = sorted(name for name in base_models if name not in function.__code__.co_names)
    if unknown:
        raise TypeError(
            f"{upstream.__name__}.__init__ of transformers {transformers_version} does not build {unknown} in its own "
            f"body, so {type(model).__name__} cannot build its base model in their place; this hf_comet version "
            "does not support that transformers version."
        )
    namespace = {**vars(sys.modules[function.__module__]), **base_models}
    rebound = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    rebound(model, *args)


def routed_forward(upstream_forward, output_class):
    """Wrap an upstream ``forward`` so it collects routing, adds the aux loss and returns ``output_class``.

    The wrapper keeps the upstream signature (``inspect.signature`` follows ``__wrapped__``), so Trainer finds the
    label names and generation its inputs. It accepts ``output_router_logits``, which adds ``router_logits`` and the
    native ``aux_loss`` as in transformers' MoE models. The weighted ``router_aux_loss`` joins ``loss`` (the first of
    the head's ``aux_loss_fields`` that the upstream forward returned) in every training-mode forward, whether or not
    ``output_router_logits`` is set (transformers' native models add it only then: a fine-tune that forgets the flag
    would silently train without load balancing), and never in eval mode; when Trainer passes ``num_items_in_batch`` to a head that honours it, the aux loss is weighted by
    this micro-batch's share of the loss items, so gradient accumulation does not multiply it.
    A call nested inside another routed forward (the base model inside a head) runs upstream unchanged.
    """
    names = list(inspect.signature(upstream_forward).parameters)[1:]  # positional order after self

    @functools.wraps(upstream_forward)
    def forward(self, *args, **kwargs):
        output_router_logits = kwargs.pop("output_router_logits", None)
        outer = active_collector()
        if outer is not None and outer.from_model:  # the base model inside our head's forward: its collector is set
            return upstream_forward(self, *args, **kwargs)
        if outer is not None:  # a caller collects (collect_routing): it gets this forward's ids and mask too
            arguments = {**dict(zip(names, args, strict=False)), **kwargs}
            ROUTER_CLASSES[self.config.routing].check_inputs(self.config, arguments)
            with outer.forward_inputs(arguments.get("attention_mask"), arguments.get("input_ids")):
                return upstream_forward(self, *args, **kwargs)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = self.config.return_dict
        arguments = {**dict(zip(names, args, strict=False)), **kwargs}
        ROUTER_CLASSES[self.config.routing].check_inputs(self.config, arguments)  # before any work (hash: input_ids)

        with collect_routing(arguments.get("attention_mask"), arguments.get("input_ids")) as collector:
            collector.from_model = True
            outputs = upstream_forward(self, *args, return_dict=True, **kwargs)
        router_aux_loss = collector.router_aux_loss()
        collector.commit(self.training)
        fields = dict(outputs)
        target = next((name for name in self.aux_loss_fields if fields.get(name) is not None), None)
        if target is not None and router_aux_loss is not None and self.training:  # always in training: see docstring
            fields[target] = fields[target] + router_aux_loss * aux_loss_share(
                self, arguments.get("labels"), kwargs.get("num_items_in_batch"), kwargs.get("shift_labels")
            )
        result = output_class(
            **fields,
            aux_loss=collector.native_aux_loss() if output_router_logits else None,
            router_logits=collector.router_logits() if output_router_logits else None,
            router_aux_loss=router_aux_loss,
            router_losses=collector.losses_by_name(),
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


def _list(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


@torch.no_grad()
def check_routing_weights(model, loading_info) -> None:
    """Refuse a loaded checkpoint whose MoE weights do not fit its config, before transformers' generic report.

    * Unexpected MoE tensors (experts where the config has a dense FFN, a dense FFN where it has experts:
      ``moe_layers`` changed, or a dense checkpoint) are an error naming them. Missing ones follow transformers'
      convention (load, initialise them) with a warning that names them and says the routing is not the saved one.
    * Each block's saved ``routing_record`` (routing, experts, widths, block size, COMET's k, seed, layer) must
      equal what the config builds; only COMET's keep rate may differ (`RUNTIME_FIELDS`), with a warning.
    * A COMET projection is a pure function of ``routing_seed`` and the layer: a missing one is recreated, and said
      so (a fitted one, ``comet_router="fitted"``, is not: missing, it is one of the MoE tensors above); a loaded one must match the CRC-32 saved in the record (damaged bytes of the same size are an error; not
      checked when the model is loaded in a precision below float32, which changes the bytes by design).
    * A checkpoint of the first release has no record: its routing is not cross-checked (said at info level).
    """
    where = model.config._name_or_path or "the checkpoint"
    blocks = {name: module for name, module in model.named_modules() if isinstance(module, MoEBlock)}
    missing, unexpected = loading_info.missing_keys, loading_info.unexpected_keys
    family = getattr(model, "family", None)
    recreated, unrecorded = [], []
    # Both stay in the load report (transformers' convention: every persistent tensor the file lacks is listed);
    # what they mean is said below.
    fitted = {name for name, block in blocks.items() if getattr(block.router, "fitted", False)}
    for name, block in blocks.items():
        if isinstance(block.router, CometRouter) and name not in fitted and f"{name}.router.projection" in missing:
            recreated.append(block.layer_idx)
        if f"{name}.routing_record" in missing:
            unrecorded.append(block.layer_idx)
        if getattr(block.router, "projection_in", None) is not None and f"{name}.router.projection_in" in missing:
            recreated.append(block.layer_idx)
    # a fitted projection is not a function of the seed: missing, it is reported below as initialised at random
    explained = {
        f"{name}.router.{key}" for name in blocks if name not in fitted for key in ("projection", "projection_in")
    }
    explained |= {f"{name}.routing_record" for name in blocks}
    moe_missing = {
        key for key in missing if key not in explained and any(key.startswith(f"{name}.") for name in blocks)
    }
    moe_unexpected = {
        key
        for key in unexpected
        if ".experts." in key
        or ".router." in key
        or key.endswith(".routing_record")
        or any(key.startswith(f"{name}.") for name in blocks)
        or (family is not None and (ffn := family.ffn_key(key)) is not None and model.config.is_moe_layer(ffn.layer))
    }
    if moe_unexpected:
        problem = f"tensors it has that this config has no place for: {_list(moe_unexpected)}"
        if moe_missing:
            problem = f"MoE tensors missing from it: {_list(moe_missing)}; {problem}"
        raise CheckpointMismatchError(
            f"{where}: the weights do not fit config.json ({problem}). moe_layers={model.config.moe_layers}, "
            f"routing={model.config.routing!r}: restore the config the weights were saved with; to convert a dense "
            "checkpoint use hf_comet.convert_to_moe."
        )
    if moe_missing:  # transformers' convention: load and initialise what is missing, but say exactly what it means
        logger.warning(
            f"{where}: MoE tensors missing from the checkpoint were initialised at random: {_list(moe_missing)}. "
            "Those layers' experts or routers are not the saved ones, so the routing and outputs differ from the "
            "saved model's; restore the weights file if this is not intended."
        )
    for block in blocks.values():
        if block.layer_idx in unrecorded:
            continue
        saved = [int(v) for v in block.routing_record.tolist()]
        expected = [int(v) for v in block.expected_record(model.config).tolist()]
        differing = [field for field, a, b in zip(RECORD_FIELDS, saved, expected, strict=True) if a != b]
        allowed = [field for field in differing if field in RUNTIME_FIELDS]
        refused = [field for field in differing if field not in allowed]
        lossy = getattr(block.router, "projection", torch.empty(0)).dtype not in (torch.float32, torch.float64)
        if "projection_crc32" in refused and (lossy or block.layer_idx in recreated):
            refused.remove("projection_crc32")  # loaded in a lower precision (or recreated): the bytes differ by design
        if "projection_crc32" in refused:
            raise CheckpointMismatchError(
                f"{where}: layer {block.layer_idx}'s COMET projection does not match the checksum saved with it: the "
                "weights file is damaged. Restore the file (the projection can be recreated from routing_seed only by "
                "deleting it from the file, if it was the seeded one)."
            )
        refused = [field for field in refused if field != "projection_crc32"]
        if refused:
            was, now = describe_record(saved), describe_record(expected)
            detail = ", ".join(f"{field} {was[field]!r} (config: {now[field]!r})" for field in refused)
            raise CheckpointMismatchError(
                f"{where}: layer {block.layer_idx}'s weights were saved for {detail}. Restore those fields in "
                "config.json (or pass the checkpoint's values), or retrain/convert for the new routing."
            )
        if allowed:
            logger.warning(
                f"{where}: layer {block.layer_idx} was saved with COMET k={saved[RECORD_FIELDS.index('units_kept')]} "
                f"units per token; running with k={expected[RECORD_FIELDS.index('units_kept')]} as requested."
            )
        block.routing_record.copy_(block.expected_record(model.config))
    recreated = sorted(set(recreated))
    if recreated:
        logger.warning(
            f"{where}: the COMET projection of layers {recreated} was not in the checkpoint and was recreated from "
            f"routing_seed={model.config.routing_seed}: it is a pure function of the seed and the layer, so it is "
            "identical to the one the model was trained with if the seed is unchanged."
        )
    if unrecorded:
        logger.info(f"{where}: saved before routing records; its routing was not cross-checked against config.json.")


def register_family(pretrained_class: type, auto_classes: dict[str, type]) -> None:
    """Record a family's Auto classes (for the complete ``auto_map``) and mark each class for remote-code saving."""
    pretrained_class._comet_auto_classes = auto_classes
    for auto_name, cls in auto_classes.items():
        cls.register_for_auto_class(auto_name)


__all__ = [
    "CheckpointMismatchError",
    "check_routing_weights",
    "CometPreTrainedMixin",
    "MoEOutputFields",
    "aux_loss_share",
    "loss_item_share",
    "register_family",
    "routed_forward",
    "upstream_init",
]
