"""``smm report`` on the run folder of a real federation (simulation tier): whatever the server writes,
the report reads. The federation loop drives the real ClientApp in-process, as in
``test_contract_inprocess.py``; the report's own behaviour is tested fast in tests/server/report/test_report.py."""

from __future__ import annotations

import json
import re

import pytest

import client.app as client_app
from server.federation.loop import run_federation
from server.report.build import METRICS_JSON, write_report
from sim_cohort import SMALL, write_features_cohort
from smm_model.config import ExperimentConfig
from test_contract_inprocess import InProcessFlower


@pytest.mark.slow
def test_report_of_a_real_in_process_federation(tmp_path, monkeypatch):
    cohort = write_features_cohort(tmp_path / "cohort", patients=20)
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(tmp_path / "site-logs"))
    cfg = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}"])
    final = run_federation(InProcessFlower(3), cfg, tmp_path / "run", poll_s=0.01)
    html = write_report([tmp_path / "run"]).read_text()
    metrics = json.loads((tmp_path / "run" / METRICS_JSON).read_text())
    entry = metrics["runs"][0]
    assert metrics["report_errors"] == [] and entry["complete"] is True and entry["problems"] == []
    recorded = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert entry["test"]["global"]["values"] == recorded["test"]["global"]["values"]
    assert entry["test"]["per_site"] == recorded["test"]["per_site"]
    assert entry["selection"]["best_round"] == final["best_round"]
    sections = dict(re.findall(r'<section id="([a-z]+)">(.*?)</section>', html, flags=re.S))
    assert sections["curves"].count("<img ") == 5 and sections["coordination"].count("<img ") == 1
    if "stats" in recorded["test"]["global"]:  # the pooled statistics are recorded (newer server)
        assert sections["classification"].count("<img ") == 4 and sections["survival"].count("<img ") == 1
    if recorded.get("site_info"):  # sites appear under their labels
        labels = [i["label"] for i in recorded["site_info"].values() if i.get("label")]
        assert all(f"<td>{label}</td>" in sections["test"] for label in labels)
