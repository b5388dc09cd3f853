"""The zoo: world generator (deterministic, disjoint splits, no target item in training data),
suite files in sync, committed models loadable as a SourcePool with their recorded scores,
deterministic training, and a 2-generation evolution run over the committed zoo."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import yaml
from synthetic import assert_best_is_the_logged_best, evals

from dfs_merge.apps.zoo import family as zoo
from dfs_merge.apps.zoo import world

HAVE_ZOO = all((zoo.ZOO_DIR / n / "model.safetensors").is_file() for n in ("base", "j", "m"))
needs_zoo = pytest.mark.skipif(not HAVE_ZOO, reason="committed zoo weights missing (run `make zoo`)")

KINDS = ("e_story", "j_story", "parallel", "mixed", "e_arith")


@pytest.fixture(scope="module")
def splits() -> world.Splits:
    return world.make_splits()


def test_world_is_deterministic(splits):
    again = world.make_splits()
    assert again == splits
    for kind in KINDS:
        a = list(islice(world.stream(kind, 7, splits), 50))
        assert a == list(islice(world.stream(kind, 7, splits), 50))
        assert a != list(islice(world.stream(kind, 8, splits), 50))


def test_splits_are_disjoint_and_sized(splits):
    dev, test = set(splits.j_arith_dev), set(splits.j_arith_test)
    assert len(dev) == len(splits.j_arith_dev) >= 500 and len(test) == len(splits.j_arith_test) >= 500
    assert not dev & test
    e_dev, e_test = set(splits.e_arith_dev), set(splits.e_arith_test)
    assert not (e_dev & e_test) and not ((e_dev | e_test) & (dev | test))
    assert not set(splits.j_text_dev) & set(splits.j_text_test)
    # J problems: operands are J number words, the answer digits; every question has the answer cue.
    p = splits.j_arith_test[0]
    q = p.question("j").split()
    assert q[-2:] == ["kotae", ":"] and not any(w.isdigit() for w in q)
    assert 0 <= p.answer <= 2 * world.OPERAND_MAX


def test_no_held_out_item_or_j_problem_in_training_data(splits):
    j_questions = {p.question("j") for p in splits.held_out_problems()}
    e_questions = {p.question("e") for p in splits.held_out_problems()}
    held_texts = splits.held_out_texts()
    for kind in KINDS:
        for doc in islice(world.stream(kind, 0, splits), 1500):
            assert doc not in held_texts
            # A J problem needs the J answer cue right after a J question mark; no training text has it.
            assert "？ kotae :" not in doc, (kind, doc)
            if kind == "e_arith":
                assert doc.rsplit(" ", 1)[0] not in e_questions
            else:
                assert not any(q in doc for q in j_questions if q[:12] in doc)


def test_suite_files_match_the_generator(tmp_path):
    written = zoo.write_suites(tmp_path)
    for path in written:
        committed = zoo.SUITE_DIR / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} missing: run `python -m dfs_merge.apps.zoo suites`"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale"


def test_training_is_deterministic(tmp_path):
    a = zoo.train("base", tmp_path / "a", log=lambda _: None, steps=2)
    b = zoo.train("base", tmp_path / "b", log=lambda _: None, steps=2)
    assert zoo.weights_digest(a) == zoo.weights_digest(b)


@pytest.mark.slow  # scores the committed zoo models on their tasks
@needs_zoo
def test_committed_zoo_loads_as_a_source_pool_and_keeps_its_scores(splits):
    from dfs_merge.genome import Route
    from dfs_merge.models.sources import SourcePool
    from dfs_merge.stitch import stitch

    pool = SourcePool.load([str(zoo.ZOO_DIR / "j"), str(zoo.ZOO_DIR / "m")])
    assert pool.layers_per_source == (8, 8)
    recorded = json.loads((zoo.ZOO_DIR / "scores.json").read_text())
    tok = pool.tokenizer
    got = {
        "j": zoo.arith_accuracy(pool.sources[0].model, tok, splits.j_arith_dev, "j"),
        "m": zoo.arith_accuracy(pool.sources[1].model, tok, splits.j_arith_dev, "j"),
        "route": zoo.arith_accuracy(stitch(pool, Route.parse(zoo.HAND_ROUTE)), tok, splits.j_arith_dev, "j"),
    }
    for name, value in got.items():
        assert value == pytest.approx(recorded["dev"][name]["j_arith"], abs=1e-9), name


@needs_zoo
def test_two_generation_evolution_on_the_zoo(tmp_path):
    from dfs_merge.config import load_config
    from dfs_merge.search.evolution import run_evolution

    cfg = load_config(Path(zoo.ROOT / "genomes" / "zoo.yaml"), population=4, generations=2, limit=16,
                      report_tasks=[], out=str(tmp_path / "run"))
    r = run_evolution(cfg, progress=False, log=lambda *_: None)
    lines = evals(tmp_path / "run")
    assert r.evaluations == len(lines) and all(e["error"] is None for e in lines)
    assert_best_is_the_logged_best(tmp_path / "run")
    best = yaml.safe_load((tmp_path / "run" / "best.genome.yaml").read_text())
    assert {t["docs"] for t in best["scores"]["dev"]["tasks"].values()} == {16}  # limit: 16 documents a task
