"""Start-up check: a run that was launched as several processes but trains as one process per copy.

Under ``torchrun`` or ``accelerate launch`` on a machine without GPUs, a plain ``Accelerator()`` does not join the
process group: Accelerate forms a gloo group only for ``Accelerator(cpu=True)`` or the environment variable
``ACCELERATE_USE_CPU=true`` (``PartialState._prepare_backend``), so each launched copy trains alone on the whole data
(``DistributedType.NO``, ``num_processes == 1``, ``gather`` returns one value) and nothing fails. Likewise
``accelerate launch --cpu --num_processes 2`` starts ONE process (its CPU launcher ignores ``num_processes`` without an
MPI hostfile). `warn_if_launch_collapsed` names both cases (docs/decisions.md, "Accelerate on CPU").
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

LAUNCHER_WORLD_SIZE_VARIABLES = (
    "WORLD_SIZE",  # torchrun, accelerate's multi-process launcher, deepspeed
    "LOCAL_WORLD_SIZE",  # torchrun
    "OMPI_COMM_WORLD_SIZE",  # Open MPI
    "PMI_SIZE",  # MPICH / Intel MPI
    "MV2_COMM_WORLD_SIZE",  # MVAPICH
)
"""Environment variables in which launchers announce how many processes they started."""

FIX = (
    "On a machine without GPUs, launch with ACCELERATE_USE_CPU=true (e.g. `ACCELERATE_USE_CPU=true accelerate launch "
    "--config_file recipes/accelerate_ddp_cpu.yaml script.py`, or the same before torchrun) or create "
    "Accelerator(cpu=True); TrainingArguments(use_cpu=True) does this for Trainer."
)


class SingleProcessLaunchWarning(UserWarning):
    """A multi-process launch ended up with one process per training copy."""


def launched_world_size(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """The first launcher variable of `LAUNCHER_WORLD_SIZE_VARIABLES` that says more than one process, and its
    value; ``None`` when none does. A value that is not an integer raises ``ValueError`` naming it."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_WORLD_SIZE_VARIABLES:
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer process count") from None
        if value > 1:
            return name, value
    return None


def launch_collapse_message(num_processes: int, environ: Mapping[str, str] | None = None) -> str | None:
    """Why this run trains as ``num_processes`` process(es) although it was launched as several, or ``None``.

    Args:
        num_processes: the number of processes the training library formed (``accelerator.num_processes``,
            ``PartialState().num_processes``, ``TrainingArguments.world_size``).
        environ: the environment to read (default ``os.environ``).
    """
    if num_processes != 1:
        return None
    environ = os.environ if environ is None else environ
    launched = launched_world_size(environ)
    if launched is not None:
        name, value = launched
        return (
            f"this process was launched as one of {value} ({name}={value}) but trains with num_processes=1: each "
            f"launched copy trains alone on all the data, gradients are not averaged and gather() returns one "
            f"value. {FIX}"
        )
    # accelerate's CPU ("simple") launcher: sets ACCELERATE_USE_CPU, and MASTER_PORT only when asked for >1 process
    if "ACCELERATE_USE_CPU" in environ and "MASTER_PORT" in environ and "RANK" not in environ:
        return (
            "`accelerate launch` started ONE process although more were asked for (MASTER_PORT is set, RANK is "
            "not): with --cpu or a MULTI_CPU config its CPU launcher ignores num_processes unless an MPI hostfile "
            "is given. Launch with `ACCELERATE_USE_CPU=true accelerate launch --config_file "
            "recipes/accelerate_ddp_cpu.yaml script.py` (a MULTI_GPU config, which also starts N ranks without GPUs)."
        )
    return None


def warn_if_launch_collapsed(num_processes: int, environ: Mapping[str, str] | None = None) -> bool:
    """Warn (`SingleProcessLaunchWarning`) when a multi-process launch ended up with ``num_processes == 1``.

    Call it once at start-up with what the training library formed, e.g.
    ``warn_if_launch_collapsed(accelerator.num_processes)``. `CometTrainer` calls it itself. Returns whether it
    warned.
    """
    message = launch_collapse_message(num_processes, environ)
    if message is None:
        return False
    warnings.warn(message, SingleProcessLaunchWarning, stacklevel=2)
    return True
