"""Our server optimisers against Flower's own classes, round by round, and their checkpoint state.

Flower's FedAvgM and FedOpt strategies are the reference: each round the test gives them the
arrays of the round as their own ``configure_train`` would (the reference needs Flower's attribute;
the product never writes it) and compares the new global model with ours.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp import strategy as flower
from server_fakes import config

from server.aggregation import server_opt
from server.aggregation.strategy import AggregationRule, GuardedStrategy, build_strategy, restore_strategy_state
from server.federation.messages import Reply

START = {"w": np.array([0.5, -1.0, 2.0], dtype=np.float32), "b": np.array([[1.0, 1.0], [-2.0, 0.0]], dtype=np.float32)}
SETTINGS = ("federation.server_lr=0.3", "federation.server_beta_1=0.8", "federation.server_beta_2=0.95",
            "federation.server_tau=0.01", "federation.server_momentum=0.0")


def replies(g: dict[str, np.ndarray], rng: np.random.Generator) -> list[Reply]:
    return [Reply(n, arrays={k: (v + rng.normal(0.2, 0.5, v.shape)).astype(np.float32) for k, v in g.items()},
                  metrics={"num-examples": 4 * n}) for n in (1, 2, 3)]


def reference(name: str, fed) -> flower.Strategy:
    common = dict(min_train_nodes=fed.min_nodes, min_evaluate_nodes=fed.min_nodes, min_available_nodes=fed.min_nodes)
    if name == "fedavgm":
        return flower.FedAvgM(**common, server_momentum=fed.server_momentum, server_learning_rate=fed.server_lr)
    opt = dict(eta=fed.server_lr, eta_l=0.01, tau=fed.server_tau)
    if name == "fedadagrad":
        return flower.FedAdagrad(**common, **opt)
    cls = {"fedadam": flower.FedAdam, "fedyogi": flower.FedYogi}[name]
    return cls(**common, **opt, beta_1=fed.server_beta_1, beta_2=fed.server_beta_2)


@pytest.mark.parametrize("name, extra", [("fedadam", ()), ("fedyogi", ()), ("fedadagrad", ()),
                                         ("fedavgm", ("federation.server_momentum=0.9",))])
def test_server_optimizer_matches_flower_round_by_round(name, extra):
    fed = config(f"federation.strategy={name}", *SETTINGS, *extra).federation
    ours = GuardedStrategy(build_strategy(fed), fed)
    ref_strategy = reference(name, fed)
    theirs = GuardedStrategy(AggregationRule(ref_strategy), fed)
    rng = np.random.default_rng(7)
    g_ours, g_ref = dict(START), dict(START)
    for rnd in (1, 2, 3, 4):
        batch = replies(g_ours, rng)
        if name == "fedavgm":
            ref_strategy.current_arrays = ArrayRecord({k: Array(v.copy()) for k, v in g_ref.items()})
        else:
            ref_strategy.current_arrays = {k: v.copy() for k, v in g_ref.items()}
        g_ours = ours.aggregate(rnd, batch, g_ours).arrays
        g_ref = theirs.aggregate(rnd, batch, g_ref).arrays
        for k in START:
            np.testing.assert_array_equal(g_ours[k], g_ref[k])
            assert g_ours[k].dtype == np.float32
    assert not np.allclose(g_ours["w"], START["w"], atol=0.05)  # the runs moved


def test_fedopt_rolls_its_moments_back_when_a_round_is_unusable(monkeypatch):
    """A step that fails half-way (here: moments updated, then an error) skips the round and
    leaves the moments as they were before it; the next round then continues from them."""
    fed = config("federation.strategy=fedadam", *SETTINGS).federation
    g = GuardedStrategy(build_strategy(fed), fed)
    rng = np.random.default_rng(1)
    g1 = g.aggregate(1, replies(START, rng), START).arrays
    before = g.state_dict()
    opt, real_step = g.strategy.server_opt, g.strategy.server_opt.step

    def failing_step(server_round, current, mean):
        real_step(server_round, current, mean)  # moves m_t and v_t
        raise FloatingPointError("overflow")

    monkeypatch.setattr(opt, "step", failing_step)
    out = g.aggregate(2, replies(g1, rng), g1)
    assert out.arrays is None and out.skip_reason == "E_AGGREGATION"
    after = g.state_dict()
    for key in ("m_t", "v_t"):
        assert all(np.array_equal(before[key][k], after[key][k]) for k in START)


def test_a_fedavgm_checkpoint_from_flowers_class_still_resumes():
    """Checkpoints written while FedAvgM was Flower's class hold the momentum as a list in the
    model's order and the round's arrays; they load, and the next step uses the momentum."""
    fed = config("federation.strategy=fedavgm", "federation.server_momentum=0.9", "federation.server_lr=0.5").federation
    a = GuardedStrategy(build_strategy(fed), fed)
    rng = np.random.default_rng(2)
    g1 = a.aggregate(1, replies(START, rng), START).arrays
    new_style = a.state_dict()
    legacy = {"class": "FedAvgM", "current_arrays": dict(g1),
              "momentum_vector": [new_style["momentum_vector"][k] for k in START]}
    b = GuardedStrategy(build_strategy(fed), fed)
    restore_strategy_state(b.strategy, legacy)
    batch = replies(g1, rng)
    ga, gb = a.aggregate(2, batch, g1).arrays, b.aggregate(2, batch, g1).arrays
    assert all(np.array_equal(ga[k], gb[k]) for k in START)


def test_server_optimizer_state_is_a_copy():
    opt = server_opt.FedAdagrad(eta=0.1, eta_l=0.01, tau=1e-3)
    opt.step(1, START, {k: v + 1 for k, v in START.items()})
    state = opt.state_dict()
    opt.step(2, START, {k: v + 2 for k, v in START.items()})
    assert not np.array_equal(state["v_t"]["w"], opt.v_t["w"])
