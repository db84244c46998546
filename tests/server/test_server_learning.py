"""Sites that really train: the server workflow around the local trainer learns (synthetic patients).

The sites here are plain functions over ``client.local.train`` and ``client.cohorts.synthetic`` (tests may import
the site side; ``server`` never does). Two sites, two rounds of the tiny SMM model on the diagnosis
task: the federated validation loss must fall below the initial model's, and the resumed run must
give the same weights as the uninterrupted one with real gradient steps in between.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from server_fakes import Crash, FakeSite, FakeTransport, config
from torch.utils.data import DataLoader

from client.site.collate import collate_patients
from client.cohorts.synthetic import SynthSpec, synthetic_patients
from client.local.train import make_optimizer, predict, train_epochs
from server.runs.checkpoint import load_checkpoint
from server.federation.loop import run_federation
from server.federation.messages import KEY_EXPERIMENT, KEY_LOCAL_EPOCHS, KEY_LR, KEY_ROUND, TRAIN, Instruction, Reply
from smm_model.config import ExperimentConfig
from smm_model.metrics.federated import confusion_counts
from smm_model.nn.model import build_model
from smm_model.contract.protocol import EvalStats

SPEC = SynthSpec(feature_dim=24, genes_tumour=10, genes_micro=14, min_patches=20, max_patches=60)


class TrainingSite(FakeSite):
    """A site that trains the received model on its own synthetic patients (deterministically)."""

    def __init__(self, node_id: int) -> None:
        super().__init__(node_id)
        self.train_items = synthetic_patients(48, SPEC, seed=node_id)
        self.val_items = synthetic_patients(24, SPEC, seed=100 + node_id)

    def _model(self, ins: Instruction) -> tuple[ExperimentConfig, torch.nn.Module]:
        cfg = ExperimentConfig.from_yaml_text(ins.config[KEY_EXPERIMENT])
        model = build_model(cfg.model)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ins.arrays.items()}, strict=True)
        return cfg, model

    def _train(self, ins: Instruction) -> Reply:
        cfg, model = self._model(ins)
        r = int(ins.config[KEY_ROUND])
        torch.manual_seed(1000 * self.node_id + r)
        loader = DataLoader(self.train_items, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                            collate_fn=collate_patients, generator=torch.Generator().manual_seed(r))
        logs = train_epochs(model, loader, cfg, epochs=int(ins.config[KEY_LOCAL_EPOCHS]),
                            device=torch.device("cpu"),
                            optimizer=make_optimizer(model, cfg.train, lr=float(ins.config[KEY_LR])))
        return Reply(self.node_id, arrays={k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
                     metrics={"num-examples": len(self.train_items), "train-loss": logs[-1].loss, "seconds": 0.0})

    def _evaluate(self, ins: Instruction, cfg: ExperimentConfig) -> Reply:
        cfg, model = self._model(ins)
        pred = predict(model, DataLoader(self.val_items, batch_size=24, collate_fn=collate_patients),
                       torch.device("cpu"))
        p, y = pred.probs["diagnosis"], pred.targets["diagnosis"]
        nll = float(-np.log(p[np.arange(len(y)), y] + 1e-12).sum())
        confusion = {"diagnosis": confusion_counts(y, p.argmax(1), 4).ravel().tolist()}
        stats = EvalStats(n=len(y), loss_sum=nll, confusion=confusion)
        return Reply(self.node_id, metrics=stats.to_record())


CFG = ("model.tasks=[diagnosis]", "federation.rounds=3", "federation.local_epochs=1", "train.lr=0.004",
       "federation.selection_metric=diagnosis.accuracy")


def test_federated_training_learns_and_resumes_exactly(tmp_path):
    cfg = config(*CFG)
    a = tmp_path / "a"
    final = run_federation(FakeTransport({n: TrainingSite(n) for n in (11, 12)}), cfg, a)
    rounds = [json.loads(line) for line in (a / "rounds.jsonl").read_text().splitlines()]
    loss = [r["val"]["global"]["values"]["loss"] for r in rounds]
    assert loss[-1] < loss[0] - 0.05, loss
    assert rounds[-1]["train"]["aggregate"]["train-loss"] < rounds[1]["train"]["aggregate"]["train-loss"]
    assert final["test"]["global"]["values"]["diagnosis.accuracy"] > 0.3

    b = tmp_path / "b"
    crash = FakeTransport({n: TrainingSite(n) for n in (11, 12)},
                          crash=lambda i: i.message_type == TRAIN and i.config[KEY_ROUND] == 2)
    with pytest.raises(Crash):
        run_federation(crash, cfg, b)
    run_federation(FakeTransport({n: TrainingSite(n) for n in (11, 12)}), cfg, b, resume=True)
    wa, wb = load_checkpoint(a, 3).weights, load_checkpoint(b, 3).weights
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
