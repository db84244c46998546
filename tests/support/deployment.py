"""A real Flower deployment on loopback for the deployment tier (tests/deployment/).

``Deployment`` starts every process in its own session with a private FLWR_HOME, remembers its
whole process tree by PID and stops all of it (also on failure); ``Federation`` builds one
federation on it: ``smm certs`` (CA, SuperLink certificate, SuperNode key pairs), synthetic site
folders (``smm synth --features-only``), a ``flower-superlink`` with TLS, ``--enable-supernode-auth``
and SQLite state (``--database``), the SuperNode keys registered with ``flwr supernode register``,
one ``flower-supernode`` per site (``--node-config site-dir=...``), and ``flwr run`` of a staged copy
of the app (``server.ops.simulate.stage_app``: the FAB the processes install holds this checkout's
packages). The fault helpers (``send_signal``, ``kill``, the SuperLink's restart, finding the ServerApp
and ClientApp processes) act on PIDs this harness started or found in its own FLWR_HOMEs only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server.ops.simulate import (ProcessTracker, _executable, dump_config, flwr_env, free_port, pids_with_env,
                                 resolve_config, stage_app, stop_process_trees, write_run_config)
from flwr_runs import cli_json, wait_for_run
from sim_cohort import SMALL, write_features_cohort

ROOT = Path(__file__).resolve().parents[2]
CONN = "dep"


def check_checkout() -> None:
    """The harness, and through the FAB the ServerApp and ClientApps, must run this checkout's code
    (an editable install of another checkout would otherwise win in this process)."""
    import server

    where = Path(server.__file__).resolve()
    if ROOT not in where.parents:
        raise AssertionError(f"`server` is imported from {where}, not from {ROOT}: run with PYTHONPATH={ROOT}")


def poll(cond: Callable[[], Any], timeout_s: float, every_s: float = 0.5, what: str = "condition") -> Any:
    """``cond()``'s first truthy value, polled every ``every_s`` until ``timeout_s``; AssertionError after."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Deployment:
    """Every process started by a test, each in its own session, tracked by PID."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}  # the latest process started under each name
        self.trees: dict[str, ProcessTracker] = {}  # ... and its process tree
        self.started: list[subprocess.Popen] = []  # every process ever started (restarts too)
        self.trackers: list[ProcessTracker] = []
        self.homes: list[Path] = []
        self.logs: dict[str, Path] = {}
        self._files = []

    def home(self, name: str) -> Path:
        h = self.base / "homes" / name
        h.mkdir(parents=True, exist_ok=True)
        if h not in self.homes:
            self.homes.append(h)
        return h

    def start(self, name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        """Start ``cmd`` as ``name`` (a restart under the same name appends to the same log)."""
        log = self.base / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        f = log.open("a")
        f.write(f"\n=== {time.strftime('%H:%M:%S')} start {name} ===\n")
        f.flush()
        self._files.append(f)
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=flwr_env(home), cwd=str(self.base),
                             start_new_session=True)
        self.procs[name], self.logs[name] = p, log
        self.started.append(p)
        self.trees[name] = ProcessTracker(p.pid)
        self.trackers.append(self.trees[name])
        self.sample()
        return p

    def sample(self) -> None:
        for t in self.trackers:
            t.sample()

    def log(self, name: str, tail: int = 3000) -> str:
        return self.logs[name].read_text(errors="replace")[-tail:]

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
        except AssertionError:
            self.send_signal(name, signal.SIGKILL)
            poll(lambda: not self.trees[name].alive(), 10.0, 0.1, f"{name} to exit after SIGKILL")
        try:
            self.procs[name].wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, grace_s: float = 15.0) -> list[int]:
        """Stop everything started here by PID (``stop_process_trees``), close the logs; returns the
        PIDs still alive, including any process carrying one of the private FLWR_HOMEs."""
        left = stop_process_trees(self.started, self.trackers, self.homes, grace_s)
        for f in self._files:
            f.close()
        return left


def make_certs(out: Path, supernodes: int) -> Path:
    """``smm certs`` into ``out`` (CA, SuperLink certificate, ``supernodes`` key pairs)."""
    res = subprocess.run([sys.executable, "-m", "smm_model.cli", "certs", "--out", str(out), "--supernodes",
                          str(supernodes), "--hosts", "localhost,127.0.0.1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return out


class Federation:
    """One TLS + node-auth federation of ``sites`` synthetic sites on a ``Deployment``.

    ``overrides``: config overrides on top of ``sim_cohort.SMALL`` (baked into the run's
    ``config.yaml``). Sites are numbered 1..sites; ``supernode-k`` runs site k with key
    ``supernode-k``; ``node_ids[k]`` is the id its registration got.
    """

    def __init__(self, dep: Deployment, base: Path, sites: int, overrides: Sequence[str] = (), patients: int = 24,
                 keys: int | None = None):
        check_checkout()
        self.dep, self.base = dep, base
        self.certs = make_certs(base / "certs", keys or sites)
        self.ca = (self.certs / "ca.crt").resolve()
        cohort = write_features_cohort(base / "cohort", sites=sites, patients=patients)
        self.sites = sorted(p.resolve() for p in cohort.iterdir() if (p / "clinical.csv").is_file())
        assert len(self.sites) == sites
        yaml_in = base / "dep.yaml"
        yaml_in.write_text(f"name: dep-test\ndata:\n  sites_root: {cohort.resolve()}\n")
        self.cfg = resolve_config(yaml_in, [*SMALL, *overrides])
        self.config_text = dump_config(self.cfg)
        self.port = free_port()
        self.db = base / "state.db"
        self.app: Path | None = None
        self.node_ids: dict[int, int] = {}
        self.cli_home = dep.home("cli")
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONN}"\n\n[superlink.{CONN}]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.ca}"\n')
        self.cli_env = flwr_env(self.cli_home)

    # -- processes

    def start_superlink(self) -> subprocess.Popen:
        """The SuperLink (TLS, node auth, SQLite state in ``self.db``); a restart reuses port and database."""
        return self.dep.start("superlink", [
            _executable("flower-superlink"), "--ssl-ca-certfile", str(self.ca),
            "--ssl-certfile", str(self.certs / "server.pem"), "--ssl-keyfile", str(self.certs / "server.key"),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.db),
            "--disable-runtime-dependency-installation"], self.dep.home("superlink"))

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        r = subprocess.run([_executable("flwr"), *args], env=self.cli_env, cwd=str(self.base), capture_output=True,
                           text=True, timeout=timeout)
        self.dep.sample()
        return r

    def register(self, k: int, attempts: int = 30) -> int:
        """Register ``supernode-k``'s public key (retrying while the SuperLink starts); its node id."""
        r = None
        for _ in range(attempts):
            assert self.dep.procs["superlink"].poll() is None, self.dep.log("superlink")
            r = self.flwr("supernode", "register", str(self.certs / f"supernode-{k}.pub"), CONN, "--name",
                          f"site-{k}", "--format", "json")
            try:
                out = cli_json(r.stdout) if r.returncode == 0 else {}
            except (AssertionError, ValueError):
                out = {}
            if out.get("success") is True:
                self.node_ids[k] = int(out["node-id"])
                return self.node_ids[k]
            time.sleep(1.0)
        raise AssertionError((r.stdout + r.stderr)[-2000:] + self.dep.log("superlink"))

    def start_supernode(self, k: int, key: int | None = None, name: str | None = None) -> subprocess.Popen:
        """``supernode-k`` (or ``name``) for site k with key ``supernode-<key or k>``."""
        name = name or f"supernode-{k}"
        return self.dep.start(name, [
            _executable("flower-supernode"), "--root-certificates", str(self.ca),
            "--auth-supernode-private-key", str(self.certs / f"supernode-{key or k}"),
            "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
            "--node-config", f'site-dir="{self.sites[k - 1]}"'], self.dep.home(name))

    def start(self) -> "Federation":
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
        r = self.flwr("supernode", "list", CONN, "--format", "json", timeout=60)
        try:
            return {int(n["node-id"]): str(n["status"]) for n in cli_json(r.stdout).get("nodes") or []}
        except (AssertionError, ValueError, KeyError):
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
        return [p for p in pids_with_env("FLWR_HOME", str(self.dep.home(name))) if needle in cmdline(p)]

    # -- runs

    def run_dir(self, name: str) -> Path:
        d = (self.base / name).resolve()
        d.mkdir(exist_ok=True)
        if not (d / "config.yaml").exists():
            (d / "config.yaml").write_text(self.config_text)
        return d

    def submit(self, run_dir: Path, resume: bool = False) -> int:
        """``flwr run`` of the staged app for ``run_dir`` (its ``config.yaml``); the run id."""
        if self.app is None:
            self.app = stage_app(ROOT, self.base / "app")
        rc = write_run_config(self.base / f"run-config-{run_dir.name}-{int(resume)}.toml", {
            "config-path": str(run_dir / "config.yaml"), "overrides": "", "run-dir": str(run_dir),
            "resume": resume})
        r = self.flwr("run", str(self.app), CONN, "--run-config", str(rc), "--format", "json", timeout=300)
        out = cli_json(r.stdout) if r.returncode == 0 else {}
        assert out.get("success") and out.get("run-id") is not None, (r.stdout + r.stderr)[-3000:]
        return int(out["run-id"])

    def status(self, run_id: int) -> str:
        r = self.flwr("ls", CONN, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            runs = cli_json(r.stdout).get("runs") or []
        except (AssertionError, ValueError):
            return ""
        return str(runs[0].get("status", "")) if runs else ""

    def wait_finished(self, run_id: int, timeout_s: float = 480.0, every_s: float = 5.0,
                      watch: Sequence[str] = ("superlink",)) -> str:
        """Poll ``flwr ls`` until the run is ``finished:*`` (each call costs CPU the run needs, so not
        too often); the processes named in ``watch`` must stay alive meanwhile."""
        def alive() -> None:
            for name in watch:
                p = self.dep.procs[name]
                assert p.poll() is None, f"{name} exited ({p.returncode}):\n{self.dep.log(name)}"

        return wait_for_run(self.flwr, CONN, str(run_id), timeout_s, check=alive, poll_s=every_s)

    def server_log(self, run_id: int, tail: int = 4000) -> str:
        r = self.flwr("log", str(run_id), CONN, "--show", timeout=60)
        return (r.stdout + r.stderr)[-tail:]

    def diagnostics(self, run_id: int | None = None, names: Sequence[str] = ()) -> str:
        """The ServerApp's log (``flwr log``) and the tails of the named processes' logs, for a failure message."""
        parts = [f"--- serverapp (run {run_id}) ---\n{self.server_log(run_id)}"] if run_id is not None else []
        for name in ("superlink", *names):
            if name in self.dep.logs:
                parts.append(f"--- {name} ---\n{self.dep.log(name)}")
        return "\n".join(parts)


def read_rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


def round_record(run_dir: Path, r: int) -> dict | None:
    """Round ``r``'s record in ``rounds.jsonl`` once it is written (None before)."""
    return next((rec for rec in read_rounds(run_dir) if rec.get("round") == r), None)


#: Set to a JSON path (benchmarks/results/reliability.json) to record the fault tests' figures there.
RESULTS_ENV = "SMM_RELIABILITY_RESULTS"


def _provenance():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import provenance
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return provenance


def _tree_state() -> str:
    """The checkout's commit now (at import: the code the session's tests run), ``+changes`` when
    tracked files differ from it."""
    commit = _provenance().git_commit()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("+changes" if dirty else "")


SESSION_COMMIT = _tree_state()


def record_figures(scenario: str, figures: dict[str, Any]) -> Path | None:
    """Merge one scenario's measured figures into the file ``$SMM_RELIABILITY_RESULTS`` names, each
    scenario with the date, the commit its session ran and the command; nothing when it is unset."""
    target = os.environ.get(RESULTS_ENV)
    if not target:
        return None
    provenance = _provenance()
    path = Path(target)
    data = json.loads(path.read_text()) if path.exists() else {}
    run = {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "commit": SESSION_COMMIT,
           "command": f"{RESULTS_ENV}={target} OMP_NUM_THREADS=1 python -m pytest {' '.join(sys.argv[1:])}"}
    data.update({"benchmark": "reliability", "machine": provenance.machine("flwr"), **run})
    data.setdefault("scenarios", {})[scenario] = {**figures, **run}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
