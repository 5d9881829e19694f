"""The MoE config field reference (``docs/config.md``), generated from the `CometMoEConfigMixin` docstring.

The docstring's ``Args:`` section is the one place a field is documented; the table adds each field's dataclass
default. ``tests/test_docs.py`` checks that the docstring documents every dataclass field exactly once, in order,
and that ``docs/config.md`` holds this table verbatim. Print it with ``python -m hf_comet.config_reference``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from .modeling.configuration_comet import CometMoEConfigMixin

_ENTRY = re.compile(r"(\w+): (.*)")


def docstring_fields(cls: type = CometMoEConfigMixin) -> list[tuple[str, str]]:
    """``(name, text)`` of every entry of the ``Args:`` section of ``cls``'s docstring, in order (repeats kept, so a
    field documented twice shows), continuation lines joined by single spaces."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    indent = len(lines[start]) - len(lines[start].lstrip()) + 4
    entries: list[tuple[str, list[str]]] = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        if depth < indent:
            break
        match = _ENTRY.fullmatch(line.strip())
        if depth == indent and match:
            entries.append((match.group(1), [match.group(2)]))
        elif depth > indent and entries:
            entries[-1][1].append(line.strip())
        else:
            raise ValueError(f"{cls.__name__} docstring: cannot read Args line {line!r}")
    return [(name, " ".join(parts)) for name, parts in entries]


def field_defaults(cls: type = CometMoEConfigMixin) -> dict[str, Any]:
    """Every dataclass field of ``cls`` and its default, in declaration order."""
    return {field.name: field.default for field in dataclasses.fields(cls)}


def format_default(value: Any) -> str:
    """A default as it reads in Python, in a code span: ``"comet"``, ``None``, ``0.5``."""
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def _markdown(text: str) -> str:
    """Docstring markup -> markdown: ````x```` code spans become ```x```; ``|`` is escaped for the table."""
    return re.sub(r"``(.+?)``", r"`\1`", text).replace("|", "\\|")


def config_field_reference(cls: type = CometMoEConfigMixin) -> str:
    """The markdown table of every MoE config field: name, dataclass default, meaning (from the docstring)."""
    meanings = dict(docstring_fields(cls))
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name, default in field_defaults(cls).items():
        rows.append(f"| `{name}` | {format_default(default)} | {_markdown(meanings.get(name, ''))} |")
    return "\n".join(rows) + "\n"


__all__ = ["config_field_reference", "docstring_fields", "field_defaults", "format_default"]

if __name__ == "__main__":
    print(config_field_reference(), end="")
