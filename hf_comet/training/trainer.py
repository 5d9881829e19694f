"""`CometTrainer`: transformers' Trainer plus routing telemetry in ``log_history`` and every reporter.

Training itself needs nothing from this class: hf_comet models fold their aux loss into ``loss`` (once per optimizer
step under gradient accumulation) and keep ``eval_loss`` the task loss. The subclass exists because Trainer appends a
log line to ``log_history`` before callbacks see it, so only ``log`` itself can add keys that reach every reporter
(transformers-v5-notes §4).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..io import atomic_write_text, loads_json
from ..modeling.modeling_comet_common import aux_loss_share, loss_item_share
from .distillation import (
    DistillationConfig,
    check_teacher,
    distillation_kl,
    distillation_mask,
    hidden_state_mse,
    teacher_inputs,
)
from .launch import warn_if_launch_collapsed
from .statistics import statistics_paused

SUMMARY_KEYS = ("max_load_share", "min_load_share", "dead_experts", "gate_entropy", "usage_entropy")
SUMMARY_KEYS += ("dropped_tokens", "non_finite_decisions", "mask_overlap", "overlap_similarity_correlation")
ROUTING_LOGGING = ("summary", "layers", "none")
"""The telemetry levels of `CometTrainer` (``routing_logging``), in `hf_comet.names` too (``hf-comet train``)."""
ROUTING_STATE_FILE = "routing_state_{rank}.json"
"""Per process in every Trainer checkpoint: what resuming needs beyond the weights and Trainer's own RNG states."""


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def reduce_routing_statistics(model: torch.nn.Module) -> None:
    """Sum every MoE block's statistics accumulators over the ranks of the default process group (in place).

    The accumulators are sums (tokens, selections, entropy and pair moments), so the reduced window is exactly the
    window of the global batch. A no-op outside torch.distributed. Every rank must call it at the same point.
    """
    if not _distributed() or not hasattr(model, "moe_blocks"):
        return
    for block in model.moe_blocks():
        for tensor in block.statistics_tensors().values():
            torch.distributed.all_reduce(tensor)


def flatten_routing_statistics(statistics: dict[int, dict[str, Any]], prefix: str = "routing") -> dict[str, float]:
    """Scalar log entries from `routing_statistics()`: ``{prefix}/layer_{i}/{key}`` per layer and model summaries
    ``{prefix}/{key}`` (max of ``max_load_share``, min of ``min_load_share``, sum of ``dead_experts`` and
    ``dropped_tokens``, mean of the rest). Lists and ``None`` values are left out (reporters take scalars)."""
    logs: dict[str, float] = {}
    per_key: dict[str, list[float]] = {key: [] for key in SUMMARY_KEYS}
    for layer, stats in sorted(statistics.items()):
        for key in SUMMARY_KEYS:
            value = stats.get(key)
            if value is None:
                continue
            logs[f"{prefix}/layer_{layer}/{key}"] = float(value)
            per_key[key].append(float(value))
    reducers = {"max_load_share": max, "min_load_share": min, "dead_experts": sum, "dropped_tokens": sum}
    reducers["non_finite_decisions"] = sum
    for key, values in per_key.items():
        if values:
            reduce = reducers.get(key, lambda v: sum(v) / len(v))
            logs[f"{prefix}/{key}"] = float(reduce(values))
    return logs


def _read_routing_state(path: str, model) -> dict[int, tuple[int, torch.Tensor]]:
    """The routing state saved in ``path``, checked whole before anything is restored: per MoE layer the pair
    sampler's position (an integer >= 0) and the selection counts (integers >= 0, one per expert of that layer).
    A truncated, malformed or mismatched file is refused naming it, rather than resuming with wrong counts."""

    def damaged(reason: str) -> ValueError:
        return ValueError(
            f"the routing state {path!r} is damaged ({reason}); restore it from a good checkpoint, or delete it to "
            "resume with fresh routing counters (expert merging then ranks by counts from the resume on)."
        )

    try:
        state = loads_json(Path(path).read_text(), "it")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise damaged(f"{type(error).__name__}: {error}") from None
    if not isinstance(state, dict):
        raise damaged(f"a JSON {type(state).__name__}, not an object of layers")
    blocks = {str(block.layer_idx): block for block in model.moe_blocks()}
    restored = {}
    for layer, saved in state.items():
        block = blocks.get(layer)
        if block is None:
            raise damaged(f"layer {layer!r} is not an MoE layer of this model ({', '.join(blocks)})")
        if not isinstance(saved, dict) or set(saved) != {"pair_draws", "selection_counts"}:
            raise damaged(f"layer {layer}: expected pair_draws and selection_counts")
        draws, counts = saved["pair_draws"], saved["selection_counts"]
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise damaged(f"layer {layer}: pair_draws={draws!r} is not an integer >= 0")
        expected = block.selection_counts.numel()
        if (
            not isinstance(counts, list)
            or len(counts) != expected
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        ):
            shown = f"{len(counts)} values" if isinstance(counts, list) else repr(counts)[:40]
            raise damaged(f"layer {layer}: selection_counts must be {expected} integers >= 0, got {shown}")
        restored[block.layer_idx] = (draws, torch.tensor(counts, dtype=torch.long).view_as(block.selection_counts))
    return restored


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a transformers model, or a PEFT wrapper of one) is a decoder-only causal LM, whose loss
    scores position ``t``'s logits against label ``t + 1``: its ``loss_type`` is ``"ForCausalLM"``, or its class is
    one of transformers' causal-LM heads (``GPT2LMHeadModel`` has ``loss_type=None``: its name matches no loss)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    return (
        getattr(base, "loss_type", None) == "ForCausalLM"
        or type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def _our_head_on(stock: type) -> type | None:
    """Our MoE class built directly on the upstream class ``stock`` (``CometGPT2ForCausalLM`` on
    ``GPT2LMHeadModel``), or ``None``."""
    from ..modeling import FAMILY_ADAPTERS

    for adapter in FAMILY_ADAPTERS.values():
        for ours in (*adapter.auto_classes.values(), *adapter.other_classes):
            if stock in ours.__bases__:
                return ours
    return None


def align_loss_contract(model: torch.nn.Module | None) -> None:
    """Give a stock transformers model the loss contract of our MoE head built on it, so Trainer normalises the
    dense baseline's loss exactly as it normalises ours (in place; our own models are left as they are).

    * A causal LM whose ``loss_type`` is ``None`` (``GPT2LMHeadModel``, ``BertLMHeadModel``) gets ``"ForCausalLM"``,
      the loss its ``loss_function`` already falls back to. Without it Trainer counts ``num_items_in_batch`` over the
      unshifted labels (64 per 64-token window) while the loss sums 63 shifted positions: the dense loss, trained and
      evaluated, came out 63/64 of the mean (ours, named ``...ForCausalLM``, were counted right).
    * A head whose ``forward`` takes ``**kwargs`` but ignores ``num_items_in_batch`` (a per-batch mean:
      ``GPT2ForSequenceClassification``, ``BertForMaskedLM``...) gets our head's ``accepts_loss_kwargs = False``;
      otherwise Trainer, believing the loss normalised over the accumulated batch, does not divide it by the
      gradient-accumulation steps, and the dense loss and gradients came out that many times ours.

    docs/decisions.md, "One loss denominator"."""
    if model is None:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, torch.nn.Module):
        return
    if getattr(base, "loss_type", "") is None and is_causal_lm(base):
        base.loss_type = "ForCausalLM"
    ours = _our_head_on(type(base))
    if ours is not None and "accepts_loss_kwargs" in vars(ours) and not hasattr(base, "accepts_loss_kwargs"):
        base.accepts_loss_kwargs = ours.accepts_loss_kwargs


class CometTrainer(Trainer):
    """`Trainer` that logs the routers' telemetry every ``logging_steps``.

    Each training log line gains ``router_aux_loss`` (the weighted aux loss's part of the logged ``loss``: what was
    trained, per optimizer step, averaged over the window like ``loss``) and, from the MoE
    blocks' statistics over the window (summed over ranks under DDP): as model summaries (and per layer with
    ``routing_logging="layers"``) the max/min load share, dead experts, gate entropy H_s and usage entropy H_u (bits), dropped tokens, and the mask overlap
    between token pairs with its correlation to their input similarity (COMET's claim). The window then restarts.
    ``routing_history`` keeps, per logging step, each layer's tokens per expert (for load heatmaps). Evaluation does
    not count into the training window.

    A stock transformers model (the dense baseline) is first given our head's loss contract
    (`align_loss_contract`), so Trainer divides its loss by the same denominator as ours, in training and evaluation;
    the model object keeps those two attributes (``loss_type``, ``accepts_loss_kwargs``) afterwards.

    When a label smoother or ``compute_loss_func`` replaces the model's loss, the aux loss is added back (weighted
    like the model does), so label smoothing does not silently drop load balancing.

    At start-up it warns (`~hf_comet.training.launch.SingleProcessLaunchWarning`) when the process was launched as
    one of several (``torchrun``, ``accelerate launch``) but Accelerate formed a single process.

    Args:
        routing_logging: how much telemetry each log line gains: ``"summary"`` (default: ``router_aux_loss`` and
            the model summaries ``routing/{key}``, a handful of keys whatever the depth), ``"layers"`` (also every
            layer's ``routing/layer_{i}/{key}``: about ten keys per MoE layer) or ``"none"`` (log like a plain
            Trainer; ``routing_history`` stays empty). ``routing_history`` keeps the per-layer tokens per expert at
            ``"summary"`` and ``"layers"`` alike.
        teacher_model: a model to distil from, typically the dense model the student was converted from
            (`hf_comet.training.distillation`). It runs in eval mode under ``no_grad`` on the student's device, in
            training steps only (``eval_loss`` stays the task loss), is never saved in checkpoints and never gets
            gradients. Its logits must have the student's size (vocabulary or ``num_labels``), else a
            ``ValueError`` names both before training. It is held whole on every process (not sharded by
            FSDP or DeepSpeed).
        distillation: the `DistillationConfig` (default ``DistillationConfig()`` when a teacher is given). The loss
            becomes ``(1 - alpha) * task + aux + alpha * T^2 * KL + hidden_weight * MSE``, each distillation term
            weighted like the task loss under gradient accumulation, and each log line gains ``distill_loss``: the
            distillation terms' part of the logged ``loss`` (per optimizer step, averaged over the window).
    """

    def __init__(
        self,
        *args,
        routing_logging: str = "summary",
        teacher_model: torch.nn.Module | None = None,
        distillation: DistillationConfig | None = None,
        **kwargs,
    ):
        if routing_logging not in ROUTING_LOGGING:
            raise ValueError(
                f"routing_logging={routing_logging!r} is not a telemetry level; choose one of "
                f"{', '.join(map(repr, ROUTING_LOGGING))} (summaries, summaries and every layer, nothing)."
            )
        if distillation is not None and not isinstance(distillation, DistillationConfig):
            raise TypeError(
                f"distillation must be a DistillationConfig (hf_comet.training.DistillationConfig), not a "
                f"{type(distillation).__name__}."
            )
        if teacher_model is None and distillation is not None:
            raise ValueError("distillation= was given without teacher_model=: pass the model to distil from.")
        if teacher_model is not None:
            check_teacher(kwargs.get("model", args[0] if args else None), teacher_model)
        align_loss_contract(kwargs.get("model", args[0] if args else None))  # before Trainer inspects the model
        super().__init__(*args, **kwargs)
        warn_if_launch_collapsed(self.accelerator.num_processes)
        self.routing_logging = routing_logging
        self.routing_history: list[dict[str, Any]] = []
        self._aux_sum: torch.Tensor | None = None  # the aux loss's part of the reported loss, summed over the window
        self._aux_window_start = 0
        self.teacher_model = teacher_model
        self.distillation = distillation if distillation is not None or teacher_model is None else DistillationConfig()
        self._distill_sum: torch.Tensor | None = None  # the distillation terms' part of the reported loss (window)
        self._distill_window_start = 0
        if teacher_model is not None:
            check_teacher(self.model, teacher_model)  # a model_init model is known only now
            teacher_model.eval()
            student_parameter = next(self.model.parameters(), None) if self.model is not None else None
            self._place_teacher(student_parameter.device if student_parameter is not None else self.args.device)

    def call_model_init(self, trial=None):
        """Upstream ``call_model_init``, the model given the stock loss contract (`align_loss_contract`)."""
        model = super().call_model_init(trial)
        align_loss_contract(model)
        return model

    # -- loss ----------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        replaces_model_loss = (self.label_smoother is not None or self.compute_loss_func is not None) and (
            "labels" in inputs
        )
        labels = inputs.get("labels")
        shift_labels = inputs.get("shift_labels")
        attention_mask = inputs.get("attention_mask")
        distilling = self.teacher_model is not None and self.distillation.distils and model.training
        if distilling:  # before the student's forward: Trainer's may take the labels out of `inputs`
            teacher_outputs = self._teacher_forward(inputs)
            if self.distillation.hidden_weight > 0:
                inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux_loss = outputs.get("router_aux_loss") if isinstance(outputs, dict) else None
        aux_part: torch.Tensor | float = 0.0  # the aux loss's part of `loss`, kept whole by distillation
        if aux_loss is not None and model.training:
            if replaces_model_loss:
                weight = self._aux_weight(model, labels, num_items_in_batch)
                loss = loss + aux_loss * weight
            else:  # the model added it, weighted by its share; Trainer may then scale the whole loss
                unwrapped = self.accelerator.unwrap_model(model)
                passed = num_items_in_batch if self.model_accepts_loss_kwargs else None
                weight = aux_loss_share(unwrapped, labels, passed, shift_labels) * self._token_average_scale(
                    num_items_in_batch
                )
            aux_part = aux_loss * weight
            contribution = (aux_loss.detach().float() * weight) / self._trainer_divisor(num_items_in_batch)
            if self._aux_sum is None:  # a new window starts at the step last logged (also after a resume)
                self._aux_sum, self._aux_window_start = contribution, self.state.global_step
            else:
                self._aux_sum = self._aux_sum + contribution
        if distilling:
            causal = getattr(self.accelerator.unwrap_model(model), "loss_type", None) == "ForCausalLM"
            distill = self._distillation_terms(outputs, teacher_outputs, labels, shift_labels, attention_mask, causal)
            distill = distill * self._mean_weight(labels, shift_labels, num_items_in_batch, causal)
            # (1 - alpha) * task + aux + distill, written so that alpha = 0 leaves `loss` bit for bit
            loss = loss - self.distillation.alpha * (loss - aux_part) + distill
            contribution = distill.detach().float() / self._trainer_divisor(num_items_in_batch)
            if self._distill_sum is None:
                self._distill_sum, self._distill_window_start = contribution, self.state.global_step
            else:
                self._distill_sum = self._distill_sum + contribution
        return (loss, outputs) if return_outputs else loss

    # -- distillation --------------------------------------------------------------------------------------------
    def _place_teacher(self, device: torch.device) -> None:
        """Move the teacher to ``device`` unless it is there (or spread over devices by a ``device_map``)."""
        if getattr(self.teacher_model, "hf_device_map", None):
            return
        parameter = next(self.teacher_model.parameters(), None)
        if parameter is not None and parameter.device != device:
            self.teacher_model.to(device)

    def _teacher_forward(self, inputs: dict[str, Any]):
        """The teacher's outputs on this micro-batch: eval mode, no gradients, on the inputs' device."""
        teacher = self.teacher_model
        if teacher.training:  # a user may have switched it back
            teacher.eval()
        device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        if device is not None:
            self._place_teacher(device)
        kwargs = teacher_inputs(teacher, inputs, self.label_names)
        if self.distillation.hidden_weight > 0:
            kwargs["output_hidden_states"] = True
        with torch.no_grad():
            outputs = teacher(**kwargs)
        if not isinstance(outputs, dict):
            raise TypeError("distillation needs the teacher's outputs as a ModelOutput; set its config.return_dict.")
        return outputs

    def _distillation_terms(self, outputs, teacher_outputs, labels, shift_labels, attention_mask, causal: bool):
        """``alpha * T^2 * KL + hidden_weight * MSE`` of this micro-batch, each a mean over its counted positions."""
        config = self.distillation
        if not isinstance(outputs, dict):
            raise TypeError("distillation needs the student's outputs as a ModelOutput (return_dict=True).")
        terms = []
        if config.alpha > 0:
            student, teacher = outputs.get("logits"), teacher_outputs.get("logits")
            if student is None or teacher is None:
                which = "student" if student is None else "teacher"
                keys = list(outputs if student is None else teacher_outputs)
                raise ValueError(
                    f"distillation with alpha > 0 compares logits, but the {which}'s outputs have none (only "
                    f"{', '.join(keys)}); use a head with logits, or alpha=0 with hidden_weight > 0."
                )
            if student.shape != teacher.shape:
                raise ValueError(
                    f"the teacher's logits have shape {tuple(teacher.shape)} and the student's {tuple(student.shape)} "
                    "on the same inputs; distillation needs equal shapes (same vocabulary or num_labels)."
                )
            mask = distillation_mask(student.shape[:-1], labels, shift_labels, attention_mask, causal)
            terms.append(config.alpha * distillation_kl(student, teacher, config.temperature, mask))
        if config.hidden_weight > 0:
            student, teacher = outputs.get("hidden_states"), teacher_outputs.get("hidden_states")
            if not student or not teacher:
                raise ValueError("hidden_weight > 0 needs the last hidden states of both models "
                                 "(output_hidden_states), but one of them returned none.")  # fmt: skip
            student, teacher = student[-1], teacher[-1]
            if student.shape != teacher.shape:
                raise ValueError(
                    f"the teacher's last hidden state has shape {tuple(teacher.shape)} and the student's "
                    f"{tuple(student.shape)}; hidden_weight > 0 needs equal shapes (the same width)."
                )
            positions = student.shape[:-1]
            mask = distillation_mask(positions, labels, shift_labels, attention_mask, causal)
            token_labels = any(t is not None and t.shape == positions for t in (labels, shift_labels))
            mse = hidden_state_mse(student, teacher, mask, per_example=not token_labels)  # the task loss's items
            terms.append(config.hidden_weight * mse)
        return sum(terms[1:], terms[0])

    def _mean_weight(self, labels, shift_labels, num_items_in_batch, causal: bool) -> float | torch.Tensor:
        """Weight of a micro-batch mean added to the loss so that it counts once per optimizer step, like the task
        loss: 1 where Trainer divides the loss by the accumulation steps; where the loss is normalised over the
        accumulated batch instead, this micro-batch's share of the counted label positions (1 / accumulation steps
        without labels), times Trainer's factor for token averaging across devices."""
        if not self._loss_is_scaled(num_items_in_batch):
            return 1.0
        if num_items_in_batch is None or (labels is None and shift_labels is None):
            weight = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        else:
            weight = loss_item_share(labels, num_items_in_batch, causal, shift_labels)
        return weight * self._token_average_scale(num_items_in_batch)

    def _token_average_scale(self, num_items_in_batch) -> int:
        """What Trainer multiplies a loss by when it averages tokens across devices (1 otherwise)."""
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    def _loss_is_scaled(self, num_items_in_batch) -> bool:
        """Whether Trainer treats the loss as normalised over the accumulated batch (does not divide it)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return bool(scaled)

    def _trainer_divisor(self, num_items_in_batch) -> int:
        """What Trainer divides the reported micro-batch loss by (the accumulation steps when it is not scaled)."""
        if self._loss_is_scaled(num_items_in_batch):
            return 1
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _aux_weight(self, model, labels: torch.Tensor | None, num_items_in_batch) -> float | torch.Tensor:
        """Weight of the aux loss added to a loss Trainer computed itself, so it counts once per optimizer step.

        Mirrors Trainer: a loss it treats as already normalised over the accumulated batch (``compute_loss_func``,
        or a loss-kwargs model given ``num_items_in_batch``) is not divided by the accumulation steps, so the aux loss
        takes this micro-batch's share of the loss items (else 1 / accumulation steps); and where Trainer multiplies
        the loss by the number of processes (token averaging across devices), the aux loss is multiplied alike.
        """
        scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func
        if not scaled:
            return 1.0  # Trainer divides the whole loss by the accumulation steps
        if num_items_in_batch is None or labels is None:
            weight = 1.0 / self.args.gradient_accumulation_steps
        else:
            causal = getattr(self.accelerator.unwrap_model(model), "loss_type", None) == "ForCausalLM"
            weight = loss_item_share(labels, num_items_in_batch, causal)
        return weight * self._token_average_scale(num_items_in_batch)

    # -- resumable routing state ---------------------------------------------------------------------------------
    def _routing_state_file(self, folder: str) -> str:
        return os.path.join(folder, ROUTING_STATE_FILE.format(rank=self.args.process_index))

    def _save_rng_state(self, output_dir: str) -> None:
        """Trainer's RNG states plus, per MoE layer, the token-pair sampler's position (the similarity regulariser
        and the statistics draw from it) and the selection counts expert merging ranks by, so a resumed run
        continues bit for bit."""
        super()._save_rng_state(output_dir)
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "moe_blocks"):
            return
        state = {
            str(block.layer_idx): {"pair_draws": block.pair_draws, "selection_counts": block.selection_counts.tolist()}
            for block in model.moe_blocks()
        }
        atomic_write_text(self._routing_state_file(output_dir), json.dumps(state))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = self._routing_state_file(checkpoint)
        model = self.accelerator.unwrap_model(self.model)
        if not os.path.isfile(path) or not hasattr(model, "moe_blocks"):
            return
        restored = _read_routing_state(path, model)
        for block in model.moe_blocks():
            if block.layer_idx in restored:
                block.pair_draws, counts = restored[block.layer_idx]
                block.selection_counts.copy_(counts)

    # -- telemetry -----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._distillation_logs())
        if self.routing_logging != "none" and "loss" in logs:
            logs.update(self.routing_logs())
        super().log(logs, start_time)

    def _distillation_logs(self) -> dict[str, float]:
        """``distill_loss`` of the window since the last call, per optimizer step like ``loss`` (averaged over the
        ranks under DDP: every rank calls it), then reset; nothing when no distillation term was trained."""
        steps = self.state.global_step - self._distill_window_start
        if self._distill_sum is None or steps <= 0:
            return {}
        value = self._distill_sum / steps
        if _distributed():
            torch.distributed.all_reduce(value)
            value = value / torch.distributed.get_world_size()
        self._distill_sum = None
        return {"distill_loss": float(value)}

    def routing_logs(self) -> dict[str, float]:
        """The telemetry of the window since the last call (collective under DDP: every rank calls it), then reset."""
        logs: dict[str, float] = {}
        steps = self.state.global_step - self._aux_window_start
        if self._aux_sum is not None and steps > 0:
            aux = self._aux_sum / steps  # per optimizer step, as Trainer reports `loss`
            if _distributed():
                torch.distributed.all_reduce(aux)
                aux = aux / torch.distributed.get_world_size()
            logs["router_aux_loss"] = float(aux)
            self._aux_sum = None
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "moe_blocks"):
            return logs
        reduce_routing_statistics(model)
        statistics = model.routing_statistics(reset=True)
        flat = flatten_routing_statistics(statistics)
        logs.update(flat if self.routing_logging == "layers" else {k: v for k, v in flat.items() if "/layer_" not in k})
        self.routing_history.append(
            {
                "step": self.state.global_step,
                "tokens_per_expert": {layer: stats["tokens_per_expert"] for layer, stats in statistics.items()},
                **{k: v for k, v in logs.items() if not math.isnan(v)},
            }
        )
        return logs

    @contextlib.contextmanager
    def _statistics_paused(self):
        """Keep the forwards inside out of the training statistics window."""
        with statistics_paused(self.accelerator.unwrap_model(self.model)):
            yield

    def evaluate(self, *args, **kwargs):
        """Upstream ``evaluate``; evaluation forwards stay out of the training statistics window."""
        with self._statistics_paused():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        """Upstream ``predict``; prediction forwards stay out of the training statistics window."""
        with self._statistics_paused():
            return super().predict(*args, **kwargs)


__all__ = [
    "ROUTING_LOGGING",
    "CometTrainer",
    "align_loss_contract",
    "flatten_routing_statistics",
    "is_causal_lm",
    "reduce_routing_statistics",
]
