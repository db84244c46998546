"""``smm simulate``'s pieces that need no SuperLink: config resolution, the run config file, the
staged app, and process tracking (the teardown must find every process, by PID)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from server.ops.simulate import (APP_DIR, ProcessTracker, count_sites, dump_config, free_port, main, pids_with_env,
                                 resolve_config, stage_app, write_run_config)
from sim_cohort import SMALL, write_features_cohort
from smm_model.config import ConfigError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_features_cohort(tmp_path_factory.mktemp("cohort"), patients=8)


def write_config(path: Path, sites_root: str) -> Path:
    path.write_text(f"name: t\ndata:\n  sites_root: {sites_root}\n")
    return path


def test_config_is_resolved_with_absolute_site_paths(cohort, tmp_path, monkeypatch):
    monkeypatch.chdir(cohort.parent)
    cfg = resolve_config(write_config(tmp_path / "c.yaml", cohort.name), SMALL)
    assert Path(cfg.data.sites_root) == cohort.resolve()
    assert count_sites(cfg.data) == 3
    text = dump_config(cfg)  # reads back as the same config (checked inside)
    assert str(cohort.resolve()) in text and "rounds: 2" in text
    with pytest.raises(ConfigError, match="federation.min_nodes"):
        resolve_config(tmp_path / "c.yaml", [*SMALL, "federation.min_nodes=4"])
    with pytest.raises(ConfigError, match="not a folder"):
        resolve_config(write_config(tmp_path / "d.yaml", "no/such/dir"), SMALL)


def test_bad_config_fails_before_any_process_starts(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  hidden_dim: -1\n")
    assert main([str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    assert "model.hidden_dim" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([str(cfg), "--resume"]) == 2  # --resume needs --run-dir


def test_run_config_file_survives_awkward_paths(tmp_path):
    odd = tmp_path / 'a dir with "quotes", spaces, é and \\ backslash' / "config.yaml"
    values = {"config-path": str(odd), "overrides": "", "run-dir": str(odd.parent), "resume": False}
    path = write_run_config(tmp_path / "run-config.toml", values)
    assert tomllib.loads(path.read_text()) == values


def test_staged_app_holds_exactly_the_fab_files(tmp_path):
    staged = stage_app(APP_DIR, tmp_path / "app")
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert "pyproject.toml" in files and "client/app.py" in files and "server/app.py" in files
    assert "configs/demo.yaml" in files and "smm_model/nn/model.py" in files
    assert not [f for f in files if f.startswith(("tests/", "benchmarks/", ".venv/", "runs/", "sites/"))]
    assert not [f for f in files if "__pycache__" in f]
    # Flower builds a FAB from it (the 10 MB limit is checked by flwr itself).
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    flwr = Path(sys.executable).parent / "flwr"
    res = subprocess.run([str(flwr), "build", "--app", str(staged)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    fab = next(tmp_path.glob("*.fab"))
    assert fab.stat().st_size < 10 * 1024 * 1024


def test_tracker_stops_a_whole_process_tree_by_pid():
    # A parent in its own session whose child starts yet another session (as Ray's daemons may).
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
              "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            env={**os.environ, "FEDSMM_TEST_MARK": "tracker"})
    tracker = ProcessTracker(proc.pid)
    deadline = time.monotonic() + 20
    while len(tracker.seen) < 2 and time.monotonic() < deadline:
        tracker.sample()
        time.sleep(0.1)
    try:
        assert len(tracker.seen) == 2 and os.getpid() not in tracker.seen
        assert sorted(pids_with_env("FEDSMM_TEST_MARK", "tracker")) == sorted(tracker.seen)
        tracker.signal_all(signal.SIGTERM)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while tracker.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tracker.alive() == [] and pids_with_env("FEDSMM_TEST_MARK", "tracker") == []
    finally:
        tracker.signal_all(signal.SIGKILL)


def test_free_port_is_bindable():
    import socket
    port = free_port()
    assert isinstance(port, int) and 1024 <= port <= 65535  # a real unprivileged port, never 0 ("any")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # OSError if the port were still taken
        assert s.getsockname() == ("127.0.0.1", port)
