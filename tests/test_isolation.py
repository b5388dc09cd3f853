"""The suite writes only into its own temporary folders (tests/conftest.py): the home folder, the dfs-merge
cache, the Hugging Face and lm-eval caches all lie under the session's root; only the converted real models
are shared, through $DFS_MERGE_TEST_MODEL_CACHE. `.ci/run` checks the real home folder from outside."""

from __future__ import annotations

import os
from pathlib import Path

from dfs_merge.models import hub
from dfs_merge.models import store as ms

MODEL_CACHE_ENV = "DFS_MERGE_TEST_MODEL_CACHE"  # tests/conftest.py


def test_every_per_user_folder_is_under_the_sessions_root(test_home):
    assert Path.home() == test_home / "home" and Path("~").expanduser() == test_home / "home"
    assert ms.cache_root() == test_home / "dfs-merge-cache"
    assert hub.cache_dir() == test_home / "hf-home" / "hub"
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "HF_HOME"):
        assert Path(os.environ[var]).is_relative_to(test_home), var
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_lm_evals_dataset_cache_is_under_the_sessions_root(test_home):
    from dfs_merge.fitness.lm_eval_glue import offline_env

    root = offline_env()
    assert root == test_home / "dfs-merge-cache" / "lm-eval"
    for var in ("HF_DATASETS_CACHE", "LM_HARNESS_CACHE_PATH"):
        assert Path(os.environ[var]).is_relative_to(test_home), var


def test_only_the_converted_models_are_shared(test_home):
    models = ms.models_dir()
    assert models.is_symlink() and models.resolve() == Path(os.environ[MODEL_CACHE_ENV]).resolve()
    assert not Path(os.environ[MODEL_CACHE_ENV]).resolve().is_relative_to(Path(os.environ["HOME"]))
