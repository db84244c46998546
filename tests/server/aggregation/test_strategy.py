"""Strategies from config, hand-computed aggregation and server-optimiser state."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum
from server_fakes import config

from server.federation.messages import Reply
from server.aggregation import server_opt
from server.aggregation.server_opt import DEFAULT_SERVER_LR
from server.aggregation.strategy import GuardedStrategy, build_strategy, restore_strategy_state, strategy_state
from smm_model.config import ConfigError


def fed(*extra: str):
    return config(*extra).federation


def reply(nid: int, n: int, **arrays) -> Reply:
    return Reply(nid, arrays={k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()},
                 metrics={"num-examples": n, "train-loss": float(nid)})


GLOBAL = {"w": np.zeros(3, dtype=np.float32), "b": np.zeros((2, 2), dtype=np.float32)}


@pytest.mark.parametrize("name, averaging, opt", [
    ("fedavg", FedAvg, None), ("scaffold", FedAvg, None), ("fedavgm", FedAvg, server_opt.FedAvgM),
    ("fedprox", FedProx, None), ("fedadam", FedAvg, server_opt.FedAdam), ("fedyogi", FedAvg, server_opt.FedYogi),
    ("fedadagrad", FedAvg, server_opt.FedAdagrad), ("fedmedian", FedMedian, None),
    ("fedtrimmedavg", FedTrimmedAvg, None), ("krum", Krum, None), ("multikrum", MultiKrum, None)])
def test_every_configured_strategy_builds(name, averaging, opt):
    """Flower's strategy averages; the server optimisers are ours, named as Flower names them."""
    cfg = config(f"federation.strategy={name}", "federation.min_nodes=3", "train.proximal_mu=0.01",
                 "federation.trimmed_beta=0.3")
    rule = build_strategy(cfg.federation, cfg.train, n_sites=10)
    assert type(rule.averaging) is averaging and (rule.server_opt is None if opt is None else type(rule.server_opt) is opt)
    s = rule.averaging
    assert s.min_train_nodes == s.min_evaluate_nodes == s.min_available_nodes == 3
    assert rule.name == (opt.name if opt else averaging.__name__)


def test_strategy_parameters_come_from_the_config():
    cfg = config("federation.strategy=fedadam", "federation.server_lr=0.05", "federation.server_beta_1=0.8",
                 "federation.server_beta_2=0.95", "federation.server_tau=0.01", "train.lr=0.003")
    s = build_strategy(cfg.federation, cfg.train).server_opt
    assert (s.eta, s.eta_l, s.beta_1, s.beta_2, s.tau) == (0.05, 0.003, 0.8, 0.95, 0.01)
    cfg = config("federation.strategy=fedprox", "train.proximal_mu=0.1")
    assert build_strategy(cfg.federation, cfg.train).averaging.proximal_mu == 0.1
    s = build_strategy(fed("federation.strategy=fedavgm", "federation.server_momentum=0.9",
                           "federation.server_lr=0.5")).server_opt
    assert (s.server_momentum, s.server_learning_rate, s.server_opt) == (0.9, 0.5, True)
    # server_lr: null means the strategy's own default: FedOpt's customary eta, plain averaging for FedAvgM.
    assert DEFAULT_SERVER_LR == {"fedopt": 0.01, "fedavgm": 1.0}
    assert build_strategy(fed("federation.strategy=fedadam")).server_opt.eta == 0.01
    s = build_strategy(fed("federation.strategy=fedavgm")).server_opt
    assert (s.server_learning_rate, s.server_momentum, s.server_opt) == (1.0, 0.0, False)
    s = build_strategy(fed("federation.strategy=fedtrimmedavg", "federation.trimmed_beta=0.25"), n_sites=8).averaging
    assert s.beta == 0.25
    s = build_strategy(fed("federation.strategy=multikrum", "federation.krum_byzantine=1"), n_sites=6).averaging
    assert (s.num_malicious_nodes, s.num_nodes_to_select) == (1, 5)  # multikrum_keep=0 -> n - f
    s = build_strategy(fed("federation.strategy=multikrum", "federation.krum_byzantine=1",
                           "federation.multikrum_keep=2"), n_sites=6).averaging
    assert s.num_nodes_to_select == 2


def test_strategy_site_count_errors_are_config_errors():
    """With few hospitals, these settings silently do nothing; refuse them at start."""
    with pytest.raises(ConfigError, match=r"federation.trimmed_beta: trimming 0.2 of 4 sites removes none"):
        build_strategy(fed("federation.strategy=fedtrimmedavg"), n_sites=4)
    with pytest.raises(ConfigError, match=r"federation.krum_byzantine: Krum needs more than 2f \+ 2 = 4 sites"):
        build_strategy(fed("federation.strategy=krum", "federation.krum_byzantine=1"), n_sites=4)
    with pytest.raises(ConfigError, match="federation.min_nodes: 2 sites needed but the run has 1"):
        build_strategy(fed(), n_sites=1)
    with pytest.raises(ConfigError, match="multikrum_keep: keeps 7 updates but the run has 6 sites"):
        build_strategy(fed("federation.strategy=multikrum", "federation.multikrum_keep=7"), n_sites=6)


def test_fedavg_is_the_hand_computed_weighted_mean():
    # Prepare: weights 1 and 3 -> factors 0.25 and 0.75, exact in float32.
    a = reply(11, 1, w=[1.0, 2.0, -4.0], b=[[0.0, 8.0], [4.0, 1.0]])
    b = reply(12, 3, w=[5.0, 2.0, 0.0], b=[[4.0, 0.0], [0.0, 1.0]])
    guarded = GuardedStrategy(build_strategy(fed()), fed())
    # Execute
    out = guarded.aggregate(1, [a, b], GLOBAL)
    # Assert (rtol = 0)
    np.testing.assert_array_equal(out.arrays["w"], np.array([4.0, 2.0, -1.0], dtype=np.float32))
    np.testing.assert_array_equal(out.arrays["b"], np.array([[3.0, 2.0], [1.0, 1.0]], dtype=np.float32))
    assert list(out.arrays) == ["w", "b"] and out.arrays["w"].dtype == np.float32
    assert out.metrics == {"train-loss": pytest.approx(0.25 * 11 + 0.75 * 12)}


def test_fedmedian_and_krum_from_config():
    values = [0.2, 0.6, 0.7, 0.8, 5.0]
    replies = [reply(10 + i, 10 * (i + 1), w=[v] * 3, b=[[v, v], [v, v]]) for i, v in enumerate(values)]
    cfg = fed("federation.strategy=fedmedian")
    out = GuardedStrategy(build_strategy(cfg, n_sites=5), cfg).aggregate(1, replies, GLOBAL)
    np.testing.assert_array_equal(out.arrays["w"], np.full(3, 0.7, dtype=np.float32))
    # Krum with f = 1: each update is scored by its n - f - 2 = 2 closest neighbours; 0.7 wins.
    cfg = fed("federation.strategy=krum", "federation.krum_byzantine=1")
    out = GuardedStrategy(build_strategy(cfg, n_sites=5), cfg).aggregate(1, replies, GLOBAL)
    np.testing.assert_array_equal(out.arrays["b"], np.full((2, 2), 0.7, dtype=np.float32))
    # MultiKrum keeping n - f = 4 drops the 5.0 update and averages the rest by example counts.
    cfg = fed("federation.strategy=multikrum", "federation.krum_byzantine=1")
    out = GuardedStrategy(build_strategy(cfg, n_sites=5), cfg).aggregate(1, replies, GLOBAL)
    expect = np.float32((10 * 0.2 + 20 * 0.6 + 30 * 0.7 + 40 * 0.8) / 100)
    np.testing.assert_allclose(out.arrays["w"], np.full(3, expect), rtol=1e-6)


def test_fedtrimmedavg_trims_the_extremes():
    values = [-50.0, 1.0, 2.0, 3.0, 60.0]
    replies = [reply(10 + i, 5, w=[v] * 3, b=[[v, v], [v, v]]) for i, v in enumerate(values)]
    cfg = fed("federation.strategy=fedtrimmedavg")
    out = GuardedStrategy(build_strategy(cfg, n_sites=5), cfg).aggregate(1, replies, GLOBAL)
    np.testing.assert_array_equal(out.arrays["w"], np.full(3, 2.0, dtype=np.float32))


def test_fedadam_state_round_trip_continues_identically():
    cfg = config("federation.strategy=fedadam", "federation.server_lr=0.1")
    rng = np.random.default_rng(0)

    def round_replies(g):
        return [Reply(n, arrays={k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in g.items()},
                      metrics={"num-examples": 10}) for n in (11, 12)]

    a = GuardedStrategy(build_strategy(cfg.federation, cfg.train), cfg.federation)
    g1 = a.aggregate(1, round_replies(GLOBAL), GLOBAL).arrays
    assert g1["w"].dtype == np.float32  # FedAdam computes in float64; the model stays float32
    state = strategy_state(a.strategy)
    assert state["class"] == "FedAdam" and set(state["m_t"]) == {"w", "b"} and set(state["v_t"]) == {"w", "b"}
    b = GuardedStrategy(build_strategy(cfg.federation, cfg.train), cfg.federation)
    restore_strategy_state(b.strategy, state)
    replies = round_replies(g1)
    ga, gb = a.aggregate(2, replies, g1).arrays, b.aggregate(2, replies, g1).arrays
    for k in ga:
        np.testing.assert_array_equal(ga[k], gb[k])
    fresh = GuardedStrategy(build_strategy(cfg.federation, cfg.train), cfg.federation)
    gc = fresh.aggregate(2, replies, g1).arrays  # without the moments the step differs
    assert not np.array_equal(ga["w"], gc["w"])
    with pytest.raises(ValueError, match="saved by FedAdam, cannot restore it into FedAvg"):
        restore_strategy_state(build_strategy(fed()), state)


def test_stateless_strategies_have_no_optimizer_state():
    assert strategy_state(build_strategy(fed())) == {"class": "FedAvg"}


# --- FedAvgM on a quadratic problem, by hand ------------------------------------------------------------

#: Site optima a_i of f_i(w) = ||w - a_i||^2 / 2 and example counts (weights 1/4, 3/4).
OPTIMA = {11: (1, {"w": [1.0, 2.0, -4.0], "b": [[0.0, 8.0], [4.0, 1.0]]}),
          12: (3, {"w": [5.0, 2.0, 0.0], "b": [[4.0, 0.0], [0.0, 1.0]]})}
LOCAL_LR, LOCAL_STEPS = 0.1, 5
SERVER_LR, MOMENTUM = 0.5, 0.9
START = {"w": np.array([0.5, -1.0, 2.0], dtype=np.float32), "b": np.array([[1.0, 1.0], [-2.0, 0.0]], dtype=np.float32)}


def local_descent(w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """LOCAL_STEPS gradient steps on ||w - a||^2 / 2 (gradient w - a), in float64."""
    w = w.astype(np.float64)
    for _ in range(LOCAL_STEPS):
        w = w - LOCAL_LR * (w - a)
    return w


def quadratic_replies(g: dict[str, np.ndarray]) -> list[Reply]:
    return [Reply(nid, arrays={k: local_descent(g[k], np.asarray(a[k])).astype(np.float32) for k in g},
                  metrics={"num-examples": n}) for nid, (n, a) in OPTIMA.items()]


def by_hand(g: dict[str, np.ndarray], m_prev: dict[str, np.ndarray] | None, momentum: float, lr: float):
    """(new global, momentum buffer): pseudo-gradient = global - weighted mean of the replies;
    m = momentum * m_prev + pseudo-gradient (m = pseudo-gradient in round 1); global - lr * m."""
    total = sum(n for n, _ in OPTIMA.values())
    replies = quadratic_replies(g)
    new, m = {}, {}
    for k in g:
        mean = sum(n / total * r.arrays[k].astype(np.float64) for r, (n, _) in zip(replies, OPTIMA.values()))
        pg = g[k].astype(np.float64) - mean
        m[k] = pg if m_prev is None else momentum * m_prev[k] + pg
        new[k] = g[k].astype(np.float64) - lr * m[k]
    return new, m


def fedavgm(*extra: str) -> GuardedStrategy:
    cfg = fed("federation.strategy=fedavgm", f"federation.server_momentum={MOMENTUM}",
              f"federation.server_lr={SERVER_LR}", *extra)
    return GuardedStrategy(build_strategy(cfg), cfg)


def test_fedavgm_is_the_hand_computed_momentum_step_and_survives_a_state_round_trip():
    a = fedavgm()
    g1 = a.aggregate(1, quadratic_replies(START), START).arrays
    want1, m1 = by_hand(START, None, MOMENTUM, SERVER_LR)
    for k in START:
        np.testing.assert_allclose(g1[k], want1[k], rtol=1e-6, atol=1e-6)
        assert g1[k].dtype == np.float32 and g1[k].shape == START[k].shape
    state = strategy_state(a.strategy)
    assert state["class"] == "FedAvgM" and set(state) == {"class", "momentum_vector"}
    assert list(state["momentum_vector"]) == ["w", "b"]
    for k, got in state["momentum_vector"].items():  # round 1's buffer is its pseudo-gradient
        np.testing.assert_allclose(got, m1[k], rtol=1e-6, atol=1e-6)

    replies = quadratic_replies(g1)
    g2 = a.aggregate(2, replies, g1).arrays
    want2, _ = by_hand(g1, m1, MOMENTUM, SERVER_LR)
    plain2, _ = by_hand(g1, None, MOMENTUM, SERVER_LR)  # the same step without the round-1 momentum
    for k in START:
        np.testing.assert_allclose(g2[k], want2[k], rtol=1e-6, atol=1e-6)
        assert np.abs(want2[k] - plain2[k]).max() > 0.1  # the momentum term is large enough to be seen
    # A checkpoint round trip into a new strategy gives the same round 2, bit for bit; a strategy
    # without the restored state does not.
    b = fedavgm()
    restore_strategy_state(b.strategy, state)
    g2b = b.aggregate(2, replies, g1).arrays
    assert all(np.array_equal(g2[k], g2b[k]) for k in g2)
    g2c = fedavgm().aggregate(2, replies, g1).arrays
    np.testing.assert_allclose(g2c["w"], plain2["w"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="saved by FedAvgM, cannot restore it into FedAdam"):
        restore_strategy_state(build_strategy(fed("federation.strategy=fedadam")), state)


def test_fedavgm_without_momentum_and_unit_rate_is_fedavg():
    g = fedavgm("federation.server_momentum=0.0", "federation.server_lr=null").aggregate(
        1, quadratic_replies(START), START).arrays
    avg = GuardedStrategy(build_strategy(fed()), fed()).aggregate(1, quadratic_replies(START), START).arrays
    assert all(np.array_equal(g[k], avg[k]) for k in g)
