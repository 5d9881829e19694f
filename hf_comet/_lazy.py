"""Loading on first use: PEP 562 lazy exports (`lazy_exports`) and a hook run right after a module is imported
(`after_import`).

`lazy_exports` is used by ``hf_comet``, ``hf_comet.convert`` and ``hf_comet.training`` so that importing them imports
none of their (torch-heavy) submodules; ``from hf_comet.convert import convert_to_moe`` still works. `after_import`
lets the package plug things into ``modeling/`` (which travels with checkpoints and imports no hf_comet) when the
module loads, however it is imported, without importing it first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType
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


class _CallbackLoader(importlib.abc.Loader):
    """Runs the real loader, then the callbacks; everything else (source, file name) is the real loader's."""

    def __init__(self, loader: importlib.abc.Loader, callbacks: list[Callable[[ModuleType], None]]):
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for callback in self._callbacks:
            callback(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module it asks the other finders and wraps the loader they return."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CallbackLoader(spec.loader, self.callbacks[fullname])
                return spec
        return None


_FINDER = _AfterImportFinder()


def after_import(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` right after ``module_name`` is executed (now, if it already is): a post-import
    hook, so the package can complete a module it must not be imported by."""
    if module_name in sys.modules:
        callback(sys.modules[module_name])
        return
    _FINDER.callbacks.setdefault(module_name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


__all__ = ["after_import", "lazy_exports"]
