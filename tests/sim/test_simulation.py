"""The simulation tier: ``smm simulate`` runs a real Flower simulation (own SuperLink, Ray) of three
synthetic sites for two rounds with all three tasks, and must leave nothing running.

Checked: the run ends ``finished:completed`` (exit status 0); ``rounds.jsonl`` has rounds 0..2 with
training metrics from every site and validation metrics per site; the global model moved away from
the initial one; the federated validation loss after round 2 is below the initial model's; and
every process of the simulation is gone afterwards (looked up independently, by its private
FLWR_HOME in the process environment).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from server.federation.loop import initial_weights
from server.ops.simulate import pids_with_env
from sim_cohort import SMALL, write_features_cohort
from smm_model.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]


def _smm(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smm_model.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _private_home(stdout: str) -> str:
    """The simulation's private FLWR_HOME, from the `flwr run <tmp>/app` line it prints."""
    m = re.search(r"\$ flwr run (\S+)/app sim ", stdout)
    assert m, stdout[-3000:]
    return m.group(1) + "/flwr"


def test_three_sites_two_rounds(tmp_path):
    cohort = write_features_cohort(tmp_path / "cohort", patients=24)
    config = tmp_path / "sim.yaml"
    config.write_text(f"name: sim-test\ndata:\n  sites_root: {cohort}\n")
    run_dir = tmp_path / "run"
    sets = [a for s in SMALL for a in ("--set", s)]
    t0 = time.monotonic()
    res = _smm("simulate", str(config), "--run-dir", str(run_dir), *sets, "--timeout", "400", timeout=500)
    took = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "finished:completed" in out and str(run_dir) in out

    # nothing of the simulation is left running, and its temporary folder is gone
    home = _private_home(res.stdout)
    assert pids_with_env("FLWR_HOME", home) == []
    assert not Path(home).parent.exists()
    assert "still alive" not in out

    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["status"] == "aggregated"
        per_site = r["train"]["per_site"]
        assert len(per_site) == 3
        for m in per_site.values():
            assert m["num-examples"] > 0 and np.isfinite(m["train-loss"]) and m["seconds"] > 0
            assert {f"coord-{t}-conflicts" for t in ("diagnosis", "grade", "survival")} <= set(m)
        assert len(r["val"]["per_site"]) == 3
        assert all(np.isfinite(v) and v > 0 for v in r["train"]["update_norms"].values())
    losses = [r["val"]["global"]["values"]["loss"] for r in rounds]
    assert losses[2] < losses[0], losses
    for task_metric in ("diagnosis.accuracy", "grade.auc", "survival.c_index"):
        assert task_metric in rounds[2]["val"]["global"]["values"]

    # the final (selected) model is not the initial one
    cfg = ExperimentConfig.from_yaml_text((run_dir / "config.yaml").read_text())
    final = torch.load(run_dir / "model.pt", weights_only=False)
    start = initial_weights(cfg)
    assert set(final["weights"]) == set(start)
    assert any(not np.array_equal(final["weights"][k].numpy(), start[k]) for k in start)
    assert json.loads((run_dir / "final_metrics.json").read_text())["test"]["patients"] > 0
    assert sorted(p.name for p in (run_dir / "site-logs").iterdir()) == ["site_1.log", "site_2.log", "site_3.log"]
    print(f"3 sites x 2 rounds: {took:.1f} s wall for `smm simulate`")


@pytest.mark.slow
def test_failed_run_exits_nonzero_and_stops_everything(tmp_path):
    """Every site is refused at preflight (features 32-wide, model expects 64): the ServerApp fails,
    the run ends finished:failed, the command says so (status 1) and still stops every process."""
    cohort = write_features_cohort(tmp_path / "cohort", sites=2, patients=8)
    config = tmp_path / "sim.yaml"
    config.write_text(f"name: sim-fail\ndata:\n  sites_root: {cohort}\n")
    sets = [a for s in [*SMALL, "model.feature_dim=64", "federation.min_nodes=2"] for a in ("--set", s)]
    res = _smm("simulate", str(config), "--run-dir", str(tmp_path / "run"), *sets, "--timeout", "300", timeout=400)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-4000:]
    assert "finished:failed" in out
    home = _private_home(res.stdout)
    assert pids_with_env("FLWR_HOME", home) == []
    assert not Path(home).parent.exists()
