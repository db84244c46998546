"""The deployment tier: a real Flower deployment on loopback with TLS and SuperNode authentication.

``server.ops.certs`` (what ``smm certs`` writes) makes a CA, the SuperLink's certificate and three SuperNode key pairs; one
``flower-superlink`` (TLS, ``--enable-supernode-auth``, SQLite state) runs with a private FLWR_HOME;
the three public keys are registered with ``flwr supernode register``; three ``flower-supernode``
(``--root-certificates``, ``--auth-supernode-private-key``, ``--node-config 'site-dir="..."'``), each
with its own FLWR_HOME and synthetic site folder, join; ``flwr run`` of a staged copy of the app
trains for two rounds; the run must end ``finished:completed`` with two aggregated rounds in
``rounds.jsonl``. Then a fourth SuperNode with an UNREGISTERED key must be refused (observed on
1.42: it logs "Exit Code: 305 ... Failed to activate SuperNode" and exits with status 1). Every process is stopped by PID afterwards
(also on failure) and none may be left. The harness is ``server/ops/loopback.py``
(with ``tests/support/deployment.py``).

Run: ``.venv/bin/python -m pytest tests/deployment -m deployment -q`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from deployment import CONN, Federation  # tests/support (tests/conftest.py)

pytestmark = pytest.mark.deployment

EXIT_SUPERNODE_AUTH_REFUSED = 305  # Flower's exit code "SuperNode cannot activate" (logged; the status is 1)


def test_tls_and_node_auth_two_rounds(tmp_path, deployment):
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    # credentials (four key pairs: the fourth is never registered), three sites, the config
    fed = Federation(deployment, tmp_path, sites=3, keys=4)

    # SuperLink (TLS + node auth + SQLite state), the three sites' keys registered
    t0 = time.monotonic()
    superlink = fed.start_superlink()
    for k in (1, 2, 3):
        fed.register(k)
    timings["registered_s"] = time.monotonic() - t0

    # three SuperNodes, each with its own FLWR_HOME, key and site folder
    for k in (1, 2, 3):
        fed.start_supernode(k)

    # submit a staged copy of the app and poll until finished
    run_dir = fed.run_dir("run")
    t0 = time.monotonic()
    run_id = fed.submit(run_dir)
    status = fed.wait_finished(run_id, timeout_s=480, every_s=10.0,  # each `flwr ls` costs CPU the run needs
                               watch=("superlink", "supernode-1", "supernode-2", "supernode-3"))
    timings["run_s"] = time.monotonic() - t0
    if status != "finished:completed":
        pytest.fail(f"run {run_id} status {status!r}\n{fed.diagnostics(run_id, ['supernode-1'])}")

    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for rd in rounds[1:]:
        assert rd["status"] == "aggregated"
        assert len(rd["train"]["per_site"]) == 3
        assert all(m["num-examples"] > 0 for m in rd["train"]["per_site"].values())
        assert len(rd["val"]["per_site"]) == 3
        assert "loss" in rd["val"]["global"]["values"]

    # the three registered nodes are online (one line each in `flwr supernode list`)
    r = fed.flwr("supernode", "list", CONN, "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    listing = r.stdout

    # a fourth SuperNode with an unregistered key is refused
    t0 = time.monotonic()
    rogue = fed.start_supernode(1, key=4, name="supernode-rogue")
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
