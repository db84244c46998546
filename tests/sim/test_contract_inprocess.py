"""The server's federated workflow driving the real ClientApp, in one process, through Flower
``Message`` objects: the message contract checked end to end without Ray or a SuperLink.

The transport here does what Flower does between ``Grid.send_and_receive`` and a ClientApp: it
turns each instruction into a ``Message`` with the site's ``Context`` (partition id -> site folder),
calls the ClientApp, and turns the reply -- or the exception, as an error reply whose reason is
``"<class 'X'>:<'message'>"`` -- back into the server's ``Reply``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

import client.app as client_app
from server.app import reply_from_message
from server.loop import run_federation
from server.messages import ARRAYS, CONFIG, Reply, sanitize_error
from sim_cohort import SMALL, write_features_cohort
from smm_model.config import ExperimentConfig


class InProcessFlower:
    """A transport that runs ``client.app.app`` for each node, as Flower's simulation would."""

    def __init__(self, n_sites: int) -> None:
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                                          node_config={"partition-id": k, "num-partitions": n_sites})
                         for k in range(n_sites)}
        self.reasons: list[str] = []

    def node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send(self, instructions):
        out = []
        for i, ins in enumerate(instructions):
            content = RecordDict({CONFIG: ConfigRecord(dict(ins.config))})
            if ins.arrays is not None:
                content[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in ins.arrays.items()})
            msg = Message(content=content, metadata=Metadata(
                run_id=1, message_id=f"m{i}", src_node_id=1, dst_node_id=ins.node_id, reply_to_message_id="",
                group_id="", created_at=time.time(), ttl=DEFAULT_TTL, message_type=ins.message_type))
            try:
                reply = reply_from_message(client_app.app(msg, self.contexts[ins.node_id]))
            except Exception as e:  # what Flower sends back for a raising ClientApp
                reason = str(type(e)) + ":<'" + str(e) + "'>"
                self.reasons.append(reason)
                reply = Reply(ins.node_id, error=sanitize_error(2, reason))
            out.append(reply)
        return out


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_server_workflow_runs_the_client_app(tmp_path, monkeypatch):
    cohort = write_features_cohort(tmp_path / "cohort", patients=20)
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(tmp_path / "site-logs"))
    cfg = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}"])
    final = run_federation(InProcessFlower(3), cfg, tmp_path / "run", poll_s=0.01)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["status"] == "aggregated" and len(r["train"]["kept"]) == 3
        for m in r["train"]["per_site"].values():
            assert m["num-examples"] > 0 and np.isfinite(m["train-loss"])
        assert len(r["val"]["per_site"]) == 3
    assert rounds[-1]["val"]["global"]["values"]["loss"] < rounds[0]["val"]["global"]["values"]["loss"]
    assert final["test"]["patients"] > 0 and final["refused_sites"] == {}


def test_a_failing_site_reaches_the_server_as_a_code_only(tmp_path, monkeypatch):
    cohort = write_features_cohort(tmp_path / "cohort", patients=16)
    sentinel = "PHI-SENTINEL-TCGA-XX-0000"
    clinical = cohort / "site_3" / "clinical.csv"
    lines = clinical.read_text().splitlines()
    head, first = lines[0].split(","), lines[1].split(",")
    first[head.index("patient_id")], first[head.index("grade")] = sentinel, "banana"
    clinical.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(tmp_path / "site-logs"))
    cfg = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}", "federation.min_nodes=2",
                                                "federation.rounds=1"])
    transport = InProcessFlower(3)
    final = run_federation(transport, cfg, tmp_path / "run", poll_s=0.01)
    assert list(final["refused_sites"]) == ["102"] and "E_DATA" in final["refused_sites"]["102"]
    assert transport.reasons and all(sentinel not in r and str(cohort) not in r for r in transport.reasons)
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file() and f.suffix in (".jsonl", ".json", ".log", ".yaml"):
            assert sentinel not in f.read_text(errors="replace"), f
    logs = {f.name: f.read_text() for f in (tmp_path / "site-logs").iterdir()}
    assert sentinel in logs["site_3.log"]
    # One process served all three sites (as a Ray actor does): each log holds its own site only.
    assert sentinel not in logs["site_1.log"] and sentinel not in logs["site_2.log"]
    assert [text.count("preflight:") for _, text in sorted(logs.items())] == [1, 1, 0]
