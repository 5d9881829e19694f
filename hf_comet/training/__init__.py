"""Training beside Trainer: routing telemetry, expert-merging and Deep-MoE constraint callbacks, recipes and plots."""

from .callbacks import DeepConstraintCallback, ExpertMergingCallback, lift_deep_constraint
from .launch import SingleProcessLaunchWarning, launch_collapse_message, warn_if_launch_collapsed
from .trainer import CometTrainer, flatten_routing_statistics, reduce_routing_statistics

__all__ = [
    "CometTrainer",
    "DeepConstraintCallback",
    "ExpertMergingCallback",
    "SingleProcessLaunchWarning",
    "flatten_routing_statistics",
    "launch_collapse_message",
    "lift_deep_constraint",
    "reduce_routing_statistics",
    "warn_if_launch_collapsed",
]
