"""What the three model families share: weight init of the MoE modules, output fields, the routed forward wrapper
and the complete ``auto_map`` written at save time. Travels with checkpoints (torch/transformers imports only).
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass

import torch
from transformers import initialization as init

from .moe_block import CometMoEBlock, ExpertMerge, active_collector, collect_routing
from .moe_experts import CometExperts
from .moe_routers import AttentiveRouter, CometRouter, DeepRouter, NoisyTopKRouter, SwitchRouter, TopKRouter


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
    """Mixed into each family's ``PreTrainedModel``: MoE weight init, experts-kernel policy and remote-code saving."""

    _can_set_experts_implementation_cached_value = True  # the experts class lives in a sibling file (notes §2.2)
    _comet_auto_classes: dict[str, type] = {}  # Auto class name -> our class, filled by each modeling file

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, CometExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.normal_(module.down_proj, mean=0.0, std=std * self._down_proj_std_factor)
            init.zeros_(module.down_proj_bias)
            if module.output_bias is not None:
                init.zeros_(module.output_bias)
        elif isinstance(module, CometRouter):
            init.copy_(module.projection, module.reset_projection(self.config.routing_seed))
        elif isinstance(module, (TopKRouter, SwitchRouter)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, NoisyTopKRouter):
            init.zeros_(module.weight)  # Shazeer et al. 2017: both gate matrices start at zero
            init.zeros_(module.noise_weight)
        elif isinstance(module, AttentiveRouter):
            init.normal_(module.key_proj, mean=0.0, std=std)  # gate_proj / query are nn.Linear: upstream init
        elif isinstance(module, DeepRouter):
            init.zeros_(module.assignment_totals)
            init.zeros_(module.constraint_steps_done)

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

    # -- routing state: statistics, expert merging, Deep-MoE constraint -----------------------------------------------
    def moe_blocks(self) -> list[CometMoEBlock]:
        """The model's MoE blocks in layer order."""
        return [module for module in self.modules() if isinstance(module, CometMoEBlock)]

    def _moe_block(self, layer_idx: int) -> CometMoEBlock:
        blocks = {block.layer_idx: block for block in self.moe_blocks()}
        if layer_idx not in blocks:
            raise ValueError(f"layer {layer_idx} has no MoE block; MoE layers are {sorted(blocks)}.")
        return blocks[layer_idx]

    def routing_statistics(self, reset: bool = False) -> dict[int, dict]:
        """Per MoE layer (by block index) the routing statistics accumulated since the last reset (see
        `CometMoEBlock.routing_statistics` for the keys). Statistics accumulate in every routed forward, training and
        evaluation, without host syncs; reading them syncs once per layer. ``reset`` starts a fresh window."""
        result = {block.layer_idx: block.routing_statistics() for block in self.moe_blocks()}
        if reset:
            self.reset_routing_statistics()
        return result

    def reset_routing_statistics(self) -> None:
        """Start a fresh statistics window in every MoE layer."""
        for block in self.moe_blocks():
            block.reset_statistics()

    def merge_experts(self, layer_idx: int, source_a: int, source_b: int, into: int, how: str = "mean") -> ExpertMerge:
        """Overwrite expert ``into`` of block ``layer_idx`` with the merge of ``source_a`` and ``source_b`` (Park
        2024); see `CometMoEBlock.merge_experts`. ``parameters`` of the result carry model-qualified names."""
        block = self._moe_block(layer_idx)
        if how == "count_weighted" and block.learned:
            _global_counts(block)  # every rank must weight the sources alike
        return self._qualify(block.merge_experts(source_a, source_b, into, how=how))

    def merge_most_used_into_least_used(self, how: str = "mean") -> list[ExpertMerge]:
        """In every learned-gating layer, merge the two most selected experts into the least selected other one
        (ties go to the lower index) and reset the counts (Park 2024, methods.md §3.4). Layers with no training
        forward since their last merge are skipped. Then reset the optimizer state of the returned parameters'
        slices (`hf_comet.reset_merged_optimizer_state`). Under torch.distributed the counts are summed over ranks
        first, so every rank merges the same experts: call it on every rank at the same step."""
        blocks = self.moe_blocks()
        learned = [block for block in blocks if block.learned]
        if not learned:
            raise ValueError(
                "this model has no learned-gating MoE layer (routing='comet' everywhere): COMET's experts are "
                "overlapping unit masks of one FFN, so there is nothing to merge."
            )
        if learned[0].experts_module.num_experts < 3:
            raise ValueError(
                f"num_experts={learned[0].experts_module.num_experts}: merging the two most used experts into a third needs "
                "at least 3 experts per layer."
            )
        merges = []
        for block in learned:
            counts = _global_counts(block).tolist()
            if sum(counts) == 0:
                continue
            ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
            source_a, source_b = ranked[0], ranked[1]
            into = min((e for e in range(len(counts)) if e not in (source_a, source_b)), key=lambda e: (counts[e], e))
            merges.append(self._qualify(block.merge_experts(source_a, source_b, into, how=how)))
        return merges

    def _qualify(self, merge: ExpertMerge) -> ExpertMerge:
        """Replace block-relative parameter names by the model's qualified names."""
        names = {id(param): name for name, param in self.named_parameters()}
        merge.parameters = {names.get(id(t), name): t for name, t in merge.parameters.items()}
        return merge

    def lift_deep_constraint(self) -> None:
        """End the Deep-MoE balancing-constraint phase in every ``deep`` layer now, for good."""
        for block in self.moe_blocks():
            if isinstance(block.router, DeepRouter):
                block.router.lift_constraint()

    def complete_auto_map(self) -> dict[str, str]:
        """``auto_map`` naming the config and every Auto class of this family, so any head loads remotely."""
        auto_map = {"AutoConfig": f"{type(self.config).__module__.rsplit('.', 1)[-1]}.{type(self.config).__name__}"}
        for auto_name, cls in self._comet_auto_classes.items():
            auto_map[auto_name] = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
        return auto_map

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        """Upstream ``save_pretrained``, writing the complete ``auto_map`` (upstream writes only the saved class) and,
        where hf_comet is installed and the folder has no README.md yet, the model card. ``push_to_hub=True`` uploads
        the folder, card included, with `push_to_hub`."""
        self.config.auto_map = self.complete_auto_map()
        push = kwargs.pop("push_to_hub", False)
        push_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "commit_message", "private") if k in kwargs}
        result = super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if is_main_process and not os.path.exists(os.path.join(save_directory, "README.md")):
            try:  # imports inside try blocks are not required by transformers' remote-code import check
                from hf_comet.cards import write_model_card
            except ImportError:  # loaded as remote code without the package: no card
                write_model_card = None
            if write_model_card is not None:
                write_model_card(self, save_directory, repo_id=push_kwargs.get("repo_id"))
        if push and is_main_process:
            repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            self.push_to_hub(repo_id, **push_kwargs)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        max_shard_size: int | str | None = "50GB",
        create_pr: bool = False,
        revision: str | None = None,
        commit_description: str | None = None,
        tags: list[str] | None = None,
    ):
        """Upload weights, config, modeling code and the hf_comet model card in one commit.

        Upstream ``push_to_hub`` uploads the repo's existing card (or a generic one) with tags added; this one
        uploads the hf_comet card of this model (routing, provenance, statistics, loading, citations; tags given
        here are added), replacing README.md on the Hub. Same arguments and Hub calls as upstream otherwise.
        """
        import tempfile

        from transformers.utils.hub import hf_api

        if tags:
            self.add_model_tags(tags)
        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, max_shard_size=max_shard_size, repo_id=repo_id)
            return self._upload_modified_files(
                work_dir,
                repo_id,
                files_timestamps={},
                commit_message=commit_message or "Upload model (hf_comet)",
                token=token,
                create_pr=create_pr,
                revision=revision,
                commit_description=commit_description,
            )


def routed_forward(upstream_forward, output_class):
    """Wrap an upstream ``forward`` so it collects routing, adds the aux loss and returns ``output_class``.

    The wrapper keeps the upstream signature (``inspect.signature`` follows ``__wrapped__``), so Trainer finds the
    label names and generation its inputs. It accepts ``output_router_logits``. The aux loss joins ``loss`` only in
    training mode; when Trainer passes ``num_items_in_batch`` to a head that honours it, the aux loss is weighted by
    this micro-batch's share of the loss items, so gradient accumulation does not multiply it.
    A call nested inside another routed forward (the base model inside a head) runs upstream unchanged.
    """
    signature = inspect.signature(upstream_forward)

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
        arguments = signature.bind_partial(self, *args, **kwargs).arguments

        with collect_routing(arguments.get("attention_mask")) as collector:
            outputs = upstream_forward(self, *args, return_dict=True, **kwargs)
        aux_loss = collector.aux_loss()
        collector.commit(self.training)
        fields = dict(outputs)
        if "loss" in fields and aux_loss is not None and self.training:
            fields["loss"] = fields["loss"] + aux_loss * _aux_loss_share(self, arguments.get("labels"), kwargs)
        result = output_class(
            **fields,
            aux_loss=aux_loss,
            router_logits=collector.router_logits() if output_router_logits else None,
        )
        return result if return_dict else result.to_tuple()

    return forward


def _aux_loss_share(model, labels: torch.Tensor | None, kwargs: dict) -> torch.Tensor | float:
    """This micro-batch's share of the loss items when the task loss is a sum over ``num_items_in_batch``, else 1."""
    num_items_in_batch = kwargs.get("num_items_in_batch")
    if num_items_in_batch is None or labels is None or not getattr(model, "accepts_loss_kwargs", True):
        return 1.0
    counted = kwargs.get("shift_labels")
    if counted is None:
        counted = labels[..., 1:] if model.loss_type == "ForCausalLM" else labels
    return counted.ne(-100).sum().to(torch.float32) / num_items_in_batch


def _global_counts(block: CometMoEBlock) -> torch.Tensor:
    """The block's selection counts summed over every rank of the default process group (local ones otherwise)."""
    counts = block.selection_counts
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.clone()
        torch.distributed.all_reduce(counts)
        block.selection_counts.copy_(counts)  # count_weighted merges read them too
    return counts


def register_family(pretrained_class: type, auto_classes: dict[str, type]) -> None:
    """Record a family's Auto classes (for the complete ``auto_map``) and mark each class for remote-code saving."""
    pretrained_class._comet_auto_classes = auto_classes
    for auto_name, cls in auto_classes.items():
        cls.register_for_auto_class(auto_name)


__all__ = ["CometPreTrainedMixin", "ExpertMerge", "MoEOutputFields", "register_family", "routed_forward"]
