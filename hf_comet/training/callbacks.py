"""Trainer callbacks that act on routing state: expert merging (Park 2024), the Deep-MoE constraint phase and the
COMET keep-rate schedule."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

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


def scheduled_keep_rate(
    step: int, target: float, steps: int, start: float = 1.0, schedule: str = "cubic", levels: int | None = None
) -> float:
    """COMET's keep rate after ``step`` optimizer steps of a schedule from ``start`` to ``target`` over ``steps``.

    ``"cubic"`` is the gradual-pruning schedule of Zhu & Gupta (2017) applied to the kept fraction,
    ``keep = target + (start - target) * (1 - step / steps) ** 3``: it drops fast while the network can absorb it and
    slowly near the end; ``"linear"`` drops evenly. From ``steps`` on it stays at ``target``. With ``levels`` the
    value is rounded up to one of ``levels`` equal steps between ``target`` and ``start`` (``levels + 1`` values in
    all, ``start`` and ``target`` included).
    """
    progress = min(max(step, 0) / steps, 1.0)
    remaining = 1.0 - progress
    fraction = remaining**3 if schedule == "cubic" else remaining
    if levels is not None:
        fraction = math.ceil(fraction * levels - 1e-9) / levels
    return target + (start - target) * fraction


class KeepRateScheduleCallback(TrainerCallback, ExportableState):
    """Anneal COMET's keep rate from ``start`` (default 1.0: exactly the dense FFN, so a converted dense checkpoint
    starts undamaged) to ``target`` over the first ``steps`` optimizer steps, unit or block level.

    The keep rate is set before every optimizer step from ``state.global_step`` (the same on every rank, and right
    again after a resume), and recorded in the config, so a checkpoint saved mid-schedule loads at the keep rate it
    was saved with. ``history`` holds ``(step, keep_rate, units or blocks kept)`` whenever k changes.

    Every new k is a new shape for ``torch.compile``, which recompiles (8 times at most by default, then it refuses
    or falls back to eager), so by default the keep rate moves in ``levels=7`` equal steps: 8 values of k, start and
    target included. ``levels=None`` follows the schedule exactly (for eager training).

    With ``load_best_model_at_end`` the best checkpoint keeps the keep rate it was saved and evaluated with. The
    structured COMET router selects exactly by groups only where k fits a grouping (at keep 0.5: pairs); between
    those k it falls back to a top-k of its scores, so its masks change more between levels than the full router's.

    Args:
        steps: optimizer steps the schedule takes (>= 1).
        target: the keep rate at the end, in (0, 1]. Default: the target a schedule recorded in the model's config
            (`TARGET_ATTRIBUTE`, written while a schedule runs, so a checkpoint saved mid-schedule, resumed or
            reloaded, keeps heading to it), else the model's ``comet_keep_rate`` when training starts from step 0.
        start: the keep rate at step 0, in [target, 1].
        schedule: ``"cubic"`` (Zhu & Gupta 2017) or ``"linear"``; see `scheduled_keep_rate`.
        levels: how many equal steps the keep rate takes (``None``: every step's exact value).
    """

    def __init__(
        self,
        steps: int,
        target: float | None = None,
        start: float = 1.0,
        schedule: str = "cubic",
        levels: int | None = 7,
    ):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} must be an integer >= 1.")
        if schedule not in KEEP_RATE_SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not a schedule; choose one of {', '.join(KEEP_RATE_SCHEDULES)}.")
        if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 1):
            raise ValueError(f"levels={levels!r} must be an integer >= 1, or None.")
        for name, value in (("target", target), ("start", start)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise ValueError(f"{name}={value!r} must be a number in (0, 1].")
        if target is not None and start < target:
            raise ValueError(f"start={start} is below target={target}; the schedule lowers the keep rate.")
        self.steps, self.target, self.start, self.schedule, self.levels = steps, target, start, schedule, levels
        self.history: list[tuple[int, float, int]] = []

    def state(self) -> dict:
        """What a Trainer checkpoint stores (``restore_callback_states_from_checkpoint=True`` restores it): the
        schedule, with the target it resolved."""
        return {
            "args": {"steps": self.steps, "target": self.target, "start": self.start, "schedule": self.schedule,
                     "levels": self.levels},
            "attributes": {},
        }  # fmt: skip

    TARGET_ATTRIBUTE = "keep_rate_schedule_target"
    """The config attribute (saved in ``config.json``) holding the target of a schedule that has not finished: the
    config's ``comet_keep_rate`` is then the schedule's value at that step, not its end. Removed once it finishes."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(model.config, "routing", None) != "comet":
            raise ValueError(
                "KeepRateScheduleCallback needs a model with routing='comet'; this one routes with "
                f"{getattr(model.config, 'routing', None)!r}."
            )
        recorded = getattr(model.config, self.TARGET_ATTRIBUTE, None)
        if self.target is None and recorded is not None:
            if isinstance(recorded, bool) or not isinstance(recorded, (int, float)) or not 0 < recorded <= 1:
                raise ValueError(f"the model's config records {self.TARGET_ATTRIBUTE}={recorded!r}, not a keep rate "
                                 "in (0, 1]; pass target= or remove it from config.json.")  # fmt: skip
            self.target = float(recorded)
        if self.target is None:
            if state.global_step > 0:
                raise ValueError(
                    f"KeepRateScheduleCallback resumes at step {state.global_step} without a target: the model's "
                    f"comet_keep_rate ({model.config.comet_keep_rate}) is the schedule's value there, not its end. "
                    "Pass target=, or restore_callback_states_from_checkpoint=True in TrainingArguments."
                )
            self.target = float(model.config.comet_keep_rate)
        if self.start < self.target:
            raise ValueError(f"start={self.start} is below the model's comet_keep_rate={self.target}.")
        setattr(model.config, self.TARGET_ATTRIBUTE, self.target)  # every save before the end records it
        self._apply(model, state.global_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        saved = Path(best, "config.json") if best else None
        if saved is not None and saved.is_file():  # the best weights run at the keep rate they were evaluated at
            keep_rate = json.loads(saved.read_text()).get("comet_keep_rate", self.target)
            model.set_comet_keep_rate(keep_rate)
            logger.info("best checkpoint %s keeps its COMET keep rate %.4f", best, keep_rate)
            return
        self._apply(model, state.global_step)
        if state.global_step >= self.steps and hasattr(model.config, self.TARGET_ATTRIBUTE):
            delattr(model.config, self.TARGET_ATTRIBUTE)  # finished: comet_keep_rate is the target

    def _apply(self, model, step: int) -> None:
        keep_rate = scheduled_keep_rate(step, self.target, self.steps, self.start, self.schedule, self.levels)
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
