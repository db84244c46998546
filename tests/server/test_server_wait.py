"""Bounded wait for sites (reliability B2): never Flower's infinite ``sample_nodes`` loop."""

from __future__ import annotations

import time

import pytest
from server_fakes import FakeTransport, config, sites

from server.federation.loop import run_federation
from server.federation.wait import NodeWaitTimeout, wait_for_nodes


def test_returns_at_once_when_enough_sites_are_connected():
    assert wait_for_nodes(lambda: [3, 1, 2], 2, 10.0, sleep=lambda s: pytest.fail("slept")) == [1, 2, 3]
    assert wait_for_nodes(lambda: [3, 1, 2], 2, 10.0, eligible={1, 3}) == [1, 3]


def test_waits_for_late_sites_on_the_clock():
    now = [0.0]
    connected = [[1], [1], [1, 2]]

    def list_nodes():
        return connected.pop(0) if len(connected) > 1 else connected[0]

    def sleep(s):
        now[0] += s

    assert wait_for_nodes(list_nodes, 2, 5.0, poll_s=1.0, clock=lambda: now[0], sleep=sleep) == [1, 2]
    assert now[0] == 2.0


def test_too_few_sites_fail_clearly_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(NodeWaitTimeout, match=r"only 1 of 3 sites connected after [\d.]+ s"):
        wait_for_nodes(lambda: [7, 8], 3, 0.4, eligible={7}, poll_s=0.1)
    assert 0.4 <= time.monotonic() - t0 < 0.4 + 1.0


def test_a_run_with_too_few_sites_fails_within_wait_for_nodes_s(tmp_path):
    cfg = config("federation.wait_for_nodes_s=0.5")
    transport = FakeTransport(sites(3), connected=lambda: [11])
    t0 = time.monotonic()
    with pytest.raises(NodeWaitTimeout, match="only 1 of 2 sites connected"):
        run_federation(transport, cfg, tmp_path / "run", poll_s=0.1)
    assert time.monotonic() - t0 < 0.5 + 1.5
    assert transport.sent == []  # nothing was sent to the lone site


def test_a_site_lost_for_good_mid_run_fails_the_run_not_hangs_it(tmp_path):
    """B2: 2 of 3 sites die after round 1 with min_nodes 2: the next round's wait ends in an error,
    and the last checkpoint is the one of the last completed round."""
    cfg = config("federation.wait_for_nodes_s=0.3", "federation.rounds=3")
    alive = [11, 12, 13]
    transport = FakeTransport(sites(3), connected=lambda: alive)

    def crash_after_round_1(path, state, **kw):
        from server.runs.checkpoint import save_checkpoint
        out = save_checkpoint(path, state, **kw)
        if state.round == 1:
            alive[:] = [11]
        return out

    import server.federation.loop as loop
    orig = loop.save_checkpoint
    loop.save_checkpoint = crash_after_round_1
    try:
        t0 = time.monotonic()
        with pytest.raises(NodeWaitTimeout, match="only 1 of 2 sites connected"):
            run_federation(transport, cfg, tmp_path / "run", poll_s=0.05)
        assert time.monotonic() - t0 < 10
    finally:
        loop.save_checkpoint = orig
    from server.runs.checkpoint import load_latest
    assert load_latest(tmp_path / "run").round == 1
