"""The GPU check (`make gpu-check`, issue 18): the project's code paths on one GPU, sized for at most 8 minutes.

Two random-weight Mistral-7B-shaped sources in bf16 are built on the device (and saved, for mergekit and the
workers), then: the identity route's logits equal the source's; a repeated-layer route generates the same with
the KV cache as without (or parts only at a near-tie, as bf16 may); the bf16 export is verified; A (this project:
stitch + score) / B (mergekit write + load + score) / C (raw forwards) per candidate on 100 cloze documents; 1 vs
2 Ray workers sharing the GPU (`gpus_per_worker` 0.5). Results: bench/results/gpu.json.

`--tiny` runs the same steps scaled down on the CPU (tiny shapes, a few documents), so the script does not rot.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import RESULTS, machine, write_result

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))  # builders: the tokenizer and the HF folder writer

MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}


def build_sources(root: Path, shape: dict[str, Any], device: str, dtype: torch.dtype) -> list[Path]:
    """Two random Mistral-shaped models (seeds 0, 1) made on `device` in `dtype`, saved as HF folders."""
    from builders import build_tokenizer, save_source
    from transformers import MistralConfig, MistralForCausalLM

    tok = build_tokenizer()
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = MistralConfig(**{"vocab_size": len(tok), **shape}, tie_word_embeddings=False)
        with torch.device(device):
            model = MistralForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
        dirs.append(save_source(model, tok, root / f"source{seed}"))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return dirs


def check_generation(model: Any, ids: torch.Tensor, tol: float) -> dict[str, Any]:
    """Greedy generation with and without the cache: equal, or parted first at a near-tie (gap within `tol`)."""
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
        gaps = []
        for row in range(ids.shape[0]):
            differ = (cached[row] != uncached[row]).nonzero()
            if len(differ):
                t = int(differ[0])
                logits = model(uncached[row:row + 1, :t]).logits[0, -1].float()
                gaps.append(float((logits[uncached[row, t]] - logits[cached[row, t]]) / logits.abs().max()))
    return {"equal": bool(torch.equal(cached, uncached)), "near_tie_gaps": gaps,
            "ok": all(0 <= g <= tol for g in gaps)}


def ray_throughput(dirs: list[Path], device: str, dtype: str, limit: int, genomes: int, tmp: Path,
                   workers: int) -> dict[str, Any]:
    """Candidates per minute of `workers` Ray actors sharing the device (0.5 GPU each on cuda)."""
    import ray

    from dfs_merge.config import RunConfig
    from dfs_merge.search.backends import ModelEvaluator, RayEvaluator

    cfg = RunConfig(sources=[str(d) for d in dirs], repeats=2, tasks={"cloze_mc_dev": 1.0}, limit=limit,
                    device=device, dtype=dtype, out=str(tmp / "ray"), threads=1)
    from dfs_merge.genome import Genome, Route

    rng = random.Random(0)
    layers = _layers(dirs[0])
    routes: dict[str, None] = {}
    while len(routes) < workers + genomes:  # distinct routes ending on the base's last layer (pin_ends)
        a, b = rng.randint(0, layers - 2), rng.randint(0, layers - 2)
        routes[f"0:0-{a}, 1:{b}-{layers - 2}, 0:{layers - 1}"] = None
    gs = [Genome.from_route(Route.parse(r), cfg.sources, [layers, layers], 2) for r in routes]
    ray.init(num_cpus=max(2, workers), include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        with RayEvaluator(ModelEvaluator(cfg), workers, threads=1,
                          num_gpus=0.5 if device == "cuda" else 0.0) as ev:
            list(ev.submit(gs[:workers]))  # warm-up: every worker loads the sources
            t1 = time.perf_counter()
            results = dict(ev.submit(gs[workers:]))
            t2 = time.perf_counter()
            placed = [p["resources"] for p in ev.placements.values()]
    finally:
        ray.shutdown()
    n = len(results)
    return {"workers": workers, "candidates": n, "setup_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2),
            "per_minute": round(60 * n / (t2 - t1), 2) if n else None, "errors": sum(not e.ok for e in results.values()),
            "resources": placed}


def _layers(folder: Path) -> int:
    import json

    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, a few documents (CI)")
    ap.add_argument("--docs", type=int, default=None, help="cloze documents for A/B/C (default 100; --tiny 4)")
    ap.add_argument("--ray-genomes", type=int, default=None, help="candidates per Ray measurement (default 6; tiny 4)")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = ap.parse_args(argv)
    from bench_throughput import bench_task

    from dfs_merge.export.checkpoint import export_checkpoint
    from dfs_merge.export.verify import verify_tolerance
    from dfs_merge.genome import Genome, Hop, Route
    from dfs_merge.models.sources import SourcePool
    from dfs_merge.stitch import stitch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on a GPU machine, or with --tiny on the CPU", file=sys.stderr)
        return {}
    docs = args.docs or (4 if args.tiny else 100)
    ray_genomes = args.ray_genomes or (4 if args.tiny else 6)
    shape = TINY if args.tiny else MISTRAL_7B
    result: dict[str, Any] = {"machine": machine(), "tiny": args.tiny, "device": device, "shape": shape,
                              "dtype": "bfloat16"}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="dfs-gpu-check-"))
    try:
        t0 = time.perf_counter()
        dirs = build_sources(tmp, shape, device, torch.bfloat16)
        pool = SourcePool.load([str(d) for d in dirs], device, "bfloat16")
        result["build_s"] = round(time.perf_counter() - t0, 2)
        layers = pool.layers_per_source[0]
        identity = Route(tuple(Hop(0, i) for i in range(layers)))
        ids = torch.randint(3, pool.base.model.config.vocab_size, (2, 24),
                            generator=torch.Generator().manual_seed(0)).to(pool.device)
        with torch.no_grad():
            diff = float((stitch(pool, identity)(ids).logits - pool.base.model(ids).logits).abs().max())
        result["identity_max_abs_diff"] = diff
        half = layers // 2
        route = Route.parse(f"0:0-{half}, 1:{half - 1}-{layers - 1}, 0:{layers - 2}-{layers - 1}")
        result["route"] = route.text()
        result["generation"] = check_generation(stitch(pool, route), ids, verify_tolerance(torch.bfloat16))
        genome = Genome.from_route(route, [str(d) for d in dirs], [layers, layers], 2)
        t0 = time.perf_counter()
        export_checkpoint(pool, genome, tmp / "export")  # raises unless verified within the bf16 tolerance
        result["export"] = {"verified": True, "s": round(time.perf_counter() - t0, 2)}
        shutil.rmtree(tmp / "export")
        abc_args = argparse.Namespace(batch_size=8, mergekit_cli=False, no_b=False)
        result["abc"] = bench_task(pool, route, genome, "cloze_mc_dev", docs, abc_args, 1, tmp)
        del pool
        if device == "cuda":
            torch.cuda.empty_cache()
        result["ray"] = [ray_throughput(dirs, device, "bfloat16", min(docs, 20), ray_genomes, tmp, w) for w in (1, 2)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["total_s"] = round(time.perf_counter() - t_all, 2)
    result["ok"] = (result["identity_max_abs_diff"] == 0.0 and result["generation"]["ok"]
                    and all(r["errors"] == 0 for r in result["ray"]))
    write_result(args.out, result)
    print(f"gpu_check: {'ok' if result['ok'] else 'FAILED'} in {result['total_s']}s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
