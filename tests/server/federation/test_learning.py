"""Sites that really train: the server workflow around the real site code learns (synthetic patients).

The sites here call the site side's own round functions, ``client.local.round.preflight_summary``,
``train_round`` and ``evaluate_round`` (tests may import the site side; ``server`` never does), on a
small synthetic features-only cohort written by ``client.cohorts.synth``. The server turns the
sites' ``EvalStats`` into metrics with ``metrics_from_eval``, as in a real run.

The bar is relative to the data: on the pooled test patients the federated model must beat the
majority-class predictor (accuracy = share of the most common class, AUC = 0.5: constant scores
rank no pair) by a margin that a model that did not learn cannot reach. The resumed run must give
the same weights as the uninterrupted one with real gradient steps in between.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from server_fakes import Crash, FakeTransport, config

from client.cohorts.synth import CohortSpec, write_cohort
from client.local.round import evaluate_round, load_site, preflight_summary, train_round
from server.federation.loop import run_federation
from server.federation.messages import (KEY_EXPERIMENT, KEY_LOCAL_EPOCHS, KEY_LR, KEY_ROUND, KEY_SHARED, KEY_SPLIT,
                                        PREFLIGHT, TRAIN, Instruction, Reply)
from server.runs.checkpoint import load_checkpoint
from smm_model.config import ExperimentConfig
from smm_model.contract.protocol import SharedStats
from smm_model.contract.wire import KEY_VALIDATE, VALIDATION

CFG = ("model.tasks=[diagnosis]", "federation.rounds=3", "federation.local_epochs=2", "train.lr=0.004",
       "federation.selection_metric=diagnosis.accuracy",
       # Exact statistics: at k = 5 the test confusion matrices of these 19-patient splits are
       # almost wholly suppressed (tests/sim/test_privacy_attack.py runs the default policy).
       "privacy.min_cell=1")
#: The federated model's margins over the majority-class predictor on the test patients. A model
#: that learned nothing scores at most about the majority share and an AUC near 0.5 (about 0.2 and
#: 0.4 here with a vanishing learning rate); the trained one about 0.87 and 0.98.
ACCURACY_MARGIN = 0.25
AUC_BAR = 0.8


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory) -> list[Path]:
    """Two sites of 64 synthetic patients (a third of them in the test split), features only, at the
    dimensions of ``server_fakes.SMALL``; the class signal is strong enough to learn in 3 rounds."""
    d = CohortSpec()
    feats = replace(d.features, feature_dim=24, genes_tumour=10, genes_micro=14, min_patches=20, max_patches=60,
                    gene_noise=1.0, patient_noise=1.0)
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, replace(d, sites=2, patients_per_site=64, features_only=True, seed=3, split=(0.5, 0.2, 0.3),
                              features=feats), log=lambda *_: None)
    return sorted(p for p in out.iterdir() if p.is_dir())


class RoundSite:
    """A site that answers with the site side's real round functions on its own folder (the message
    decoding is ``client/app.py``'s, without Flower's types)."""

    def __init__(self, node_id: int, site_dir: Path) -> None:
        self.node_id, self.site_dir = node_id, site_dir

    def __call__(self, ins: Instruction) -> Reply:
        cfg = ExperimentConfig.from_yaml_text(ins.config[KEY_EXPERIMENT])
        if ins.message_type == PREFLIGHT:
            return Reply(self.node_id, records={"summary": {"json": preflight_summary(self.site_dir, cfg).to_json()}})
        shared = SharedStats.from_json(ins.config[KEY_SHARED])
        state = {k: torch.from_numpy(np.array(v)) for k, v in ins.arrays.items()}
        if ins.message_type == TRAIN:
            records = {}
            if KEY_VALIDATE in ins.config:  # as client/app.py: the received weights validated first
                val = evaluate_round(self.site_dir, cfg, shared, state, str(ins.config[KEY_VALIDATE]))
                records[VALIDATION] = val.to_record()
            new, metrics, _, _ = train_round(self.site_dir, cfg, shared, state, float(ins.config[KEY_LR]),
                                             int(ins.config[KEY_LOCAL_EPOCHS]), server_round=int(ins.config[KEY_ROUND]))
            return Reply(self.node_id, arrays={k: v.numpy() for k, v in new.items()}, metrics=metrics, records=records)
        stats = evaluate_round(self.site_dir, cfg, shared, state, str(ins.config[KEY_SPLIT]))
        return Reply(self.node_id, metrics=stats.to_record())


def transport(site_dirs: list[Path], **kw) -> FakeTransport:
    return FakeTransport({11 + i: RoundSite(11 + i, d) for i, d in enumerate(site_dirs)}, **kw)


def test_federated_training_beats_the_majority_class_and_resumes_exactly(tmp_path, site_dirs):
    cfg = config(*CFG)
    a = tmp_path / "a"
    final = run_federation(transport(site_dirs), cfg, a, poll_s=0.01)
    rounds = [json.loads(line) for line in (a / "rounds.jsonl").read_text().splitlines()]
    loss = [r["val"]["global"]["values"]["loss"] for r in rounds]
    assert loss[-1] < loss[0] - 0.2, loss
    assert rounds[-1]["train"]["aggregate"]["train-loss"] < rounds[1]["train"]["aggregate"]["train-loss"]

    # The majority-class baseline of the very patients evaluated: the sites' own test labels, which
    # are also the rows (true classes) of the pooled confusion matrix the server received.
    test = final["test"]["global"]
    counts = np.sum([load_site(d, cfg).aggregate_stats()["splits"]["test"]["diagnosis"] for d in site_dirs], axis=0)
    assert np.array_equal(np.reshape(test["stats"]["diagnosis-confusion"], (4, 4)).sum(axis=1), counts)
    assert counts.sum() >= 30  # patients with a diagnosis label (n may count unlabelled ones too)
    majority = counts.max() / counts.sum()
    acc, auc = test["values"]["diagnosis.accuracy"], test["values"]["diagnosis.auc"]
    assert acc > majority + ACCURACY_MARGIN, (acc, majority)
    assert auc > AUC_BAR, auc

    b = tmp_path / "b"
    crash = transport(site_dirs, crash=lambda i: i.message_type == TRAIN and i.config[KEY_ROUND] == 2)
    with pytest.raises(Crash):
        run_federation(crash, cfg, b, poll_s=0.01)
    run_federation(transport(site_dirs), cfg, b, resume=True, poll_s=0.01)
    wa, wb, w0 = load_checkpoint(a, 3).weights, load_checkpoint(b, 3).weights, load_checkpoint(a, 1).weights
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert not all(np.array_equal(wa[k], w0[k]) for k in wa)  # real steps between round 1 and round 3
