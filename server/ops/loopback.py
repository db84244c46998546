"""A real Flower deployment on this machine's loopback: the processes a hospital network runs, here
side by side, for the deployment tests (tests/deployment) and the overhead benchmark
(benchmarks/federation_overhead.py).

``Processes`` starts each process in its own session with a private FLWR_HOME and its own log,
remembers its whole process tree by PID (``ProcessTracker``), signals or kills one tree (the fault
tests' site crash) and stops everything by PID, never by name (also on failure).

``LoopbackFederation`` is one federation on it, the way docs/deployment guides a coordinator:
credentials (``server.ops.certs``: a CA, the SuperLink's certificate for localhost/127.0.0.1, one
key pair per SuperNode), a ``flower-superlink`` with TLS, ``--enable-supernode-auth`` and SQLite
state (``--database``, so a restarted SuperLink keeps its runs and nodes), the keys registered with
``flwr supernode register``, one ``flower-supernode`` per site folder (``--node-config
site-dir=...``), a ``flwr`` CLI connection with the CA, and runs submitted with ``flwr run`` and
followed with ``flwr ls`` (``server.ops.flwr_cli``). Which app and config are run is the caller's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from server.ops.certs import write_credentials
from server.ops.flwr_cli import cli_json, executable, register_supernode, run_status, strip_ansi, wait_for_run
from server.ops.simulate import ProcessTracker, flwr_env, free_port, pids_with_env, stop_process_trees

__all__ = ["CONNECTION", "DeploymentError", "poll", "cmdline", "Processes", "LoopbackFederation"]

#: The connection name in the CLI's private FLWR_HOME/config.toml.
CONNECTION = "loopback"
#: The names the SuperLink's certificate is valid for: what SuperNodes and the CLI dial here.
LOOPBACK_HOSTS = "localhost,127.0.0.1"

T = TypeVar("T")


class DeploymentError(RuntimeError):
    """A deployment process exited, or a CLI step failed; the message holds the logs' tails."""


def poll(cond: Callable[[], T], timeout_s: float, every_s: float = 0.5, what: str = "condition") -> T:
    """``cond()``'s first truthy value, asked every ``every_s``; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def cmdline(pid: int) -> str:
    """A live process's command line ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Processes:
    """Every process started for one deployment, each in its own session, tracked by PID.

    ``base/homes/<name>`` is each process's FLWR_HOME, ``base/logs/<name>.log`` its output (a restart
    under the same name appends to the same log, after a header line)."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}  # the latest process started under each name
        self.trees: dict[str, ProcessTracker] = {}  # ... and its process tree
        self.started: list[subprocess.Popen] = []  # every process ever started (restarts too)
        self.trackers: list[ProcessTracker] = []
        self.homes: list[Path] = []
        self.logs: dict[str, Path] = {}
        self._files: list = []

    def home(self, name: str) -> Path:
        """``name``'s private FLWR_HOME (created; stop() also kills whatever carries it)."""
        h = self.base / "homes" / name
        h.mkdir(parents=True, exist_ok=True)
        if h not in self.homes:
            self.homes.append(h)
        return h

    def start(self, name: str, cmd: Sequence[str], home: Path, extra_env: Mapping[str, str] | None = None
              ) -> subprocess.Popen:
        """Start ``cmd`` as ``name`` with ``flwr_env(home)`` plus ``extra_env``."""
        log = self.base / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        f = log.open("a")
        f.write(f"\n=== {time.strftime('%H:%M:%S')} start {name} ===\n")
        f.flush()
        self._files.append(f)
        p = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env={**flwr_env(home), **(extra_env or {})},
                             cwd=str(self.base), start_new_session=True)
        self.procs[name], self.logs[name] = p, log
        self.started.append(p)
        self.trees[name] = ProcessTracker(p.pid)
        self.trackers.append(self.trees[name])
        self.sample()
        return p

    def sample(self) -> None:
        """Remember the processes each tree has now (a child seen once is stopped even if orphaned)."""
        for t in self.trackers:
            t.sample()

    def log(self, name: str, tail: int = 3000) -> str:
        """The last ``tail`` characters of ``name``'s log, without colour codes."""
        return strip_ansi(self.logs[name].read_text(errors="replace"))[-tail:]

    def check_alive(self, names: Sequence[str] | None = None) -> None:
        """DeploymentError with its log when a process named (default: every one) has exited."""
        for name in names if names is not None else list(self.procs):
            p = self.procs[name]
            if p.poll() is not None:
                raise DeploymentError(f"{name} exited ({p.returncode}):\n{self.log(name)}")

    def alive(self, name: str) -> list[int]:
        self.trees[name].sample()
        return self.trees[name].alive()

    def send_signal(self, name: str, sig: int) -> list[int]:
        """Send ``sig`` to every live process of ``name``'s tree (the whole site machine, say); returns them."""
        pids = self.alive(name)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return pids

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout_s: float = 30.0) -> None:
        """``sig`` to ``name``'s whole tree; returns once none of it is alive (SIGKILL after ``timeout_s``)."""
        self.send_signal(name, sig)
        if sig == signal.SIGTERM:
            self.send_signal(name, signal.SIGCONT)  # a stopped process would not act on it
        try:
            poll(lambda: not self.trees[name].alive(), timeout_s, 0.1, f"{name} to exit")
        except TimeoutError:
            self.send_signal(name, signal.SIGKILL)
            poll(lambda: not self.trees[name].alive(), 10.0, 0.1, f"{name} to exit after SIGKILL")
        try:
            self.procs[name].wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, grace_s: float = 15.0) -> list[int]:
        """Stop everything started here by PID (``stop_process_trees``: SIGTERM, then SIGKILL, also to
        anything carrying one of the private FLWR_HOMEs), close the logs; returns the PIDs still alive."""
        left = stop_process_trees(self.started, self.trackers, self.homes, grace_s)
        for f in self._files:
            f.close()
        self._files.clear()
        return left


class LoopbackFederation:
    """One TLS + SuperNode-authentication federation of the site folders ``sites`` on ``procs``.

    Sites are numbered 1..len(sites); ``supernode-k`` runs site k with key ``supernode-k`` (``keys``
    key pairs are made, at least one per site: a test may start a SuperNode with a key never
    registered); ``node_ids[k]`` is the id site k's registration got. ``supernode_env``: extra
    environment of every SuperNode (and so of its ClientApps), e.g. torch's thread caps."""

    def __init__(self, procs: Processes, base: Path, sites: Sequence[Path], keys: int | None = None,
                 supernode_env: Mapping[str, str] | None = None, connection: str = CONNECTION):
        if not sites:
            raise ValueError("a federation needs at least one site folder")
        self.procs, self.base, self.connection = procs, base, connection
        self.sites = [Path(s).resolve() for s in sites]
        self.certs = write_credentials(base / "certs", max(keys or 0, len(self.sites)), LOOPBACK_HOSTS)
        self.ca = self.certs.ca_crt.resolve()
        self.supernode_env = dict(supernode_env or {})
        self.port = free_port()
        self.db = base / "state.db"
        self.node_ids: dict[int, int] = {}
        self.cli_home = procs.home("cli")
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.ca}"\n')
        self.cli_env = flwr_env(self.cli_home)

    # -- processes

    def start_superlink(self) -> subprocess.Popen:
        """The SuperLink (TLS, node auth, SQLite state in ``self.db``); a restart reuses port and database."""
        return self.procs.start("superlink", [
            executable("flower-superlink"), "--ssl-ca-certfile", str(self.ca),
            "--ssl-certfile", str(self.certs.server_pem), "--ssl-keyfile", str(self.certs.server_key),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.db),
            "--disable-runtime-dependency-installation"], self.procs.home("superlink"))

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI on this federation's connection (its private FLWR_HOME)."""
        r = subprocess.run([executable("flwr"), *args], env=self.cli_env, cwd=str(self.base), capture_output=True,
                           text=True, timeout=timeout)
        self.procs.sample()
        return r

    def register(self, k: int, wait_s: float = 60.0) -> int:
        """Register ``supernode-k``'s public key (retried while the SuperLink starts); its node id."""
        self.node_ids[k] = register_supernode(
            self.flwr, self.certs.supernode_pub(k), self.connection, f"site-{k}", wait_s,
            check=lambda: self.procs.check_alive(["superlink"]))
        return self.node_ids[k]

    def start_supernode(self, k: int, key: int | None = None, name: str | None = None) -> subprocess.Popen:
        """``supernode-k`` (or ``name``) for site k with key ``supernode-<key or k>``."""
        name = name or f"supernode-{k}"
        return self.procs.start(name, [
            executable("flower-supernode"), "--root-certificates", str(self.ca),
            "--auth-supernode-private-key", str(self.certs.supernode_key(key or k)),
            "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
            "--node-config", f'site-dir="{self.sites[k - 1]}"'], self.procs.home(name), self.supernode_env)

    def start(self) -> "LoopbackFederation":
        """SuperLink, registered keys, one SuperNode per site, all online."""
        self.start_superlink()
        for k in range(1, len(self.sites) + 1):
            self.register(k)
        for k in range(1, len(self.sites) + 1):
            self.start_supernode(k)
        self.wait_online(set(self.node_ids.values()))
        return self

    def nodes(self) -> dict[int, str]:
        """node id -> status, from ``flwr supernode list`` (empty while the SuperLink does not answer)."""
        r = self.flwr("supernode", "list", self.connection, "--format", "json", timeout=60)
        try:
            return {int(n["node-id"]): str(n["status"]) for n in cli_json(r.stdout).get("nodes") or []}
        except (ValueError, KeyError, TypeError):
            return {}

    def wait_online(self, ids: set[int], timeout_s: float = 120.0) -> float:
        """Seconds until every node in ``ids`` is online."""
        t0 = time.monotonic()
        poll(lambda: all(self.nodes().get(n) == "online" for n in ids), timeout_s, 1.0,
             f"nodes {sorted(ids)} online; last: {self.nodes()}")
        return time.monotonic() - t0

    def processes(self, name: str, needle: str) -> list[int]:
        """Live processes of ``name``'s FLWR_HOME whose command line holds ``needle`` (e.g. the
        SuperLink's ``flwr-serverapp``, a SuperNode's ``flwr-clientapp``)."""
        return [p for p in pids_with_env("FLWR_HOME", str(self.procs.home(name))) if needle in cmdline(p)]

    # -- runs

    def submit_app(self, app: Path, run_config: Path) -> int:
        """``flwr run APP --run-config RUN_CONFIG``; the run id (DeploymentError when refused)."""
        r = self.flwr("run", str(app), self.connection, "--run-config", str(run_config), "--format", "json",
                      timeout=300)
        try:
            out: dict[str, Any] = cli_json(r.stdout) if r.returncode == 0 else {}
        except ValueError:
            out = {}
        if not (out.get("success") and out.get("run-id") is not None):
            raise DeploymentError(f"flwr run failed:\n{strip_ansi(r.stdout + r.stderr)[-3000:]}")
        return int(out["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status ("" while the SuperLink does not answer)."""
        return run_status(self.flwr, self.connection, run_id) or ""

    def wait_finished(self, run_id: int, timeout_s: float = 480.0, every_s: float = 5.0,
                      watch: Sequence[str] = ("superlink",), done: Callable[[], bool] = lambda: False) -> str:
        """The run's ``finished:*`` status (the last one seen at the timeout); the processes named
        in ``watch`` must stay alive meanwhile (DeploymentError). ``every_s``: each ``flwr ls``
        costs CPU the run needs; ``done()`` true (e.g. its final metrics written) asks at once."""
        def check() -> None:
            self.procs.sample()
            self.procs.check_alive(list(watch))

        return wait_for_run(self.flwr, self.connection, run_id, timeout_s, check=check, poll_s=every_s, done=done)

    def server_log(self, run_id: int, tail: int = 4000) -> str:
        """The ServerApp's log as the SuperLink keeps it (``flwr log --show``)."""
        r = self.flwr("log", str(run_id), self.connection, "--show", timeout=60)
        return strip_ansi(r.stdout + r.stderr)[-tail:]

    def diagnostics(self, run_id: int | None = None, names: Sequence[str] = ()) -> str:
        """The ServerApp's log and the tails of the SuperLink's and the named processes' logs."""
        parts = [f"--- serverapp (run {run_id}) ---\n{self.server_log(run_id)}"] if run_id is not None else []
        for name in ("superlink", *names):
            if name in self.procs.logs:
                parts.append(f"--- {name} ---\n{self.procs.log(name)}")
        return "\n".join(parts)
