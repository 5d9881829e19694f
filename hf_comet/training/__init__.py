"""Training beside Trainer: routing telemetry, distillation from the dense model, expert-merging, Deep-MoE constraint
and keep-rate callbacks, recipes and plots.

``import hf_comet.training`` imports none of its modules (``Trainer``, callbacks, plots); each name loads on first
use (PEP 562).
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports below only name what __getattr__ exports)

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "callbacks": (
            "DeepConstraintCallback",
            "ExpertMergingCallback",
            "KeepRateScheduleCallback",
            "lift_deep_constraint",
            "scheduled_keep_rate",
        ),
        "distillation": ("DistillationConfig",),
        "launch": ("SingleProcessLaunchWarning", "launch_collapse_message", "warn_if_launch_collapsed"),
        "trainer": ("CometTrainer", "flatten_routing_statistics", "reduce_routing_statistics"),
    },
)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` loads these
    from .callbacks import (
        DeepConstraintCallback,
        ExpertMergingCallback,
        KeepRateScheduleCallback,
        lift_deep_constraint,
        scheduled_keep_rate,
    )
    from .distillation import DistillationConfig
    from .launch import SingleProcessLaunchWarning, launch_collapse_message, warn_if_launch_collapsed
    from .trainer import CometTrainer, flatten_routing_statistics, reduce_routing_statistics
