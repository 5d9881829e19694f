"""Bounds on what a user's input may make us allocate, checked before the work: the machine's memory
(`check_memory`). (The nesting depth of a user's JSON is bounded by `hf_comet.io.loads_json`.) Light: imports no
torch."""

from __future__ import annotations

import os

from .io import UserError


def total_memory() -> int | None:
    """The machine's total memory in bytes (``os.sysconf``, else ``/proc/meminfo``), ``None`` where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def format_bytes(size: float) -> str:
    """``17179869184`` -> ``"17.2 GB"``."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if size < 1000 or unit == "PB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} PB"  # pragma: no cover


def check_memory(needed: float, what: str, advice: str) -> None:
    """Refuse (`UserError`) work estimated to need ``needed`` bytes when that is more than the machine's total
    memory, with both numbers, ``what`` needs it and ``advice`` (what to lower). Unknown memory: no check."""
    memory = total_memory()
    if memory is not None and needed > memory:
        raise UserError(
            f"{what} needs about {format_bytes(needed)} of memory, more than this machine's {format_bytes(memory)}; "
            f"{advice}"
        )


__all__ = ["check_memory", "format_bytes", "total_memory"]
