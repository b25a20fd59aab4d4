"""Name -> plugin registries for methods and datasets.

Built-in plugins register when their package is imported (``bench.methods`` and
``bench.datasets`` import every module explicitly); outside packages register through
the entry-point groups ``thyrobench.methods`` and ``thyrobench.datasets``, whose targets
are modules (or objects) that call the same ``register`` decorators on import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from bench.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """An unknown plugin name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """A dict of named plugins that loads built-ins and entry points on first use."""

    def __init__(self, kind: str, builtin_package: str, entry_point_group: str) -> None:
        self.kind = kind
        self._builtin_package = builtin_package
        self._group = entry_point_group
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, item: T) -> T:
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def decorator(self, name_of: Callable[[T], str]) -> Callable[[T], T]:
        def register(item: T) -> T:
            return self.register(name_of(item), item)

        return register

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtin_package)
        for ep in entry_points(group=self._group):
            try:
                ep.load()
            except Exception as err:  # a broken plugin must say which one it is
                raise ImportError(f"{self.kind} plugin entry point {ep.name!r} ({ep.value}) failed to load: {err}") from err

    def get(self, name: str) -> T:
        self.load()
        if name not in self._items:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}")
        return self._items[name]

    def names(self) -> list[str]:
        self.load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
