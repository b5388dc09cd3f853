"""Evaluation backends behind one interface: in-process, a local process pool, and Ray actors.

An `Evaluator` takes genomes and gives back `(key, Evaluation)` pairs in the order
the evaluations finish; the caller records each as it arrives. What a worker does
for one genome is a picklable callable `Genome -> Evaluation` (a "genome
evaluator"): by default `ModelEvaluator`, which loads the sources and builds the
fitness tasks once per process (`setup()`), then per genome checks it, stitches
the route and scores the model. Tests inject a cheap synthetic one. Genomes travel
to workers as plain dicts (`genome_to_dict`), evaluations come back as dicts.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from dfs_merge.candidate import CandidateScorer
from dfs_merge.config import RunConfig
from dfs_merge.errors import ConfigError, DfsMergeError
from dfs_merge.evaluation import Evaluation
from dfs_merge.genome import Genome, genome_from_dict, genome_to_dict

GenomeEvaluator = Callable[[Genome], Evaluation]


# ---- the work for one genome ------------------------------------------------------------
class ModelEvaluator:
    """The real per-genome work: sources and fitness built once per process, then check, stitch and score.

    After `setup()`, `pool`, `fitness` and `activation_cache` are the loaded sources, the built tasks and the
    prefix cache (None when off), and `scorer` the `CandidateScorer` over them."""

    def __init__(self, cfg: RunConfig, split: str = "dev", cache_dir: str | Path | None = None):
        self.cfg = cfg
        self.split = split
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.pool: Any = None
        self.fitness: Any = None
        self.activation_cache: Any = None
        self.blender: Any = None  # the resident model of parameter-space candidates, made on the first one

    def setup(self) -> None:
        """Load the sources and build the fitness tasks, once."""
        if os.environ.get(THREADS_ENV):
            import torch

            torch.set_num_threads(int(os.environ[THREADS_ENV]))
        if self.pool is None:
            from dfs_merge.models.sources import SourcePool

            self.pool = SourcePool.load(list(self.cfg.sources), self.cfg.device, self.cfg.dtype,
                                        self.cfg.trust_remote_code)
        if self.activation_cache is None and self.cfg.prefix_cache_mb > 0:
            from dfs_merge.stitch import ActivationCache

            self.activation_cache = ActivationCache(self.cfg.prefix_cache_mb)
        if self.fitness is None:
            from dfs_merge.fitness.score import Fitness

            kwargs = {"cache_dir": self.cache_dir} if self.cache_dir is not None else {}
            self.fitness = Fitness.from_config(self.cfg, split=self.split, **kwargs)

    @property
    def scorer(self) -> CandidateScorer:
        """Stitch-and-score over the loaded sources (loading them first if needed)."""
        self.setup()
        return CandidateScorer(self.pool, self.fitness, self.activation_cache, self.blender)

    def for_split(self, split: str) -> ModelEvaluator:
        """The same work on another split, sharing the loaded sources (a second copy is not loaded)."""
        other = ModelEvaluator(self.cfg, split, self.cache_dir)
        other.pool = self.pool
        other.activation_cache = self.activation_cache
        other.blender = self.blender
        return other

    def __call__(self, genome: Genome) -> Evaluation:
        scorer = self.scorer
        ev = scorer.genome(genome)
        self.blender = scorer.blender
        return ev

    def __getstate__(self) -> dict[str, Any]:
        # Loaded models and tasks stay in their process; a worker builds its own in setup().
        return {"cfg": self.cfg, "split": self.split, "cache_dir": self.cache_dir, "pool": None, "fitness": None,
                "activation_cache": None, "blender": None}


def setup_evaluator(fn: GenomeEvaluator) -> None:
    """Run a genome evaluator's one-time `setup()` where it has one."""
    setup = getattr(fn, "setup", None)
    if callable(setup):
        setup()


def evaluate_safely(fn: GenomeEvaluator, genome: Genome) -> Evaluation:
    """`fn(genome)`, with any exception turned into a failed Evaluation (WORST_SCORE, `error` set)."""
    start = time.perf_counter()
    try:
        ev = fn(genome)
        if not isinstance(ev, Evaluation):
            raise TypeError(f"the genome evaluator returned {type(ev).__name__}, not an Evaluation")
        return ev
    except Exception as err:  # noqa: BLE001 - one candidate's failure must not stop the run
        try:
            hops = len(genome.decode())
        except Exception:  # noqa: BLE001
            hops = 0
        return Evaluation.failed(f"{type(err).__name__}: {err}".splitlines()[0][:500], hops,
                                 time.perf_counter() - start)


def failed(genome: Genome, why: str) -> Evaluation:
    """A failed Evaluation for a genome whose worker died."""
    return Evaluation.failed(why, len(genome.decode()))


def worker_threads(cfg: RunConfig) -> int:
    """Torch threads per worker: `threads` if set, else the cores shared out among the workers."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // max(1, cfg.workers))


THREADS_ENV = "DFS_MERGE_THREADS"


def _set_threads(threads: int | None) -> None:
    """Limit torch's threads in this process without importing torch here (a synthetic evaluator never
    needs it): the environment is read when torch is imported, and `ModelEvaluator.setup` applies it."""
    if not threads:
        return
    for var in (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


# ---- the interface ----------------------------------------------------------------------
class Evaluator(ABC):
    """Evaluates genomes; results come back in completion order, each with the key of its genome."""

    @abstractmethod
    def submit(self, genomes: Sequence[Genome]) -> Iterator[tuple[str, Evaluation]]:
        """Evaluate `genomes` (distinct keys); yield `(genome.key(), Evaluation)` as each finishes."""

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        """Release workers."""

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessEvaluator(Evaluator):
    """Evaluates one genome after another in this process (the default)."""

    def __init__(self, fn: GenomeEvaluator, threads: int | None = None):
        self.fn = fn
        _set_threads(threads)
        setup_evaluator(fn)

    def submit(self, genomes: Sequence[Genome]) -> Iterator[tuple[str, Evaluation]]:
        for g in genomes:
            yield g.key(), evaluate_safely(self.fn, g)


# ---- a local process pool ---------------------------------------------------------------
_WORKER_FN: GenomeEvaluator | None = None
_WORKER_SETUP_ERROR: str | None = None
SETUP_ERROR = "__setup_error__"


def _init_pool_worker(fn: GenomeEvaluator, threads: int | None) -> None:
    """Process-pool initializer: set the thread count and build the evaluator's state once."""
    global _WORKER_FN, _WORKER_SETUP_ERROR
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # workers' bars would garble the run's own
    _set_threads(threads)
    _WORKER_FN = fn
    try:
        setup_evaluator(fn)
    except Exception as err:  # noqa: BLE001 - reported to the driver with the first result
        _WORKER_SETUP_ERROR = str(err) if isinstance(err, DfsMergeError) else f"{type(err).__name__}: {err}"


def _evaluate_dict(genome_dict: dict[str, Any]) -> dict[str, Any]:
    """Worker side: a genome dict in, an Evaluation dict out."""
    if _WORKER_SETUP_ERROR is not None or _WORKER_FN is None:
        return {SETUP_ERROR: _WORKER_SETUP_ERROR or "worker not initialised"}
    return _evaluate_in_worker(_WORKER_FN, genome_dict)


def _evaluate_in_worker(fn: GenomeEvaluator, genome_dict: dict[str, Any]) -> dict[str, Any]:
    try:
        genome = genome_from_dict(genome_dict)
    except Exception as err:  # noqa: BLE001
        return Evaluation.failed(f"{type(err).__name__}: {err}").to_dict()
    return evaluate_safely(fn, genome).to_dict()


def _from_worker(result: dict[str, Any]) -> Evaluation:
    """An Evaluation from a worker's dict; a worker that could not set up stops the run with its reason."""
    if SETUP_ERROR in result:
        raise DfsMergeError(f"evaluation worker could not start: {result[SETUP_ERROR]}")
    return Evaluation.from_dict(result)


class ProcessPoolEvaluator(Evaluator):
    """`workers` spawned processes, each loading the sources once (in the pool's initializer)."""

    def __init__(self, fn: GenomeEvaluator, workers: int, threads: int | None = None):
        self.fn = fn
        self.workers = workers
        self.threads = threads
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=get_context("spawn"),
                initializer=_init_pool_worker,
                initargs=(self.fn, self.threads),
            )
        return self._executor

    def submit(self, genomes: Sequence[Genome]) -> Iterator[tuple[str, Evaluation]]:
        pending: dict[Future, Genome] = {self._pool().submit(_evaluate_dict, genome_to_dict(g)): g for g in genomes}
        crashed: list[Genome] = []
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                g = pending.pop(fut)
                try:
                    ev = _from_worker(fut.result())
                except BrokenProcessPool:
                    crashed.append(g)
                    continue
                yield g.key(), ev
        if crashed:
            yield from self._retry_alone(crashed)

    def _retry_alone(self, genomes: list[Genome]) -> Iterator[tuple[str, Evaluation]]:
        """After a worker died, evaluate each affected genome on its own so that only the culprit fails;
        the pool is restarted only when it breaks again."""
        self._restart()
        for g in genomes:
            try:
                ev = _from_worker(self._pool().submit(_evaluate_dict, genome_to_dict(g)).result())
            except BrokenProcessPool:
                ev = failed(g, "worker process died while evaluating this genome")
                self._restart()
            yield g.key(), ev

    def _restart(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


# ---- Ray --------------------------------------------------------------------------------
class RayWorker:
    """A Ray actor's body: unpickles the genome evaluator (after extending sys.path) and sets it up once."""

    def __init__(self, payload: bytes, sys_path: list[str], threads: int | None):
        for p in reversed(sys_path):
            if p not in sys.path:
                sys.path.insert(0, p)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _set_threads(threads)
        self.setup_error: str | None = None
        self.fn: GenomeEvaluator = pickle.loads(payload)  # the driver's own object, sent to its own worker
        try:
            setup_evaluator(self.fn)
        except Exception as err:  # noqa: BLE001 - reported to the driver with the first result
            self.setup_error = str(err) if isinstance(err, DfsMergeError) else f"{type(err).__name__}: {err}"

    def evaluate(self, genome_dict: dict[str, Any]) -> dict[str, Any]:
        if self.setup_error is not None:
            return {SETUP_ERROR: self.setup_error}
        return _evaluate_in_worker(self.fn, genome_dict)


def import_ray() -> Any:
    """Import Ray, or explain in one line how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("ray: Ray is not installed; pip install 'dfs-merge[ray]'") from None
    return ray


class RayEvaluator(Evaluator):
    """`workers` Ray actors (one CPU each), each loading the sources once; `address`: auto | local | ADDRESS."""

    def __init__(self, fn: GenomeEvaluator, workers: int, address: str = "local", threads: int | None = None):
        ray = import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                if address == "local":
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except Exception as err:  # noqa: BLE001 - a cluster that cannot be reached is the user's setting
                raise ConfigError(f"ray: cannot start or reach Ray at {address!r} ({type(err).__name__}: {err})") from None
            self._started = True
        actor = ray.remote(num_cpus=1, max_restarts=2, max_task_retries=0)(RayWorker)
        payload = pickle.dumps(fn)
        self._actors = [actor.remote(payload, list(sys.path), threads) for _ in range(workers)]

    def submit(self, genomes: Sequence[Genome]) -> Iterator[tuple[str, Evaluation]]:
        ray = self._ray
        queue = list(genomes)[::-1]
        idle = list(self._actors)
        running: dict[Any, tuple[Genome, Any]] = {}
        while queue or running:
            while queue and idle:
                g, actor = queue.pop(), idle.pop()
                running[actor.evaluate.remote(genome_to_dict(g))] = (g, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                g, actor = running.pop(ref)
                idle.append(actor)
                try:
                    ev = _from_worker(ray.get(ref))
                except ray.exceptions.RayError as err:
                    ev = failed(g, f"ray worker failed: {type(err).__name__}")
                yield g.key(), ev

    def close(self) -> None:
        for a in self._actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        self._actors = []
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


def make_evaluator(cfg: RunConfig, fn: GenomeEvaluator) -> Evaluator:
    """The backend the config asks for: Ray if `ray:` is set, a process pool if `workers > 1`, else in-process."""
    if cfg.ray:
        return RayEvaluator(fn, cfg.workers, cfg.ray, worker_threads(cfg))
    if cfg.workers > 1:
        return ProcessPoolEvaluator(fn, cfg.workers, worker_threads(cfg))
    return InProcessEvaluator(fn, cfg.threads)


class LazyEvaluator(Evaluator):
    """The configured backend, started on first use, so that a finished run resumes without loading anything."""

    def __init__(self, cfg: RunConfig, fn: GenomeEvaluator):
        self.cfg = cfg
        self.fn = fn
        self.inner: Evaluator | None = None

    @property
    def started(self) -> bool:
        """Whether the backend was started."""
        return self.inner is not None

    def submit(self, genomes: Sequence[Genome]) -> Iterator[tuple[str, Evaluation]]:
        if not genomes:
            return iter(())
        if self.inner is None:
            self.inner = make_evaluator(self.cfg, self.fn)
        return self.inner.submit(genomes)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
