"""A name -> object registry whose misses list the close names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lathe.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Items register where they are defined; `get` explains a miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(
                f"{self.kind} {name!r} does not exist{did_you_mean(name, self._items)}; "
                f"known: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def values(self) -> list[T]:
        """The items in the order they registered."""
        return list(self._items.values())

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
