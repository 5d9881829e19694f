"""Distillation from the dense model a converted one came from: the settings (`DistillationConfig`) and the loss terms
`CometTrainer` adds when it is given ``teacher_model=`` and ``distillation=``.

The loss of a training step is ``(1 - alpha) * task_loss + alpha * T^2 * KL(teacher_T || student_T)`` on the logits
(softened by the temperature ``T``; Hinton et al. 2015) plus ``hidden_weight * MSE`` of the last hidden states, with
the routers' aux losses kept at their own weight. Both terms average over the items the task loss counts: the
positions whose label is not ``-100`` (shifted for a causal LM) for token labels, else the examples (the hidden
states first over each example's real tokens, `distillation_mask`), and are weighted like the task loss under
gradient accumulation. Why these choices: docs/decisions.md, "Distilling from the dense model".
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DistillationConfig:
    """How `CometTrainer` distils a student from ``teacher_model``; checked when built.

    Args:
        alpha: weight of the logits' distillation term; the task loss gets ``1 - alpha``. ``0`` trains on the task
            loss alone, ``1`` on the teacher alone. In [0, 1].
        temperature: ``T`` softening both distributions; the KL term is multiplied by ``T^2`` so its gradients keep
            their size whatever ``T`` (Hinton et al.). Greater than 0.
        hidden_weight: weight of the mean squared error between the student's and the teacher's last hidden states
            (``output_hidden_states``; the two must have the same width, as a converted model has). ``0`` (default)
            skips it. 0 or more.

    With ``alpha=0`` and ``hidden_weight=0`` nothing is distilled: the teacher is not run and the loss is exactly
    `CometTrainer`'s own.
    """

    alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("alpha", "temperature", "hidden_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"DistillationConfig({name}={value!r}): {name} must be a number, not a "
                                f"{type(value).__name__}.")  # fmt: skip
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"DistillationConfig(alpha={self.alpha!r}): alpha weighs the distillation term against the task loss "
                "and must be in [0, 1] (0: task loss only, 1: teacher only)."
            )
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"DistillationConfig(temperature={self.temperature!r}): the temperature must be a finite number > 0 "
                "(1 keeps the distributions as they are; 2 to 4 is usual)."
            )
        if not (self.hidden_weight >= 0 and math.isfinite(self.hidden_weight)):
            raise ValueError(
                f"DistillationConfig(hidden_weight={self.hidden_weight!r}): the weight of the hidden-state term must "
                "be a finite number >= 0 (0 turns it off)."
            )

    @property
    def distils(self) -> bool:
        """Whether any term is trained (``alpha > 0`` or ``hidden_weight > 0``): otherwise the teacher is not run."""
        return self.alpha > 0 or self.hidden_weight > 0


def logits_size(model: torch.nn.Module) -> int | None:
    """The last dimension of ``model``'s logits, read without running it: the output embeddings' rows (a language
    model's vocabulary) or the config's ``num_labels`` (a classifier); ``None`` when neither can be read."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if callable(get_output_embeddings) else None
    if output is not None:
        size = getattr(output, "out_features", None)
        if size is None and isinstance(getattr(output, "weight", None), torch.Tensor):
            size = output.weight.shape[0]
        return None if size is None else int(size)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    return int(num_labels) if isinstance(num_labels, int) else None


def check_teacher(student: torch.nn.Module | None, teacher: Any) -> None:
    """Refuse a teacher that cannot teach ``student``, before any training: not a module, the student itself, or
    logits of another size (vocabulary or ``num_labels``), naming both sizes."""
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher_model must be a torch.nn.Module (e.g. the dense model loaded with an Auto class), "
                        f"not a {type(teacher).__name__}.")  # fmt: skip
    if student is None:
        return
    if teacher is student:
        raise ValueError("teacher_model is the model being trained; pass the dense model it was converted from.")
    student_size, teacher_size = logits_size(student), logits_size(teacher)
    if student_size is not None and teacher_size is not None and student_size != teacher_size:
        raise ValueError(
            f"the teacher's logits have {teacher_size} entries per position and the student's {student_size} "
            "(vocabulary size or num_labels); distillation compares them entry by entry, so both must be equal: "
            "use the dense model the student was converted from, with the same head."
        )


def distillation_mask(
    positions: torch.Size,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor | None:
    """Which of the ``positions`` (the logits' or hidden states' shape without its last dimension) count: those whose
    label is not ``-100`` when the labels have that shape (for a causal LM the label of the next position, as
    transformers' ``ForCausalLMLoss`` shifts them, or ``shift_labels`` as given), else the attention mask's real
    tokens; ``None``: every position counts (a classifier's one row per example, an image model)."""
    if shift_labels is not None and shift_labels.shape == positions:
        return shift_labels.ne(-100)
    if labels is not None and labels.shape == positions:
        if causal:
            return F.pad(labels[..., 1:], (0, 1), value=-100).ne(-100)
        return labels.ne(-100)
    if attention_mask is not None and attention_mask.shape == positions:
        return attention_mask.bool()
    return None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions ``mask`` keeps (0 when it keeps none)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.device)
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2`` times the mean over the counted positions of ``KL(softmax(teacher / T) || softmax(student / T))`` over
    the last dimension, in float32. Gradients flow into the student only if ``teacher_logits`` carries none."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    return temperature**2 * _masked_mean(kl, mask)


def hidden_state_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    per_example: bool = False,
) -> torch.Tensor:
    """Mean squared error of two hidden states ``(batch, positions, features)``, in float32, averaged over the
    features and the counted positions; ``per_example``: first over each example's counted positions, then over the
    examples, so that each example weighs the same whatever its length (as in a classifier's task loss)."""
    squared = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    if not per_example or squared.dim() < 2:
        return _masked_mean(squared, mask)
    if mask is None:
        return squared.mean()
    mask = mask.to(squared.device)
    per_row = torch.where(mask, squared, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)
    return per_row.mean()


NOT_FOR_THE_TEACHER = ("labels", "shift_labels", "num_items_in_batch", "output_router_logits", "return_dict")
"""Inputs of a training step that are the student's loss or routing arguments, never passed to the teacher."""


def teacher_inputs(teacher: torch.nn.Module, inputs: Mapping[str, Any], label_names=()) -> dict[str, Any]:
    """The model inputs of a training step for ``teacher``: without labels and loss arguments, and without keys its
    ``forward`` does not take (a stock dense model takes no routing arguments)."""
    dropped = set(NOT_FOR_THE_TEACHER) | set(label_names or ())
    kept = {k: v for k, v in inputs.items() if k not in dropped}
    parameters = inspect.signature(teacher.forward).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kept
    return {k: v for k, v in kept.items() if k in parameters}


__all__ = [
    "DistillationConfig",
    "check_teacher",
    "distillation_kl",
    "distillation_mask",
    "hidden_state_mse",
    "logits_size",
    "teacher_inputs",
]
