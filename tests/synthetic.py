"""Cheap synthetic fitnesses and fake sources for the evolution tests (no model is loaded).

`TargetRoute` scores a genome by how close its decoded route is to a known target
route (edit distance over hops, plus a small penalty for scales away from 1), so the
optimum is known (0.0). It is a picklable top-level class, so every evaluation
backend (in-process, process pool, Ray) can run it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dfs_merge.config import RunConfig
from dfs_merge.evaluation import Evaluation, TaskResult
from dfs_merge.genome import Genome, Route

QUIET = {"progress": False, "log": lambda *_: None}
"""`run_evolution` keyword arguments for a run that prints nothing."""
LAYERS = 4  # per fake source
TARGET = "0:0-1, 1:1-3, 0:2-3"  # 7 hops; reachable with 2 sources x 4 layers x 2 repeats


def write_fake_sources(folder: Path, n: int = 2, layers: int = LAYERS) -> list[str]:
    """Source folders holding only a Llama config.json: enough to lay out slots, never loaded."""
    out = []
    for i in range(n):
        d = folder / f"src{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 64,
        }))
        out.append(str(d))
    return out


def make_config(sources: list[str], out: Path, **kw: Any) -> RunConfig:
    """A run config over fake sources with small defaults (population 8, 6 generations)."""
    data: dict[str, Any] = {
        "sources": sources, "repeats": 2, "scaling": "slot", "tasks": {"synthetic": 1.0},
        "population": 8, "generations": 6, "seed": 0, "out": str(out),
    }
    data.update(kw)
    return RunConfig(**data)


def edit_distance(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Levenshtein distance between two hop sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def evals(out: Path) -> list[dict[str, Any]]:
    """The lines of a run's evals.jsonl."""
    return [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]


def assert_best_is_the_logged_best(out: Path) -> None:
    """best.genome.yaml is a genome with the top dev score of evals.jsonl, and records that score (for a run
    without a final choice on validation)."""
    import yaml

    from dfs_merge.genome_files import load_genome

    lines = [e for e in evals(out) if e["error"] is None]
    top = max(e["score"] for e in lines)
    best = out / "best.genome.yaml"
    assert load_genome(best).key() in {e["key"] for e in lines if e["score"] == top}, top
    assert yaml.safe_load(best.read_text())["scores"]["dev"]["score"] == top


def outcome(out: Path) -> tuple:
    """What must match between two runs that should be the same search: best genome file, evaluated keys,
    counters, history (without timings), final population, CMA-ES state."""
    state = json.loads((out / "checkpoint.json").read_text())
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in state["history"]]
    return ((out / "best.genome.yaml").read_text(), {e["key"] for e in evals(out)}, state["counters"], history,
            [e["key"] for e in state["population"]], state.get("cma"))


class TargetRoute:
    """Score = -(edit distance of the route's hops to TARGET) - 0.1 * sum |scale - 1|; optimum 0.

    `sleep` seconds per call; `fail_hops`: raise for routes of these lengths; `die_on_call`: SIGKILL this
    process at the start of that call (1-based), the fault injected from inside the work; `calls` lists the keys
    this object evaluated (in-process only).
    """

    def __init__(self, target: str = TARGET, sleep: float = 0.0, fail_hops: tuple[int, ...] = (),
                 die_on_call: int | None = None):
        self.target = [(h.source, h.layer) for h in Route.parse(target)]
        self.sleep = sleep
        self.fail_hops = tuple(fail_hops)
        self.die_on_call = die_on_call
        self.calls: list[str] = []

    def __call__(self, genome: Genome) -> Evaluation:
        route = genome.check()
        self.calls.append(route.key())
        if len(self.calls) == self.die_on_call:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sleep:
            time.sleep(self.sleep)
        if len(route) in self.fail_hops:
            raise RuntimeError(f"synthetic failure for a {len(route)}-hop route")
        hops = [(h.source, h.layer) for h in route]
        value = -float(edit_distance(hops, self.target)) - 0.1 * sum(abs(s - 1.0) for s in route.scales)
        task = TaskResult("synthetic", "neg_distance", value, True, 1, 0.0)
        return Evaluation(score=value, hops=len(route), tasks={"synthetic": task}, seconds=0.0)


class TargetRecipe:
    """Score = -(squared distance of a recipe's values to `target`, one value for every gene); optimum 0.
    `calls` lists the keys this object evaluated (in-process only); `sleep` seconds per call."""

    def __init__(self, target: float = 0.3, sleep: float = 0.0):
        self.target = target
        self.sleep = sleep
        self.calls: list[str] = []

    def __call__(self, recipe: Any) -> Evaluation:
        self.calls.append(recipe.key())
        if self.sleep:
            time.sleep(self.sleep)
        value = -sum((x - self.target) ** 2 for x in recipe.scales)
        task = TaskResult("synthetic", "neg_distance", value, True, 1, 0.0)
        return Evaluation(score=value, hops=recipe.layers, tasks={"synthetic": task}, seconds=0.0)


class Logged(TargetRoute):
    """TargetRoute that appends "key node pid CUDA_VISIBLE_DEVICES" to the file `log` as each call starts (one file
    shared by every worker of this machine; node: Ray's node id, or "local"). `kill_after`: the first call that
    finds more than that many lines in the log SIGKILLs its own worker process, once per run (the marker file
    `log`.killed holds the victim's key), so that the genome's retry succeeds. `hold`: (node id, n): the first
    call on that node that finds more than n lines in the log touches `log`.held and then waits (up to 10
    minutes) for its node to be taken away: a fault a test injects at a known point inside the work."""

    def __init__(self, log: Path, sleep: float = 0.0, kill_after: int | None = None, fail_hops: tuple[int, ...] = (),
                 hold: tuple[str, int] | None = None):
        super().__init__(sleep=sleep, fail_hops=fail_hops)
        self.log = str(log)
        self.kill_after = kill_after
        self.hold = hold
        self.parent = os.getpid()  # never kill the test process itself

    def __call__(self, genome: Genome) -> Evaluation:
        node = "local"
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            node = sys.modules["ray"].get_runtime_context().get_node_id()
        key = genome.key()
        with open(self.log, "a") as f:
            f.write(f"{key} {node} {os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\n")
        if self.kill_after is not None and os.getpid() != self.parent:
            if len(Path(self.log).read_text().splitlines()) > self.kill_after:
                try:
                    fd = os.open(self.log + ".killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, key.encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
        if self.hold is not None and node == self.hold[0] and len(Path(self.log).read_text().splitlines()) > self.hold[1]:
            Path(self.log + ".held").write_text(key)
            time.sleep(600)
        return super().__call__(genome)


def calls(log: Path) -> list[list[str]]:
    """A `Logged` call log: [key, node, pid, CUDA_VISIBLE_DEVICES] per call."""
    return [line.split() for line in Path(log).read_text().splitlines()] if Path(log).exists() else []


class NoisyDocs(TargetRoute):
    """A fitness over `docs` documents: each document's value is TargetRoute's value plus deterministic noise
    (Gaussian, sd `noise`, drawn from the genome's key and the document's index), the score their mean. The true
    ranking is TargetRoute's (up to the noise's finite-sample mean). Called with a race window `docs=(from, to)`
    it scores only those documents and returns their per-document results, as `Fitness.score` does; `windows`
    lists (key, first, last + 1) of every call, for counting documents."""

    def __init__(self, docs: int = 48, noise: float = 1.0, sleep: float = 0.0):
        super().__init__(sleep=sleep)
        self.docs = docs
        self.noise = noise
        self.windows: list[tuple[str, int, int]] = []

    def values(self, genome: Genome) -> list[float]:
        """Every document's value for `genome`."""
        import random

        mean = super().__call__(genome).score
        rng = random.Random(genome.key())
        return [mean + self.noise * rng.gauss(0.0, 1.0) for _ in range(self.docs)]

    def __call__(self, genome: Genome, docs: tuple[float, float] | None = None) -> Evaluation:
        from dfs_merge.fitness.score import prefix_size

        values = self.values(genome)
        window = range(self.docs) if docs is None else range(prefix_size(docs[0], self.docs),
                                                              prefix_size(docs[1], self.docs))
        self.windows.append((genome.key(), window.start, window.stop))
        items = [values[i] for i in window]
        mean = sum(items) / len(items)
        task = TaskResult("synthetic", "value", mean, True, len(items), 0.0)
        per_doc = None if docs is None else {"synthetic": {"aggregation": "mean", "start": window.start,
                                                           "total": self.docs, "items": items}}
        return Evaluation(mean, len(genome.check()), {"synthetic": task}, 0.0, per_doc=per_doc)
