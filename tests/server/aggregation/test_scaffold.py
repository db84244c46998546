"""SCAFFOLD's server side (``federation.strategy: scaffold``; ``server.aggregation.strategy.ControlVariates``
inside ``GuardedStrategy``) on a quadratic problem worked out by hand.

Site i has f_i(w) = h_i / 2 * ||w - a_i||^2 with its own curvature h_i, optimum a_i and example
count n_i; the federation's optimum is the minimiser of sum_i n_i f_i, sum(n_i h_i a_i) / sum(n_i h_i).
The sites' local rule is written here in numpy (SCAFFOLD's option II, Karimireddy et al. 2020:
K steps of y -= lr * (grad f_i(y) - c_i + c) from the global x, the new c_i is the mean of the
gradients over those steps), so what is tested is the server: the weights are the example-weighted
mean of the replies, c is the example-weighted mean of the latest c_i, the state survives a
checkpoint, and bad control variates are dropped without touching c. What the server sends each
site is its correction d_i = c - c_i (``ControlVariates.correction``, with the server's copy of c_i),
and a site rule that only adds d_i to its gradients (keeping no c_i) is the same SCAFFOLD.

What must hold: rounds 1-2 equal a pure-numpy SCAFFOLD; with the same K local steps SCAFFOLD
reaches the federation's optimum where FedAvg stays at its own, biased fixed point; so does the
correction-driven rule, also across a dropped reply.
"""

from __future__ import annotations

import numpy as np
import pytest
from server_fakes import config

from server.federation.messages import Reply
from server.aggregation.strategy import ControlVariates, GuardedStrategy, build_strategy

#: node -> (n_i, h_i, a_i): different curvatures and optima, weights 10 : 30 : 20.
SITES = {11: (10, 0.5, [2.0, -1.0, 0.5]),
         12: (30, 2.0, [-1.0, 3.0, 1.0]),
         13: (20, 4.0, [0.5, 0.0, -2.0])}
LR, K = 0.1, 5
START = np.array([1.0, 1.0, 1.0], dtype=np.float32)
ZERO = np.zeros(3, dtype=np.float32)


def optimum(sites=SITES) -> np.ndarray:
    """argmin sum_i n_i f_i: sum(n_i h_i a_i) / sum(n_i h_i)."""
    return (sum(n * h * np.asarray(a) for n, h, a in sites.values()) / sum(n * h for n, h, _ in sites.values()))


def fedavg_fixed_point(sites=SITES) -> np.ndarray:
    """Where FedAvg with K local steps settles: K steps from x give a_i + (1 - lr h_i)^K (x - a_i),
    so x = sum n_i s_i a_i / sum n_i s_i with s_i = 1 - (1 - lr h_i)^K (not the optimum when the h_i differ)."""
    s = {nid: 1 - (1 - LR * h) ** K for nid, (_, h, _) in sites.items()}
    return (sum(n * s[i] * np.asarray(a) for i, (n, _, a) in sites.items())
            / sum(n * s[i] for i, (n, _, _) in sites.items()))


def local_round(nid: int, x: np.ndarray, c: np.ndarray, c_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Site ``nid``'s round (float64): (y, new c_i = mean over the K steps of grad f_i)."""
    _, h, a = SITES[nid]
    y = x.astype(np.float64)
    grads = []
    for _ in range(K):
        g = h * (y - np.asarray(a))
        grads.append(g)
        y = y - LR * (g - c_i.astype(np.float64) + c.astype(np.float64))
    return y, np.mean(grads, axis=0)


def site_reply(nid: int, x: np.ndarray, c: np.ndarray | None, c_i: np.ndarray | None) -> Reply:
    """What a site sends: its weights, and with SCAFFOLD (``c`` given) its new c_i; FedAvg runs the
    same rule with c = c_i = 0 and sends no control."""
    y, new = local_round(nid, x, ZERO if c is None else c, ZERO if c_i is None else c_i)
    return Reply(nid, arrays={"w": y.astype(np.float32)},
                 control=None if c is None else {"w": new.astype(np.float32)},
                 metrics={"num-examples": SITES[nid][0], "train-loss": 0.0})


def fed(strategy: str = "scaffold", min_nodes: int = 3):
    return config(f"federation.strategy={strategy}", f"federation.min_nodes={min_nodes}").federation


def scaffold(min_nodes: int = 3) -> GuardedStrategy:
    f = fed(min_nodes=min_nodes)
    return GuardedStrategy(build_strategy(f, n_sites=len(SITES)), f, control=ControlVariates({"w": ZERO}))


def site_controls(g: GuardedStrategy) -> dict[int, np.ndarray]:
    return {nid: c["w"] for nid, (_, c) in g.control.sites.items()}


def scaffold_round(g: GuardedStrategy, r: int, x: np.ndarray, sites_c: dict[int, np.ndarray]) -> np.ndarray:
    """One round as server.federation.loop runs it: c over the round's nodes, the sites' replies, aggregate.
    ``sites_c`` is the sites' own memory of their c_i (what Context.state keeps), updated here."""
    c = g.control.server_control(sorted(SITES))["w"]
    replies = [site_reply(nid, x, c, sites_c.get(nid)) for nid in sorted(SITES)]
    out = g.aggregate(r, replies, {"w": x})
    assert out.arrays is not None and out.dropped == [], out.skip_reason
    sites_c.update({rep.node_id: rep.control["w"] for rep in replies})
    return out.arrays["w"]


def weighted_mean(values: dict[int, np.ndarray]) -> np.ndarray:
    return sum(SITES[nid][0] * v for nid, v in values.items()) / sum(n for n, _, _ in SITES.values())


def scaffold_by_hand(rounds: int) -> list[tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]]:
    """Pure numpy SCAFFOLD in float64, per round: (the c sent, the new x, the new c_i)."""
    x, c, ci = START.astype(np.float64), np.zeros(3), {nid: np.zeros(3) for nid in SITES}
    out = []
    for _ in range(rounds):
        steps = {nid: local_round(nid, x, c, ci[nid]) for nid in SITES}
        ci = {nid: new for nid, (_, new) in steps.items()}
        out.append((c, weighted_mean({nid: y for nid, (y, _) in steps.items()}), ci))
        x, c = out[-1][1], weighted_mean(ci)
    return out


def test_two_rounds_equal_scaffold_by_hand():
    hand = scaffold_by_hand(2)
    g, sites_c, x = scaffold(), {}, START
    for r, (c_hand, x_hand, ci_hand) in enumerate(hand, start=1):
        c_sent = g.control.server_control(sorted(SITES))["w"]
        assert c_sent.dtype == np.float32
        np.testing.assert_allclose(c_sent, c_hand, rtol=1e-6, atol=1e-7)
        x = scaffold_round(g, r, x, sites_c)
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, x_hand, rtol=1e-6, atol=1e-6)
        for nid in SITES:  # the server keeps each site's latest c_i and its example weight
            np.testing.assert_allclose(site_controls(g)[nid], ci_hand[nid], rtol=1e-6, atol=1e-6)
            assert g.control.sites[nid][0] == SITES[nid][0]
    np.testing.assert_allclose(g.control.server_control(sorted(SITES))["w"], weighted_mean(hand[-1][2]),
                               rtol=1e-6, atol=1e-6)
    # Round 2 ran with a large correction and it mattered: FedAvg's round 2 from x_1 lands elsewhere.
    assert np.abs(hand[1][0]).max() > 0.5
    plain = weighted_mean({nid: local_round(nid, hand[0][1], ZERO, ZERO)[0] for nid in SITES})
    assert np.abs(hand[1][1] - plain).max() > 0.05
    # c covers the nodes asked for: a single node's c is its own c_i; an unknown node's, zeros.
    np.testing.assert_array_equal(g.control.server_control([12])["w"], site_controls(g)[12])
    np.testing.assert_array_equal(g.control.server_control([99])["w"], ZERO)


def test_scaffold_reaches_the_federations_optimum_where_fedavg_stays_biased():
    rounds = 60
    g, sites_c, x = scaffold(), {}, START
    for r in range(1, rounds + 1):
        x = scaffold_round(g, r, x, sites_c)
    f = fed("fedavg")
    avg, xa = GuardedStrategy(build_strategy(f, n_sites=len(SITES)), f), START
    for r in range(1, rounds + 1):
        out = avg.aggregate(r, [site_reply(nid, xa, None, None) for nid in sorted(SITES)], {"w": xa})
        xa = out.arrays["w"]
    star, biased = optimum(), fedavg_fixed_point()
    d_scaffold = float(np.linalg.norm(x - star))
    d_fedavg = float(np.linalg.norm(xa - star))
    # Measured: SCAFFOLD is 3.5e-8 from the optimum (float32's floor, reached by round 25; 1.6e-4 at
    # round 10); FedAvg is 0.374 from it, 9e-8 from its own fixed point, which is 0.374 off.
    assert d_scaffold < 1e-6, d_scaffold
    assert d_fedavg > 0.3, d_fedavg
    np.testing.assert_allclose(xa, biased, atol=1e-6)
    assert float(np.linalg.norm(biased - star)) > 0.3
    # At SCAFFOLD's fixed point each c_i is grad f_i at the optimum, and c (their weighted mean) is 0.
    for nid, (_, h, a) in SITES.items():
        np.testing.assert_allclose(site_controls(g)[nid], h * (star - np.asarray(a)), atol=1e-5)
    np.testing.assert_allclose(g.control.server_control(sorted(SITES))["w"], ZERO, atol=1e-5)


def scaffold_from(state) -> GuardedStrategy:
    g = scaffold()
    g.load_state_dict(state)
    return g


def test_a_state_round_trip_continues_bit_identically():
    a, sites_c, x = scaffold(), {}, START
    for r in (1, 2, 3):
        x = scaffold_round(a, r, x, sites_c)
    state = a.state_dict()
    assert state["class"] == "FedAvg" and set(state["scaffold"]["sites"]) == set(SITES)
    b = scaffold_from(state)
    xa, xb, ca, cb = x, x, dict(sites_c), dict(sites_c)
    for r in (4, 5, 6):
        xa, xb = scaffold_round(a, r, xa, ca), scaffold_round(b, r, xb, cb)
        if r == 4:
            x4 = xa
        assert np.array_equal(xa, xb), r
        assert np.array_equal(a.control.server_control(sorted(SITES))["w"],
                              b.control.server_control(sorted(SITES))["w"]), r
    # The captured state holds copies: rounds 4-6 left it as it was, so a new restore repeats round 4.
    assert np.array_equal(scaffold_round(scaffold_from(state), 4, x, dict(sites_c)), x4)
    # Without it (the server's c back to zero while the sites keep their c_i) round 4 differs.
    assert np.abs(scaffold_round(scaffold(), 4, x, dict(sites_c)) - x4).max() > 1e-3


@pytest.mark.parametrize("fault, code", [("missing", "E_MISSING_CONTROL"), ("shape", "E_CONTROL_ARRAY_SHAPE"),
                                         ("nan", "E_CONTROL_NONFINITE"), ("dtype", "E_CONTROL_ARRAY_DTYPE"),
                                         ("keys", "E_CONTROL_ARRAY_KEYS")])
def test_a_bad_control_variate_is_dropped_and_leaves_c_unchanged(fault, code):
    g, sites_c = scaffold(min_nodes=2), {}
    x = scaffold_round(g, 1, START, sites_c)
    before = {nid: c.copy() for nid, c in site_controls(g).items()}
    c = g.control.server_control(sorted(SITES))["w"]
    replies = [site_reply(nid, x, c, sites_c[nid]) for nid in sorted(SITES)]
    bad = replies[1]  # node 12, the heaviest site: its c_i would move c the most
    good = bad.control["w"]
    bad.control = {"missing": None, "shape": {"w": np.zeros(4, dtype=np.float32)},
                   "nan": {"w": np.array([good[0], np.nan, good[2]], dtype=np.float32)},
                   "dtype": {"w": good.astype(np.float64)},
                   "keys": {"w": good, "b": ZERO}}[fault]
    out = g.aggregate(2, replies, {"w": x})
    assert out.dropped == [(12, code)] and out.kept == [11, 13] and out.arrays is not None
    assert np.array_equal(site_controls(g)[12], before[12])  # node 12's c_i is its round-1 one
    for nid in (11, 13):
        assert np.array_equal(site_controls(g)[nid], replies[sorted(SITES).index(nid)].control["w"])
        assert not np.array_equal(site_controls(g)[nid], before[nid])
    # The weights are the mean of the kept replies only.
    w = {11: 10 / 30, 13: 20 / 30}
    np.testing.assert_allclose(out.arrays["w"], sum(w[r.node_id] * r.arrays["w"].astype(np.float64)
                                                    for r in replies if r.node_id in w), rtol=1e-6)


def test_a_skipped_round_does_not_update_the_control_variates():
    g, sites_c = scaffold(), {}
    x = scaffold_round(g, 1, START, sites_c)
    before = {nid: c.copy() for nid, c in site_controls(g).items()}
    c = g.control.server_control(sorted(SITES))["w"]
    replies = [site_reply(nid, x, c, sites_c[nid]) for nid in sorted(SITES)]
    replies[0].control = None  # 2 usable replies left, federation.min_nodes is 3
    out = g.aggregate(2, replies, {"w": x})
    assert out.arrays is None and out.skip_reason == "E_TOO_FEW_REPLIES"
    assert out.dropped == [(11, "E_MISSING_CONTROL")]
    # The two good replies' c_i were not taken: the control variates wait for an aggregated round.
    assert all(np.array_equal(site_controls(g)[nid], before[nid]) for nid in SITES)
    assert not np.array_equal(replies[1].control["w"], before[12])


# --- ControlVariates.correction: what each site is sent (the site keeps no c_i) ---------------------------

def corrected_round(g: GuardedStrategy, r: int, x: np.ndarray, nodes=tuple(sorted(SITES)),
                    fault: dict[int, str] | None = None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One round as server.federation.loop runs it now: each node gets ``correction(node, nodes)`` and runs
    K steps of y -= lr (grad f_i(y) + d_i) (``local_round`` with c = d_i, c_i = 0: the site holds
    nothing). ``fault``: node -> "nan", that node's reply's control is non-finite (dropped)."""
    d = {nid: g.control.correction(nid, list(nodes))["w"] for nid in nodes}
    replies = [site_reply(nid, x, d[nid], None) for nid in nodes]
    for nid in fault or {}:
        rep = next(rp for rp in replies if rp.node_id == nid)
        rep.control = {"w": np.full(3, np.nan, dtype=np.float32)}
    out = g.aggregate(r, replies, {"w": x})
    assert out.arrays is not None, out.skip_reason
    assert out.dropped == [(nid, "E_CONTROL_NONFINITE") for nid in sorted(fault or {})]
    return out.arrays["w"], d


def test_the_correction_is_c_minus_the_servers_own_c_i():
    nodes = sorted(SITES)
    g = scaffold()
    # Before any accepted reply: c = 0 and no c_i, so zeros, in the parameters' dtype, as copies.
    for nid in nodes:
        d = g.control.correction(nid, nodes)
        assert list(d) == ["w"] and d["w"].dtype == np.float32 and not d["w"].any()
        d["w"][:] = 7.0
        assert not g.control.correction(nid, nodes)["w"].any() and not g.control.zeros["w"].any()
    scaffold_round(g, 1, START, {})
    known = site_controls(g)
    assert sorted(known) == nodes and all(np.abs(c).max() > 0.1 for c in known.values())
    c_hand = weighted_mean({nid: c.astype(np.float64) for nid, c in known.items()})
    c = g.control.server_control(nodes)["w"]
    np.testing.assert_allclose(c, c_hand, rtol=1e-6, atol=1e-7)
    for nid in nodes:  # a known node: c - its c_i, as the server holds it
        d = g.control.correction(nid, nodes)["w"]
        assert d.dtype == np.float32
        np.testing.assert_array_equal(d, (c.astype(np.float64) - known[nid].astype(np.float64)).astype(np.float32))
        np.testing.assert_allclose(d, c_hand - known[nid], rtol=1e-6, atol=1e-6)
        assert not np.allclose(d, c, atol=1e-3)  # not the plain c any more
    # With every node known and in the round, the example-weighted corrections cancel: sum n_i d_i = 0.
    total = sum(SITES[nid][0] * g.control.correction(nid, nodes)["w"].astype(np.float64) for nid in nodes)
    np.testing.assert_allclose(total, ZERO, atol=1e-5)
    # A node with no accepted reply yet (99): just c, over the known nodes of the round.
    np.testing.assert_array_equal(g.control.correction(99, [*nodes, 99])["w"], c)
    # A round of a subset: c over that subset, minus the node's own c_i.
    sub = g.control.server_control([12, 13])["w"]
    np.testing.assert_allclose(sub, (30 * known[12] + 20 * known[13]) / 50, rtol=1e-6)
    np.testing.assert_array_equal(g.control.correction(12, [12, 13])["w"], (sub.astype(np.float64) - known[12]).astype(np.float32))
    # Reading it changes nothing: the known c_i are the same objects' values as before.
    assert all(np.array_equal(site_controls(g)[nid], known[nid]) for nid in nodes)


def test_a_site_rule_driven_by_the_correction_is_the_same_scaffold_and_converges():
    hand = scaffold_by_hand(2)
    g, x = scaffold(), START
    previous = {nid: np.zeros(3) for nid in SITES}  # c_i before round 1
    for r, (c_hand, x_hand, ci_hand) in enumerate(hand, start=1):
        x, d = corrected_round(g, r, x)
        for nid in SITES:  # d_i = c - c_i of the pure-numpy run (zeros in round 1)
            np.testing.assert_allclose(d[nid], c_hand - previous[nid], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x, x_hand, rtol=1e-6, atol=1e-6)
        for nid in SITES:
            np.testing.assert_allclose(site_controls(g)[nid], ci_hand[nid], rtol=1e-6, atol=1e-6)
        previous = ci_hand
    assert all(not v.any() for v in corrected_round(scaffold(), 1, START)[1].values())
    assert np.abs(hand[1][0]).max() > 0.5  # round 2's correction was large
    # 60 rounds: the same trajectory as the rule with the sites' own c_i, and the federation's optimum.
    rounds, star = 60, optimum()
    a, xa, sites_c = scaffold(), START, {}
    b, xb = scaffold(), START
    for r in range(1, rounds + 1):
        xa = scaffold_round(a, r, xa, sites_c)
        xb, _ = corrected_round(b, r, xb)
        np.testing.assert_allclose(xb, xa, rtol=1e-5, atol=1e-6)
    assert float(np.linalg.norm(xb - star)) < 1e-6, np.linalg.norm(xb - star)
    for nid, (_, h, a_i) in SITES.items():
        np.testing.assert_allclose(site_controls(b)[nid], h * (star - np.asarray(a_i)), atol=1e-5)
        np.testing.assert_allclose(b.control.correction(nid, sorted(SITES))["w"], -h * (star - np.asarray(a_i)),
                                   atol=1e-5)  # at the optimum d_i = -grad f_i: the site's drift cancelled
    # A dropped reply (node 12's control variate is NaN in round 5, min_nodes 2) leaves the server's
    # c_12 at round 4's; the site is sent c - that c_12 in round 6, so nothing is out of step.
    g, x = scaffold(min_nodes=2), START
    for r in range(1, rounds + 1):
        if r == 5:
            c12 = site_controls(g)[12].copy()
        if r == 6:  # c over the round (node 12 counted with its round-4 c_i), minus that same c_12
            assert np.array_equal(site_controls(g)[12], c12)
            c6 = g.control.server_control(sorted(SITES))["w"]
            want = (c6.astype(np.float64) - c12).astype(np.float32)
        x, d = corrected_round(g, r, x, fault={12: "nan"} if r == 5 else None)
        if r == 6:
            np.testing.assert_array_equal(d[12], want)
            assert not np.array_equal(site_controls(g)[12], c12)  # round 6's reply was taken
    assert float(np.linalg.norm(x - star)) < 1e-6, np.linalg.norm(x - star)


def test_an_outlying_control_variate_is_kept_but_flagged(caplog):
    """A site sending a huge c_i moves every other site's correction: like an outlying update it is
    named in the log and the round record (kept: honest sites with unusual data look the same)."""
    nodes = (21, 22, 23, 24)
    g = GuardedStrategy(build_strategy(fed(min_nodes=3), n_sites=len(nodes)), fed(min_nodes=3),
                        control=ControlVariates({"w": ZERO}))
    c_i = {21: [0.1, 0.0, 0.0], 22: [0.0, 0.12, 0.0], 23: [0.0, 0.0, 0.09], 24: [50.0, -50.0, 50.0]}
    replies = [Reply(n, arrays={"w": START + 0.01 * i}, control={"w": np.array(c_i[n], dtype=np.float32)},
                     metrics={"num-examples": 10}) for i, n in enumerate(nodes)]
    with caplog.at_level("WARNING", logger="fedsmm.server.strategy"):
        out = g.aggregate(1, replies, {"w": START})
    assert out.kept == list(nodes) and out.arrays is not None
    assert out.control_outliers == [24]
    np.testing.assert_allclose(out.control_norms[24], np.linalg.norm(c_i[24]), rtol=1e-6)
    assert "node 24's SCAFFOLD control variate norm" in caplog.text
    honest = [Reply(r.node_id, arrays=r.arrays, control={"w": np.array(c_i[21], dtype=np.float32)},
                    metrics=r.metrics) for r in replies]
    assert g.aggregate(2, honest, {"w": START}).control_outliers == []  # nobody stands out
