"""The ServerApp adapter with real Flower ``Message`` objects, over a fake in-process Grid.

No SuperLink and no Ray: a ``FakeGrid`` turns each instruction Message into a call of a fake site
and the site's answer into a reply Message (``Message(content, reply_to=msg)`` or
``Message(Error(...), reply_to=msg)``, exactly as a ClientApp's runtime does), so the conversions
in ``server.app`` and the ServerApp's ``main`` are exercised on Flower's own types.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from server_fakes import SENTINEL, FakeSite, config

import server.app as server_app
from server.app import APP_DIR, FlowerTransport, pack_record, read_run_settings, reply_from_message
from server.federation.loop import resolved_config_text
from server.federation.messages import ARRAYS, CONFIG, METRICS, Instruction
from smm_model.contract.packing import Layout, pack, unpack
from smm_model.contract.wire import LAYOUT, layout_key
from server.federation.wait import NodeWaitTimeout
from smm_model.config import ConfigError


@pytest.fixture
def task_identity():
    """Be the running ServerApp task, as Flower's runtime is before it calls ``main``.

    ``server.app.instruction_message`` uses Flower's public instruction constructor
    ``Message(content, dst_node_id, message_type, ...)``, which stamps ``run_id``, ``src_node_id``
    and ``src_task_id`` from ``TaskIdentity``; its getters raise while no Flower runtime has set it
    (``flwr.superlink.runtime.run_serverapp`` does, as do ``run_simulation`` and ``start_grid``). flwr
    1.42 has no public API to set it, so this does what those runtimes do: assign through
    ``TaskIdentity``'s property setters (never its private attributes), and restores the previous
    identity afterwards (unset = None, which is what the setters store for "not set")."""
    names = ("run_id", "node_id", "task_id")

    def current(name: str) -> int | None:
        try:
            return getattr(TaskIdentity, name)
        except RuntimeError:  # "TaskIdentity.<name> is not set."
            return None

    saved = {name: current(name) for name in names}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    yield
    for name, value in saved.items():
        setattr(TaskIdentity, name, value)


class FakeGrid:
    """The Grid methods the ServerApp uses (node ids, push, pull), answering through in-process
    fake sites: a push computes each site's reply at once, a pull hands over those asked for.
    Sites in ``silent`` never answer; ``pulls`` counts the pull requests."""

    def __init__(self, sites: dict[int, FakeSite], connected: list[int] | None = None) -> None:
        self.sites = sites
        self.connected = connected if connected is not None else sorted(sites)
        self.silent: set[int] = set()
        self.lost: set[int] = set()  # the SuperLink answers for these, as for a node whose heartbeat stopped
        self.ttls: list[float] = []
        self.replies: dict[str, Message] = {}
        self.pulls = 0
        self._next = 0

    def get_node_ids(self):
        return list(self.connected)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self._next += 1
            mid = f"msg-{self._next}"
            msg.metadata.__dict__["_message_id"] = mid  # as Flower's grids stamp it before pushing
            ids.append(mid)
            self.ttls.append(msg.metadata.ttl)
            if msg.metadata.dst_node_id in self.lost:
                self.replies[mid] = _superlink_unavailable(msg)
            elif msg.metadata.dst_node_id not in self.silent:
                self.replies[mid] = self._answer(msg)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _answer(self, msg):
        nid = msg.metadata.dst_node_id
        content = msg.content
        layout = Layout.from_json(content[CONFIG][layout_key(ARRAYS)]) if ARRAYS in content.array_records else None
        arrays = unpack({k: a.numpy() for k, a in content[ARRAYS].items()}, layout) if layout else None
        ins = Instruction(nid, msg.metadata.message_type, dict(content[CONFIG]), arrays)
        try:
            r = self.sites[nid](ins)
        except Exception as e:
            return Message(Error(code=2, reason=f"<class '{type(e).__name__}'>:<'{e}'>"), reply_to=msg)
        out = RecordDict()
        if r.arrays is not None:  # a site replies in the layout it was sent
            flat, _ = pack(r.arrays, layout)
            out[ARRAYS] = ArrayRecord({d: Array(a) for d, a in flat.items()})
            out[LAYOUT] = ConfigRecord({ARRAYS: layout.digest})
        if r.metrics is not None:
            out[METRICS] = MetricRecord(r.metrics)
        for name, rec in r.records.items():
            out[name] = ConfigRecord(rec)
        return Message(out, reply_to=msg)


def _superlink_unavailable(msg: Message) -> Message:
    """The error reply a SuperLink writes for an instruction to a node it lost: Flower's own
    constructor, whose sender is the SuperLink (node 1), not the node."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")


def write_config(tmp_path: Path, *extra: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(resolved_config_text(config(*extra)))
    return path


def context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_run_settings_from_run_config(tmp_path):
    s = read_run_settings({}, cwd=tmp_path)
    assert s.config_path == APP_DIR / "configs" / "demo.yaml" and s.overrides == () and s.run_dir is None
    assert s.resume is False
    s = read_run_settings({"config-path": "configs/x.yaml", "overrides": "federation.rounds=2; train.lr=0.01;",
                           "run-dir": "runs/a", "resume": "true"}, app_dir=Path("/app"), cwd=tmp_path)
    assert s.config_path == Path("/app/configs/x.yaml") and s.run_dir == tmp_path / "runs" / "a"
    assert s.overrides == ("federation.rounds=2", "train.lr=0.01") and s.resume is True
    s = read_run_settings({"config-path": "/abs/c.yaml", "run-dir": "/abs/run", "resume": False})
    assert s.config_path == Path("/abs/c.yaml") and s.run_dir == Path("/abs/run")
    with pytest.raises(ConfigError, match="'resume': expected true or false, got 'maybe'"):
        read_run_settings({"resume": "maybe"})
    with pytest.raises(ConfigError, match="'overrides': item 'federation.rounds' is not key.path=value"):
        read_run_settings({"overrides": "federation.rounds"})
    with pytest.raises(ConfigError, match="'run-dir': expected a string"):
        read_run_settings({"run-dir": 3})


def test_error_replies_lose_their_text():
    md_msg = Message(Error(code=2, reason=f"<class 'OSError'>:<'/data/{SENTINEL}.svs'>"),
                     metadata=_metadata(5))
    r = reply_from_message(md_msg)
    assert r.node_id == 5 and r.error == "E_CLIENT_ERROR" and SENTINEL not in repr(r)
    r = reply_from_message(Message(Error(code=5, reason="Node Unavailable"), metadata=_metadata(6)))
    assert r.error == "E_NODE_UNAVAILABLE"


def test_reply_contents_are_converted_and_counted():
    w = {"w": np.arange(3, dtype=np.float32), "n": np.array([4, 5], dtype=np.int64)}
    flat, layout = pack(w)
    arrays = ArrayRecord({d: Array(a) for d, a in flat.items()})
    assert len(arrays) == 2  # one flat array per dtype, not one per tensor
    msg = Message(RecordDict({ARRAYS: arrays, METRICS: MetricRecord({"num-examples": 4}),
                              LAYOUT: ConfigRecord({ARRAYS: layout.digest}),
                              "summary": ConfigRecord({"json": "{}"})}), metadata=_metadata(7))
    r = reply_from_message(msg, {ARRAYS: layout})
    assert r.error is None and list(r.arrays) == ["w", "n"]
    assert np.array_equal(r.arrays["w"], w["w"]) and r.arrays["n"].dtype == np.int64
    assert r.metrics == {"num-examples": 4} and r.records == {"summary": {"json": "{}"}}
    # every record counts: arrays, metrics and config text
    assert r.bytes_received == sum(msg.content[k].count_bytes() for k in (ARRAYS, METRICS, LAYOUT, "summary")) \
        > arrays.count_bytes()


def test_a_reply_whose_weights_do_not_fit_the_sent_layout_is_refused():
    """Weights in another layout (another model, another order, a truncated array), or weights
    nobody asked for, are E_BAD_REPLY, never reshaped into the global model. (A site that packs in
    another order and claims the sent layout cannot be told apart by the bytes; the ClientApp
    packs in the instruction's layout, ``pack(state, layout)``, which checks names and shapes.)"""
    w = {"a": np.zeros((2, 2), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}
    sent = Layout.of(w)

    def reply(arrays, digest):
        flat, _ = pack(arrays)
        content = RecordDict({ARRAYS: ArrayRecord({d: Array(a) for d, a in flat.items()}),
                              METRICS: MetricRecord({"num-examples": 4})})
        if digest is not None:
            content[LAYOUT] = ConfigRecord({ARRAYS: digest})
        return reply_from_message(Message(content, metadata=_metadata(7)), {ARRAYS: sent})

    assert reply(w, sent.digest).error is None
    swapped = {"b": w["b"], "a": w["a"]}  # same bytes, another order
    assert reply(swapped, Layout.of(swapped).digest).error == "E_BAD_REPLY"
    assert reply({"a": w["a"], "b": w["b"][:2]}, sent.digest).error == "E_BAD_REPLY"
    assert reply(w, None).error == "E_BAD_REPLY"  # no layout digest
    flat, _ = pack(w)
    unasked = Message(RecordDict({ARRAYS: ArrayRecord({d: Array(a) for d, a in flat.items()}),
                                  LAYOUT: ConfigRecord({ARRAYS: sent.digest})}), metadata=_metadata(7))
    assert reply_from_message(unasked).error == "E_BAD_REPLY"


def _metadata(src: int):
    import time

    from flwr.app import DEFAULT_TTL, Metadata
    return Metadata(run_id=1, message_id="m", src_node_id=src, dst_node_id=0, reply_to_message_id="x", group_id="",
                    created_at=time.time(), ttl=DEFAULT_TTL, message_type="train")


def test_flower_transport_one_reply_per_instruction(task_identity):
    sites = {11: FakeSite(11), 12: FakeSite(12, train_fault="error"), 13: FakeSite(13)}
    grid = FakeGrid(sites, connected=[11, 12])
    grid.silent = {13}  # 13 never answers
    clock = [0.0]

    def sleep(s):
        clock[0] += s

    t = FlowerTransport(grid, timeout_s=30.0, poll_s=0.5, clock=lambda: clock[0], sleep=sleep)
    cfg_text = resolved_config_text(config())
    w = {"a": np.zeros((2, 2), dtype=np.float32)}
    ins = [Instruction(n, "train", {"experiment": cfg_text, "server-round": 1}, w) for n in (11, 12, 13)]
    replies = t.send(ins)
    assert [r.node_id for r in replies] == [11, 12, 13]
    assert replies[0].error is None and replies[0].arrays["a"].shape == (2, 2)
    assert replies[1].error == "E_CLIENT_ERROR" and replies[2].error == "E_NO_REPLY"
    packed = pack_record(w)
    weights = packed.record.count_bytes()
    config_bytes = ConfigRecord({"experiment": cfg_text, "server-round": 1,
                                 layout_key(ARRAYS): packed.layout.to_json()}).count_bytes()
    assert [r.bytes_sent for r in replies] == [weights + config_bytes] * 3  # the config text travels too
    assert replies[0].bytes_received > weights  # the trained weights plus the metrics
    assert set(grid.ttls) == {30.0}
    # Pulled every poll_s until the timeout, for the one that never answered: 30 s / 0.5 s, plus the first.
    assert grid.pulls == 61 and clock[0] == 30.0
    grid.silent, grid.pulls = set(), 0
    assert all(r.error in (None, "E_CLIENT_ERROR") for r in t.send(ins)) and grid.pulls == 1
    # A node the SuperLink lost: its error reply names the SuperLink as sender and is still filed
    # under the node the instruction went to, with its reason (not E_NO_REPLY after the timeout).
    grid.lost, clock[0] = {13}, 0.0
    replies = t.send(ins)
    assert [r.node_id for r in replies] == [11, 12, 13] and replies[2].error == "E_NODE_UNAVAILABLE"
    assert clock[0] == 0.0  # every reply was in at the first pull


def test_server_app_runs_a_federation_over_flower_messages(tmp_path, task_identity):
    sites = {11: FakeSite(11), 12: FakeSite(12), 13: FakeSite(13, train_fault=lambda r: "error" if r == 1 else None)}
    grid = FakeGrid(sites)
    cfg_path = write_config(tmp_path, "federation.rounds=1")
    run_dir = tmp_path / "run"
    server_app.main(grid, context({"config-path": str(cfg_path), "overrides": "federation.rounds=2",
                                   "run-dir": str(run_dir)}))
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]  # the override won
    assert rounds[1]["train"]["dropped"] == [{"node": 13, "reason": "E_CLIENT_ERROR"}]
    assert rounds[2]["train"]["kept"] == [11, 12, 13]
    assert rounds[1]["bytes"]["sent"] > 0 and rounds[1]["bytes"]["received"] > 0
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["sites"] == [11, 12, 13] and final["best_round"] in (1, 2)
    for name in ("rounds.jsonl", "final_metrics.json", "server.log"):
        assert SENTINEL not in (run_dir / name).read_text()
    # resume=true on the finished run: only the final evaluation is redone
    server_app.main(grid, context({"config-path": str(cfg_path), "overrides": "federation.rounds=2",
                                   "run-dir": str(run_dir), "resume": True}))
    assert len((run_dir / "rounds.jsonl").read_text().splitlines()) == 3


def test_server_app_failures_propagate(tmp_path, task_identity):
    cfg_path = write_config(tmp_path, "federation.wait_for_nodes_s=0.2")
    with pytest.raises(NodeWaitTimeout, match="only 1 of 2 sites connected"):
        server_app.main(FakeGrid({11: FakeSite(11)}), context({"config-path": str(cfg_path),
                                                               "run-dir": str(tmp_path / "run")}))
    with pytest.raises(ConfigError, match="cannot read .*missing.yaml"):
        server_app.main(FakeGrid({}), context({"config-path": str(tmp_path / "missing.yaml")}))
    with pytest.raises(ConfigError, match="federation.rounds: must be a positive integer"):
        server_app.main(FakeGrid({}), context({"config-path": str(cfg_path), "overrides": "federation.rounds=0"}))
