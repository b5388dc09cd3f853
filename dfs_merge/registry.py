"""Named classes of one pluggable kind (search algorithms, trackers), by name, without importing them.

A registry maps each name to where its class lives, `"module:Class"` (as lm-eval's lazy registry does), and
imports that module only when the class is looked up: the run config checks `algorithm:` and `tracking:`
against these tables without importing the search or a tracker's library. A class defined elsewhere (a
test, a plug-in) is added with `register`, and then the registry holds the class itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from dfs_merge.errors import ConfigError

if TYPE_CHECKING:
    from dfs_merge.search.algorithms import Algorithm
    from dfs_merge.search.tracking import Tracker


class Named(Protocol):
    """A registrable class: it says its own name."""

    name: ClassVar[str]


T = TypeVar("T", bound=Named)


class Registry(dict[str, "type[T] | str"], Generic[T]):
    """The classes of one kind by their `name`, each a class or its `"module:Class"` path; `key` is the config
    key that names one (`algorithm`)."""

    def __init__(self, key: str, kind: str, paths: dict[str, str]):
        super().__init__(paths)
        self.key = key
        self.kind = kind

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make `cls` available under its `name`."""
        self[cls.name] = cls
        return cls

    def unknown(self, name: Any) -> str:
        """The message for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; expected one of {', '.join(self)}"

    def lookup(self, name: str) -> type[T]:
        """The class registered under `name`, its module imported on first use; a ConfigError naming the known
        ones otherwise."""
        if name not in self:
            raise ConfigError(f"{self.key}: {self.unknown(name)}")
        entry = self[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self[name] = entry
        return entry


ALGORITHMS: Registry[Algorithm] = Registry("algorithm", "algorithm", {
    "ga": "dfs_merge.search.algorithms:GA",
    "nsga2": "dfs_merge.search.algorithms:NSGA2",
    "random": "dfs_merge.search.algorithms:RandomSearch",
    "cmaes": "dfs_merge.search.algorithms:CMAES",
})
"""The search algorithms (config `algorithm:`); a new one is a class in `search/algorithms.py` and its row here."""

TRACKERS: Registry[Tracker] = Registry("tracking", "tracker", {
    "wandb": "dfs_merge.search.tracking:WandbTracker",
    "mlflow": "dfs_merge.search.tracking:MlflowTracker",
})
"""The experiment trackers (config `tracking:`); a new one is a class in `search/tracking.py` and its row here."""
