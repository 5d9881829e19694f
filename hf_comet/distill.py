"""Distillation of attentive gates into plain softmax gates (Krishnamurthy et al. 2023, §2.6 of methods.md).

The attentive gate scores an expert from that expert's own activations, so every expert runs for every token. After
training with it, `attentive_to_softmax_gates` swaps each attentive router for a plain two-layer softmax gate (our
``deep`` router with the balancing constraint off) whose trunk is copied from the attentive gate's trunk and whose
output layer is new, and freezes everything else; `distill_attentive_gates` then trains only the gates on the task
loss (Adam, lr 1e-3 as in the authors' code). With a top-k the result routes sparsely at inference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers import initialization as init

from .modeling.configuration_comet import MOE_FIELD_DEFAULTS
from .modeling.moe_routers import AttentiveRouter, DeepMoEGate


def attentive_to_softmax_gates(model: torch.nn.Module, top_k: int | None = None) -> list[str]:
    """Replace every attentive router of ``model`` in place by a softmax gate initialised from its trunk.

    Args:
        model: an hf_comet model with ``routing="attentive"``.
        top_k: experts kept per token by the new gates. ``None`` takes ``config.mixture_top_k`` if set, else
            ``config.num_experts_per_tok``; ``num_experts`` keeps a dense mixture.

    The config becomes ``routing="deep"``, ``deep_constraint_steps=0``, ``mixture_top_k=top_k`` (and
    ``router_aux_loss_coef``, which deep does not read, its default) so the saved model reloads with the new gates. Every parameter except the gates' is frozen (``requires_grad=False``).
    Returns the names of the trainable (gate) parameters.
    """
    config = model.config
    if getattr(config, "routing", None) != "attentive":
        raise ValueError(
            f"routing={getattr(config, 'routing', None)!r}: distillation replaces attentive gates; the model must use "
            "routing='attentive'."
        )
    if top_k is None:
        top_k = config.mixture_top_k if config.mixture_top_k is not None else config.num_experts_per_tok
    if not 1 <= top_k <= config.num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={config.num_experts}.")
    # one checked change (`update_moe`): the fields only attentive reads go back to their defaults, as deep ignores them
    config.update_moe(
        routing="deep",
        deep_constraint_steps=0,
        mixture_top_k=None if top_k == config.num_experts else top_k,
        router_aux_loss_coef=MOE_FIELD_DEFAULTS["router_aux_loss_coef"],
    )
    for block in model.moe_blocks():
        old = block.router
        if not isinstance(old, AttentiveRouter):
            continue
        new = DeepMoEGate(config, block.layer_idx, block.hidden_size)
        reference = old.gate_proj.weight
        new.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            new.gate_proj.weight.copy_(old.gate_proj.weight)
            new.gate_proj.bias.copy_(old.gate_proj.bias)
            init.normal_(new.gate_out.weight, mean=0.0, std=config.initializer_range)
            init.zeros_(new.gate_out.bias)
        block.replace_router(new)
    for name, param in model.named_parameters():
        param.requires_grad_(".router." in name)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def distill_attentive_gates(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    top_k: int | None = None,
    lr: float = 1e-3,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Swap attentive gates for softmax gates (`attentive_to_softmax_gates`) and train only the gates on the task loss.

    ``batches`` yields model inputs with labels (one optimizer step per batch). Returns the training loss per step.
    """
    gate_names = attentive_to_softmax_gates(model, top_k=top_k)
    parameters = [param for name, param in model.named_parameters() if name in set(gate_names)]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    model.train()
    losses = []
    for step, batch in enumerate(batches):
        outputs = model(**batch)
        if outputs.loss is None:
            raise ValueError("distillation trains on the task loss: the batches must include labels.")
        optimizer.zero_grad(set_to_none=True)
        outputs.loss.backward()
        optimizer.step()
        losses.append(float(outputs.loss.detach()))
        if log is not None:
            log(step, losses[-1])
    model.eval()
    return losses


__all__ = ["attentive_to_softmax_gates", "distill_attentive_gates"]
