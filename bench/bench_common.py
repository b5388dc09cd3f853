"""Small helpers shared by the bench scripts: the machine and its load, medians, writing a result file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

# Progress bars (mergekit's, transformers' weight loading) would garble the tables; tqdm and huggingface_hub read
# these when imported, so every bench script imports this module before torch, transformers or lm-eval.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is often shared: every figure carries them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """Where and when a figure was measured: date, CPU, cores, torch threads, accelerator, load now."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": loadavg(),
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def write_result(path: Path, data: dict[str, Any]) -> Path:
    """Write one result file as indented JSON (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
