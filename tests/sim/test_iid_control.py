"""IID control: when every site draws its patients from one distribution, the federation's
protocol (``federation.local_steps`` with ``federation.site_optimizer: persist``) must reach what
training on the pooled patients reaches, round for round. A gap here is the protocol's own cost
(averaging, the optimizer kept at the sites), not the sites' heterogeneity.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import client.app as client_app
import client.baselines.runfolder as rf
from client.baselines.centralized import run_centralized
from smm_model.contract.sites import simulation_site_dirs
from server.federation.loop import run_federation
from sim_cohort import IID, SMALL, write_features_cohort
from smm_model.config import ExperimentConfig
from test_contract_inprocess import InProcessFlower

#: Federated best validation loss / centralized best validation loss may exceed 1 by this much.
#: Measured with step-matched local work as below (IID cohorts of 3 sites x 16-20 patients, 2-3
#: rounds, cohort seeds 5-12, data.max_patches 32 or 64, 31 runs): the ratio ran from 0.954 to
#: 1.025 (this test's run: initial 4.1355, centralized 3.7068, federated 3.6362, ratio 0.981), so
#: 10 % leaves about 4x the worst gap seen. A federation that learned nothing would sit at the
#: initial/centralized ratio, 1.07-1.16 on those cohorts (1.116 here): the ratio alone is not
#: enough, hence the second check.
RATIO_TOLERANCE = 0.10
#: ...and the federation must recover at least this share of the centralized run's improvement
#: over the initial model (measured 0.80-1.26 over the same runs).
MIN_SHARE_OF_IMPROVEMENT = 0.5


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_an_iid_federation_reaches_the_pooled_runs_validation_loss(tmp_path, monkeypatch):
    cohort = write_features_cohort(tmp_path / "cohort", patients=16, seed=5, **IID)
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(tmp_path / "site-logs"))
    base = [*SMALL, f"data.sites_root={cohort}", "data.max_patches=32", "federation.rounds=2",
            "federation.local_epochs=1"]
    cfg = ExperimentConfig.from_yaml_text("", base)
    dirs = simulation_site_dirs(cfg.data)
    central = run_centralized(cfg, dict(zip(rf.site_names(dirs), dirs)), tmp_path / "central", say=lambda _m: None)
    rounds = [json.loads(line) for line in (tmp_path / "central" / rf.ROUNDS_FILE).read_text().splitlines()]
    initial = rounds[0]["val"]["global"]["values"]["loss"]
    n_train = rounds[1]["train"]["aggregate"]["num-examples"]
    # Each site takes as many optimizer steps per round as the pooled run does (one pass over all
    # training patients): FedAvg of K parallel steps on IID data then follows K pooled steps.
    steps = n_train // cfg.train.batch_size
    fcfg = ExperimentConfig.from_yaml_text("", [*base, f"federation.local_steps={steps}",
                                                "federation.site_optimizer=persist"])
    fed = run_federation(InProcessFlower(3), fcfg, tmp_path / "fed", poll_s=0.01)

    c, f = central["selection_value"], fed["selection_value"]
    what = f"initial {initial:.4f}, centralized {c:.4f}, federated {f:.4f} (ratio {f / c:.3f})"
    assert central["selection_metric"] == fed["selection_metric"] == "loss", what
    assert c < initial, what  # the pooled run learned: the comparison means something
    assert f <= (1 + RATIO_TOLERANCE) * c, what
    assert initial - f >= MIN_SHARE_OF_IMPROVEMENT * (initial - c), what
