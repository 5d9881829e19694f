"""PEP 562 lazy exports: a package lists which submodule defines each public name, and the name loads on first use.

Used by ``hf_comet``, ``hf_comet.modeling``, ``hf_comet.convert`` and ``hf_comet.training`` so that importing them
imports none of their (torch-heavy) submodules; ``from hf_comet.convert import convert_to_moe`` still works.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, names: dict[str, tuple[str, ...]], submodules: tuple[str, ...] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``: ``names`` maps a submodule (relative to ``package``) to
    the public names it defines; ``submodules`` are submodules importable as attributes (``package.submodule``)."""
    module_of = {name: module for module, module_names in names.items() for name in module_names}

    def __getattr__(name: str) -> Any:
        if name in module_of:
            value = getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        vars(sys.modules[package])[name] = value  # loaded once; later reads skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(module_of) | set(submodules))

    return __getattr__, __dir__, sorted(module_of)


__all__ = ["lazy_exports"]
