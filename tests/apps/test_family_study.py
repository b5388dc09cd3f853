"""The family study's table arithmetic: blind baselines and accuracy by operation from per-document results."""

from __future__ import annotations

import pytest

from dfs_merge.apps import family_study as fs
from dfs_merge.evaluation import Evaluation, TaskResult

ROWS = [{"answer": "7", "op": "add", "a": 3, "b": 4}, {"answer": "1", "op": "sub", "a": 4, "b": 3},
        {"answer": "7", "op": "add", "a": 7, "b": 0}, {"answer": "2", "op": "sub", "a": 5, "b": 3}]


def test_blind_baselines_count_the_answers_that_read_no_j():
    got = fs.blind_baselines(ROWS)
    assert got["majority answer"] == 50.0  # "7" twice out of four
    assert got["always add the two operands"] == 50.0  # 3 + 4 and 7 + 0
    assert got["always subtract them"] == 75.0  # 4 - 3, 7 - 0, 5 - 3


def test_accuracy_by_operation_splits_the_per_document_results():
    task = "family_arith_jd_test"
    ev = Evaluation(0.5, 30, {task: TaskResult(task, "acc", 0.5, True, 4, 0.0)},
                    per_doc={task: {"aggregation": "mean", "start": 0, "total": 4, "items": [1, 0, 0, 1]}})
    assert fs.by_operation(ev, task, ROWS) == {"add": 50.0, "sub": 50.0}
    ev.per_doc[task]["items"] = [1, 1, 1, 0]
    assert fs.by_operation(ev, task, ROWS) == {"add": 100.0, "sub": 50.0}
    with pytest.raises(ValueError):  # items that are not the split's documents are refused, not misaligned
        ev.per_doc[task]["items"] = [1, 1, 1]
        fs.by_operation(ev, task, ROWS)


def test_the_committed_digit_target_has_both_operations_in_every_split():
    for split in ("dev", "val", "test"):
        rows = fs.problems(split)
        ops = {r["op"] for r in rows}
        assert ops == {"add", "sub"} and all(int(r["answer"]) == (r["a"] + r["b"] if r["op"] == "add"
                                                                  else r["a"] - r["b"]) for r in rows)


def test_an_unknown_search_is_one_line_and_exit_2_before_anything_is_loaded_or_written(tmp_path, capsys):
    out = tmp_path / "study"
    assert fs.main([str(out), "--searches=ps,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'nope' is not a search here; known: ps, dfs, hybrid" in err, err
    assert not out.exists()


def test_a_memoised_row_of_a_genome_is_keyed_by_its_sources_contents(tiny_source_dirs, tmp_path):
    """A hybrid's chosen route reads the same ("0:0-3") over another parameter-space merge: its memoised test row
    must not be reused for it, so a genome's row is keyed by its text and its sources' fingerprints."""
    import shutil

    from dfs_merge.genome import Genome, Route

    copy = shutil.copytree(tiny_source_dirs[0], tmp_path / "same")
    changed = shutil.copytree(tiny_source_dirs[0], tmp_path / "changed")
    (changed / "config.json").write_text((changed / "config.json").read_text().replace("{", '{"_edited": 1, ', 1))

    def row(source):
        genome = Genome.from_route(Route.parse("0:0-3"), [str(source)], [4], 1)
        return fs.Candidate("evolved hybrid", pool=None, genome=genome, text="0:0-3")

    assert row(tiny_source_dirs[0]).memo_key == row(copy).memo_key  # the same contents: reused
    assert row(changed).memo_key != row(tiny_source_dirs[0]).memo_key
    assert fs.Candidate("J", pool=None, text="").memo_key == ""  # a parent's row: its text, as before
