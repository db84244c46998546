"""Sites that train part of the model (a site lacking a modality): each weight is averaged over the
sites that trained it, a weight nobody (or too few) trained keeps its value and its server moments,
and the preflight refuses what cannot average that way."""

from __future__ import annotations

import numpy as np
import pytest
from server_fakes import config, site_summary

from server.aggregation.server_opt import FedAdam, FedAvgM
from server.aggregation.strategy import GuardedStrategy, build_strategy
from server.federation.loop import screen_sites
from server.federation.messages import Reply
from smm_model.contract.protocol import SchemaMismatch, check_schemas
from smm_model.contract.wire import TRAINED, TRAINED_TENSORS

GLOBAL = {"head": np.zeros(2, dtype=np.float32), "path": np.full(3, 10.0, dtype=np.float32),
          "gene": np.zeros(2, dtype=np.float32)}


def reply(nid: int, n: int, trained: list[str] | None = None, **arrays) -> Reply:
    full = {k: np.asarray(arrays.get(k, GLOBAL[k]), dtype=np.float32) for k in GLOBAL}
    records = {} if trained is None else {TRAINED: {TRAINED_TENSORS: trained}}
    return Reply(nid, arrays=full, metrics={"num-examples": n, "train-loss": float(nid)}, records=records)


def _replies():
    # two full sites and one without slides (it sends "path" unchanged, and says it did not train it)
    return [reply(1, 10, head=[1, 1], path=[12, 12, 12], gene=[2, 2]),
            reply(2, 30, head=[3, 3], path=[14, 14, 14], gene=[4, 4]),
            reply(3, 60, ["head", "gene"], head=[5, 5], gene=[6, 6])]


def _fed(*extra):
    return config("federation.min_nodes=2", *extra).federation


def test_each_weight_is_averaged_over_the_sites_that_trained_it():
    f = _fed()
    out = GuardedStrategy(build_strategy(f), f).aggregate(1, _replies(), GLOBAL)
    assert out.skip_reason is None and out.frozen == []
    # head and gene: all three sites, weights 10, 30, 60; path: sites 1 and 2 only, weights 10, 30
    np.testing.assert_allclose(out.arrays["head"], [(10 * 1 + 30 * 3 + 60 * 5) / 100] * 2, rtol=1e-6)
    np.testing.assert_allclose(out.arrays["gene"], [(10 * 2 + 30 * 4 + 60 * 6) / 100] * 2, rtol=1e-6)
    np.testing.assert_allclose(out.arrays["path"], [(10 * 12 + 30 * 14) / 40] * 3, rtol=1e-6)
    assert list(out.arrays) == list(GLOBAL) and all(a.dtype == np.float32 for a in out.arrays.values())


def test_full_replies_aggregate_exactly_as_before():
    f = _fed()
    full = [reply(1, 10, head=[1, 1], path=[12, 12, 12]), reply(2, 30, head=[3, 3], path=[14, 14, 14])]
    listed = [reply(1, 10, list(GLOBAL), head=[1, 1], path=[12, 12, 12]),
              reply(2, 30, list(GLOBAL), head=[3, 3], path=[14, 14, 14])]
    a = GuardedStrategy(build_strategy(f), f).aggregate(1, full, GLOBAL).arrays
    b = GuardedStrategy(build_strategy(f), f).aggregate(1, listed, GLOBAL).arrays
    assert all(np.array_equal(a[k], b[k]) for k in GLOBAL)


def test_a_weight_trained_by_too_few_sites_keeps_its_value():
    f = _fed()  # min_nodes 2: one site's "path" alone would expose its update
    replies = [reply(1, 10, head=[1, 1], path=[12, 12, 12]), reply(3, 60, ["head", "gene"], head=[5, 5])]
    out = GuardedStrategy(build_strategy(f), f).aggregate(1, replies, GLOBAL)
    assert out.frozen == ["path"]
    np.testing.assert_array_equal(out.arrays["path"], GLOBAL["path"])
    np.testing.assert_allclose(out.arrays["head"], [(10 + 300) / 70] * 2, rtol=1e-6)


def test_server_momentum_leaves_a_frozen_weight_and_its_momentum_alone():
    f = _fed("federation.strategy=fedavgm", "federation.server_momentum=0.9")
    g = GuardedStrategy(build_strategy(f), f)
    r1 = g.aggregate(1, _replies(), GLOBAL)
    opt = g.strategy.server_opt
    assert isinstance(opt, FedAvgM)
    m_path = opt.momentum_vector["path"].copy()
    np.testing.assert_allclose(m_path, GLOBAL["path"] - (10 * 12 + 30 * 14) / 40, rtol=1e-6)  # first round: m = x - mean
    # round 2: only one full site replies, so "path" is frozen; its momentum must not move it
    r2 = g.aggregate(2, [reply(1, 10, head=[1, 1], path=[0, 0, 0]), reply(3, 60, ["head", "gene"], head=[5, 5])],
                     r1.arrays)
    assert r2.frozen == ["path"]
    np.testing.assert_array_equal(r2.arrays["path"], r1.arrays["path"])
    np.testing.assert_array_equal(opt.momentum_vector["path"], m_path)
    # the trained weights took the usual momentum step: m = 0.9 m + (x - mean), x - m
    mean = (10 * 1 + 60 * 5) / 70
    m_head = 0.9 * (0 - (10 * 1 + 30 * 3 + 60 * 5) / 100) + (r1.arrays["head"][0] - mean)
    np.testing.assert_allclose(r2.arrays["head"], r1.arrays["head"] - m_head, rtol=1e-5)


def test_fedadam_frozen_weight_gets_no_step_and_zero_moments():
    f = _fed("federation.strategy=fedadam")
    g = GuardedStrategy(build_strategy(f), f)
    out = g.aggregate(1, [reply(1, 10, head=[1, 1], path=[12, 12, 12]), reply(3, 60, ["head", "gene"])], GLOBAL)
    assert isinstance(g.strategy.server_opt, FedAdam) and out.frozen == ["path"]
    np.testing.assert_array_equal(out.arrays["path"], GLOBAL["path"])
    assert not g.strategy.server_opt.m_t["path"].any() and not g.strategy.server_opt.v_t["path"].any()


@pytest.mark.parametrize("trained", [[], ["nope"], ["head", "head"], "head"])
def test_a_bad_list_of_trained_weights_drops_the_reply(trained):
    f = _fed()
    replies = _replies()[:2] + [Reply(3, arrays=dict(GLOBAL), metrics={"num-examples": 5, "train-loss": 0.0},
                                      records={TRAINED: {TRAINED_TENSORS: trained}})]
    out = GuardedStrategy(build_strategy(f), f).aggregate(1, replies, GLOBAL)
    assert out.dropped == [(3, "E_TRAINED_KEYS")] and out.kept == [1, 2]


@pytest.mark.parametrize("strategy", ["krum", "fedmedian", "fedtrimmedavg"])
def test_robust_strategies_skip_a_round_with_a_partial_site(strategy):
    """The preflight refuses such sites (below); should one get through, the round is skipped, never
    a median or a Krum choice over weights some sites did not train."""
    f = _fed(f"federation.strategy={strategy}", "federation.trimmed_beta=0.2")
    g = GuardedStrategy(build_strategy(f), f)
    out = g.aggregate(1, _replies(), GLOBAL)
    assert out.arrays is None and out.skip_reason == "E_PARTIAL_UNSUPPORTED"


def _sites(cfg, genomics_only=(3,)):
    """Three preflight summaries; those in ``genomics_only`` as a site without slides sends them."""
    out = {}
    for nid in (1, 2, 3):
        s = site_summary(cfg, nid)
        if nid in genomics_only:
            s.schema.update(modalities=["genomics"], encoder=None, feature_dim=None, encoder_weights=None)
            s.patches = {"n": 0, "sum": [], "sum_sq": []}
        out[nid] = s
    return out


def test_the_preflight_accepts_a_site_without_slides_and_compares_what_it_has():
    cfg = config("federation.min_nodes=2")
    accepted, refused, ref = screen_sites(_sites(cfg), cfg)
    assert sorted(accepted) == [1, 2, 3] and refused == {} and ref == 1
    # the reference is a site with slides even when sites without are the majority
    accepted, refused, ref = screen_sites(_sites(cfg, genomics_only=(1, 2)), cfg)
    assert sorted(accepted) == [1, 2, 3] and ref == 3


@pytest.mark.parametrize("extra, why", [
    (["federation.strategy=krum"], "federation.strategy 'krum' cannot average each weight"),
    (["federation.strategy=scaffold"], "federation.strategy 'scaffold' cannot average each weight"),
    (["model.arch=abmil"], "model.arch 'abmil' reads histology"),
])
def test_the_preflight_refuses_a_site_the_run_cannot_use(extra, why):
    cfg = config("federation.min_nodes=2", *extra)
    with pytest.raises(SchemaMismatch, match=why):
        check_schemas({"3": _sites(cfg)[3]}, cfg)
    accepted, refused, _ = screen_sites(_sites(cfg), cfg)
    assert sorted(accepted) == [1, 2] and why in refused[3]


def test_an_snn_run_takes_a_site_without_slides_as_a_full_site():
    cfg = config("federation.min_nodes=2", "model.arch=snn", "federation.strategy=krum")
    check_schemas({"3": _sites(cfg)[3]}, cfg)  # snn reads genomics only: nothing is partial
