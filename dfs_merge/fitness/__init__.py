"""Fitness: lm-eval tasks built once per process, then one candidate model scored on all of them."""

from dfs_merge import lazy_exports

__all__ = ["Fitness", "default_suites_dir"]
__getattr__ = lazy_exports(__name__, {"Fitness": "score", "default_suites_dir": "tasks"})
