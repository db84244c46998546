"""Fault tests of a real deployment (issue 14): sites that die, stall or come back, too few sites,
SuperLink restarts. Each starts its own TLS + node-auth federation of two tiny synthetic sites
(``tests/support/deployment.py``), injects the fault by PID (SIGKILL, SIGSTOP/SIGCONT, SIGTERM of
processes it started or found in its own FLWR_HOMEs), and checks what the run folder
(``rounds.jsonl``, checkpoints, ``failure.json``, ``model.pt``) and ``flwr ls`` say.

What Flower 1.42 does underneath (read in its source, flwr/server/superlink/linkstate and
flwr/supercore/heartbeat.py): a SuperNode (and each ClientApp/ServerApp task) heartbeats every
17-22 s and is offline once 2 x 30 s pass without one; from then on the SuperLink answers every
message to it that has no reply yet with a NODE_UNAVAILABLE error (sent from the SuperLink's own
node id, 1), also when the reply had arrived before. A message whose ``ttl``
(``federation.round_timeout_s``) passes without a reply gets an "expired" error. Seen in these
runs: a SuperNode finishes a stale message (and sends its late reply) before it pulls the next
one; the ServerApp exits ~9 s after its SuperLink stops, and ``flwr ls`` shows that run
``running`` after the restart, ``finished:failed`` later. Figures: benchmarks/results/reliability.json.

Run: ``PYTHONPATH=. OMP_NUM_THREADS=1 python -m pytest tests/deployment/test_faults.py -m deployment -s``;
``SMM_RELIABILITY_RESULTS=benchmarks/results/reliability.json`` records the figures printed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deployment import Federation, cmdline, poll, read_rounds, round_record  # tests/support (tests/conftest.py)
from server.runs.checkpoint import load_checkpoint, load_latest

pytestmark = pytest.mark.deployment

#: The tiny federation every fault test starts from (on top of sim_cohort.SMALL).
TINY = ["federation.local_epochs=1", "federation.site_optimizer=fresh", "federation.seed=7"]


def _kept(rec: dict) -> list[int]:
    return sorted(int(n) for n in (rec.get("train") or {}).get("kept") or [])


def _dropped(rec: dict) -> dict[int, str]:
    return {int(d["node"]): d["reason"] for d in (rec.get("train") or {}).get("dropped") or []}


def _wait_round(fed: Federation, run_dir: Path, r: int, k: int, seen: set[int], timeout_s: float) -> dict:
    """Round ``r``'s record once written, adding to ``seen`` every ClientApp process of site k alive
    before it was (each scan comes before the look at rounds.jsonl, so none of them can be working
    on a message of a later round: those are sent after the record is written)."""
    def done():
        pids = fed.processes(f"supernode-{k}", "flwr-clientapp")
        rec = round_record(run_dir, r)
        if rec is None:
            seen.update(pids)
        return rec

    return poll(done, timeout_s, 0.2, f"round {r}'s record")


def _three_rounds(deployment, tmp_path: Path, timeout_s: float) -> tuple[Federation, Path, int, float, set[int]]:
    """Two sites, ``min_nodes = 1`` (a round closes from the other site), three rounds: submitted,
    returned once preflight is done and round 1's messages go out (round 0's record is written just
    before). (federation, run folder, run id, monotonic time of the submission, the PIDs of site 2's
    ClientApps until then: preflight's, which may still be exiting)"""
    fed = Federation(deployment, tmp_path, sites=2, overrides=[
        *TINY, "federation.rounds=3", "federation.min_nodes=1", f"federation.round_timeout_s={timeout_s:g}",
        "federation.wait_for_nodes_s=60"]).start()
    run_dir = fed.run_dir("run")
    t_run = time.monotonic()
    run_id = fed.submit(run_dir)
    seen: set[int] = set()
    try:
        _wait_round(fed, run_dir, 0, 2, seen, 240)
    except (AssertionError, TimeoutError) as e:
        pytest.fail(f"{e}\n{fed.diagnostics(run_id, ['supernode-1', 'supernode-2'])}")
    return fed, run_dir, run_id, t_run, seen


def _three_rounds_done(fed: Federation, run_dir: Path, run_id: int, t_run: float,
                       figures: dict) -> tuple[list[dict], str]:
    """Wait for ``_three_rounds``'s run to end; it must complete with rounds 0..3 recorded.
    (the round records, a description of them for failure messages)"""
    status = fed.wait_finished(run_id, timeout_s=300)
    figures["run_s"] = round(time.monotonic() - t_run, 1)
    rounds = read_rounds(run_dir)
    diag = f"rounds: {[(r['round'], r['status'], _kept(r), _dropped(r), r.get('timings')) for r in rounds]}"
    assert status == "finished:completed", f"{status}\n{diag}\n{fed.diagnostics(run_id, ['supernode-2'])}"
    assert [r["round"] for r in rounds] == [0, 1, 2, 3], diag
    return rounds, diag


def _site_2_on_round_1(fed: Federation, preflight: set[int]) -> None:
    """Returns once site 2 works on round 1's train message (a ClientApp other than preflight's)."""
    poll(lambda: set(fed.processes("supernode-2", "flwr-clientapp")) - preflight, 120, 0.1,
         "site 2's ClientApp on round 1")


def _trained_again(run_dir: Path, node: int, what: str) -> dict:
    """The first round after round 1 that kept ``node``'s update."""
    return poll(lambda: next((r for r in read_rounds(run_dir) if r["round"] > 1 and node in _kept(r)), None),
                300, 0.5, f"a later round trained on site 2 (node {node}) {what}")


@pytest.mark.timeout(1200)
def test_killed_site_round_closes_then_site_rejoins(tmp_path, deployment, figures):
    """Scenario 1: site 2's SuperNode (its whole process tree) is SIGKILLed while it trains in
    round 1. The round must close from site 1 within ``round_timeout_s`` (the SuperLink answers for
    the dead node once its heartbeat patience runs out) and be aggregated without it; site 2 is
    restarted (same key, same node id) and must be trained on again in a later round; the run completes."""
    timeout_s = 180.0  # far above a normal round (<= 100 s measured on a loaded 2-core machine)
    fed, run_dir, run_id, t_run, preflight = _three_rounds(deployment, tmp_path, timeout_s)
    a, b = fed.node_ids[1], fed.node_ids[2]
    try:
        _site_2_on_round_1(fed, preflight)
        deployment.kill("supernode-2")
        t_kill = time.monotonic()
        rec1 = poll(lambda: round_record(run_dir, 1), timeout_s + 60, 0.2, "round 1's record")
        figures["round_closed_after_kill_s"] = round(time.monotonic() - t_kill, 1)
        fed.start_supernode(2)
        t_restart = time.monotonic()
        rejoined = _trained_again(run_dir, b, "after its restart")
        figures["site_rejoined_after_restart_s"] = round(time.monotonic() - t_restart, 1)
        figures["rejoined_round"] = rejoined["round"]
    except (AssertionError, TimeoutError) as e:
        pytest.fail(f"{e}\n{fed.diagnostics(run_id, ['supernode-1', 'supernode-2'])}")
    rounds, diag = _three_rounds_done(fed, run_dir, run_id, t_run, figures)
    assert figures["round_closed_after_kill_s"] <= timeout_s, diag
    assert rec1["status"] == "aggregated" and _kept(rec1) == [a] and b in rec1["train"]["sampled"], diag
    assert b in _dropped(rec1), diag
    assert all(r["status"] == "aggregated" for r in rounds[1:]), diag
    assert rounds[-1]["round"] == 3 and _kept(rounds[-1]) == sorted((a, b)), diag
    assert (run_dir / "model.pt").is_file() and not (run_dir / "failure.json").exists()
    figures["dropped_reason"] = _dropped(rec1)[b]
    # The SuperLink's error for a dead node is NODE_UNAVAILABLE (README: "E_NODE_UNAVAILABLE").
    assert _dropped(rec1)[b] == "E_NODE_UNAVAILABLE", diag
    figures["_passed"] = True


@pytest.mark.timeout(1200)
def test_a_site_paused_past_the_heartbeat_patience_is_dropped_then_trains_again(tmp_path, deployment, figures):
    """Scenario 5, long pause: site 2's whole machine (SuperNode, SuperExec, ClientApp) is stopped
    with SIGSTOP while it trains in round 1 and held until round 1 has closed without it (the
    SuperLink declares the silent node unavailable after its heartbeat patience); SIGCONT then, with
    no restart: the site must be trained on again in a later round and the run complete."""
    timeout_s = 180.0
    fed, run_dir, run_id, t_run, preflight = _three_rounds(deployment, tmp_path, timeout_s)
    a, b = fed.node_ids[1], fed.node_ids[2]
    try:
        _site_2_on_round_1(fed, preflight)
        deployment.send_signal("supernode-2", signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            rec1 = poll(lambda: round_record(run_dir, 1), timeout_s + 60, 0.2, "round 1's record")
        finally:
            figures["paused_s"] = round(time.monotonic() - t_stop, 1)
            deployment.send_signal("supernode-2", signal.SIGCONT)
        t_cont = time.monotonic()
        back = _trained_again(run_dir, b, "after SIGCONT")
        figures["trained_again_after_cont_s"] = round(time.monotonic() - t_cont, 1)
        figures["trained_again_round"] = back["round"]
    except (AssertionError, TimeoutError) as e:
        pytest.fail(f"{e}\n{fed.diagnostics(run_id, ['supernode-1', 'supernode-2'])}")
    rounds, diag = _three_rounds_done(fed, run_dir, run_id, t_run, figures)
    assert figures["paused_s"] <= timeout_s + 1, diag
    assert rec1["status"] == "aggregated" and _kept(rec1) == [a] and b in _dropped(rec1), diag
    figures["dropped_reason"] = _dropped(rec1)[b]
    # closed by the SuperLink's verdict on the silent node (its heartbeat patience), not by the timeout
    assert _dropped(rec1)[b] == "E_NODE_UNAVAILABLE", diag
    assert _kept(rounds[-1]) == sorted((a, b)), diag
    figures["_passed"] = True


def _running_clientapps(fed: Federation, k: int, exclude: set[int] = frozenset()) -> list[int]:
    """Site k's ClientApp processes that have started on their message (they have loaded torch,
    which only the app imports, after the ClientApp pulled its input), not counting ``exclude``."""
    out = []
    for pid in fed.processes(f"supernode-{k}", "flwr-clientapp"):
        try:
            if pid not in exclude and "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                out.append(pid)
        except OSError:
            pass
    return out


def _replied_rounds(supernode_log: str) -> list[int]:
    """The rounds a SuperNode sent a train reply for: Flower logs ``[RUN <id>, ROUND <r>]`` before
    ``Sending: train message``."""
    rounds, current = [], None
    for line in supernode_log.splitlines():
        m = re.search(r"\[RUN \d+, ROUND (\d+)\]", line)
        if m:
            current = int(m.group(1))
        elif "Sending: train message" in line and current is not None:
            rounds.append(current)
    return rounds


def _slow_down(pids: list[int], until, stop_s: float = 14.0, run_s: float = 1.0) -> float:
    """Make processes slow until ``until()`` is truthy: SIGSTOP, with a ``run_s`` SIGCONT window every
    ``stop_s + run_s`` seconds, so that their heartbeat (due every 17-22 s, Flower's patience 60 s)
    still goes out while their work hardly progresses. Returns the seconds; leaves them running."""
    def signal_all(sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    t0 = time.monotonic()
    try:
        while not until():
            signal_all(signal.SIGSTOP)
            deadline = time.monotonic() + stop_s
            while time.monotonic() < deadline and not until():
                time.sleep(0.2)
            signal_all(signal.SIGCONT)
            time.sleep(run_s)
    finally:
        signal_all(signal.SIGCONT)
    return time.monotonic() - t0


@pytest.mark.timeout(1200)
def test_straggler_dropped_paused_site_waited_for(tmp_path, deployment, figures):
    """Scenarios 4 and 5 (short pause). Round 1: once site 2's ClientApp has started on its train
    message it is made very slow (stopped, with a short window every 15 s for its heartbeat) until
    ``round_timeout_s`` has closed the round: the round is aggregated from site 1 alone, site 2
    dropped. Then the ClientApp runs at full speed, finishes the stale message and sends its late
    reply, which must reach no later round (the server pulls only a round's own message ids): in
    round 2 site 2 is trained on as usual. Round 3: site 2's whole machine is paused (SIGSTOP) for
    ``pause_s``, shorter than Flower's heartbeat patience: the round waits for it and aggregates both."""
    timeout_s, pause_s = 150.0, 20.0  # the timeout: above a normal round on a loaded 2-core machine
    fed, run_dir, run_id, t_run, seen = _three_rounds(deployment, tmp_path, timeout_s)
    a, b = fed.node_ids[1], fed.node_ids[2]
    try:
        t_push = time.monotonic()  # round 1's messages go out right after round 0's record
        late = poll(lambda: _running_clientapps(fed, 2, seen), 120, 0.2, "site 2's ClientApp on round 1")
        figures["straggler_slowed_s"] = round(_slow_down(late, lambda: round_record(run_dir, 1), run_s=0.5), 1)
        figures["straggler_round_closed_s"] = round(time.monotonic() - t_push, 1)
        _wait_round(fed, run_dir, 2, 2, seen, timeout_s + 120)  # seen: + the stale ClientApp, round 2's
        # round 3: site 2 paused pause_s once it works on round 3's message
        poll(lambda: _running_clientapps(fed, 2, seen), 120, 0.2, "site 2's ClientApp on round 3")
        deployment.send_signal("supernode-2", signal.SIGSTOP)
        try:
            time.sleep(pause_s)  # the fault itself: a fixed pause
        finally:
            deployment.send_signal("supernode-2", signal.SIGCONT)
    except (AssertionError, TimeoutError) as e:
        pytest.fail(f"{e}\n{fed.diagnostics(run_id, ['supernode-1', 'supernode-2'])}")
    rounds, diag = _three_rounds_done(fed, run_dir, run_id, t_run, figures)
    # the rounds site 2 sent a train reply for (round 1's: the late one, after round 1 closed)
    figures["site_2_replied_rounds"] = _replied_rounds(deployment.log("supernode-2", tail=1_000_000))
    rec1, rec2, rec3 = rounds[1:]
    figures["straggler_round_train_s"] = round(rec1["timings"]["train"], 1)
    figures["round_after_straggler_train_s"] = round(rec2["timings"]["train"], 1)
    figures["paused_round_train_s"] = round(rec3["timings"]["train"], 1)
    figures["straggler_dropped_reason"] = _dropped(rec1).get(b)
    # round 1: closed at the timeout, from site 1 alone; site 2 sampled and dropped
    assert rec1["status"] == "aggregated" and _kept(rec1) == [a] and b in rec1["train"]["sampled"], diag
    assert b in _dropped(rec1) and str(b) not in rec1["train"]["per_site"], diag
    assert timeout_s - 5 <= rec1["timings"]["train"] <= timeout_s + 10, diag
    # rounds 2 and 3 (site 2 paused pause_s): both sites, site 2 with its usual data, no outlier
    for rec in (rec2, rec3):
        assert rec["status"] == "aggregated" and _kept(rec) == sorted((a, b)) and not _dropped(rec), diag
        assert rec["train"]["per_site"][str(b)]["num-examples"] == rec3["train"]["per_site"][str(b)]["num-examples"]
        assert not rec["train"]["norm_outliers"], diag
    assert rec3["timings"]["train"] >= pause_s, diag
    figures["_passed"] = True


def _model_weights(run_dir: Path) -> dict[str, np.ndarray]:
    payload = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)
    return {k: v.numpy() for k, v in payload["weights"].items()}


def _differing(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> list[str]:
    """Names whose arrays differ in any bit (or exist on one side only)."""
    return sorted(k for k in set(x) | set(y)
                  if k not in x or k not in y or x[k].dtype != y[k].dtype or x[k].tobytes() != np.asarray(y[k]).tobytes())


def _complete(fed: Federation, run_dir: Path, resume: bool, what: str) -> int:
    run_id = fed.submit(run_dir, resume=resume)
    status = fed.wait_finished(run_id, timeout_s=480)
    if status != "finished:completed":
        pytest.fail(f"{what}: run {run_id} {status!r}\n{fed.diagnostics(run_id, ['supernode-1', 'supernode-2'])}")
    return run_id


@pytest.mark.timeout(1800)
def test_lost_sites_fail_the_run_and_resume_matches_uninterrupted(tmp_path, deployment, figures):
    """Scenarios 2 and 3. A reference run completes (2 sites, 2 rounds). A second run loses site 2
    right after round 1 (the ServerApp is held with SIGSTOP while the site shuts down, so the loss
    falls between rounds and round 1 is the reference's round 1): it must fail within
    ``wait_for_nodes_s`` with failure.json and ``finished:failed``, its round-1 checkpoint intact.
    The SuperLink is restarted on its database (between runs): the nodes come back with their ids
    and the run history is kept. Resumed (``resume = true``) the run completes with the reference's
    final weights bit for bit. (A restart during a run: test_superlink_restart_during_a_run_then_resume.)"""
    wait_s = 20.0
    fed = Federation(deployment, tmp_path, sites=2, overrides=[
        *TINY, "federation.rounds=2", "federation.min_nodes=2", "federation.round_timeout_s=150",
        f"federation.wait_for_nodes_s={wait_s:g}"]).start()
    a, b = fed.node_ids[1], fed.node_ids[2]
    supernodes = ["supernode-1", "supernode-2"]

    # -- the reference: uninterrupted ----------------------------------------------------------------
    t0 = time.monotonic()
    ref = fed.run_dir("ref")
    ref_id = _complete(fed, ref, False, "reference run")
    figures["reference_run_s"] = round(time.monotonic() - t0, 1)
    ref_model, ref_last = _model_weights(ref), load_latest(ref)
    assert ref_last is not None and ref_last.round == 2

    # -- site 2 lost after round 1: the run fails within wait_for_nodes_s -----------------------------
    lost = fed.run_dir("lost")
    lost_id = fed.submit(lost)
    try:
        poll(lambda: round_record(lost, 0), 240, 0.2, "round 0 of the second run")
        serverapp = poll(lambda: fed.processes("superlink", "flwr-serverapp"), 30, 0.1, "the ServerApp process")
        poll(lambda: round_record(lost, 1), 240, 0.005, "round 1 of the second run")
        for pid in serverapp:
            os.kill(pid, signal.SIGSTOP)  # hold the ServerApp between rounds 1 and 2
        try:
            deployment.kill("supernode-2", signal.SIGTERM)  # the site shuts down (its SuperNode signs off)
            poll(lambda: fed.nodes().get(b) not in (None, "online"), 60, 0.5, f"node {b} offline")
        finally:
            for pid in serverapp:
                os.kill(pid, signal.SIGCONT)
        t_lost = time.monotonic()
        poll(lambda: (lost / "failure.json").exists(), wait_s + 120, 0.2, "failure.json")
        figures["failed_after_site_lost_s"] = round(time.monotonic() - t_lost, 1)
        status = fed.wait_finished(lost_id, timeout_s=240)
    except (AssertionError, TimeoutError) as e:
        pytest.fail(f"{e}\n{fed.diagnostics(lost_id, supernodes)}")
    failure = json.loads((lost / "failure.json").read_text())
    figures["failure"] = {k: failure.get(k) for k in ("error", "reason", "last_checkpoint_round")}
    diag = f"failure.json: {failure}\nrounds: {[(r['round'], r['status'], _kept(r)) for r in read_rounds(lost)]}"
    assert status == "finished:failed", f"{status}\n{diag}\n{fed.diagnostics(lost_id)}"
    assert figures["failed_after_site_lost_s"] <= wait_s + 15, diag
    assert failure["error"] == "NodeWaitTimeout" and "only 1 of 2 sites connected" in failure["reason"], diag
    assert failure["last_checkpoint_round"] == 1 and [r["round"] for r in read_rounds(lost)] == [0, 1], diag
    latest = load_latest(lost)  # verifies the checksum
    assert latest is not None and latest.round == 1, diag
    assert _differing(latest.weights, load_checkpoint(ref, 1).weights) == [], "round 1 differs from the reference's"

    # -- SuperLink restart between runs, on its database ------------------------------------------------
    t0 = time.monotonic()
    deployment.kill("superlink", signal.SIGTERM)
    fed.start_superlink()
    fed.start_supernode(2)
    fed.wait_online({a, b})
    figures["superlink_restart_to_nodes_online_s"] = round(time.monotonic() - t0, 1)
    assert fed.status(ref_id) == "finished:completed" and fed.status(lost_id) == "finished:failed", \
        "the run history did not survive the restart"

    # -- resumed: the reference's weights --------------------------------------------------------------
    t0 = time.monotonic()
    _complete(fed, lost, True, "resumed run")
    figures["resumed_run_s"] = round(time.monotonic() - t0, 1)
    rounds = read_rounds(lost)
    assert [r["round"] for r in rounds] == [0, 1, 2] and _kept(rounds[2]) == sorted((a, b)), rounds
    assert _differing(load_latest(lost).weights, ref_last.weights) == [], "final checkpoint differs from the reference's"
    assert _differing(_model_weights(lost), ref_model) == [], "model.pt differs from the reference's"
    figures["resume_bit_identical"] = True
    figures["_passed"] = True


@pytest.mark.timeout(1200)
def test_superlink_restart_during_a_run_then_resume(tmp_path, deployment, figures):
    """Scenario 3, during a run: the SuperLink process is stopped (SIGTERM) after round 1 of 2 and
    started again on its database. What the ServerApp and ``flwr ls`` then do is recorded (the
    ServerApp loses its SuperLink); the coordinator's resume (``resume = true``, same run folder)
    must complete the run from the round-1 checkpoint, rounds without gaps or duplicates."""
    fed = Federation(deployment, tmp_path, sites=2, overrides=[
        *TINY, "federation.rounds=2", "federation.min_nodes=2", "federation.round_timeout_s=180",
        "federation.wait_for_nodes_s=60"]).start()
    a, b = fed.node_ids[1], fed.node_ids[2]
    supernodes = ["supernode-1", "supernode-2"]
    during = fed.run_dir("during")
    during_id = fed.submit(during)
    try:
        poll(lambda: round_record(during, 1), 300, 0.2, "round 1 of the third run")
        serverapp = fed.processes("superlink", "flwr-serverapp")
        link = deployment.procs["superlink"]
        t_cut = time.monotonic()
        link.send_signal(signal.SIGTERM)  # the SuperLink process only, as `kill <pid>` would
        link.wait(timeout=60)
        try:  # does the ServerApp notice, and end by itself?
            poll(lambda: not any(cmdline(p) for p in serverapp), 90, 0.5, "the ServerApp to exit")
            figures["during_serverapp_exited_after_s"] = round(time.monotonic() - t_cut, 1)
        except TimeoutError:
            figures["during_serverapp_exited_after_s"] = None
        deployment.kill("superlink", signal.SIGTERM)  # what is left of its tree (a service manager would)
        fed.start_superlink()
        fed.wait_online({a, b})
        figures["during_status_after_restart"] = fed.status(during_id)
        figures["during_rounds_before_resume"] = [r["round"] for r in read_rounds(during)]
    except (AssertionError, TimeoutError) as e:
        pytest.fail(f"{e}\n{fed.diagnostics(during_id, supernodes)}")
    t0 = time.monotonic()
    _complete(fed, during, True, "run resumed after the SuperLink restart")
    figures["during_resumed_run_s"] = round(time.monotonic() - t0, 1)
    rounds = read_rounds(during)
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["status"] == "aggregated" for r in rounds[1:]), rounds
    assert _kept(rounds[2]) == sorted((a, b)) and (during / "model.pt").is_file(), rounds
    figures["resumed_after_round"] = json.loads((during / "final_metrics.json").read_text()).get("resumed_after_round")
    assert figures["resumed_after_round"] in figures["during_rounds_before_resume"], figures
    # the interrupted run: never reported completed (on flwr 1.42 it stays "running" after the restart)
    figures["during_status_at_end"] = fed.status(during_id)
    assert figures["during_status_at_end"] != "finished:completed", figures
    figures["_passed"] = True
