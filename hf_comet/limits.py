"""Bounds on what a user's input may make us allocate or parse, checked before the work: the machine's memory
(`check_memory`) and the nesting depth of JSON (`loads_json`). Light: imports no torch."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .io import UserError

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in a user's JSON (config files, ``--set`` values, routing state):
real configs nest fewer than 10 levels; Python's parser recurses once per level (1,000 levels: a ``RecursionError``,
10,000: a crash)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (brackets inside strings do not count), without parsing."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def check_json_file_depth(path: str | os.PathLike, what: str) -> None:
    """Refuse (`UserError`) a JSON or JSON Lines file nested deeper than `MAX_JSON_DEPTH`, read line by line (a JSON
    string holds no raw newline, so lines split no string) before a parser sees it: Arrow's JSON reader crashes
    the process (a segmentation fault) on 10,000 levels."""
    depth = deepest = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            for bracket in _BRACKETS.findall(_STRING.sub("", line)):
                depth += 1 if bracket in "[{" else -1
                if depth > deepest:
                    deepest = depth
                    if deepest > MAX_JSON_DEPTH:
                        raise UserError(
                            f"{what} nests arrays/objects more than {MAX_JSON_DEPTH} levels deep; at most "
                            f"{MAX_JSON_DEPTH} are accepted."
                        )


def loads_json(text: str, what: str) -> Any:
    """``json.loads(text)``, refusing (`UserError` naming ``what`` and the limit) JSON nested deeper than
    `MAX_JSON_DEPTH` before parsing it; a ``json.JSONDecodeError`` passes through for the caller to word."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise UserError(f"{what} nests arrays/objects {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted.")
    return json.loads(text)


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


__all__ = ["MAX_JSON_DEPTH", "check_json_file_depth", "check_memory", "format_bytes", "json_depth", "loads_json", "total_memory"]
