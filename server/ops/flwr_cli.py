"""The ``flwr`` command line as fedsmm's launchers drive it: this environment's Flower console
scripts, the JSON object a ``--format json`` command prints, a run's status from ``flwr ls``, a
SuperNode key's registration, and waiting for a run to finish.

Why one home: ``smm simulate`` (``server.ops.simulate``), the loopback deployment
(``server.ops.loopback``: the deployment tests and the overhead benchmark), the docker registration
script (``docker/register_sites.py``) and the compose test drive the same CLI, with the same
quirks (flower.md 0.8-0.9): the JSON may come after a warning line, ``flwr run`` exits 0 even when
the run later fails (its status only ``flwr ls`` tells), and ``flwr supernode register`` fails while
the SuperLink is still starting.

``flwr`` below is any callable ``flwr(*args, timeout=seconds) -> subprocess.CompletedProcess`` that
runs the CLI with the caller's environment (its FLWR_HOME names the connections).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["FlwrCall", "RegistrationError", "strip_ansi", "executable", "cli_json", "run_status",
           "register_supernode", "wait_for_run"]

FlwrCall = Callable[..., subprocess.CompletedProcess]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class RegistrationError(RuntimeError):
    """``flwr supernode register`` did not succeed before its deadline; the message is Flower's."""


def strip_ansi(text: str) -> str:
    """``text`` without the terminal colour codes Flower's logs carry."""
    return _ANSI.sub("", text)


def executable(name: str) -> str:
    """A console script of this environment (next to the running interpreter), else from PATH: the
    SuperLink, SuperNodes and CLI must be the same flwr as the app's (pyproject.toml pins it)."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH; install flwr[simulation]")
    return found


def cli_json(out: str) -> dict:
    """The JSON object a ``flwr ... --format json`` printed (after any warning or log lines);
    ValueError when there is none."""
    start = out.find("{")
    if start < 0:
        raise ValueError(f"no JSON object in the flwr output: {strip_ansi(out)[-500:]!r}")
    return json.loads(out[start:])


def run_status(flwr: FlwrCall, connection: str, run_id: int | str) -> str | None:
    """The run's status (``pending``, ``running``, ``finished:completed``, ``finished:failed``, ...)
    from ``flwr ls CONNECTION --run-id ID --format json``; None when the SuperLink did not answer."""
    r = flwr("ls", connection, "--run-id", str(run_id), "--format", "json", timeout=60)
    try:
        runs = cli_json(r.stdout).get("runs") or []
    except ValueError:
        return None
    return str(runs[0].get("status", "")) if runs else None


def register_supernode(flwr: FlwrCall, public_key: Path, connection: str, name: str, wait_s: float = 60.0,
                       check: Callable[[], None] = lambda: None, every_s: float = 1.0) -> int:
    """Register a SuperNode's public key (``flwr supernode register``) under ``name``; its node id.

    Retried every ``every_s`` for up to ``wait_s`` while the SuperLink starts; ``check()`` runs
    before each try (e.g. raising when the SuperLink process has exited). RegistrationError with
    Flower's message after the deadline (a key registered already fails every time: Flower refuses
    a second registration)."""
    deadline = time.monotonic() + wait_s
    while True:
        check()
        r = flwr("supernode", "register", str(public_key), connection, "--name", name, "--format", "json",
                 timeout=120)
        try:
            out = cli_json(r.stdout)
        except ValueError:
            out = {}
        if r.returncode == 0 and out.get("success") is True:
            return int(out["node-id"])
        if time.monotonic() >= deadline:
            why = str(out.get("error-message") or r.stderr or r.stdout).strip()
            raise RegistrationError(f"{public_key} ({name}): {strip_ansi(why)[-500:]}")
        time.sleep(every_s)


def wait_for_run(flwr: FlwrCall, connection: str, run_id: int | str, timeout_s: float,
                 check: Callable[[], None] = lambda: None, poll_s: float = 10.0,
                 done: Callable[[], bool] = lambda: False) -> str:
    """Poll ``flwr ls`` until the run's status starts with ``finished:`` or ``timeout_s`` passes;
    the last status seen ("" when none was).

    ``check()`` runs every second (e.g. raising when a deployment's process has died). Each
    ``flwr ls`` is a Python process of a few CPU-seconds that competes with the run on a small
    machine, so it is asked every ``poll_s`` only, and at once when ``done()`` turns true (e.g. the
    run folder's final metrics appeared)."""
    status, deadline, last = "", time.monotonic() + timeout_s, -float("inf")
    while True:
        check()
        if done() or time.monotonic() - last >= poll_s:
            last = time.monotonic()
            status = run_status(flwr, connection, run_id) or status
            if status.startswith("finished:"):
                return status
        if time.monotonic() >= deadline:
            return status
        time.sleep(min(1.0, poll_s))
