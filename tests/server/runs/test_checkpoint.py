"""Server checkpoints: complete, atomic with a checksum manifest, corrupt ones skipped (cases C3-C5 of
the fault test plan, ../shared/docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from server_fakes import config

from server.runs.checkpoint import (CheckpointError, ServerState, capture_rng, load_checkpoint, load_latest, read_index,
                               restore_rng, save_checkpoint)
from server.federation.loop import initial_weights, resolved_config_text
from server.federation.messages import Reply
from server.aggregation.strategy import GuardedStrategy, build_strategy, strategy_state
from smm_model.nn.model import build_model

CFG = config("federation.strategy=fedadam")


def state(round_: int, weights=None, **kw) -> ServerState:
    w = weights if weights is not None else {"w": np.full(3, float(round_), dtype=np.float32)}
    return ServerState(round=round_, weights=w, config_text="name: x\n", shared_json="{}", **kw)


def test_checkpoint_is_complete_and_loads_strictly(tmp_path):
    weights = initial_weights(CFG)
    guarded = GuardedStrategy(build_strategy(CFG.federation, CFG.train), CFG.federation)
    rng = np.random.default_rng(0)
    replies = [Reply(n, arrays={k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in weights.items()},
                     metrics={"num-examples": 5}) for n in (1, 2)]
    new = guarded.aggregate(1, replies, weights).arrays
    sampler = random.Random(3)
    sampler.random()
    s = ServerState(round=1, weights=new, config_text=resolved_config_text(CFG), shared_json='{"n_sites": 2}',
                    strategy_state=guarded.state_dict(), sampler_state=sampler.getstate(), best_round=1,
                    best_value=0.5, schema={"encoder": "resnet50_trunc"}, skipped_rounds=[])
    path = save_checkpoint(tmp_path, s)
    raw = torch.load(path, weights_only=True)  # no pickled code objects: safe to load
    assert {"round", "weights", "strategy", "config", "shared", "sampler", "rng", "versions", "schema",
            "best_round", "best_value"} <= set(raw)
    assert set(raw["rng"]) == {"python", "numpy", "torch"}
    assert {"torch", "flwr", "fedsmm", "numpy", "python"} <= set(raw["versions"])
    assert not any(k.startswith(("_module.", "_orig_mod.", "module.")) for k in raw["weights"])
    model = build_model(CFG.model)
    model.load_state_dict(raw["weights"], strict=True)
    back = load_latest(tmp_path)
    assert back.round == 1 and list(back.weights) == list(new)
    assert all(np.array_equal(back.weights[k], new[k]) and back.weights[k].dtype == new[k].dtype for k in new)
    assert back.config_text == s.config_text and back.shared_json == s.shared_json
    assert (back.best_round, back.best_value, back.schema) == (1, 0.5, {"encoder": "resnet50_trunc"})
    saved = strategy_state(guarded.strategy)
    assert saved["class"] == "FedAdam"
    for name in ("m_t", "v_t"):
        assert set(back.strategy_state[name]) == set(saved[name]) == set(weights)
        assert all(np.array_equal(back.strategy_state[name][k], saved[name][k]) for k in saved[name])
    restored = random.Random()
    restored.setstate(back.sampler_state)
    assert restored.random() == sampler.random()
    index = read_index(tmp_path)
    assert index["checkpoints"][0]["file"] == "round_0001.pt" and len(index["checkpoints"][0]["sha256"]) == 64


def test_rng_states_are_restored():
    snap = capture_rng()
    a = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    restore_rng(snap)
    b = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert a == b


def test_saved_rng_state_round_trips_through_a_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path, state(1))
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(load_latest(tmp_path).rng)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, damage, caplog):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, state(r))
    latest = tmp_path / "checkpoints" / "round_0003.pt"
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        latest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        latest.unlink()
    with caplog.at_level(logging.WARNING, logger="fedsmm"):
        back = load_latest(tmp_path)
    assert back.round == 2 and back.weights["w"][0] == 2.0
    assert "ignoring checkpoint of round 3" in caplog.text and "round_0003.pt" in caplog.text
    assert "resuming from round 2" in caplog.text


def test_no_valid_checkpoint_is_an_explicit_error(tmp_path):
    save_checkpoint(tmp_path, state(1))
    (tmp_path / "checkpoints" / "round_0001.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no valid checkpoint.*checksum mismatch"):
        load_latest(tmp_path)
    assert load_latest(tmp_path / "elsewhere") is None


def test_a_crash_before_the_index_update_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """The new file is written but the index is not: the partial state is never picked up."""
    save_checkpoint(tmp_path, state(1))
    import server.runs.checkpoint as ck

    def die(*a, **k):
        raise KeyboardInterrupt("killed between the checkpoint file and the index")

    monkeypatch.setattr(ck, "atomic_write_json", die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, state(2))
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "round_0002.pt").exists()  # the orphan...
    assert load_latest(tmp_path).round == 1  # ...is not trusted
    save_checkpoint(tmp_path, state(2))
    assert load_latest(tmp_path).round == 2


def test_keeps_the_last_n_plus_the_best(tmp_path):
    for r in range(1, 7):
        save_checkpoint(tmp_path, state(r, best_round=2), keep_last=2)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["index.json", "round_0002.pt", "round_0005.pt", "round_0006.pt"]
    assert load_checkpoint(tmp_path, 2).weights["w"][0] == 2.0
    with pytest.raises(CheckpointError, match="no checkpoint of round 3"):
        load_checkpoint(tmp_path, 3)
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert index["best_round"] == 2 and index["latest_round"] == 6


def test_redone_rounds_replace_the_abandoned_timeline(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, state(r))
    save_checkpoint(tmp_path, state(2, weights={"w": np.full(3, 9.0, dtype=np.float32)}))
    assert [e["round"] for e in read_index(tmp_path)["checkpoints"]] == [1, 2]
    assert load_latest(tmp_path).weights["w"][0] == 9.0
