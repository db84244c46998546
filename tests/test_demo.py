"""``make demo`` itself, at a tiny size: the Makefile target a newcomer runs, end to end.

The real demo (3 x 40 patients, 2,048-pixel slides, 5 rounds) takes minutes; here the same target
runs with 12 patients per site on 512-pixel slides, one round, so every stage is exercised:
``smm synth`` with real TIFF slides, ``smm extract`` with the ResNet-50 trunk (random weights),
``smm site check``, ``smm simulate`` (its own SuperLink, Flower's simulation engine),
``smm centralized`` and ``smm report`` on both run folders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.timeout(1000)  # above the make call's own 900 s: 300 s quiet, 603 s measured on a loaded machine
def test_make_demo_runs_every_stage_at_a_tiny_size(tmp_path):
    sites, run = tmp_path / "sites", tmp_path / "run"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    venv = Path(sys.executable).parent.parent  # the environment running the tests, not a new one
    overrides = ["federation.rounds=1", "federation.local_epochs=1", "federation.min_site_patients=1"]
    cmd = ["make", "--no-print-directory", "-o", str(venv / ".installed"), "demo", f"VENV={venv}",
           f"STAMP={venv / '.installed'}", f"DEMO_SITES={sites}", f"DEMO_RUN={run}",
           "DEMO_SYNTH=--patients-per-site 12 --slide-size 512 --split 0.5,0.25,0.25",
           "DEMO_SET=" + " ".join(f"--set {o}" for o in overrides)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "0 failed" in out and "3 site folders pass smm site check" in out
    for stage in range(1, 6):
        assert f"[demo {stage}/5]" in out  # progress at every stage
    report = run / "federated" / "report.html"
    assert p.stdout.strip().splitlines()[-1] == f"Report: {report}"  # the last thing a newcomer reads
    html = report.read_text()
    assert "random" in html and "synthetic" in html.lower()  # the report says what the numbers are
    assert not re.search(r"https?://", html)
    metrics = json.loads((run / "federated" / "metrics.json").read_text())
    final = json.loads((run / "federated" / "final_metrics.json").read_text())
    assert final["mode"] == "federated" and final["rounds"] == 1
    assert sorted(i["label"] for i in final["site_info"].values()) == ["site_1", "site_2", "site_3"]
    assert all(i["encoder"] == "resnet50_trunc" and i["weights"] == "random" for i in final["site_info"].values())
    central = json.loads((run / "centralized" / "final_metrics.json").read_text())
    assert [r["mode"] for r in metrics["runs"]] == ["federated", "centralized"]  # the comparison is in the report
    assert metrics["runs"][0]["test"]["global"]["values"] == final["test"]["global"]["values"]
    assert metrics["runs"][1]["test"]["global"]["values"] == central["test"]["global"]["values"]
    assert metrics["report_errors"] == []
