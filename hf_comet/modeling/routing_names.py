"""The routing names a config needs, without torch: the router registry, the live name views and COMET's k.

`configuration_comet` imports this module instead of ``moe_routers`` (torch modules, transformers' modeling code), so
``import hf_comet`` and loading a config stay light. The registry fills itself from ``moe_routers`` the first time it
is read (the built-in routers register themselves on import), so every reader sees the built-in routers first and
then any added with `register_router`. Everything here stays importable from ``moe_routers`` too.

This file travels with saved checkpoints (``configuration_comet`` imports it): the standard library only. The
relative import of ``moe_routers`` below is written as an import statement so that transformers' remote-code loader
fetches ``moe_routers.py`` with the config.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .moe_routers import Router


def comet_num_active(keep_rate: float, num_units: int) -> int:
    """Units kept per token by COMET: ``k = max(1, floor(keep_rate * num_units))`` (Shaier et al., official code).

    A relative tolerance of 1e-9 guards the floor against binary rounding (``0.29 * 100 = 28.999...``).
    """
    return max(1, math.floor(keep_rate * num_units * (1 + 1e-9)))


class RouterRegistry(MutableMapping):
    """``config.routing`` value -> router class. Reading it first imports ``moe_routers`` (whose routers register
    themselves), so the built-in routers are always there and come first; writing never imports anything."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Router]] = {}
        self._loaded = False

    def load(self) -> None:
        """Import the built-in routers (once). Called by every read."""
        if self._loaded:
            return
        self._loaded = True  # moe_routers registers through us while it imports: never recurse
        try:
            from .moe_routers import Router  # noqa: F401  (registers the built-in routers)
        except BaseException:
            self._loaded = False
            raise

    def __getitem__(self, routing: str) -> type[Router]:
        self.load()
        return self._classes[routing]

    def __setitem__(self, routing: str, router_class: type[Router]) -> None:
        self._classes[routing] = router_class

    def __delitem__(self, routing: str) -> None:
        del self._classes[routing]

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(tuple(self._classes))

    def __len__(self) -> int:
        self.load()
        return len(self._classes)

    def __contains__(self, routing) -> bool:
        self.load()
        return routing in self._classes

    def __repr__(self) -> str:
        self.load()
        return f"{type(self).__name__}({self._classes!r})"


ROUTER_CLASSES = RouterRegistry()
"""``config.routing`` value -> router class (filled by `register_router`; the built-in ones on first read)."""


def register_router(router_class: type[Router]) -> type[Router]:
    """Add ``router_class`` to ``ROUTER_CLASSES`` under its ``routing`` name (usable as a class decorator)."""
    if not getattr(router_class, "routing", None):
        raise ValueError(f"{router_class.__name__} has no `routing` name.")
    ROUTER_CLASSES.load()  # the built-in routers first, whatever is registered before they are imported
    ROUTER_CLASSES[router_class.routing] = router_class
    return router_class


class RoutingNames(Sequence):
    """A live, read-only view of the registered routing names (optionally filtered), usable like a tuple."""

    def __init__(self, keep=lambda router_class: True):
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name, cls in ROUTER_CLASSES.items() if self._keep(cls))

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


ROUTINGS = RoutingNames()
"""Values accepted by ``config.routing``."""
LEARNED_ROUTINGS = RoutingNames(lambda cls: cls.has_trainable_gate)
"""Routings with a trainable gate over ``num_experts`` packed experts (everything except COMET)."""
MIXTURE_ROUTINGS = RoutingNames(lambda cls: "mixture_top_k" in cls.config_fields)
"""Routings that mix every expert by default (dense soft mixture); ``mixture_top_k`` makes them top-k."""

__all__ = [
    "LEARNED_ROUTINGS",
    "MIXTURE_ROUTINGS",
    "ROUTER_CLASSES",
    "ROUTINGS",
    "RouterRegistry",
    "RoutingNames",
    "comet_num_active",
    "register_router",
]
