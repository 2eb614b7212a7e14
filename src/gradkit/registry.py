"""Name registries: methods, models and datasets are looked up by name.

The CLI and the benchmarks take their choices from these registries, so adding a method, model or
dataset is one decorated function, with no list to keep in sync elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gradkit.errors import ConfigError

__all__ = ["Registry", "Entry", "import_object", "import_path_of", "is_import_path"]

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
        """The object registered as ``name``, or imported from ``"package.module:attribute"``.

        Raises:
            ConfigError: the name is unknown (the message lists the known names), or the import path
                does not lead to a callable (module not importable, attribute missing, not callable).
        """
        if is_import_path(name):
            return import_object(name, self.kind)  # type: ignore[return-value]
        try:
            return self._entries[name].obj
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def module(self, name: str) -> str:
        """The module that registered ``name`` (``gradkit....`` for built-in entries); for an import
        path ``"package.module:attribute"``, that module."""
        if is_import_path(name):
            return name.partition(":")[0]
        self.get(name)
        return self._entries[name].module

    def help(self, name: str) -> str:
        """The one-line description of ``name``."""
        if is_import_path(name):
            return ""
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


def is_import_path(name: object) -> bool:
    """Whether ``name`` is an import path ``"package.module:attribute"`` rather than a registered name."""
    return isinstance(name, str) and ":" in name


def import_object(path: str, kind: str = "object") -> Callable[..., Any]:
    """The callable at ``"package.module:attribute"`` (``attribute`` may be dotted: ``Class.method``).

    The module is imported with the current ``sys.path`` (a worker process gets its launcher's).

    Raises:
        ConfigError: one line naming the path: malformed, module not importable, attribute missing,
            or not callable.

    Example:
        >>> import_object("math:sqrt", "function")(4.0)
        2.0
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ConfigError(f"{kind} {path!r}: an import path must look like package.module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{kind} {path!r}: cannot import module {module_name!r} ({e}); "
                          "is its folder on sys.path (PYTHONPATH)?") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{kind} {path!r}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{kind} {path!r}: {attribute!r} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


def import_path_of(obj: object) -> str | None:
    """``"module:qualname"`` when importing that path gives back ``obj`` itself (a top-level function
    of an importable module), else None (a lambda, a local function, or one defined in ``__main__``)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    path = f"{module}:{qualname}"
    try:
        return path if import_object(path) is obj else None
    except ConfigError:
        return None
