"""A federation with a site that has no slides, end to end through the real ClientApp (in process):
2 multimodal sites and 1 genomics-only site, 2 rounds of smm. The genomics-only site trains the
gene path, pooler, projection and heads; the histology weights are averaged over the two sites with
slides only."""

from __future__ import annotations

import json

import numpy as np

import client.app as client_app
from client.baselines.evaluate import evaluate_sites, load_model_file
from client.cohorts.synth import drop_slides
from server.federation.loop import run_federation
from sim_cohort import SMALL, write_features_cohort
from smm_model.config import ExperimentConfig
from smm_model.contract.packing import Layout, unpack
from smm_model.contract.runfolder import MODEL_FILE
from smm_model.contract.wire import ARRAYS, CONFIG, TRAIN, TRAINED, TRAINED_TENSORS, layout_key
from smm_model.nn.model import build_model, trained_parameters
from test_contract_inprocess import InProcessFlower, _threads  # noqa: F401  (_threads: restores torch's threads)


def test_a_genomics_only_site_joins_a_multimodal_federation(tmp_path, monkeypatch):
    cohort = write_features_cohort(tmp_path / "cohort", patients=16)
    drop_slides(cohort / "site_3")
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(tmp_path / "site-logs"))
    cfg = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}", "federation.min_nodes=2",
                                                "federation.local_epochs=1"])
    seen = []
    app = client_app.app

    def recording(msg, context):
        reply = app(msg, context)
        if msg.metadata.message_type == TRAIN:
            layout = Layout.from_json(msg.content[CONFIG][layout_key(ARRAYS)])
            arrays = lambda content: unpack({k: a.numpy().copy() for k, a in content[ARRAYS].items()}, layout)
            seen.append({"round": int(msg.content[CONFIG]["server-round"]), "node": context.node_id,
                         "sent": arrays(msg.content), "reply": arrays(reply.content),
                         "trained": (list(reply.content[TRAINED][TRAINED_TENSORS])
                                     if TRAINED in reply.content.config_records else None),
                         "n": int(reply.content["metrics"]["num-examples"])})
        return reply

    monkeypatch.setattr(client_app, "app", recording)
    final = run_federation(InProcessFlower(3), cfg, tmp_path / "run", poll_s=0.01)
    assert final["refused_sites"] == {}
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rounds[1:]] == ["aggregated", "aggregated"]
    assert all(len(r["train"]["kept"]) == 3 for r in rounds[1:]) and len(rounds[-1]["val"]["per_site"]) == 3
    assert all(r["train"]["partial_sites"] == [102] and r["train"]["frozen"] == [] for r in rounds[1:])
    assert all(np.isfinite(r["val"]["global"]["values"]["loss"]) for r in rounds)

    # only the site without slides (node 102) lists what it trained: the genomics path
    genomics = trained_parameters(build_model(cfg.model), ["genomics"])
    assert {s["node"]: s["trained"] for s in seen if s["round"] == 1} == {100: None, 101: None, 102: genomics}
    # round 2 was sent the round-1 mean: each weight over the sites that trained it
    r1 = {s["node"]: s for s in seen if s["round"] == 1}
    sent2 = next(s["sent"] for s in seen if s["round"] == 2)
    for name, value in sent2.items():
        nodes = [100, 101, 102] if name in genomics else [100, 101]
        w = np.array([r1[n]["n"] for n in nodes], dtype=np.float64)
        ref = sum(wi * r1[n]["reply"][name].astype(np.float64) for wi, n in zip(w, nodes)) / w.sum()
        np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6, err_msg=name)
    hist = [k for k in sent2 if k not in genomics]
    assert hist and all(np.array_equal(r1[102]["reply"][k], r1[102]["sent"][k]) for k in hist)
    assert final["test"]["patients"] > 0
    # `smm evaluate` of the run's model at the site without slides (no histology schema to match)
    out = evaluate_sites(load_model_file(tmp_path / "run" / MODEL_FILE), [cohort / "site_3"], tmp_path / "ev", "test")
    assert out["test"]["patients"] > 0 and out["test"]["global"]["values"]["diagnosis.auc"] is not None
