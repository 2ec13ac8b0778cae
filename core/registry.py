"""A named table of specs, as in timm's model registry: register once, look up loudly, list for UIs."""

from __future__ import annotations

import fnmatch
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, T] = {}

    def add(self, name: str, spec: T) -> None:
        if name in self._specs:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._specs[name] = spec

    def register(self, name: str, make_spec: Callable[[Callable], T]) -> Callable[[Callable], Callable]:
        """A decorator that registers ``make_spec(fn)`` under ``name`` and returns ``fn`` unchanged."""
        def deco(fn: Callable) -> Callable:
            self.add(name, make_spec(fn))
            return fn

        return deco

    def names(self, pattern: str = "*") -> list[str]:
        return [n for n in self._specs if fnmatch.fnmatch(n, pattern)]

    def get(self, name: str) -> T:
        try:
            return self._specs[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._specs)}") from None
