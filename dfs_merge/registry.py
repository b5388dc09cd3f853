"""Named classes of one pluggable kind (search algorithms, trackers): a registry each, filled by a decorator."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from dfs_merge.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, type[T]], Generic[T]):
    """The classes of one kind by their `name`; `key` is the config key that names one (`algorithm`)."""

    def __init__(self, key: str, kind: str):
        super().__init__()
        self.key = key
        self.kind = kind

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make `cls` available under its `name`."""
        self[cls.name] = cls  # type: ignore[attr-defined]
        return cls

    def unknown(self, name: Any) -> str:
        """The message for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; expected one of {', '.join(self)}"

    def lookup(self, name: str) -> type[T]:
        """The class registered under `name`; a ConfigError naming the known ones otherwise."""
        if name not in self:
            raise ConfigError(f"{self.key}: {self.unknown(name)}")
        return self[name]
