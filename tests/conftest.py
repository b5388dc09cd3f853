"""Shared test fixtures: tiny Llama sources written as HF folders, a loaded pool, a tiny eval suite.

Everything is built offline and deterministically:

- `tiny_tokenizer`: a byte-level BPE tokenizer (vocabulary 320) trained on a built-in text,
  wrapped as a `PreTrainedTokenizerFast` with `<s>` (bos, prepended like Llama's), `</s>`
  (eos) and `<pad>`. Byte-level, so any text encodes and decodes losslessly.
- `tiny_source_dirs`: two randomly initialised `LlamaForCausalLM` (hidden 48, 4 layers,
  same config, seeds 0 and 1) saved with safetensors, each with the tokenizer.
- `tiny_trained_dir`: the same shape, trained for a few seconds on the built-in text, for
  tests that need a model whose quality a broken route can measurably damage.
- `tiny_pool`: the two random sources loaded as a `SourcePool`.
- `tiny_suite_dir`: a folder of three lm-eval tasks over tiny local JSONL files
  (multiple choice, rolling perplexity, greedy generation), data paths relative to the
  YAMLs, like the bundled `eval_suites/`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import build_tokenizer, save_source, tiny_llama_config, train_briefly, write_tiny_suite


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny matrices run several times faster so on a busy 2-core machine
    (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny tokenizer (see `build_tokenizer`)."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_source_dirs(tmp_path_factory, tiny_tokenizer) -> list[Path]:
    """Two random tiny Llama sources (same config, seeds 0 and 1) as HF folders."""
    import torch
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_sources")
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer))).eval()
        dirs.append(save_source(model, tiny_tokenizer, root / f"source{seed}"))
    return dirs


@pytest.fixture(scope="session")
def tiny_trained_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama (same shape as the random sources) trained briefly on the built-in corpus."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is several times faster on a busy 2-core machine
    try:
        train_briefly(model, tiny_tokenizer)
    finally:
        torch.set_num_threads(threads)
    return save_source(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_trained") / "trained")


@pytest.fixture(scope="session")
def tiny_pool(tiny_source_dirs):
    """The two random tiny sources loaded as a `SourcePool` (float32, CPU)."""
    from dfs_merge.models.sources import SourcePool

    return SourcePool.load([str(p) for p in tiny_source_dirs])


@pytest.fixture(scope="session")
def tiny_suite_dir(tmp_path_factory) -> Path:
    """A suite folder with tasks tiny_mc (6 docs), tiny_ppl (4 docs), tiny_gen (5 docs, 2-shot)."""
    return write_tiny_suite(tmp_path_factory.mktemp("tiny_suite"))
