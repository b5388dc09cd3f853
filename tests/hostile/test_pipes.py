"""A reader that stops early (`dfs-merge show G | head -1`) ends the command quietly, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dfs_merge import CHECKOUT
from dfs_merge.cli import SIGPIPE_EXIT

GENOME = CHECKOUT / "genomes" / "smollm2-deepened.genome.yaml"


def dfs_merge_command() -> list[str]:
    script = Path(sys.executable).parent / "dfs-merge"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dfs_merge.cli"]


def test_show_into_a_closed_pipe_exits_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes anything: every write fails with EPIPE
    try:
        proc = subprocess.run([*dfs_merge_command(), "show", str(GENOME)], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=CHECKOUT)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    assert proc.returncode == SIGPIPE_EXIT


@pytest.mark.skipif(not Path("/bin/bash").exists() or not Path("/usr/bin/head").exists(), reason="needs bash, head")
def test_show_piped_into_head():
    command = " ".join([*dfs_merge_command(), "show", str(GENOME)])
    proc = subprocess.run(["/bin/bash", "-o", "pipefail", "-c", f"{command} | head -1"], capture_output=True,
                          text=True, timeout=120, cwd=CHECKOUT)
    assert proc.stdout == f"genome: {GENOME}\n"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, SIGPIPE_EXIT)  # 0 when head read everything before it exited


def test_show_into_an_open_pipe_still_succeeds():
    proc = subprocess.run([*dfs_merge_command(), "show", str(GENOME)], capture_output=True, text=True, timeout=120,
                          cwd=CHECKOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"genome: {GENOME}\n") and "route:" in proc.stdout
