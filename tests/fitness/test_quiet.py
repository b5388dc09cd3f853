"""lm-eval's per-request chatter stays out of the log: a truncation warning is shown once per task."""

from __future__ import annotations

import logging

import pytest
import torch

from dfs_merge.fitness.lm_eval_glue import TRUNCATIONS
from dfs_merge.fitness.score import Fitness
from dfs_merge.genome import Route
from dfs_merge.stitch import stitch


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lm_eval_log():
    """The messages lm-eval's HFLM logs that get past the filters (a handler on its own logger: lm-eval may turn
    propagation to the root logger off)."""
    handler = _Collect()
    logger = logging.getLogger("lm_eval.models.huggingface")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def test_truncation_is_warned_once_per_task_not_per_candidate(tiny_pool, tiny_suite_dir, tmp_path, lm_eval_log):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # max_length 8: every multiple-choice request (query + choice) is longer, so each one is truncated
        fit = Fitness({"tiny_mc": 1.0}, suites=[tiny_suite_dir], max_length=8, cache_dir=tmp_path)
        TRUNCATIONS.reset()
        route = Route.parse(f"0:0-{tiny_pool.layers_per_source[0] - 1}")
        for _ in range(2):
            ev = fit.score(stitch(tiny_pool, route), tiny_pool.tokenizer)
            assert ev.ok, ev.error
    finally:
        torch.set_num_threads(threads)
    shown = [m for m in lm_eval_log if "Truncating" in m or "truncation" in m]
    assert len(shown) == 1, shown
    assert "task tiny_mc" in shown[0] and "shown once" in shown[0]
    assert TRUNCATIONS.counts["tiny_mc"] >= 2 * 6  # 6 documents x 4 choices per candidate, counted, not shown


def test_lm_eval_templates_are_compiled_once_and_render_as_before():
    import lm_eval.utils

    from dfs_merge.fitness.lm_eval_glue import compile_templates_once

    source = "{{question}} = {{answer | regex_replace('a', 'b')}}"
    doc = {"question": "2 + 2", "answer": "4a"}
    fresh = lm_eval.utils.env.from_string(source).render(**doc)
    compile_templates_once()
    compile_templates_once()  # once per process: a second call wraps nothing again
    first, again = lm_eval.utils.env.from_string(source), lm_eval.utils.env.from_string(source)
    assert first is again
    assert lm_eval.utils.apply_template(source, doc) == first.render(**doc) == fresh == "2 + 2 = 4b"
    assert lm_eval.utils.env.from_string("{{x}}", globals={"x": 1}).render() == "1"  # other calls pass through
