"""Search: the algorithms (ask / tell), the evaluation ledger, the backends, the run folder, the final choice."""

from dfs_merge import lazy_exports

__all__ = ["run_evolution", "RunResult"]
__getattr__ = lazy_exports(__name__, {"run_evolution": "evolution", "RunResult": "evolution"})
