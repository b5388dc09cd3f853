"""Evaluation backends behind one interface: in-process, a local process pool, and Ray actors.

An `Evaluator` takes genomes and gives back `(key, Evaluation)` pairs in the order
the evaluations finish; the caller records each as it arrives. What a worker does
for one genome is a picklable callable `genome -> Evaluation` (a "genome
evaluator"): by default `ModelEvaluator`, which loads the sources and builds the
fitness tasks once per process (`setup()`), then per genome checks it, stitches
the route and scores the model. Tests inject a cheap synthetic one. Genomes travel
to workers as plain dicts (`genome_to_dict`), evaluations come back as dicts.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfs_merge.candidate import CandidateScorer, check_images
from dfs_merge.config import RunConfig
from dfs_merge.errors import ConfigError, DfsMergeError, one_line
from dfs_merge.evaluation import Evaluation
from dfs_merge.genome_files import CandidateGenome, genome_from_dict, genome_to_dict
from dfs_merge.network import check_reachable

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from dfs_merge.fitness.score import Fitness

GenomeEvaluator = Callable[..., Evaluation]
"""`fn(genome)` -> its Evaluation; with racing also `fn(genome, docs=(from, to))`: only that window of each task's
documents (fractions), with per-document results (`Fitness.score`)."""
Window = tuple[float, float] | None


# ---- the work for one genome ------------------------------------------------------------
class ModelEvaluator:
    """The real per-genome work: sources and fitness built once per process, then check, stitch and score.

    After `setup()`, `scorer` is the `CandidateScorer` over the loaded sources, the built tasks and the prefix
    cache (None when off); `shared` is the scorer whose sources, cache and resident model it reuses (`for_split`)."""

    def __init__(self, cfg: RunConfig, split: str = "dev", cache_dir: str | Path | None = None):
        self.cfg = cfg
        self.split = split
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.scorer: CandidateScorer | None = None
        self.shared: CandidateScorer | None = None
        self.fitness: Fitness | None = None  # the built tasks, before (or without) the sources: `documents`

    def setup(self) -> CandidateScorer:
        """Load the sources (unless shared) and build the fitness tasks, once; the scorer over them."""
        if os.environ.get(THREADS_ENV):
            import torch

            torch.set_num_threads(int(os.environ[THREADS_ENV]))
        if self.scorer is not None:
            return self.scorer
        shared = self.shared
        if shared is not None:
            pool, cache, blender = shared.pool, shared.activation_cache, shared.blender
        else:
            from dfs_merge.models.sources import SourcePool
            from dfs_merge.stitch import ActivationCache

            pool = SourcePool.load(list(self.cfg.sources), self.cfg.device, self.cfg.dtype, self.cfg.trust_remote_code)
            cache = ActivationCache(self.cfg.prefix_cache_mb) if self.cfg.prefix_cache_mb > 0 else None
            blender = None  # the resident model of parameter-space candidates, made on the first one
        fitness = self.tasks()
        check_images(pool, fitness)
        self.scorer = CandidateScorer(pool, fitness, cache, blender)
        return self.scorer

    def tasks(self) -> Fitness:
        """The fitness tasks of this split, built once in this process (no model is loaded for them)."""
        if self.fitness is None:
            from dfs_merge.fitness.score import Fitness

            kwargs = {"cache_dir": self.cache_dir} if self.cache_dir is not None else {}
            self.fitness = Fitness.from_config(self.cfg, split=self.split, **kwargs)
        return self.fitness

    def documents(self) -> dict[str, int] | None:
        """Each task's number of documents (`Fitness.documents`), for `racing: auto`."""
        return self.tasks().documents()

    def for_split(self, split: str) -> ModelEvaluator:
        """The same work on another split, sharing the loaded sources (a second copy is not loaded)."""
        other = ModelEvaluator(self.cfg, split, self.cache_dir)
        other.shared = self.scorer or self.shared
        return other

    def __call__(self, genome: CandidateGenome, docs: Window = None) -> Evaluation:
        return self.setup().genome(genome, docs)

    def __getstate__(self) -> dict[str, Any]:
        # Loaded models and tasks stay in their process; a worker builds its own in setup().
        return {"cfg": self.cfg, "split": self.split, "cache_dir": self.cache_dir, "scorer": None, "shared": None,
                "fitness": None}


def setup_evaluator(fn: GenomeEvaluator) -> None:
    """Run a genome evaluator's one-time `setup()` where it has one."""
    setup = getattr(fn, "setup", None)
    if callable(setup):
        setup()


def evaluate_safely(fn: GenomeEvaluator, genome: CandidateGenome, docs: Window = None) -> Evaluation:
    """`fn(genome)` (`fn(genome, docs=docs)` for a race window), with any exception turned into a failed
    Evaluation (WORST_SCORE, `error` set)."""
    start = time.perf_counter()
    try:
        ev = fn(genome) if docs is None else fn(genome, docs=docs)
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


def lost(genome: CandidateGenome, why: str) -> Evaluation:
    """The evaluation of a genome whose worker kept dying under it: an infrastructure fault, not a score
    (`Evaluation.lost`; the ledger neither logs nor remembers it)."""
    return Evaluation.lost(why, ev_hops(genome))


CUDA_ENV = "CUDA_VISIBLE_DEVICES"


def visible_gpus(count: int | None = None) -> list[str]:
    """The GPUs this process may hand to its workers, as CUDA_VISIBLE_DEVICES names them: that variable's entries
    when it is set, else 0..count-1. `count`: how many torch sees (None: ask torch; 0 without CUDA)."""
    if count is None:
        try:
            import torch

            count = torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - no usable CUDA: no GPU to hand out
            count = 0
    env = os.environ.get(CUDA_ENV)
    if env is not None:
        return [p.strip() for p in env.split(",") if p.strip()][:count]
    return [str(i) for i in range(count)]


def pool_gpus(cfg: RunConfig, gpu_count: int | None = None) -> list[str]:
    """The GPUs the local workers are spread over: none on cpu; with cuda (or auto), every visible one."""
    return [] if cfg.device == "cpu" else visible_gpus(gpu_count)


def worker_count(cfg: RunConfig, gpus: Sequence[str] = ()) -> int:
    """Local workers: `workers` if set, else one per GPU in `gpus`, else 1."""
    return cfg.workers or max(1, len(gpus))


def worker_threads(cfg: RunConfig, workers: int | None = None) -> int:
    """Torch threads per worker: `threads` if set, else the cores shared out among the workers."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // max(1, workers or cfg.workers or 1))


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
    def submit(self, genomes: Sequence[CandidateGenome], docs: Window = None) -> Iterator[tuple[str, Evaluation]]:
        """Evaluate `genomes` (distinct keys; on the race window `docs` where given, the same for all of them);
        yield `(genome.key(), Evaluation)` as each finishes."""

    def documents(self) -> dict[str, int] | None:
        """Each fitness task's number of documents where the genome evaluator can say without scoring (its
        `documents()`), else None: what `racing: auto` decides by."""
        documents = getattr(getattr(self, "fn", None), "documents", None)
        return documents() if callable(documents) else None

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

    def submit(self, genomes: Sequence[CandidateGenome], docs: Window = None) -> Iterator[tuple[str, Evaluation]]:
        for g in genomes:
            yield g.key(), evaluate_safely(self.fn, g, docs)


# ---- a local process pool ---------------------------------------------------------------
# Fault handling, common to the pool and Ray: a genome whose worker died (a killed or crashed process, a dead
# actor or node) is evaluated again on another worker; each death while it was in flight counts one try, and
# after `retries` + 1 of them it is lost for this generation: `lost()`, "infrastructure: ...", which the ledger
# neither logs to evals.jsonl nor remembers, so a resumed run (or a later generation that asks for it) evaluates
# it again. Only the candidate's own failure (an exception, NaN) is a failed evaluation, a score. A genome that
# reliably kills its worker (a segfault, the OOM killer) cannot be told from a worker killed under it, so it
# ends as lost too. A worker that cannot set up (load the sources) stops the run with one line naming it.
_WORKER_FN: GenomeEvaluator | None = None
_WORKER_SETUP_ERROR: str | None = None
_WORKER_NAME = "worker"
SETUP_ERROR = "__setup_error__"


def _init_pool_worker(payload: bytes, threads: int | None, slots: Queue[tuple[int, str | None]]) -> None:
    """Process-pool initializer: take this worker's slot (its number and GPU) from `slots`, set CUDA_VISIBLE_DEVICES
    and the thread count, then unpickle the genome evaluator and build its state once."""
    global _WORKER_FN, _WORKER_SETUP_ERROR, _WORKER_NAME
    try:
        index, gpu = slots.get(timeout=60)
    except queue_module.Empty:  # more processes than slots: never, as the pool starts at most `workers`
        index, gpu = "?", None
    if gpu is not None:
        os.environ[CUDA_ENV] = gpu  # before the evaluator (and torch's CUDA) is set up in this process
    _WORKER_NAME = f"worker {index} (pid {os.getpid()}{f', GPU {gpu}' if gpu is not None else ''})"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # workers' bars would garble the run's own
    _set_threads(threads)
    try:
        fn = pickle.loads(payload)  # the driver's own object, sent to its own worker
        _WORKER_FN = fn
        setup_evaluator(fn)
    except Exception as err:  # noqa: BLE001 - reported to the driver with the first result
        _WORKER_SETUP_ERROR = str(err) if isinstance(err, DfsMergeError) else f"{type(err).__name__}: {err}"


def _evaluate_dict(genome_dict: dict[str, Any], docs: Window = None) -> dict[str, Any]:
    """Worker side: a genome dict (and race window) in, an Evaluation dict out."""
    if _WORKER_SETUP_ERROR is not None or _WORKER_FN is None:
        return {SETUP_ERROR: _WORKER_SETUP_ERROR or "worker not initialised", "worker": _WORKER_NAME}
    return _evaluate_in_worker(_WORKER_FN, genome_dict, docs)


def _evaluate_in_worker(fn: GenomeEvaluator, genome_dict: dict[str, Any], docs: Window = None) -> dict[str, Any]:
    try:
        genome = genome_from_dict(genome_dict)
    except Exception as err:  # noqa: BLE001
        return Evaluation.failed(f"{type(err).__name__}: {err}").to_dict()
    return evaluate_safely(fn, genome, docs).to_dict()


def _from_worker(result: dict[str, Any]) -> Evaluation:
    """An Evaluation from a worker's dict; a worker that could not set up stops the run with its reason."""
    if SETUP_ERROR in result:
        who = result.get("worker") or "worker"
        raise DfsMergeError(f"evaluation {who} could not start: {' '.join(str(result[SETUP_ERROR]).split())}")
    return Evaluation.from_dict(result)


def _results(done: set[Future], pending: dict[Future, CandidateGenome],
             suspects: list[CandidateGenome]) -> Iterator[tuple[str, Evaluation]]:
    """The results of the `done` futures (each taken out of `pending`); a genome whose worker died goes to
    `suspects` instead."""
    for fut in done:
        g = pending.pop(fut)
        try:
            ev = _from_worker(fut.result())
        except BrokenProcessPool:
            suspects.append(g)
            continue
        yield g.key(), ev


class ProcessPoolEvaluator(Evaluator):
    """`workers` spawned processes, each loading the sources once (in the pool's initializer); with `gpus`,
    worker i sees only GPU `gpus[i % len(gpus)]` (CUDA_VISIBLE_DEVICES). At most `workers` genomes are in
    flight, so that a dead worker breaks (and sends back to the queue) only those."""

    def __init__(self, fn: GenomeEvaluator, workers: int, threads: int | None = None,
                 gpus: Sequence[str] = (), retries: int = 2):
        self.fn = fn
        self.workers = workers
        self.threads = threads
        self.gpus = list(gpus)
        self.retries = retries
        self.restarts = 0  # pool restarts after a worker died
        self.retried = 0  # evaluations sent again after their worker died
        self._executor: ProcessPoolExecutor | None = None

    def slots(self) -> list[tuple[int, str | None]]:
        """(worker number, its GPU or None) for each worker of a pool."""
        return [(i, self.gpus[i % len(self.gpus)] if self.gpus else None) for i in range(self.workers)]

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            ctx = get_context("spawn")
            slots = ctx.Queue()
            for slot in self.slots():
                slots.put(slot)
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=ctx,
                initializer=_init_pool_worker,
                initargs=(pickle.dumps(self.fn), self.threads, slots),
            )
        return self._executor

    def submit(self, genomes: Sequence[CandidateGenome], docs: Window = None) -> Iterator[tuple[str, Evaluation]]:
        queue = deque(genomes)
        tries: dict[str, int] = {}
        pending: dict[Future, CandidateGenome] = {}
        while queue or pending:
            broken = False
            while queue and len(pending) < self.workers:
                try:
                    fut = self._pool().submit(_evaluate_dict, genome_to_dict(queue[0]), docs)
                except BrokenProcessPool:
                    broken = True
                    break
                pending[fut] = queue.popleft()
            done = set() if broken else wait(pending, return_when=FIRST_COMPLETED)[0]
            suspects: list[CandidateGenome] = []
            yield from _results(done, pending, suspects)
            if not (broken or suspects):
                continue
            # A worker died: the pool is broken, and what is still in flight fails with it (or finished first).
            yield from _results(wait(pending)[0], pending, suspects)
            self._restart()
            yield from self._retry_alone(suspects, tries, docs)

    def _retry_alone(self, genomes: list[CandidateGenome], tries: dict[str, int],
                     docs: Window = None) -> Iterator[tuple[str, Evaluation]]:
        """After a worker died, evaluate each genome that was in flight on its own (in a fresh pool), so that a
        genome that kills its worker is found and charged; each death counts one try; more than `retries`: lost."""
        for g in genomes:
            k = g.key()
            while True:
                tries[k] = tries.get(k, 0) + 1
                if tries[k] > self.retries:
                    yield k, lost(g, f"worker process died while evaluating this genome ({tries[k]} times, "
                                     f"the last one alone)")
                    break
                self.retried += 1
                try:
                    ev = _from_worker(self._pool().submit(_evaluate_dict, genome_to_dict(g), docs).result())
                except BrokenProcessPool:
                    self._restart()
                    continue
                yield k, ev
                break

    def _restart(self) -> None:
        if self._executor is not None:
            self.restarts += 1
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


# ---- Ray --------------------------------------------------------------------------------
PLACEMENT_TIMEOUT_S = 600.0
"""How long a Ray run waits with no worker at all before it stops: no actor could be placed (or replaced)."""


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
        except Exception as err:  # noqa: BLE001 - reported to the driver by ready()
            self.setup_error = str(err) if isinstance(err, DfsMergeError) else f"{type(err).__name__}: {err}"

    def ready(self) -> dict[str, Any]:
        """Where this actor runs and what Ray gave it (node, pid, resources, CUDA_VISIBLE_DEVICES), and its
        setup error if any."""
        import ray

        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "pid": os.getpid(), "resources": ctx.get_assigned_resources(),
                "cuda_visible_devices": os.environ.get(CUDA_ENV), SETUP_ERROR: self.setup_error}

    def evaluate(self, genome_dict: dict[str, Any], docs: Window = None) -> dict[str, Any]:
        if self.setup_error is not None:
            return {SETUP_ERROR: self.setup_error}
        return _evaluate_in_worker(self.fn, genome_dict, docs)


def import_ray() -> Any:
    """Import Ray, or explain in one line how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("ray: Ray is not installed; pip install 'dfs-merge[ray]'") from None
    return ray


def ray_actor_options(threads: int | None, num_gpus: float = 0.0) -> dict[str, Any]:
    """What each evaluation actor asks Ray for: with GPUs (`device: cuda`), `num_gpus` (`gpus_per_worker`, a
    fraction shares a card) and one CPU; else as many CPUs as its torch threads. Ray does not restart it: a
    dead actor is replaced by a new one, and its genome is evaluated again elsewhere."""
    resources: dict[str, Any] = ({"num_cpus": 1, "num_gpus": float(num_gpus)} if num_gpus
                                 else {"num_cpus": max(1, threads or 1)})
    return {**resources, "max_restarts": 0, "max_task_retries": 0}


def check_ray_address(address: str) -> None:
    """Refuse, in one line and within `CONNECT_TIMEOUT_S`, a Ray address (`host:port`, `ray://...`; `auto` as
    RAY_ADDRESS names it) where nothing listens: `ray.init` itself would wait without end."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        check_reachable(address, f"ray: {address}", ConfigError)


class RayEvaluator(Evaluator):
    """`workers` Ray actors, each loading the sources once; `address`: auto | local | ADDRESS.

    Each actor asks for `ray_actor_options(threads, num_gpus)`; `workers` None: as many as the cluster's GPUs
    hold at `num_gpus` each, or 1 without GPUs. An actor is given work only once it is up (`ready`); one that
    died is replaced, and its genome goes back to the front of the queue (at most `retries` more times).
    `placements` maps each actor's name to where it runs and what Ray assigned it."""

    def __init__(self, fn: GenomeEvaluator, workers: int | None, address: str = "local", threads: int | None = None,
                 num_gpus: float = 0.0, retries: int = 2, placement_timeout: float = PLACEMENT_TIMEOUT_S):
        ray = import_ray()
        self._ray = ray
        self._started = False
        self.options = ray_actor_options(threads, num_gpus)
        if not ray.is_initialized():
            check_ray_address(address)
            try:
                if address == "local":
                    cpus = max(os.cpu_count() or 1, (workers or 1) * self.options["num_cpus"])
                    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except Exception as err:  # noqa: BLE001 - a cluster that cannot be reached is the user's setting
                raise ConfigError(f"ray: cannot start or reach Ray at {address!r} ({type(err).__name__}: {err})") from None
            self._started = True
        if workers is None:
            gpus = ray.cluster_resources().get("GPU", 0.0)
            workers = max(1, int(gpus / num_gpus + 1e-9)) if num_gpus else 1
        self.workers = workers
        self.retries = retries
        self.placement_timeout = placement_timeout
        self.retried = 0  # evaluations sent again after their actor died
        self.replaced = 0  # actors replaced after they died
        self.placements: dict[str, dict[str, Any]] = {}
        self._cls = ray.remote(**self.options)(RayWorker)
        self._payload = pickle.dumps(fn)
        self._sys_path = list(sys.path)
        self._threads = threads
        self._made = 0
        self._start_failures = 0
        self._actors: dict[str, Any] = {}  # every live (or starting) actor by name
        self._idle: list[str] = []
        self._starting: dict[Any, str] = {}  # ready() reference -> actor name
        for _ in range(workers):
            self._start()

    def _start(self) -> None:
        name = f"ray worker {self._made}"
        self._made += 1
        actor = self._cls.remote(self._payload, self._sys_path, self._threads)
        self._actors[name] = actor
        self._starting[actor.ready.remote()] = name

    def _drop(self, name: str) -> None:
        actor = self._actors.pop(name, None)
        if actor is not None:
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass

    def _replace(self, name: str) -> None:
        self._drop(name)
        self.replaced += 1
        self._start()

    def _on_ready(self, ref: Any) -> None:
        ray = self._ray
        name = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as err:
            if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed:
                raise DfsMergeError(f"evaluation {name} could not start: {one_line(err)}") from None
            self._drop(name)  # died before it was up (its node was lost): start another
            self._start_failures += 1
            if self._start_failures > (self.retries + 1) * self.workers:
                raise DfsMergeError(f"ray: evaluation workers keep dying before they are up "
                                    f"({self._start_failures} times; last: {one_line(err)})") from None
            self._start()
            return
        where = f"{name} (node {info['node'][:12]}, pid {info['pid']})"
        if info.get(SETUP_ERROR):
            raise DfsMergeError(f"evaluation {where} could not start: {' '.join(str(info[SETUP_ERROR]).split())}")
        self.placements[name] = info
        self._idle.append(name)

    def wait_ready(self, timeout: float | None = None) -> int:
        """Wait (at most `timeout` s) until every actor being started is up; returns how many are up."""
        if self._starting:
            done, _ = self._ray.wait(list(self._starting), num_returns=len(self._starting), timeout=timeout)
            for ref in done:
                self._on_ready(ref)
        return len(self._idle)

    def submit(self, genomes: Sequence[CandidateGenome], docs: Window = None) -> Iterator[tuple[str, Evaluation]]:
        ray = self._ray
        queue = deque(genomes)
        tries: dict[str, int] = {}
        running: dict[Any, tuple[CandidateGenome, str]] = {}
        while queue or running:
            while queue and self._idle:
                g, name = queue.popleft(), self._idle.pop()
                running[self._actors[name].evaluate.remote(genome_to_dict(g), docs)] = (g, name)
            timeout = None if running else self.placement_timeout
            done, _ = ray.wait([*running, *self._starting], num_returns=1, timeout=timeout)
            if not done:
                raise DfsMergeError(f"ray: no evaluation worker could be placed in {self.placement_timeout:.0f} s "
                                    f"(each asks for {self.options}; available: {ray.available_resources()})")
            for ref in done:
                if ref in self._starting:
                    self._on_ready(ref)
                    continue
                g, name = running.pop(ref)
                try:
                    ev = _from_worker(ray.get(ref))
                except ray.exceptions.RayTaskError as err:  # the call itself raised in a live actor: not a fault
                    ev = Evaluation.failed(f"ray worker failed: {type(err).__name__}", ev_hops(g))
                except ray.exceptions.RayError as err:  # the actor, its worker process or its node died
                    self._replace(name)
                    k = g.key()
                    tries[k] = tries.get(k, 0) + 1
                    if tries[k] > self.retries:
                        yield k, lost(g, f"{name} died while evaluating this genome ({tries[k]} times; last: "
                                         f"{type(err).__name__})")
                    else:
                        self.retried += 1
                        queue.appendleft(g)
                    continue
                self._idle.append(name)
                yield g.key(), ev

    def close(self) -> None:
        for name in list(self._actors):
            self._drop(name)
        self._idle, self._starting = [], {}
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


def ev_hops(genome: CandidateGenome) -> int:
    """The hop count of a genome's route (0 when it does not decode)."""
    try:
        return len(genome.decode())
    except Exception:  # noqa: BLE001
        return 0


def make_evaluator(cfg: RunConfig, fn: GenomeEvaluator, gpu_count: int | None = None) -> Evaluator:
    """The backend the config asks for: Ray if `ray:` is set, a process pool if there is more than one local
    worker (`workers`, or with device cuda one per visible GPU), else in-process. `gpu_count` replaces torch's
    count of the visible GPUs (tests)."""
    retries = cfg.infrastructure_retries
    if cfg.ray:
        num_gpus = cfg.gpus_per_worker if cfg.device == "cuda" else 0.0
        return RayEvaluator(fn, cfg.workers, cfg.ray, worker_threads(cfg), num_gpus=num_gpus, retries=retries)
    gpus = pool_gpus(cfg, gpu_count)
    workers = worker_count(cfg, gpus)
    if workers > 1:
        return ProcessPoolEvaluator(fn, workers, worker_threads(cfg, workers), gpus=gpus, retries=retries)
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

    def submit(self, genomes: Sequence[CandidateGenome], docs: Window = None) -> Iterator[tuple[str, Evaluation]]:
        if not genomes:
            return iter(())
        if self.inner is None:
            self.inner = make_evaluator(self.cfg, self.fn)
        return self.inner.submit(genomes, docs)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
