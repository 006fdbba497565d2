"""A name -> factory registry: adding an attack, drift, model or policy is one file plus one `register`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from permanence.errors import PermanenceError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._hints: dict[str, dict[str, float]] = {}

    def register(self, name: str, **hints: float) -> Callable[[T], T]:
        """`hints`: facts about an entry that schedulers may use (a policy's relative `cost`), never its results."""
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            self._hints[name] = dict(hints)
            return entry

        return add

    def hint(self, name: str, key: str, default: float) -> float:
        self.get(name)
        return self._hints[name].get(key, default)

    def get(self, name: str, field: str | None = None) -> T:
        try:
            return self._entries[name]
        except KeyError:
            where = field or self.kind
            raise PermanenceError(
                f"{where}: unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
