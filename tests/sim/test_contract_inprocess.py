"""The server's federated workflow driving the real ClientApp, in one process, through Flower
``Message`` objects: the message contract checked end to end without Ray or a SuperLink.

The transport here does what Flower does between ``Grid.send_and_receive`` and a ClientApp: it
turns each instruction into a ``Message`` with the site's ``Context`` (partition id -> site folder),
calls the ClientApp, and turns the reply -- or the exception, as an error reply whose reason is
``"<class 'X'>:<'message'>"`` -- back into the server's ``Reply``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, Context, Message, Metadata, RecordDict

import client.app as client_app
from server.app import instruction_content, pack_record, reply_from_message
from server.runs.checkpoint import load_checkpoint, load_latest
from server.federation.loop import run_federation
from server.federation.messages import ARRAYS, CONFIG, CONTROL, TRAIN, Instruction, Reply, sanitize_error
from sim_cohort import SMALL, write_features_cohort
from smm_model.contract.packing import Layout, unpack
from smm_model.contract.wire import KEY_VALIDATE, LAYOUT, VALIDATION, layout_key
from smm_model.config import ExperimentConfig


class Crash(BaseException):
    """Simulates the server process dying (not an Exception: nothing may catch it)."""


class InProcessFlower:
    """A transport that runs ``client.app.app`` for each node, as Flower's simulation would.

    The nodes' ``Context`` objects live as long as the transport, as a SuperNode's do across a
    restart of the server. ``crash``: ``Instruction -> bool``; when true the "server" dies before
    sending it."""

    def __init__(self, n_sites: int, crash: Callable[[Instruction], bool] | None = None) -> None:
        self.crash = crash
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                                          node_config={"partition-id": k, "num-partitions": n_sites})
                         for k in range(n_sites)}
        self.reasons: list[str] = []

    def node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send(self, instructions):
        out = []
        for i, ins in enumerate(instructions):
            if self.crash is not None and self.crash(ins):
                raise Crash(f"server killed before sending {ins.message_type} to node {ins.node_id}")
            packed = {name: pack_record(a) for name, a in ((ARRAYS, ins.arrays), (CONTROL, ins.control)) if a is not None}
            content = instruction_content(ins, packed.get(ARRAYS), packed.get(CONTROL))  # as server.app's transport
            msg = Message(content=content, metadata=Metadata(
                run_id=1, message_id=f"m{i}", src_node_id=1, dst_node_id=ins.node_id, reply_to_message_id="",
                group_id="", created_at=time.time(), ttl=DEFAULT_TTL, message_type=ins.message_type))
            try:
                reply = reply_from_message(client_app.app(msg, self.contexts[ins.node_id]),
                                           {name: p.layout for name, p in packed.items()})
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


# --- federation.site_optimizer, local_steps and eval_every through the real ClientApp ----------------------

STEPS = 2  # federation.local_steps of the runs below


@dataclass
class TrainSeen:
    """One train message as a node saw it: the round, the node, the message's and the reply's
    content, and the array records of the node's ``Context.state`` after it (as numpy)."""

    round: int
    node: int
    sent: RecordDict
    reply: RecordDict
    state: dict[str, dict[str, np.ndarray]]

    def arrays(self, side: str, name: str) -> dict[str, np.ndarray]:
        """Weights record ``name`` of the message (``side="sent"``) or the reply, unpacked with
        the layout the server sent for it."""
        layout = Layout.from_json(self.sent[CONFIG][layout_key(name)])
        return unpack({k: a.numpy() for k, a in getattr(self, side)[name].items()}, layout)


def _record_runs(tmp, cohort, variants: dict[str, list[str]]) -> dict[str, dict]:
    """Run each variant (name -> config overrides on top of 3 rounds of ``STEPS`` local steps) over
    an ``InProcessFlower`` whose ClientApp calls are recorded (``TrainSeen`` per train message)."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        app = client_app.app

        def recording(msg, context):
            reply = app(msg, context)
            if msg.metadata.message_type == TRAIN:
                seen.append(TrainSeen(int(msg.content[CONFIG]["server-round"]), context.node_id, msg.content,
                                      reply.content, {name: {k: a.numpy().copy() for k, a in rec.items()}
                                                      for name, rec in context.state.array_records.items()}))
            return reply

        mp.setattr(client_app, "app", recording)
        for name, overrides in variants.items():
            seen: list[TrainSeen] = []
            cfg = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}", "federation.rounds=3",
                                                       f"federation.local_steps={STEPS}", *overrides])
            mp.setenv(client_app.LOG_DIR_ENV, str(tmp / f"logs-{name}"))
            transport = InProcessFlower(3)
            final = run_federation(transport, cfg, tmp / name, poll_s=0.01)
            logs = {f.name: f.read_text() for f in sorted((tmp / f"logs-{name}").iterdir())}
            runs[name] = {"cfg": cfg, "transport": transport, "seen": seen, "final": final, "run": tmp / name,
                          "logs": logs}
    return runs


@pytest.fixture(scope="module")
def site_optimizer_runs(tmp_path_factory):
    """The same 3-round federation (local_steps, eval_every=2) with ``persist`` and ``fresh`` site
    optimizers."""
    tmp = tmp_path_factory.mktemp("site_optimizer")
    cohort = write_features_cohort(tmp / "cohort", patients=12)
    return _record_runs(tmp, cohort, {mode: ["federation.eval_every=2", f"federation.site_optimizer={mode}"]
                                      for mode in ("persist", "fresh")})


def _rounds(run_dir):
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _assert_reply_is_the_model_only(t, model_keys):
    """A train reply: the model's arrays under "arrays" (packed in the layout the server sent) and
    the metrics, nothing of the optimizer."""
    content = t.reply
    assert set(content.array_records) == {ARRAYS} and set(content.metric_records) == {"metrics"}
    # the layout digest, and the validation of the received model when the message asked for it
    # (one phase per round)
    asked = KEY_VALIDATE in t.sent[CONFIG]
    assert set(content.config_records) == {LAYOUT, *([VALIDATION] if asked else [])}
    layout = Layout.from_json(t.sent[CONFIG][layout_key(ARRAYS)])
    assert content[LAYOUT][ARRAYS] == layout.digest
    assert [n for n, _, _ in layout.entries] == model_keys  # exactly the state_dict's keys, in order
    assert list(unpack({k: a.numpy() for k, a in content[ARRAYS].items()}, layout)) == model_keys
    metrics = content["metrics"]
    assert not [k for k in metrics if "optimizer" in k or k.split(".")[0].isdigit()], list(metrics)


def test_a_persisting_site_keeps_its_optimizer_at_the_site_only(site_optimizer_runs):
    from smm_model.nn.model import build_model

    run = site_optimizer_runs["persist"]
    model_keys = list(build_model(run["cfg"].model).state_dict())
    seen = run["seen"]
    assert sorted((t.round, t.node) for t in seen) == [(r, n) for r in (1, 2, 3) for n in (100, 101, 102)]
    for t in seen:
        r, node, content, kept = t.round, t.node, t.reply, t.state.get(client_app.OPTIMIZER_STATE_KEY)
        _assert_reply_is_the_model_only(t, model_keys)
        assert content["metrics"]["steps"] == STEPS
        # After round r the node holds Adam's state, continued: every step count is r x local_steps.
        assert kept is not None, (r, node)
        steps = {k: float(v) for k, v in kept.items() if k.endswith(".step")}
        assert steps and set(steps.values()) == {float(r * STEPS)}, (r, node)
        assert {k.split(".", 1)[1] for k in kept} == {"step", "exp_avg", "exp_avg_sq"}  # train.optimizer=adamw
        assert not set(kept) & set(t.arrays("reply", ARRAYS))
    for ctx in run["transport"].contexts.values():
        assert client_app.OPTIMIZER_STATE_KEY in ctx.state
    for name, text in run["logs"].items():
        lines = {r: next(ln for ln in text.splitlines() if f"train round {r}:" in ln) for r in (1, 2, 3)}
        assert "new optimizer state kept at the site" in lines[1], name
        assert f"{STEPS} steps" in lines[1], name
        for r in (2, 3):
            assert "optimizer state continued from the previous round" in lines[r], name


def test_a_fresh_site_optimizer_keeps_nothing_and_round_one_is_the_same(site_optimizer_runs):
    from smm_model.nn.model import build_model

    run = site_optimizer_runs["fresh"]
    model_keys = list(build_model(run["cfg"].model).state_dict())
    assert len(run["seen"]) == 9
    for t in run["seen"]:
        _assert_reply_is_the_model_only(t, model_keys)
        assert not t.state and t.reply["metrics"]["steps"] == STEPS
    for ctx in run["transport"].contexts.values():
        assert client_app.OPTIMIZER_STATE_KEY not in ctx.state and not ctx.state.array_records
    assert all("optimizer state" not in text for text in run["logs"].values())
    # Round 1 starts from no state either way: bit-identical; from round 2 on the kept moments count.
    persist = site_optimizer_runs["persist"]["run"]
    w = {r: (load_checkpoint(run["run"], r).weights, load_checkpoint(persist, r).weights) for r in (1, 2)}
    assert all(np.array_equal(w[1][0][k], w[1][1][k]) for k in w[1][0])
    assert not all(np.array_equal(w[2][0][k], w[2][1][k]) for k in w[2][0])


@pytest.mark.parametrize("mode", ["persist", "fresh"])
def test_eval_every_validates_every_kth_round_and_the_last_and_selects_among_them(site_optimizer_runs, mode):
    run = site_optimizer_runs[mode]
    rounds = _rounds(run["run"])
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert [r["val"] is not None for r in rounds] == [True, False, True, True]
    assert rounds[1]["selection"]["value"] is None and rounds[1]["selection"]["best_round"] is None
    assert "evaluate" not in rounds[1]["timings"]
    vals = {r["round"]: r["val"]["global"]["values"]["loss"] for r in rounds[2:]}
    best = min(vals, key=vals.get)
    assert run["final"]["best_round"] == best and run["final"]["selection_value"] == vals[best]
    assert rounds[3]["selection"]["best_round"] == best



# --- federation.strategy: scaffold through the real ClientApp -------------------------------------------

@pytest.fixture(scope="module")
def scaffold_run(tmp_path_factory):
    """A 3-round SCAFFOLD federation of three sites (``STEPS`` local steps), recorded."""
    tmp = tmp_path_factory.mktemp("scaffold")
    cohort = write_features_cohort(tmp / "cohort", patients=12)
    return _record_runs(tmp, cohort, {"scaffold": ["federation.strategy=scaffold"]})["scaffold"]


def _weighted_c(replies: dict[int, TrainSeen], params) -> dict[str, np.ndarray]:
    """c by hand (float64): the example-weighted mean of the replies' c_i."""
    weights = {n: float(t.reply["metrics"]["num-examples"]) for n, t in replies.items()}
    return {k: sum(w * replies[n].arrays("reply", CONTROL)[k].astype(np.float64) for n, w in weights.items())
            / sum(weights.values()) for k in params}


def _assert_no_scaffold_state(state: RecordDict) -> None:
    """The site keeps nothing for SCAFFOLD (nor anything else, with site_optimizer: fresh)."""
    assert not list(state.keys()), list(state.keys())
    assert not state.array_records and not state.config_records and not state.metric_records


def test_scaffold_sends_each_site_its_correction_and_the_site_keeps_nothing(scaffold_run):
    from server.federation.loop import model_parameters
    from smm_model.nn.model import build_model

    run = scaffold_run
    params = model_parameters(run["cfg"])
    model = build_model(run["cfg"].model)
    model_keys = list(model.state_dict())
    assert list(params) == [k for k, _ in model.named_parameters()]
    assert not hasattr(client_app, "CONTROL_STATE_KEY")  # the site-side c_i is gone
    assert all(r["status"] == "aggregated" and len(r["train"]["kept"]) == 3 for r in _rounds(run["run"])[1:])
    nodes = (100, 101, 102)
    seen = {(t.round, t.node): t for t in run["seen"]}
    assert sorted(seen) == [(r, n) for r in (1, 2, 3) for n in nodes]
    for (r, node), t in seen.items():
        assert set(t.sent.array_records) == set(t.reply.array_records) == {ARRAYS, CONTROL}
        assert list(t.arrays("reply", ARRAYS)) == model_keys
        for values in (t.arrays("sent", CONTROL), t.arrays("reply", CONTROL)):  # the model's parameters, in order
            assert list(values) == list(params), (r, node)
            assert all(values[k].shape == p.shape and values[k].dtype == p.dtype for k, p in params.items())
            assert all(np.isfinite(v).all() for v in values.values())
        assert any(v.any() for v in t.arrays("reply", CONTROL).values())
        # Nothing SCAFFOLD-related (nothing at all) in the node's Context.state after its round.
        assert t.state == {}, (r, node, list(t.state))
    for ctx in run["transport"].contexts.values():
        _assert_no_scaffold_state(ctx.state)
    # What a node is sent: round 1, zeros at every node (c = 0, no c_i yet); then c - c_i, with c the
    # example-weighted mean of the previous round's c_i and c_i the node's own reply of that round.
    assert all(not v.any() for n in nodes for v in seen[1, n].arrays("sent", CONTROL).values())
    for r in (2, 3):
        prev = {n: seen[r - 1, n] for n in nodes}
        c = _weighted_c(prev, params)
        for n in nodes:
            sent = seen[r, n].arrays("sent", CONTROL)
            for k in params:
                own = prev[n].arrays("reply", CONTROL)[k].astype(np.float64)
                scale = float(np.abs(c[k]).max() + np.abs(own).max())
                np.testing.assert_allclose(sent[k], c[k] - own, rtol=1e-5, atol=1e-6 * scale + 1e-12,
                                           err_msg=f"round {r} node {n} {k}")
        # Per node, not shared: the nodes' corrections differ, and their example-weighted sum is 0.
        first = next(iter(params))
        assert not np.array_equal(seen[r, 100].arrays("sent", CONTROL)[first], seen[r, 101].arrays("sent", CONTROL)[first])
        weights = {n: float(prev[n].reply["metrics"]["num-examples"]) for n in nodes}
        for k in params:
            total = sum(w * seen[r, n].arrays("sent", CONTROL)[k].astype(np.float64) for n, w in weights.items())
            scale = sum(w * np.abs(prev[n].arrays("reply", CONTROL)[k]).max() for n, w in weights.items())
            np.testing.assert_allclose(total, 0.0, atol=1e-5 * scale + 1e-12, err_msg=k)
    # The site log says a correction was applied, with its norm (0 in round 1).
    for node, (name, text) in zip(nodes, sorted(run["logs"].items())):
        lines = [ln for ln in text.splitlines() if "SCAFFOLD correction" in ln]
        assert len(lines) == 3, (name, lines)
        for r, line in zip((1, 2, 3), lines):
            assert f"train round {r}: SCAFFOLD correction applied (norm " in line, line
            norm = float(line.rsplit("(norm ", 1)[1].rstrip(")"))
            sent = seen[r, node].arrays("sent", CONTROL)
            want = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in sent.values())))
            assert norm == pytest.approx(want, rel=1e-3, abs=1e-12), (name, r)
            assert (norm == 0.0) == (r == 1), (name, r)
        assert "site control" not in text
    # The server keeps one c_i per site, the last one it aggregated, with the site's example count.
    saved = load_latest(run["run"])
    assert saved.round == 3
    sites = saved.strategy_state["scaffold"]["sites"]
    assert sorted(sites) == list(nodes)
    for n, entry in sites.items():
        last = seen[3, n]
        assert entry["weight"] == last.reply["metrics"]["num-examples"]
        assert all(np.array_equal(entry["control"][k], last.arrays("reply", CONTROL)[k]) for k in params)


def _crash_in_round(r: int, after: int) -> tuple[Callable[[Instruction], bool], list[int]]:
    """A crash predicate: the server dies before sending round ``r``'s train message to its
    (``after`` + 1)-th node, so ``after`` nodes have trained round ``r`` (0: between rounds)."""
    trained: list[int] = []

    def crash(ins: Instruction) -> bool:
        if ins.message_type != TRAIN or ins.config["server-round"] != r:
            return False
        if len(trained) == after:
            return True
        trained.append(ins.node_id)
        return False

    return crash, trained


@pytest.mark.parametrize("after", [0, 1], ids=["between-rounds", "mid-round"])
def test_a_resumed_scaffold_run_ends_with_the_uninterrupted_weights(scaffold_run, tmp_path, monkeypatch, after):
    """Killed in round 3 (before any site trained it, or after one site did and before the server's
    round-3 checkpoint); the server's c_i come back from the round-2 checkpoint and each site is
    sent c - c_i again, so round 3 is the uninterrupted run's, bit for bit, whether the sites kept
    their contexts or lost all state (a new Flower run, a restarted SuperNode)."""
    logs = tmp_path / "site-logs"
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(logs))
    cfg, whole = scaffold_run["cfg"], load_checkpoint(scaffold_run["run"], 3).weights
    crash, trained = _crash_in_round(3, after)
    transport = InProcessFlower(3, crash=crash)
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    with pytest.raises(Crash):
        run_federation(transport, cfg, run, poll_s=0.01)
    assert trained == [100, 101, 102][:after]
    saved = load_latest(run)
    assert saved.round == 2 and sorted(saved.strategy_state["scaffold"]["sites"]) == [100, 101, 102]
    assert [r["round"] for r in _rounds(run)] == [0, 1, 2]
    per_site = lambda: {f.name: f.read_text().count("train round 3:") for f in sorted(logs.iterdir())}
    # A site that trained round 3 logged it (twice: the round and its correction); the others did not.
    assert per_site() == {"site_1.log": 2 * after, "site_2.log": 0, "site_3.log": 0}
    for ctx in transport.contexts.values():
        _assert_no_scaffold_state(ctx.state)
    shutil.copytree(run, fresh)
    transport.crash = None
    run_federation(transport, cfg, run, resume=True, poll_s=0.01)
    assert [r["round"] for r in _rounds(run)] == [0, 1, 2, 3]
    resumed = load_checkpoint(run, 3).weights
    assert list(resumed) == list(whole) and all(np.array_equal(whole[k], resumed[k]) for k in whole)
    # Sites with fresh, empty contexts (what a resumed Flower run gives them): the same weights.
    run_federation(InProcessFlower(3), cfg, fresh, resume=True, poll_s=0.01)
    assert [r["round"] for r in _rounds(fresh)] == [0, 1, 2, 3]
    again = load_checkpoint(fresh, 3).weights
    assert list(again) == list(whole) and all(np.array_equal(whole[k], again[k]) for k in whole)
    assert per_site() == {"site_1.log": 2 * after + 4, "site_2.log": 4, "site_3.log": 4}
    final = load_latest(fresh).strategy_state["scaffold"]["sites"]
    expect = load_latest(scaffold_run["run"]).strategy_state["scaffold"]["sites"]
    assert sorted(final) == sorted(expect)
    for n in expect:
        assert final[n]["weight"] == expect[n]["weight"]
        assert all(np.array_equal(final[n]["control"][k], expect[n]["control"][k]) for k in expect[n]["control"])
