"""Training beside Trainer: routing telemetry, expert-merging, Deep-MoE constraint and keep-rate callbacks, recipes and
plots."""

from .callbacks import (
    DeepConstraintCallback,
    ExpertMergingCallback,
    KeepRateScheduleCallback,
    lift_deep_constraint,
    scheduled_keep_rate,
)
from .launch import SingleProcessLaunchWarning, launch_collapse_message, warn_if_launch_collapsed
from .trainer import CometTrainer, flatten_routing_statistics, reduce_routing_statistics

__all__ = [
    "CometTrainer",
    "DeepConstraintCallback",
    "ExpertMergingCallback",
    "KeepRateScheduleCallback",
    "SingleProcessLaunchWarning",
    "flatten_routing_statistics",
    "launch_collapse_message",
    "lift_deep_constraint",
    "reduce_routing_statistics",
    "scheduled_keep_rate",
    "warn_if_launch_collapsed",
]
