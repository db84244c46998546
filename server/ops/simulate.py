"""``smm simulate CONFIG``: a whole simulated federation on this machine, started and stopped here.

Why a launcher and not just ``flwr run .``: with a ``:local:`` connection ``flwr`` starts a detached
SuperLink that outlives the command and that nothing stops, reuses it (with its environment) for
any later run on the same port, and ``flwr run --stream`` exits 0 even when the run failed
(flower.md 0.8-0.9). So this command owns every process of the simulation:

1. resolve and validate the config with ``--set`` overrides (a bad value fails here, before any
   process starts), make ``data.sites_root`` absolute, count the site folders, and write the
   resolved config to ``RUN_DIR/config.yaml``;
2. create one private temporary folder holding ``FLWR_HOME`` (its ``config.toml`` names one
   connection, ``sim``, to ``127.0.0.1:PORT`` on a free port chosen now), a copy of the app with
   just the files of ``fab-include`` (``stage_app``: ``flwr run`` would otherwise walk the whole
   repository, ``.venv`` included) and Ray's session files (``RAY_TMPDIR``); telemetry, the update
   check, runtime dependency installation and Ray usage stats are off;
3. start ``flower-superlink --insecure --simulation --host 127.0.0.1 --port PORT --database
   :flwr-in-memory: --disable-runtime-dependency-installation`` in its own process group (log:
   ``RUN_DIR/superlink.log``) and wait until it accepts connections;
4. ``flwr run <staged app> sim --run-config RUN_DIR/run-config.toml --federation-config
   "num-supernodes=<sites> client-resources-num-cpus=<client_cpus> client-resources-num-gpus=<client_gpus>"
   --format json`` -> the run id;
5. follow ``flwr log <id> sim --stream`` in a thread (printed without ANSI colours, copied to
   ``RUN_DIR/serverapp.log``) and poll ``flwr ls sim --run-id <id> --format json`` until the status
   starts with ``finished:``; anything but ``finished:completed`` (or the timeout) is exit status 1;
6. always, also on Ctrl-C, SIGTERM and errors: stop the log follower, the SuperLink's process group
   and every process seen descending from it (Ray's daemons and workers), by PID, then look for any
   process still carrying this simulation's FLWR_HOME, stop it too, and report what is left (should
   be nothing); the temporary folder is removed.

The ServerApp reads the run config keys ``config-path`` (absolute, the resolved file),
``overrides`` (empty: already applied), ``run-dir`` (absolute) and ``resume``.
Simulated sites find their folders from ``partition-id`` (``client.local.round.resolve_site_dir``)
and write their detailed logs to ``RUN_DIR/site-logs/`` (``FEDSMM_SITE_LOG_DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import yaml

from server.ops.flwr_cli import cli_json, executable, run_status, strip_ansi
from smm_model.config import ConfigError, DataConfig, ExperimentConfig, to_dict
from smm_model.contract.runfolder import CONFIG_FILE, default_run_dir
from smm_model.contract.sites import simulation_site_dirs

__all__ = ["APP_DIR", "CONNECTION", "SimulationError", "count_sites", "resolve_config",
           "dump_config", "write_run_config", "stage_app", "free_port", "flwr_env", "pids_with_env",
           "ProcessTracker", "stop_process_trees", "Simulation", "main"]

#: The Flower app folder: the repository root, where pyproject.toml has [tool.flwr.app].
APP_DIR = Path(__file__).resolve().parents[2]
#: The connection name written into the private FLWR_HOME/config.toml.
CONNECTION = "sim"
SITE_LOG_ENV = "FEDSMM_SITE_LOG_DIR"  # read by client/app.py (the client side is not imported here)


class SimulationError(RuntimeError):
    """The simulation could not be started, or the run did not finish as completed."""


# --------------------------------------------------------------------------------------------- #
# configuration
# --------------------------------------------------------------------------------------------- #
def count_sites(data: DataConfig) -> int:
    """Number of simulated sites; every listed folder must exist."""
    dirs = simulation_site_dirs(data)
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise ConfigError(f"data.sites: site folder(s) not found: {', '.join(missing)}")
    if not dirs:
        raise ConfigError(f"data.sites_root: {data.sites_root} holds no site folder (a folder with clinical.csv)")
    return len(dirs)


def resolve_config(path: Path, overrides: Sequence[str], cwd: Path | None = None) -> ExperimentConfig:
    """Parse and validate ``path`` with overrides; make the site paths absolute (relative ones are
    relative to ``cwd``, the directory the command runs in, as for every other ``smm`` command) so
    the ServerApp and the simulated sites, whose working directory is the SuperLink's, find them."""
    cwd = Path.cwd() if cwd is None else cwd
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    cfg = ExperimentConfig.from_yaml_text(text, list(overrides), source=str(path))
    d = cfg.data
    absolute = lambda p: str((cwd / Path(p).expanduser()).resolve())
    if d.sites_root:
        d = replace(d, sites_root=absolute(d.sites_root))
    elif d.sites:
        d = replace(d, sites=tuple(absolute(s) for s in d.sites))
    cfg = replace(cfg, data=d)
    cfg.federation.check_sites(count_sites(cfg.data))
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML; parsing it back gives the same config (checked)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if ExperimentConfig.from_yaml_text(text, source="resolved config") != cfg:
        raise SimulationError("the resolved config does not read back as itself (a YAML round-trip problem)")
    return text


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    # A JSON string is a TOML basic string (quotes, backslashes and control characters escaped the
    # same way); non-ASCII stays literal (JSON's surrogate-pair escapes are not valid TOML).
    return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")


def write_run_config(path: Path, values: dict[str, Any]) -> Path:
    """``--run-config`` as a TOML file: paths with spaces or quotes survive (the inline form splits
    on whitespace)."""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


def stage_app(app_dir: Path, dest: Path) -> Path:
    """A copy of the app holding only ``pyproject.toml`` and the files its ``fab-include`` names.

    Why: ``flwr run`` walks EVERY file under the app folder before filtering (a multi-GB ``.venv``,
    ``sites/`` and ``runs/`` under the repository cost ~10 CPU-seconds per submission here, stolen
    from the simulation on a small machine). The FAB built from the copy holds the same files.
    Without a plain ``fab-include`` list (or with negated patterns) the app folder is used as is.
    """
    try:
        meta = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return app_dir
    patterns = meta.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not isinstance(patterns, list) or not patterns or any(not isinstance(p, str) or p.startswith("!")
                                                             for p in patterns):
        return app_dir
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(app_dir / "pyproject.toml", dest / "pyproject.toml")
    for pattern in patterns:
        for src in sorted(app_dir.glob(pattern.lstrip("/"))):
            if src.is_file() and not src.is_symlink() and "__pycache__" not in src.parts:
                target = dest / src.relative_to(app_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    return dest


# --------------------------------------------------------------------------------------------- #
# processes
# --------------------------------------------------------------------------------------------- #
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (the SuperLink binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: What every Flower process started by this project runs with (environment.md, flower.md): nothing
#: phoned home, no update check, no run-time ``uv sync`` of the app's dependencies, no Ray usage
#: statistics, and the SuperExec looking for new tasks every 0.1 s instead of Flower's 1 s (each
#: message to a site waits for that poll before its ClientApp process starts). The README's
#: coordinator and site guides export the same.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
              "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def flwr_env(flwr_home: Path, site_log_dir: Path | None = None, ray_tmp: Path | None = None) -> dict[str, str]:
    """The environment of every Flower process started here: this interpreter's scripts first on
    PATH, a private FLWR_HOME, nothing phoned home, no runtime ``uv sync`` of the app's
    dependencies; Ray's session folder under ``ray_tmp`` (removed with it) instead of /tmp/ray."""
    env = dict(os.environ)
    # The SuperLink starts flower-superexec, flwr-simulation, ... by name: this environment's first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({"FLWR_HOME": str(flwr_home), **FLOWER_ENV, "PYTHONUNBUFFERED": "1"})
    if site_log_dir is not None:
        env[SITE_LOG_ENV] = str(site_log_dir)
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def write_flwr_config(flwr_home: Path, port: int) -> Path:
    """``FLWR_HOME/config.toml`` with the one connection ``sim`` (and it as the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                    f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    return path


def _proc_stat(pid: int) -> tuple[int, int, int, int] | None:
    """(ppid, pgid, sid, start time) of a live process from /proc, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":  # a zombie holds no resources; its parent reaps it
        return None
    return int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def pids_with_env(key: str, value: str) -> list[int]:
    """Live processes (other than this one) whose environment has ``key=value``: every process of a
    simulation inherits its private FLWR_HOME, so this finds any that escaped the process tree."""
    needle = f"{key}={value}".encode()
    out = []
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env and _proc_stat(pid) is not None:
            out.append(pid)
    return sorted(out)


@dataclass
class ProcessTracker:
    """Every process that belongs to one started process: its process group, its session and all
    its descendants, remembered by (pid, start time) so a recycled PID is never signalled.

    Why all three: the SuperLink runs in its own session and group, but Ray's daemons may start
    their own sessions, and a process whose parent died is re-parented to init; sampling the tree
    while the run is alive catches them all.
    """

    root: int
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time

    def sample(self) -> None:
        stats = {p: s for p in _all_pids() if (s := _proc_stat(p)) is not None}
        children: dict[int, list[int]] = {}
        for p, (ppid, _, _, _) in stats.items():
            children.setdefault(ppid, []).append(p)
        found = {p for p, (_, pgid, sid, _) in stats.items() if pgid == self.root or sid == self.root}
        stack = [self.root, *found]
        while stack:
            p = stack.pop()
            if p in stats and p not in found:
                found.add(p)
            stack.extend(c for c in children.get(p, []) if c not in found)
        found.discard(os.getpid())
        for p in found:
            if p in stats:
                self.seen.setdefault(p, stats[p][3])

    def alive(self) -> list[int]:
        """Tracked processes still running (same PID and start time)."""
        out = []
        for pid, start in self.seen.items():
            s = _proc_stat(pid)
            if s is not None and s[3] == start:
                out.append(pid)
        return sorted(out)

    def signal_all(self, sig: int) -> None:
        for pid in self.alive():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def stop_process_trees(procs: Iterable[subprocess.Popen], trackers: Sequence[ProcessTracker],
                       flwr_homes: Iterable[Path], grace_s: float) -> list[int]:
    """Stop a deployment's processes by PID: SIGCONT (a fault test may have left one stopped), SIGTERM
    to each started process group and every tracked PID, SIGKILL to what is left after ``grace_s``
    and to any process carrying one of the private ``flwr_homes``; returns the PIDs still alive.

    Why one place: the deployment tests and the overhead benchmark start the same kind of process
    trees (SuperLink, SuperNodes, their SuperExecs and ClientApps) and must leave none behind.
    """
    procs, homes = list(procs), [str(h) for h in flwr_homes]
    for t in trackers:
        t.sample()
        t.signal_all(signal.SIGCONT)
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    for t in trackers:
        t.signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(t.alive() for t in trackers):
        time.sleep(0.2)
    for t in trackers:
        t.signal_all(signal.SIGKILL)
    for h in homes:
        for pid in pids_with_env("FLWR_HOME", h):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        try:
            p.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.5)
    left = {pid for t in trackers for pid in t.alive()}
    left |= {pid for h in homes for pid in pids_with_env("FLWR_HOME", h)}
    return sorted(left)


def _stream_lines(pipe: TextIO, sinks: Iterable[TextIO]) -> None:
    sinks = list(sinks)
    for line in iter(pipe.readline, ""):
        clean = strip_ansi(line)
        for s in sinks:
            try:
                s.write(clean)
                s.flush()
            except ValueError:  # a sink closed during teardown
                pass


# --------------------------------------------------------------------------------------------- #
# the simulation
# --------------------------------------------------------------------------------------------- #
@dataclass
class Simulation:
    """One simulated run: owns its FLWR_HOME, SuperLink, log follower and their processes."""

    cfg: ExperimentConfig
    run_dir: Path
    resume: bool = False
    timeout_s: float = 7200.0
    poll_s: float = 10.0
    echo: TextIO = sys.stdout
    app_dir: Path = APP_DIR
    port: int = 0
    run_id: int | None = None
    status: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _superlink: subprocess.Popen | None = None
    _follower: subprocess.Popen | None = None
    _follower_thread: threading.Thread | None = None
    _tracker: ProcessTracker | None = None
    _tmp: Path | None = None
    _flwr_home: Path | None = None
    _staged: Path | None = None
    _env: dict[str, str] = field(default_factory=dict)
    _files: list[TextIO] = field(default_factory=list)

    # -- helpers ------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        print(f"[smm simulate] {msg}", file=self.echo, flush=True)

    def _flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([executable("flwr"), *args], env=self._env, cwd=str(self.app_dir),
                              capture_output=True, text=True, timeout=timeout)

    # -- steps --------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(dump_config(self.cfg))
        # One private temporary folder (short: Ray puts Unix sockets under it) for FLWR_HOME, the
        # staged app and Ray's session files; removed when the simulation stops.
        self._tmp = Path(tempfile.mkdtemp(prefix="fedsmm-"))
        self._flwr_home = self._tmp / "flwr"
        self._staged = stage_app(self.app_dir, self._tmp / "app")
        self.port = free_port()
        write_flwr_config(self._flwr_home, self.port)
        site_logs = self.run_dir / "site-logs"
        site_logs.mkdir(exist_ok=True)
        self._env = flwr_env(self._flwr_home, site_logs, ray_tmp=self._tmp)

    def start_superlink(self, ready_timeout_s: float = 60.0) -> None:
        log = (self.run_dir / "superlink.log").open("a", encoding="utf-8")
        self._files.append(log)
        cmd = [executable("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
               "--port", str(self.port), "--database", ":flwr-in-memory:",
               "--disable-runtime-dependency-installation"]
        self._say("$ " + " ".join(cmd))
        self._superlink = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env,
                                           cwd=str(self.run_dir), start_new_session=True)
        self._tracker = ProcessTracker(self._superlink.pid)
        t0 = time.monotonic()
        while True:
            self._tracker.sample()
            if self._superlink.poll() is not None:
                raise SimulationError(f"flower-superlink exited with status {self._superlink.returncode} "
                                      f"before accepting connections; see {self.run_dir / 'superlink.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > ready_timeout_s:
                raise SimulationError(f"flower-superlink did not accept connections on 127.0.0.1:{self.port} "
                                      f"within {ready_timeout_s:.0f} s")
            time.sleep(0.2)
        self.timings["superlink_ready_s"] = time.monotonic() - t0

    def submit(self, n_sites: int) -> int:
        run_config = write_run_config(self.run_dir / "run-config.toml", {
            "config-path": str((self.run_dir / CONFIG_FILE).resolve()), "overrides": "",
            "run-dir": str(self.run_dir.resolve()), "resume": bool(self.resume)})
        f = self.cfg.federation
        fed = (f"num-supernodes={n_sites} client-resources-num-cpus={f.client_cpus:g} "
               f"client-resources-num-gpus={f.client_gpus:g}")
        args = ["run", str(self._staged or self.app_dir), CONNECTION, "--run-config", str(run_config),
                "--federation-config", fed, "--format", "json"]
        self._say("$ flwr " + " ".join(a if " " not in a else f"'{a}'" for a in args))
        last = ""
        for attempt in range(3):  # the HTTP API may still be warming up right after the port opens
            res = self._flwr(*args, timeout=300.0)
            self._tracker.sample()
            try:
                out = cli_json(res.stdout)
            except ValueError:
                out = {}
            if res.returncode == 0 and out.get("success") and out.get("run-id") is not None:
                self.run_id = int(out["run-id"])
                return self.run_id
            last = strip_ansi((res.stdout + res.stderr).strip())[-2000:]
            time.sleep(2.0 * (attempt + 1))
        raise SimulationError(f"flwr run failed:\n{last}")

    def follow_log(self) -> None:
        assert self.run_id is not None
        copy = (self.run_dir / "serverapp.log").open("a", encoding="utf-8")
        self._files.append(copy)
        self._follower = subprocess.Popen([executable("flwr"), "log", str(self.run_id), CONNECTION, "--stream"],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          env=self._env, cwd=str(self.app_dir), start_new_session=True)
        self._follower_thread = threading.Thread(target=_stream_lines, args=(self._follower.stdout,
                                                                             [self.echo, copy]), daemon=True)
        self._follower_thread.start()

    def wait(self) -> str:
        """Poll the run's status until it is ``finished:*``; returns it (timeout: stops the run).

        Each ``flwr ls`` is a Python process of a few CPU-seconds, which on a small machine competes
        with the simulation itself; so the status is asked every ``poll_s`` seconds only, and at once
        when the log stream ends (Flower closes it when the run finishes).
        """
        assert self.run_id is not None
        t0 = time.monotonic()
        status = ""
        last_poll = -float("inf")
        while True:
            self._tracker.sample()
            if self._superlink is not None and self._superlink.poll() is not None:
                raise SimulationError(f"flower-superlink exited (status {self._superlink.returncode}) during the "
                                      f"run; see {self.run_dir / 'superlink.log'}")
            stream_ended = self._follower is not None and self._follower.poll() is not None
            if stream_ended or time.monotonic() - last_poll >= self.poll_s:
                last_poll = time.monotonic()
                status = run_status(self._flwr, CONNECTION, self.run_id) or status
                if status.startswith("finished:"):
                    self.status = status
                    self.timings["run_s"] = time.monotonic() - t0
                    return status
            if time.monotonic() - t0 > self.timeout_s:
                self._flwr("stop", str(self.run_id), CONNECTION, timeout=60.0)
                self.status = f"timeout after {self.timeout_s:.0f} s (last status {status or 'unknown'})"
                return self.status
            time.sleep(1.0 if stream_ended else 0.25)

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """Stop everything started here; returns PIDs still alive afterwards (empty when clean)."""
        if self.status is not None and self._follower_thread is not None:
            self._follower_thread.join(timeout=3.0)  # the run finished: let the log's tail arrive
        for proc in (self._follower, self._superlink):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        left: list[int] = []
        if self._tracker is not None:
            self._tracker.sample()
            self._tracker.signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self._tracker.alive():
                time.sleep(0.2)
            if self._tracker.alive():
                self._tracker.signal_all(signal.SIGKILL)
                time.sleep(0.5)
            left = self._tracker.alive()
        if self._flwr_home is not None:  # anything else carrying this simulation's FLWR_HOME
            strays = pids_with_env("FLWR_HOME", str(self._flwr_home))
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if strays:
                time.sleep(0.5)
                left += pids_with_env("FLWR_HOME", str(self._flwr_home))
        for proc in (self._follower, self._superlink):
            if proc is not None:
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    left.append(proc.pid)
        if self._follower_thread is not None:
            self._follower_thread.join(timeout=2.0)
        for f in self._files:
            f.close()
        self._files.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return sorted(set(left))

    def run(self, n_sites: int) -> str:
        """prepare -> SuperLink -> submit -> follow -> wait; always stops what it started."""
        t0 = time.monotonic()
        try:
            self.prepare()
            self.start_superlink()
            self.submit(n_sites)
            self._say(f"run {self.run_id} submitted ({n_sites} simulated sites); following its log")
            self.timings["submitted_s"] = time.monotonic() - t0
            self.follow_log()
            return self.wait()
        finally:
            t_stop = time.monotonic()
            with _signals_deferred():  # a second Ctrl-C must not cut the teardown short
                left = self.stop()
            self.timings["stop_s"] = time.monotonic() - t_stop
            self.timings["total_s"] = time.monotonic() - t0
            if left:
                self._say(f"WARNING: process(es) {left} still alive after teardown")
                self.timings["leftover_processes"] = float(len(left))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM for the block (main thread only; elsewhere signals are not ours)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _terminate_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so the teardown in ``finally`` runs as on Ctrl-C."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    """``smm simulate CONFIG [--run-dir DIR] [--set key=value ...] [--resume] [--timeout S]``."""
    ap = argparse.ArgumentParser(prog="smm simulate", description="Run a simulated federation on this machine: "
                                 "own SuperLink on a free port, status checked, every process stopped.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path, help="YAML experiment config (e.g. configs/demo.yaml)")
    ap.add_argument("--run-dir", type=Path, metavar="DIR",
                    help="run folder (default runs/<config name>-<date-time>; required with --resume)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set federation.rounds=2 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    ap.add_argument("--timeout", type=float, default=7200.0, metavar="S",
                    help="stop the run and fail after S seconds (default 7200)")
    args = ap.parse_args(argv)
    if args.resume and args.run_dir is None:
        print("smm simulate: --resume needs --run-dir (the run to continue)", file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print("smm simulate: --timeout must be positive", file=sys.stderr)
        return 2
    try:
        cfg = resolve_config(args.config, args.overrides)
        n_sites = count_sites(cfg.data)
    except ConfigError as e:
        print(f"smm simulate: {e}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or default_run_dir(cfg.name)
    run_dir = run_dir.resolve()
    sim = Simulation(cfg, run_dir, resume=args.resume, timeout_s=args.timeout)
    sim._say(f"run folder: {run_dir}")
    _terminate_on_sigterm()
    try:
        status = sim.run(n_sites)
    except KeyboardInterrupt:
        print(f"smm simulate: interrupted; every process started was stopped. Run folder: {run_dir}",
              file=sys.stderr)
        return 130
    except (SimulationError, OSError, subprocess.SubprocessError) as e:
        print(f"smm simulate: {e}\nRun folder: {run_dir}", file=sys.stderr)
        return 1
    took = sim.timings.get("total_s", 0.0)
    if status != "finished:completed":
        print(f"smm simulate: run {sim.run_id} ended with status {status!r} after {took:.0f} s "
              f"(see {run_dir / 'serverapp.log'} and {run_dir / 'superlink.log'}). Run folder: {run_dir}",
              file=sys.stderr)
        return 1
    sim._say(f"run {sim.run_id}: {status} in {took:.0f} s. Run folder: {run_dir}")
    report = run_dir / "report.html"
    if report.is_file():  # the ServerApp writes it at the end of the run
        sim._say(f"report: {report}")
    else:
        sim._say(f"no report was written (see {run_dir / 'serverapp.log'}); `smm report {run_dir}` retries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
