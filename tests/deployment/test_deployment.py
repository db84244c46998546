"""The deployment tier: a real Flower deployment on loopback with TLS and SuperNode authentication.

``smm certs`` makes a CA, the SuperLink's certificate and three SuperNode key pairs; one
``flower-superlink`` (TLS, ``--enable-supernode-auth``, SQLite state) runs with a private FLWR_HOME;
the three public keys are registered with ``flwr supernode register``; three ``flower-supernode``
(``--root-certificates``, ``--auth-supernode-private-key``, ``--node-config 'site-dir="..."'``), each
with its own FLWR_HOME and synthetic site folder, join; ``flwr run`` of a staged copy of the app
trains for two rounds; the run must end ``finished:completed`` with two aggregated rounds in
``rounds.jsonl``. Then a fourth SuperNode with an UNREGISTERED key must be refused (observed on
1.42: it logs "Exit Code: 305 ... Failed to activate SuperNode" and exits with status 1). Every process is stopped by PID afterwards
(also on failure) and none may be left.

Run: ``.venv/bin/python -m pytest tests/deployment -m deployment -q`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.ops.simulate import (ProcessTracker, _executable, dump_config, flwr_env, free_port, pids_with_env,
                             resolve_config, stage_app, write_run_config)

ROOT = Path(__file__).resolve().parents[2]
from sim_cohort import SMALL, write_features_cohort  # noqa: E402 - tests/support (tests/conftest.py)
from flwr_runs import cli_json, wait_for_run  # noqa: E402

pytestmark = pytest.mark.deployment

CONN = "dep"
EXIT_SUPERNODE_AUTH_REFUSED = 305  # Flower's exit code "SuperNode cannot activate" (logged; the status is 1)


class Deployment:
    """Every process started by the test, each in its own session, tracked by PID."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}
        self.trackers: list[ProcessTracker] = []
        self.homes: list[Path] = []
        self.logs: dict[str, Path] = {}
        self._files = []

    def home(self, name: str) -> Path:
        h = self.base / "homes" / name
        h.mkdir(parents=True, exist_ok=True)
        self.homes.append(h)
        return h

    def start(self, name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        log = self.base / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        f = log.open("w")
        self._files.append(f)
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=flwr_env(home), cwd=str(self.base),
                             start_new_session=True)
        self.procs[name], self.logs[name] = p, log
        self.trackers.append(ProcessTracker(p.pid))
        self.sample()
        return p

    def sample(self) -> None:
        for t in self.trackers:
            t.sample()

    def log(self, name: str, tail: int = 3000) -> str:
        return self.logs[name].read_text(errors="replace")[-tail:]

    def stop(self, grace_s: float = 15.0) -> list[int]:
        """SIGTERM everything (groups, then every tracked PID), SIGKILL what remains; returns the
        PIDs still alive, including any process carrying one of the private FLWR_HOMEs."""
        self.sample()
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        for t in self.trackers:
            t.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(t.alive() for t in self.trackers):
            time.sleep(0.2)
        for t in self.trackers:
            t.signal_all(signal.SIGKILL)
        for h in self.homes:
            for pid in pids_with_env("FLWR_HOME", str(h)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        for f in self._files:
            f.close()
        left = {pid for t in self.trackers for pid in t.alive()}
        left |= {pid for h in self.homes for pid in pids_with_env("FLWR_HOME", str(h))}
        return sorted(left)


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        left = dep.stop()
        assert left == [], f"processes left after teardown: {left}"


def test_tls_and_node_auth_two_rounds(tmp_path, deployment):
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    # -- credentials ---------------------------------------------------------------------------
    certs = tmp_path / "certs"
    res = subprocess.run([sys.executable, "-m", "smm_model.cli", "certs", "--out", str(certs), "--supernodes", "4",
                          "--hosts", "localhost,127.0.0.1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ca = (certs / "ca.crt").resolve()

    # -- cohort and config ---------------------------------------------------------------------
    cohort = write_features_cohort(tmp_path / "cohort", patients=24)
    sites = sorted(p for p in cohort.iterdir() if (p / "clinical.csv").is_file())
    assert len(sites) == 3
    yaml_in = tmp_path / "dep.yaml"
    yaml_in.write_text(f"name: dep-test\ndata:\n  sites_root: {cohort}\n")
    cfg = resolve_config(yaml_in, SMALL)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_dir / "config.yaml"
    config.write_text(dump_config(cfg))
    run_config = write_run_config(tmp_path / "run-config.toml", {
        "config-path": str(config.resolve()), "overrides": "", "run-dir": str(run_dir.resolve()), "resume": False})

    # -- SuperLink: TLS + node auth + SQLite state -----------------------------------------------
    port = free_port()
    link_home = deployment.home("superlink")
    superlink = deployment.start("superlink", [
        _executable("flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth", "--host", "127.0.0.1",
        "--port", str(port), "--database", str(tmp_path / "state.db"),
        "--disable-runtime-dependency-installation"], link_home)

    # -- the CLI's own FLWR_HOME with a TLS connection -------------------------------------------
    cli_home = deployment.home("cli")
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONN}"\n\n[superlink.{CONN}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n')
    cli_env = flwr_env(cli_home)

    def flwr(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        r = subprocess.run([_executable("flwr"), *args], env=cli_env, cwd=str(tmp_path), capture_output=True,
                           text=True, timeout=timeout)
        deployment.sample()
        return r

    # register the three sites' keys (retrying while the SuperLink starts)
    t0 = time.monotonic()
    for k in (1, 2, 3):
        for attempt in range(30):
            assert superlink.poll() is None, deployment.log("superlink")
            r = flwr("supernode", "register", str(certs / f"supernode-{k}.pub"), CONN, "--name", f"site-{k}",
                     "--format", "json")
            try:
                ok = r.returncode == 0 and cli_json(r.stdout).get("success") is True
            except (AssertionError, ValueError):
                ok = False
            if ok:
                break
            time.sleep(1.0)
        assert ok, (r.stdout + r.stderr)[-2000:] + deployment.log("superlink")
    timings["registered_s"] = time.monotonic() - t0

    # -- three SuperNodes, each with its own FLWR_HOME, key and site folder -----------------------
    for k, site in enumerate(sites, start=1):
        deployment.start(f"supernode-{k}", [
            _executable("flower-supernode"), "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(certs / f"supernode-{k}"), "--superlink", f"127.0.0.1:{port}",
            "--port", str(free_port()), "--node-config", f'site-dir="{site.resolve()}"'],
            deployment.home(f"supernode-{k}"))

    # -- submit a staged copy of the app and poll until finished ----------------------------------
    app = stage_app(ROOT, tmp_path / "app")
    t0 = time.monotonic()
    r = flwr("run", str(app), CONN, "--run-config", str(run_config), "--format", "json", timeout=300)
    out = cli_json(r.stdout) if r.returncode == 0 else {}
    assert out.get("success") and out.get("run-id") is not None, (r.stdout + r.stderr)[-3000:]
    run_id = str(out["run-id"])

    def all_alive() -> None:
        for name, p in deployment.procs.items():
            assert p.poll() is None, f"{name} exited ({p.returncode}):\n{deployment.log(name)}"

    status = wait_for_run(flwr, CONN, run_id, 480, check=all_alive)
    timings["run_s"] = time.monotonic() - t0
    if status != "finished:completed":
        log = flwr("log", run_id, CONN, "--show", timeout=60)
        pytest.fail(f"run {run_id} status {status!r}\n--- serverapp ---\n{(log.stdout + log.stderr)[-4000:]}\n"
                    f"--- superlink ---\n{deployment.log('superlink')}\n--- supernode-1 ---\n"
                    f"{deployment.log('supernode-1')}")

    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for rd in rounds[1:]:
        assert rd["status"] == "aggregated"
        assert len(rd["train"]["per_site"]) == 3
        assert all(m["num-examples"] > 0 for m in rd["train"]["per_site"].values())
        assert len(rd["val"]["per_site"]) == 3
        assert "loss" in rd["val"]["global"]["values"]

    # the three registered nodes are online (one line each in `flwr supernode list`)
    r = flwr("supernode", "list", CONN, "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    listing = r.stdout

    # -- a fourth SuperNode with an unregistered key is refused -----------------------------------
    t0 = time.monotonic()
    rogue = deployment.start("supernode-rogue", [
        _executable("flower-supernode"), "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(certs / "supernode-4"), "--superlink", f"127.0.0.1:{port}",
        "--port", str(free_port()), "--node-config", f'site-dir="{sites[0].resolve()}"'],
        deployment.home("supernode-rogue"))
    try:
        code = rogue.wait(timeout=90)
    except subprocess.TimeoutExpired:
        code = None
    timings["refused_s"] = time.monotonic() - t0
    # Observed on flwr 1.42: the process exits with status 1 after logging "Exit Code: 305 ...
    # Failed to activate SuperNode"; the SuperLink logs "No SuperNode found with the given public key".
    rogue_log = deployment.log("supernode-rogue")
    assert code is not None and code != 0, f"exit {code}:\n{rogue_log}"
    assert f"Exit Code: {EXIT_SUPERNODE_AUTH_REFUSED}" in rogue_log and "Failed to activate SuperNode" in rogue_log
    assert "No SuperNode found with the given public key" in deployment.log("superlink", tail=200_000)
    assert superlink.poll() is None
    timings["total_s"] = time.monotonic() - t_start
    print(f"\ntimings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}\nsupernode list: {listing[:1500]}")
