"""Name registries: methods, models and datasets are looked up by name.

The CLI and the benchmarks take their choices from these registries, so adding a method, model or
dataset is one decorated function, with no list to keep in sync elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from gradkit.errors import ConfigError

__all__ = ["Registry", "Entry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object with its name and a one-line description."""

    name: str
    obj: T
    help: str
    module: str = ""
    """The module that registered it: a worker process imports it to know the name too."""


class Registry(Generic[T]):
    """A mapping from names to objects, filled by the ``register`` decorator.

    Example:
        >>> MODELS: Registry[Callable] = Registry("model")
        >>> @MODELS.register("mlp", help="two hidden layers")
        ... def mlp(input_shape, num_classes): ...
        >>> MODELS.get("mlp") is mlp
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, help: str = "") -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; a name can be registered once."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            # Without help=, the first line of the docstring describes the entry.
            doc_lines = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            module = str(getattr(obj, "__module__", "") or "")
            self._entries[name] = Entry(name, obj, help or (doc_lines[0] if doc_lines else ""), module)
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            ConfigError: the name is unknown; the message lists the known names.
        """
        try:
            return self._entries[name].obj
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def module(self, name: str) -> str:
        """The module that registered ``name`` (``gradkit....`` for built-in entries)."""
        self.get(name)
        return self._entries[name].module

    def help(self, name: str) -> str:
        """The one-line description of ``name``."""
        self.get(name)
        return self._entries[name].help

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
