"""`models.hub.cache_dir` finds the Hugging Face cache where huggingface_hub itself does, for every way the
environment can name it (huggingface_hub, run in a fresh interpreter per environment, is the reference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dfs_merge.models import hub

VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
# which of VARS each case sets (the rest unset); each set variable names a folder of its own
CASES = {
    "nothing (the home folder)": (),
    "XDG_CACHE_HOME": ("XDG_CACHE_HOME",),
    "HF_HOME over XDG_CACHE_HOME": ("HF_HOME", "XDG_CACHE_HOME"),
    "HUGGINGFACE_HUB_CACHE over HF_HOME": ("HUGGINGFACE_HUB_CACHE", "HF_HOME"),
    "HF_HUB_CACHE over everything": VARS,
}

REFERENCE = """\
import json
from huggingface_hub import constants
print(json.dumps(constants.HF_HUB_CACHE))
"""


def environment(case: tuple[str, ...], tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env["HOME"] = str(tmp_path / "home")
    env.update({var: str(tmp_path / var.lower()) for var in case})
    return env


@pytest.mark.parametrize("case", list(CASES))
def test_cache_dir_is_huggingface_hubs(case, tmp_path, monkeypatch):
    env = environment(CASES[case], tmp_path)
    done = subprocess.run([sys.executable, "-c", REFERENCE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = Path(json.loads(done.stdout))
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    for var in ("HOME", *CASES[case]):
        monkeypatch.setenv(var, env[var])
    assert hub.cache_dir() == theirs
    assert theirs.is_relative_to(tmp_path)  # every case names a folder of the test's own
