"""Guards before aggregation: malformed, non-finite, oversized and failed replies (fault test plan
cases D1-D3, D6, D8, B5, ../shared/docs/reliability.md)."""

from __future__ import annotations

import numpy as np
import pytest
from server_fakes import SENTINEL, FakeSite, config

from server.aggregation.guard import clean_train_metrics, flag_outliers, guard_replies, update_norms
from server.federation.loop import initial_weights, resolved_config_text
from server.federation.messages import TRAIN, Instruction, Reply, sanitize_error
from server.aggregation.strategy import GuardedStrategy, build_strategy

CFG = config("federation.max_examples_per_site=500")


@pytest.fixture(scope="module")
def weights():
    return initial_weights(CFG)


def train_reply(nid: int, weights, fault=None) -> Reply:
    """What FakeSite ``nid`` answers in round 1, with Flower's treatment of an exception."""
    ins = Instruction(nid, TRAIN, {"experiment": resolved_config_text(CFG), "server-round": 1}, weights)
    try:
        return FakeSite(nid, train_fault=fault)(ins)
    except Exception as e:
        return Reply(nid, error=sanitize_error(2, f"<class '{type(e).__name__}'>:<'{e}'>"))


@pytest.mark.parametrize("fault, code", [
    ("nan", "E_NONFINITE"), ("inf", "E_NONFINITE"), ("shape", "E_ARRAY_SHAPE"), ("dtype", "E_ARRAY_DTYPE"),
    ("missing_key", "E_ARRAY_KEYS"), ("extra_key", "E_ARRAY_KEYS"), ("error", "E_CLIENT_ERROR"),
    ("no_metrics", "E_MISSING_METRICS"), ("no_arrays", "E_MISSING_ARRAYS"),
    ("no_num_examples", "E_MISSING_NUM_EXAMPLES"),
])
def test_bad_reply_is_dropped_with_its_code_and_the_rest_kept(weights, fault, code, server_logs):
    replies = [train_reply(11, weights), train_reply(12, weights, fault), train_reply(13, weights)]
    kept, dropped = guard_replies(replies, weights, CFG.federation)
    assert [r.node_id for r in kept] == [11, 13]
    assert dropped == [(12, code)]
    assert f"node 12: {code}" in server_logs.text
    assert SENTINEL not in server_logs.text


def test_duplicate_reply_from_one_node_is_dropped(weights):
    a = train_reply(11, weights)
    kept, dropped = guard_replies([a, a, train_reply(12, weights)], weights, CFG.federation)
    assert [r.node_id for r in kept] == [11, 12] and dropped == [(11, "E_DUPLICATE")]


def test_absurd_and_zero_example_counts_are_clamped_and_logged(weights, server_logs):
    replies = [train_reply(11, weights, "huge"), train_reply(12, weights, "zero"), train_reply(13, weights)]
    kept, dropped = guard_replies(replies, weights, CFG.federation)
    assert dropped == []
    assert [r.metrics["num-examples"] for r in kept] == [500, 1, 40]
    assert [r.clamped_from for r in kept] == [1e9, 0.0, None]
    assert "node 11 claimed 1e+09 examples; clamped to 500" in server_logs.text
    # The clamp bounds the weight: FedAvg now gives site 11 500/541 of the average, not 1e9/(1e9+41).
    out = GuardedStrategy(build_strategy(CFG.federation), CFG.federation).aggregate(1, replies, weights)
    assert out.clamped == [(11, 1e9, 500), (12, 0.0, 1)]
    k = next(iter(weights))
    expect = (500 * kept[0].arrays[k] + 1 * kept[1].arrays[k] + 40 * kept[2].arrays[k]) / 541
    np.testing.assert_allclose(out.arrays[k], expect, rtol=1e-5, atol=1e-7)


def test_metric_names_are_whitelisted_so_no_text_reaches_the_logs(weights):
    r = train_reply(11, weights, "phi_metric_key")
    kept, _ = guard_replies([r], weights, CFG.federation)
    assert SENTINEL not in kept[0].metrics
    assert set(kept[0].metrics) == {"num-examples", "train-loss", "seconds", "coord-diagnosis-tumour",
                                    "coord-diagnosis-micro", "coord-diagnosis-conflicts"}
    assert clean_train_metrics({"train-loss": float("nan"), "seconds": True, "coord-grade-micro": 3}) == \
        {"coord-grade-micro": 3}


def test_all_replies_bad_skips_the_round_and_keeps_the_model(weights, server_logs):
    before = {k: v.copy() for k, v in weights.items()}
    replies = [train_reply(11, weights, "nan"), train_reply(12, weights, "error"), Reply(13, error="E_NO_REPLY")]
    out = GuardedStrategy(build_strategy(CFG.federation), CFG.federation).aggregate(4, replies, weights)
    assert out.arrays is None and out.skip_reason == "E_TOO_FEW_REPLIES"
    assert out.dropped == [(11, "E_NONFINITE"), (12, "E_CLIENT_ERROR"), (13, "E_NO_REPLY")]
    assert all(np.array_equal(before[k], weights[k]) for k in weights)
    assert "round 4 skipped" in server_logs.text


def test_fewer_good_replies_than_min_nodes_skips_the_round(weights):
    cfg = config("federation.min_nodes=3").federation
    replies = [train_reply(11, weights), train_reply(12, weights), train_reply(13, weights, "shape")]
    out = GuardedStrategy(build_strategy(cfg), cfg).aggregate(1, replies, weights)
    assert out.arrays is None and out.kept == [11, 12] and out.skip_reason == "E_TOO_FEW_REPLIES"


def test_update_norms_and_outlier_flag_alert_but_do_not_drop(weights, server_logs):
    replies = [train_reply(n, weights) for n in (11, 12, 13, 14)] + [train_reply(15, weights, "scaled")]
    out = GuardedStrategy(build_strategy(CFG.federation), CFG.federation).aggregate(2, replies, weights)
    assert out.kept == [11, 12, 13, 14, 15] and out.outliers == [15]
    k = next(iter(weights))
    d = replies[0].arrays[k].astype(np.float64) - weights[k]
    norms = update_norms([replies[0]], {k: weights[k]})
    assert norms[11] == pytest.approx(float(np.sqrt((d * d).sum())))
    assert out.norms[15] > 50 * out.norms[11]
    assert "node 15's update norm" in server_logs.text and "flagged for review" in server_logs.text


def test_flag_outliers_needs_a_majority():
    assert flag_outliers({1: 1.0, 2: 100.0}) == []
    assert flag_outliers({1: 1.0, 2: 1.1, 3: 0.9, 4: 1.05, 5: 9.0}) == [5]
    assert flag_outliers({1: 1.0, 2: 1.0, 3: 5.0}) == [3]  # MAD 0: anything above the median stands out
    assert flag_outliers({1: 2.0, 2: 2.0, 3: 2.0}) == []


def test_sanitize_error_keeps_only_a_code():
    flower_reason = f"<class 'FileNotFoundError'>:<'[Errno 2] No such file: /data/{SENTINEL}.svs'>"
    assert sanitize_error(2, flower_reason) == "E_CLIENT_ERROR"
    assert sanitize_error(2, "<class 'SiteError'>:<'E_DATA_READ: slide unreadable'>") == "E_DATA_READ"
    assert sanitize_error(2, "<class 'KeyError'>:<'E_TCGA_02_0001'>") == "E_CLIENT_ERROR"  # digits: not a code
    assert sanitize_error(5, "Node Unavailable") == "E_NODE_UNAVAILABLE"
    assert sanitize_error(99, SENTINEL) == "E_UNKNOWN"
