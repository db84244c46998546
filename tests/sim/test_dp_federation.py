"""DP-SGD through the federation: every site trains privately, keeps one ledger across rounds and
runs, reports its cumulative epsilon, and declines a round that would pass its budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sim_cohort import SMALL, write_features_cohort
from test_contract_inprocess import InProcessFlower

from client.local.ledger import PrivacyLedger, epsilon_of
from server.federation.loop import run_federation
from server.report.build import write_report
from smm_model.config import ExperimentConfig
from smm_model.contract import wire

DP = ["privacy.dp=true", "privacy.dp_noise_multiplier=1.0", "privacy.dp_max_grad_norm=1.0",
      "train.coordination=off", "federation.local_steps=2"]


def rounds(run_dir):
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_dp_rounds_are_accounted_in_one_ledger_per_site_across_runs(tmp_path):
    cohort = write_features_cohort(tmp_path / "cohort", patients=20)
    cfg = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}", *DP])
    run_federation(InProcessFlower(3), cfg, tmp_path / "a", poll_s=0.01)
    recs = rounds(tmp_path / "a")[1:]
    assert [r["status"] for r in recs] == ["aggregated", "aggregated"]
    eps = {}
    for r in recs:
        for node, m in r["train"]["per_site"].items():
            assert m[wire.DP_SIGMA] == 1.0 and m[wire.DP_CLIP] == 1.0 and 0 < m[wire.DP_SAMPLE_RATE] <= 1
            assert wire.TRAIN_LOSS not in m  # a mean of un-noised losses: kept at the site
            eps.setdefault(node, []).append(m[wire.DP_EPSILON])
    assert all(a < b for a, b in eps.values())  # cumulative: round 2 adds to round 1
    for k in (1, 2, 3):
        ledger = PrivacyLedger.open(cohort / f"site_{k}" / "privacy" / "ledger.json")
        assert len(ledger.history) == 2 and {e.round for e in ledger.history} == {1, 2}
        assert np.isclose(ledger.epsilon(cfg.privacy.dp_delta), epsilon_of(ledger.history, cfg.privacy.dp_delta))
    first = max(max(v) for v in eps.values())
    md = (write_report([tmp_path / "a"]).parent / "report.md").read_text()
    assert "Differential privacy" in md and f"{eps[sorted(eps)[0]][-1]:.3f}" in md

    # A second run at the same sites continues their ledgers: its first round already spends more.
    one = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}", *DP, "federation.rounds=1"])
    run_federation(InProcessFlower(3), one, tmp_path / "b", poll_s=0.01)
    again = rounds(tmp_path / "b")[1]["train"]["per_site"]
    assert min(m[wire.DP_EPSILON] for m in again.values()) > first * 0.99

    # A budget the planned run would pass: every site refuses at the preflight, before any training.
    tight = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}", *DP, "federation.rounds=1",
                                                 "privacy.dp_epsilon_budget=1.0"])
    with pytest.raises(Exception, match="E_PRIVACY_BUDGET|sites"):
        run_federation(InProcessFlower(3), tight, tmp_path / "c", poll_s=0.01)
    for k in (1, 2, 3):  # nothing was reserved
        assert len(PrivacyLedger.open(cohort / f"site_{k}" / "privacy" / "ledger.json").history) == 3
