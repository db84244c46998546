"""Bounded wait for sites (fault test plan case B2, ../shared/docs/reliability.md): never Flower's infinite ``sample_nodes`` loop.

Time is simulated: ``wait_for_nodes`` and ``run_federation`` take ``clock`` and ``sleep``, so the
tests assert the exact waiting time and number of polls, whatever the machine's load. Poll
intervals and timeouts are binary fractions (0.125, 0.25...) so that the sums are exact.
"""

from __future__ import annotations

import pytest
from server_fakes import FakeTransport, config, sites

import server.federation.loop as loop
from server.federation.loop import run_federation
from server.federation.wait import NodeWaitTimeout, wait_for_nodes


class FakeClock:
    """A clock that only moves when something sleeps on it; ``polls`` records the time of each
    ``list_nodes`` call made through ``nodes``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.polls: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        if len(self.sleeps) >= 1000:  # a wait whose simulated time stops advancing would spin forever
            pytest.fail(f"still waiting after 1000 sleeps (last {self.sleeps[-3:]}, at t={self.now})")
        self.sleeps.append(s)
        self.now += s

    def nodes(self, connected):
        """``connected`` (a callable returning node ids) wrapped to record the poll times."""
        def list_nodes():
            self.polls.append(self.now)
            return list(connected())
        return list_nodes


def test_returns_at_once_when_enough_sites_are_connected():
    assert wait_for_nodes(lambda: [3, 1, 2], 2, 10.0, sleep=lambda s: pytest.fail("slept")) == [1, 2, 3]
    assert wait_for_nodes(lambda: [3, 1, 2], 2, 10.0, eligible={1, 3}) == [1, 3]


def test_waits_for_late_sites_on_the_clock():
    t = FakeClock()
    connected = [[1], [1], [1, 2]]

    def list_nodes():
        return connected.pop(0) if len(connected) > 1 else connected[0]

    assert wait_for_nodes(t.nodes(list_nodes), 2, 5.0, poll_s=1.0, clock=t.clock, sleep=t.sleep) == [1, 2]
    assert t.now == 2.0 and t.polls == [0.0, 1.0, 2.0] and t.sleeps == [1.0, 1.0]


def test_too_few_sites_fail_clearly_at_the_timeout():
    t = FakeClock()
    with pytest.raises(NodeWaitTimeout, match=r"only 1 of 3 sites connected after 1\.0 s "
                                              r"\(federation\.wait_for_nodes_s=1\)"):
        wait_for_nodes(t.nodes(lambda: [7, 8]), 3, 1.0, eligible={7}, poll_s=0.25, clock=t.clock, sleep=t.sleep)
    assert t.now == 1.0 and t.polls == [0.0, 0.25, 0.5, 0.75, 1.0] and t.sleeps == [0.25] * 4


def test_the_last_poll_is_at_the_deadline():
    """A timeout that is not a multiple of the poll interval: the last sleep is shortened so the
    last poll happens exactly at the deadline (not a poll interval after it)."""
    t = FakeClock()
    with pytest.raises(NodeWaitTimeout, match=r"only 0 of 1 sites connected after 0\.6 s"):
        wait_for_nodes(t.nodes(lambda: []), 1, 0.625, poll_s=0.25, clock=t.clock, sleep=t.sleep)
    assert t.now == 0.625 and t.polls == [0.0, 0.25, 0.5, 0.625] and t.sleeps == [0.25, 0.25, 0.125]


def test_a_run_with_too_few_sites_fails_after_wait_for_nodes_s(tmp_path):
    cfg = config("federation.wait_for_nodes_s=0.5")  # min_nodes 2
    t = FakeClock()
    transport = FakeTransport(sites(3), connected=t.nodes(lambda: [11]))
    with pytest.raises(NodeWaitTimeout, match=r"only 1 of 2 sites connected after 0\.5 s"):
        run_federation(transport, cfg, tmp_path / "run", poll_s=0.125, clock=t.clock, sleep=t.sleep)
    assert t.now == 0.5 and t.polls == [0.0, 0.125, 0.25, 0.375, 0.5] and t.sleeps == [0.125] * 4
    assert transport.sent == []  # nothing was sent to the lone site


def test_a_site_lost_for_good_mid_run_fails_the_run_not_hangs_it(tmp_path, monkeypatch):
    """2 of 3 sites die after round 1 with min_nodes 2: the next round's wait ends in an error
    after exactly wait_for_nodes_s, and the last checkpoint is the one of the last completed round."""
    cfg = config("federation.wait_for_nodes_s=0.5", "federation.rounds=3")
    alive = [11, 12, 13]
    t = FakeClock()
    transport = FakeTransport(sites(3), connected=t.nodes(lambda: alive))
    lost_at: list[int] = []
    save = loop.save_checkpoint

    def lose_sites_after_round_1(path, state, **kw):
        out = save(path, state, **kw)
        if state.round == 1:
            alive[:] = [11]
            lost_at.append(len(t.polls))
        return out

    monkeypatch.setattr(loop, "save_checkpoint", lose_sites_after_round_1)
    with pytest.raises(NodeWaitTimeout, match=r"only 1 of 2 sites connected after 0\.5 s"):
        run_federation(transport, cfg, tmp_path / "run", poll_s=0.125, clock=t.clock, sleep=t.sleep)
    # Until the loss no wait slept (3 of 3 connected); after it, one bounded wait of 5 polls.
    assert lost_at and t.polls[:lost_at[0]] == [0.0] * lost_at[0]
    assert t.polls[lost_at[0]:] == [0.0, 0.125, 0.25, 0.375, 0.5] and t.sleeps == [0.125] * 4 and t.now == 0.5
    from server.runs.checkpoint import load_latest
    assert load_latest(tmp_path / "run").round == 1
