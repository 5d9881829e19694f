"""Trainer callbacks that act on routing state: expert merging (Park 2024), the Deep-MoE constraint phase and the
COMET keep-rate schedule."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback

from ..merging import MERGE_METHODS, merge_most_used_into_least_used, reset_merged_optimizer_state
from ..modeling.moe_routers import DeepMoEGate

logger = logging.getLogger(__name__)


class ExpertMergingCallback(TrainerCallback):
    """Merge the two most used experts into the least used one in every learned-gating layer (Park 2024), at
    epoch ends, at given optimizer steps (task boundaries), and/or every N optimizer steps, then reset the
    optimizer state of the overwritten expert slices (`hf_comet.reset_merged_optimizer_state`).

    Under DDP every rank runs the callback at the same step and the model sums the selection counts over ranks,
    so the replicas stay identical. ``history`` records each event: ``{"step", "merges": [(layer, (a, b), into)]}``.

    Args:
        every_n_steps: merge every N optimizer steps.
        at_steps: optimizer steps after which to merge (e.g. the ends of the tasks of a sequence).
        at_epoch_end: merge at the end of every epoch (the paper's per-task cadence when one epoch is one task).
        how: ``"mean"`` or ``"count_weighted"``.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        at_steps: Iterable[int] = (),
        at_epoch_end: bool = False,
        how: str = "mean",
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1 or None.")
        at_steps = sorted(set(at_steps))
        if any(step < 1 for step in at_steps):
            raise ValueError(f"at_steps={at_steps} must hold optimizer steps >= 1.")
        if every_n_steps is None and not at_steps and not at_epoch_end:
            raise ValueError("ExpertMergingCallback needs a trigger: every_n_steps, at_steps or at_epoch_end=True.")
        if how not in MERGE_METHODS:
            raise ValueError(f"how={how!r} is not a merge method; choose one of {', '.join(MERGE_METHODS)}.")
        self.every_n_steps = every_n_steps
        self.at_steps = set(at_steps)
        self.at_epoch_end = at_epoch_end
        self.how = how
        self.history: list[dict[str, Any]] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if step in self.at_steps or (self.every_n_steps and step % self.every_n_steps == 0):
            self.merge(model, optimizer, step)

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.at_epoch_end:
            self.merge(model, optimizer, state.global_step)

    def merge(self, model, optimizer, step: int) -> None:
        """Merge now and reset the optimizer state of the overwritten slices."""
        merges = merge_most_used_into_least_used(model, how=self.how)
        if optimizer is not None:
            reset_merged_optimizer_state(getattr(optimizer, "optimizer", optimizer), merges)
        event = {"step": step, "merges": [(m.layer_idx, m.sources, m.into) for m in merges]}
        self.history.append(event)
        logger.info("expert merging at step %d: %s", step, event["merges"])


def lift_deep_constraint(model) -> None:
    """End the Deep-MoE balancing-constraint phase in every ``deep`` layer of ``model`` now, for good."""
    for block in model.moe_blocks():
        if isinstance(block.router, DeepMoEGate):
            block.router.lift_constraint()


class DeepConstraintCallback(TrainerCallback):
    """Drive the Deep-MoE balancing-constraint phase (Eigen et al. 2013) by optimizer steps instead of forwards.

    On its own a ``deep`` router counts training forwards (micro-batches). With this callback the routers keep the
    constraint until ``constraint_steps`` optimizer steps (default: the config's ``deep_constraint_steps``) have
    passed, whatever the gradient accumulation, and then lift it for good.
    """

    def __init__(self, constraint_steps: int | None = None):
        if constraint_steps is not None and constraint_steps < 0:
            raise ValueError(f"constraint_steps={constraint_steps} must be >= 0 or None.")
        self.constraint_steps = constraint_steps
        self.lifted_at: int | None = None

    def _routers(self, model) -> list[DeepMoEGate]:
        return [b.router for b in model.moe_blocks() if isinstance(b.router, DeepMoEGate)]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        routers = self._routers(model)
        if not routers:
            raise ValueError("DeepConstraintCallback needs a model with routing='deep' layers.")
        if self.constraint_steps is None:
            self.constraint_steps = model.config.deep_constraint_steps
        if state.global_step >= self.constraint_steps:
            self._lift(model, state.global_step)
            return
        for router in routers:
            # From now on the optimizer step count, not the routers' forward count, ends the phase (also after a
            # resume, where the saved forward count may already exceed the config's steps under accumulation).
            router.driven_by_callback = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.lifted_at is None and state.global_step >= self.constraint_steps:
            self._lift(model, state.global_step)

    def _lift(self, model, step: int) -> None:
        for router in self._routers(model):
            router.lift_constraint()
        self.lifted_at = step


KEEP_RATE_SCHEDULES = ("cubic", "linear")


def scheduled_keep_rate(step: int, target: float, steps: int, start: float = 1.0, schedule: str = "cubic") -> float:
    """COMET's keep rate after ``step`` optimizer steps of a schedule from ``start`` to ``target`` over ``steps``.

    ``"cubic"`` is the gradual-pruning schedule of Zhu & Gupta (2017) applied to the kept fraction,
    ``keep = target + (start - target) * (1 - step / steps) ** 3``: it drops fast while the network can absorb it and
    slowly near the end; ``"linear"`` drops evenly. From ``steps`` on it stays at ``target``.
    """
    progress = min(max(step, 0) / steps, 1.0)
    remaining = 1.0 - progress
    return target + (start - target) * (remaining**3 if schedule == "cubic" else remaining)


class KeepRateScheduleCallback(TrainerCallback):
    """Anneal COMET's keep rate from ``start`` (default 1.0: exactly the dense FFN, so a converted dense checkpoint
    starts undamaged) to ``target`` over the first ``steps`` optimizer steps, unit or block level.

    The keep rate is set before every optimizer step from ``state.global_step`` (the same on every rank, and right
    again after a resume), and recorded in the config, so a checkpoint saved mid-schedule loads at the keep rate it
    was saved with. ``history`` holds ``(step, keep_rate, units or blocks kept)`` whenever k changes.

    Args:
        target: the keep rate at the end, in (0, 1] (default: the model's ``comet_keep_rate`` at train start).
        steps: optimizer steps the schedule takes (>= 1).
        start: the keep rate at step 0, in [target, 1].
        schedule: ``"cubic"`` (Zhu & Gupta 2017) or ``"linear"``; see `scheduled_keep_rate`.
    """

    def __init__(self, steps: int, target: float | None = None, start: float = 1.0, schedule: str = "cubic"):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} must be an integer >= 1.")
        if schedule not in KEEP_RATE_SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not a schedule; choose one of {', '.join(KEEP_RATE_SCHEDULES)}.")
        for name, value in (("target", target), ("start", start)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise ValueError(f"{name}={value!r} must be a number in (0, 1].")
        if target is not None and start < target:
            raise ValueError(f"start={start} is below target={target}; the schedule lowers the keep rate.")
        self.steps, self.target, self.start, self.schedule = steps, target, start, schedule
        self.history: list[tuple[int, float, int]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(model.config, "routing", None) != "comet":
            raise ValueError(
                "KeepRateScheduleCallback needs a model with routing='comet'; this one routes with "
                f"{getattr(model.config, 'routing', None)!r}."
            )
        if self.target is None:
            self.target = float(model.config.comet_keep_rate)
        if self.start < self.target:
            raise ValueError(f"start={self.start} is below the model's comet_keep_rate={self.target}.")
        self._apply(model, state.global_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._apply(model, state.global_step)

    def _apply(self, model, step: int) -> None:
        keep_rate = scheduled_keep_rate(step, self.target, self.steps, self.start, self.schedule)
        model.set_comet_keep_rate(keep_rate)
        kept = next(block.router.num_active for block in model.moe_blocks())
        if not self.history or self.history[-1][2] != kept:
            self.history.append((step, keep_rate, kept))
            logger.info("COMET keep rate %.4f at step %d (%d kept)", keep_rate, step, kept)


__all__ = [
    "KEEP_RATE_SCHEDULES",
    "DeepConstraintCallback",
    "ExpertMergingCallback",
    "KeepRateScheduleCallback",
    "lift_deep_constraint",
    "scheduled_keep_rate",
]
