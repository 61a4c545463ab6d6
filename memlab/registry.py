"""One small registry class shared by every extension point (mixers, tasks, KV policies)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a slug to a class; filled by the ``register`` decorator next to each class."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


def make_config(config_cls: type, owner: str, kwargs: dict[str, Any]) -> Any:
    """Build a dataclass config, turning unknown or missing keys into errors that name them."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown} for {owner}; expected a subset of {sorted(fields)}"
        )
    try:
        return config_cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise ValueError(f"bad config for {owner}: {exc}") from exc


def import_submodules(package: str, path: list[str], skip: set[str]) -> None:
    """Import every module of a package except ``skip``, so their ``register`` decorators run.

    Each registry's package calls this from its ``__init__``: adding a mechanism is adding a file.
    """
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(path):
        if mod.name not in skip and not mod.name.startswith("_"):
            importlib.import_module(f"{package}.{mod.name}")
