"""Registries by name for methods, fusions, encoders and datasets (timm-style).

Recipes and the CLI pick parts by name; an unknown name raises a clear error listing what exists.
The first lookup also loads the plug-ins of installed packages (:mod:`modbal.plugins`).
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → factory table for one kind of part (e.g. ``"fusion"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a class or factory function under ``name``."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``; ``KeyError`` naming the allowed values otherwise."""
        _load_plugins()
        try:
            return self._factories[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; allowed values: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the part registered under ``name`` with keyword arguments."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        _load_plugins()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        _load_plugins()
        return name in self._factories


def _load_plugins() -> None:
    from .plugins import load_entry_points

    load_entry_points()


METHODS: Registry = Registry("method")
FUSIONS: Registry = Registry("fusion")
ENCODERS: Registry = Registry("encoder")
DATASETS: Registry = Registry("dataset")
