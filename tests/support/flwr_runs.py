"""Following a run through the ``flwr`` CLI, for the tiers that deploy Flower (loopback, docker).

``flwr run`` exits 0 even when the run later fails (flower.md 0.9): the status comes from polling
``flwr ls <connection> --run-id <id> --format json`` until it starts with ``finished:``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

__all__ = ["cli_json", "wait_for_run"]


def cli_json(out: str) -> dict:
    """The JSON object a ``flwr ... --format json`` printed (after any log lines)."""
    start = out.find("{")
    assert start >= 0, out[-2000:]
    return json.loads(out[start:])


def wait_for_run(flwr: Callable[..., subprocess.CompletedProcess], connection: str, run_id: str, timeout_s: float,
                 check: Callable[[], None] = lambda: None, poll_s: float = 10.0) -> str:
    """Poll until the run's status starts with ``finished:`` or ``timeout_s`` passes; returns the
    last status seen. ``flwr(*args, timeout=...)`` runs the CLI; ``check()`` runs before every poll
    (e.g. asserting that the deployment's processes still live). ``poll_s``: each ``flwr ls``
    costs CPU-seconds the run needs on a small machine."""
    status, deadline = "", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check()
        r = flwr("ls", connection, "--run-id", run_id, "--format", "json", timeout=60)
        try:
            runs = cli_json(r.stdout).get("runs") or []
            status = str(runs[0].get("status", "")) if runs else status
        except (AssertionError, ValueError):
            pass
        if status.startswith("finished:"):
            break
        time.sleep(poll_s)
    return status
