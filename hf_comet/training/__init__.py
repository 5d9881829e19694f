"""Training beside Trainer: routing telemetry, expert-merging and Deep-MoE constraint callbacks, recipes and plots."""

from .callbacks import DeepConstraintCallback, ExpertMergingCallback, lift_deep_constraint
from .trainer import CometTrainer, flatten_routing_statistics, reduce_routing_statistics

__all__ = [
    "CometTrainer",
    "DeepConstraintCallback",
    "ExpertMergingCallback",
    "flatten_routing_statistics",
    "lift_deep_constraint",
    "reduce_routing_statistics",
]
