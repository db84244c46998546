"""Where a benchmark number comes from: the machine, library versions and the commit.

Shared by every script in this folder, so all result files describe their runs the same way.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine(*modules: str) -> dict:
    """CPU, cores, memory, Python and torch, plus ``__version__`` of each named module."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    for name in modules:
        info[name] = getattr(importlib.import_module(name), "__version__", "unknown")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
