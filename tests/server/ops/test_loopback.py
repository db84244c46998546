"""server.ops.loopback and server.ops.flwr_cli on real processes and Flower's recorded CLI output
(a whole loopback federation runs in the deployment tier, tests/deployment)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from server.ops.flwr_cli import RegistrationError, cli_json, executable, register_supernode, run_status, wait_for_run
from server.ops.loopback import DeploymentError, LoopbackFederation, Processes, poll
from server.ops.simulate import pids_with_env

# What flwr 1.42 prints (a warning line may come first; --format json writes one object).
LS_RUNNING = '{"success": true, "runs": [{"run-id": "7", "status": "running"}]}'
LS_DONE = '{"success": true, "runs": [{"run-id": "7", "status": "finished:completed"}]}'
REGISTER_OK = '{"success": true, "node-id": "4242"}'
REGISTER_REFUSED = '{"success": false, "error-message": "Public key already in use"}'


def _done(stdout: str, rc: int = 0, stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["flwr"], rc, stdout, stderr)


class Script:
    """The flwr CLI's answers in order (the last one repeats), and the calls it got."""

    def __init__(self, *answers: subprocess.CompletedProcess):
        self.answers, self.calls = list(answers), []

    def __call__(self, *args: str, timeout: float = 0.0) -> subprocess.CompletedProcess:
        self.calls.append(args)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_cli_json_reads_the_object_after_a_warning_line_and_names_what_is_missing() -> None:
    assert cli_json("WARNING: \x1b[33mflwr is old\x1b[0m\n" + LS_DONE)["runs"][0]["status"] == "finished:completed"
    with pytest.raises(ValueError, match="no JSON object in the flwr output: 'connection refused'"):
        cli_json("\x1b[31mconnection refused\x1b[0m")
    with pytest.raises(json.JSONDecodeError):  # a ValueError too
        cli_json('{"success": tru')


def test_run_status_is_none_while_the_superlink_does_not_answer() -> None:
    flwr = Script(_done("", 1, "StatusCode.UNAVAILABLE"), _done(LS_RUNNING))
    assert run_status(flwr, "c", 7) is None
    assert run_status(flwr, "c", 7) == "running"
    assert flwr.calls[0] == ("ls", "c", "--run-id", "7", "--format", "json")
    assert run_status(Script(_done('{"success": true, "runs": []}')), "c", 7) is None


def test_wait_for_run_polls_until_finished_and_asks_at_once_when_done() -> None:
    flwr = Script(_done(LS_RUNNING), _done(LS_RUNNING), _done(LS_DONE))
    checks = []
    assert wait_for_run(flwr, "c", 7, timeout_s=30, check=lambda: checks.append(1), poll_s=0.01) \
        == "finished:completed"
    assert len(flwr.calls) == 3 and len(checks) >= 3
    # a long poll interval, but the run folder says it is done: no 60 s wait for the status
    flwr = Script(_done(LS_RUNNING), _done(LS_DONE))
    t0 = time.monotonic()
    assert wait_for_run(flwr, "c", 7, timeout_s=30, poll_s=60, done=lambda: True) == "finished:completed"
    assert time.monotonic() - t0 < 10
    # the timeout returns the last status seen; a failing check() ends the wait with its error
    assert wait_for_run(Script(_done(LS_RUNNING)), "c", 7, timeout_s=0.05, poll_s=0.01) == "running"

    def dead() -> None:
        raise DeploymentError("superlink exited (1)")

    with pytest.raises(DeploymentError, match="superlink exited"):
        wait_for_run(Script(_done(LS_RUNNING)), "c", 7, timeout_s=30, check=dead)


def test_register_supernode_retries_while_the_superlink_starts_then_reports_flowers_reason(tmp_path) -> None:
    pub = tmp_path / "supernode-1.pub"
    flwr = Script(_done("", 1, "StatusCode.UNAVAILABLE"), _done(REGISTER_OK))
    assert register_supernode(flwr, pub, "c", "site-1", wait_s=30, every_s=0.01) == 4242
    assert flwr.calls[-1] == ("supernode", "register", str(pub), "c", "--name", "site-1", "--format", "json")
    with pytest.raises(RegistrationError, match=r"supernode-1\.pub \(site-1\): Public key already in use"):
        register_supernode(Script(_done(REGISTER_REFUSED, 1)), pub, "c", "site-1", wait_s=0.05, every_s=0.01)


def test_executable_prefers_this_environments_console_script() -> None:
    assert Path(executable("flwr")).parent == Path(sys.executable).parent
    with pytest.raises(FileNotFoundError, match="no-such-flower-tool not found"):
        executable("no-such-flower-tool")


def test_processes_stop_whole_trees_and_orphans_that_carry_their_flwr_home(tmp_path) -> None:
    procs = Processes(tmp_path)
    try:
        home = procs.home("tree")
        procs.start("tree", ["bash", "-c", "sleep 300 & sleep 300 & echo started; wait"], home)
        poll(lambda: len(procs.alive("tree")) == 3, 10, 0.05, "bash and its two sleeps")
        assert "start tree ===" in poll(lambda: "started" in procs.log("tree") and procs.log("tree"), 10, 0.05)
        # an orphan in its own session, its parent gone: found by its private FLWR_HOME
        orphan_home = procs.home("orphan")
        p = procs.start("orphan", ["bash", "-c", "setsid sleep 300 & exit 0"], orphan_home)
        p.wait(timeout=10)
        poll(lambda: pids_with_env("FLWR_HOME", str(orphan_home)), 10, 0.05, "the orphaned sleep")
        procs.kill("tree", signal.SIGTERM)
        assert procs.alive("tree") == []
        with pytest.raises(DeploymentError, match=r"tree exited \(-15\)"):
            procs.check_alive(["tree"])
    finally:
        left = procs.stop(grace_s=5)
    assert left == []
    assert pids_with_env("FLWR_HOME", str(orphan_home)) == []


def test_processes_restart_appends_to_the_same_log_and_check_alive_shows_it(tmp_path) -> None:
    procs = Processes(tmp_path)
    try:
        for word in ("first", "second"):
            procs.start("job", ["bash", "-c", f"echo {word}; exit 3"], procs.home("job")).wait(timeout=10)
        with pytest.raises(DeploymentError, match=r"(?s)job exited \(3\):.*first.*second"):
            procs.check_alive()
    finally:
        assert procs.stop(grace_s=2) == []


def test_loopback_federation_writes_credentials_and_a_tls_cli_connection(tmp_path) -> None:
    sites = [tmp_path / "site-a", tmp_path / "site-b"]
    for s in sites:
        s.mkdir()
    procs = Processes(tmp_path / "dep")
    fed = LoopbackFederation(procs, tmp_path / "dep", sites, keys=3, supernode_env={"OMP_NUM_THREADS": "1"})
    assert fed.sites == [s.resolve() for s in sites]
    for k in (1, 2, 3):  # one key pair a site, and the extra one asked for
        assert fed.certs.supernode_key(k).is_file() and fed.certs.supernode_pub(k).is_file()
    assert not fed.certs.supernode_pub(4).exists()
    conf = tomllib.loads((fed.cli_home / "config.toml").read_text())
    conn = conf["superlink"][conf["superlink"]["default"]]
    assert conn == {"address": f"127.0.0.1:{fed.port}", "root-certificates": str(fed.certs.ca_crt.resolve())}
    assert fed.cli_env["FLWR_HOME"] == str(fed.cli_home)
    with pytest.raises(ValueError, match="at least one site"):
        LoopbackFederation(procs, tmp_path / "none", [])
    assert procs.stop(grace_s=1) == []
