"""A named table of specs, as in timm's model registry: register once, look up loudly, list for UIs, create.

A spec is a frozen dataclass with at least ``name`` and ``factory`` (core.enhance.registry.EnhancerSpec,
core.models.ClassifierSpec). ``create`` builds by name and lets the registry attach the spec to what it built,
so the spec travels with the object (``core.models.spec_of``).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, spec_type: Callable[..., T], attach: Callable[[Any, T], Any] | None = None):
        self.kind = kind
        self.spec_type = spec_type
        self.attach = attach  # (built object, spec) -> the object handed to the caller
        self._specs: dict[str, T] = {}

    def add(self, spec: T) -> T:
        name = spec.name
        if name in self._specs:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._specs[name] = spec
        return spec

    def register(self, name: str, description: str, **spec_fields) -> Callable[[Callable], Callable]:
        """A decorator: ``@registry.register(name, description, ...)`` over the factory; returns it unchanged."""
        def deco(factory: Callable) -> Callable:
            self.add(self.spec_type(name=name, factory=factory, description=description, **spec_fields))
            return factory

        return deco

    def names(self, pattern: str = "*") -> list[str]:
        return [n for n in self._specs if fnmatch.fnmatch(n, pattern)]

    def get(self, name: str) -> T:
        try:
            return self._specs[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._specs)}") from None

    def create(self, name: str, *args, **kwargs):
        """Build ``name`` with its factory (``None`` keyword arguments are dropped, so defaults apply)."""
        spec = self.get(name)
        built = spec.factory(*args, **{k: v for k, v in kwargs.items() if v is not None})
        return self.attach(built, spec) if self.attach else built
