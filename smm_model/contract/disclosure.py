"""Disclosure control: the rules every value a site sends passes through, applied at the site.

The threat is an honest-but-curious server (or anyone who reads its logs and run folders): it
follows the protocol but studies everything a site sends (the preflight summary, every round's
metrics, every evaluation) to single out a patient. The rule, after DataSHIELD's disclosure traps
(``nfilter.tab``, "five is the most common threshold rule imposed by data releasers worldwide"):

* **No count cell between 1 and k - 1.** A count that leaves a site is 0 or at least k
  (``privacy.min_cell``, default 5; the site's own floor, node config ``min-cell``, can only raise
  it). On an ordered axis (time bins, score bins, predicted risk groups) neighbouring cells are
  merged until every cell holds 0 or at least k patients (``merge_ordered``); several rows that
  share the axis (events and censored, positives and negatives) are merged on the same groups, so
  no difference of released cells isolates fewer than k patients either. On an unordered axis
  (class counts, a confusion-matrix row) small cells are suppressed, and more cells with them
  while the suppressed ones together hold fewer than k (secondary suppression: the row's total is
  known from elsewhere, so a lone suppressed cell could be recomputed), ``suppress_unordered``.
* **Sums and means only over at least k patients**, and per-site statistics of a split only when
  it has at least k patients (``release_allowed``).
* **Say what was coarsened**: the reply names the suppressed cells, so the server never reads a
  suppressed cell as a true zero, and the report says what was suppressed.

Differencing: the same patients appear in every round's validation statistics with changing
predictions. Released label statistics (the survival histogram, class counts) are sent once, in
the preflight, and are the same every round; Kaplan-Meier counts per predicted risk group, whose
groups change every round, are sent only for the test split, which a run evaluates once (see
``KM_SPLITS``). Repeated runs on the same test patients are not covered by these rules (that needs
differential privacy of the evaluation itself); DP-SGD covers what the weights carry.

This module is pure numpy over counts; ``client.local.round`` applies it to every outgoing
statistic, and ``tests/sim/test_privacy_attack.py`` plays the curious server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DisclosurePolicy", "merge_ordered", "apply_groups", "release_ordered", "suppress_unordered",
           "release_km", "KM_SPLITS", "SITE_FLOOR_KEY"]

#: SuperNode node-config key of a site's own minimum cell count (it can raise, never lower, the run's).
SITE_FLOOR_KEY = "min-cell"
#: Splits whose evaluation carries Kaplan-Meier counts per predicted risk group (see the docstring).
KM_SPLITS = ("test",)


@dataclass(frozen=True)
class DisclosurePolicy:
    """The minimum cell count k in force at a site. ``k == 1`` is no disclosure control."""

    k: int = 5

    @classmethod
    def at_site(cls, run_min_cell: int, site_floor: int | None = None) -> DisclosurePolicy:
        """The stricter of what the run asks (``privacy.min_cell``) and the site's own floor."""
        k = max(int(run_min_cell), int(site_floor or 1))
        if k < 1:
            raise ValueError(f"minimum cell count must be >= 1, got {k}")
        return cls(k)

    @property
    def active(self) -> bool:
        return self.k > 1

    def ok(self, count: int) -> bool:
        """A count that may leave the site as it is."""
        return count == 0 or count >= self.k

    def release_allowed(self, n_patients: int) -> bool:
        """Sums, means and metrics over ``n_patients`` may be sent."""
        return n_patients >= self.k


def _valid(block: np.ndarray, k: int) -> bool:
    """Every row's total over the block is 0 or >= k."""
    s = block.sum(axis=-1)
    return bool(np.all((s == 0) | (s >= k)))


def merge_ordered(rows: np.ndarray, k: int) -> list[tuple[int, int]] | None:
    """Groups [start, stop) of consecutive bins that cover the axis, such that in every row each
    group's count is 0 or at least ``k``; None when no grouping exists (a row's total is between
    1 and k - 1: the whole table must then be suppressed).

    ``rows``: (R, n) non-negative integer counts sharing one ordered axis (R = 1 for a single
    histogram). Greedy from the left: a group closes as soon as it is valid; a trailing remainder
    that is not valid joins the groups before it until it is. The result is the finest grouping
    this rule finds, not a global optimum.
    """
    rows = np.atleast_2d(np.asarray(rows, dtype=np.int64))
    if rows.ndim != 2 or (rows < 0).any():
        raise ValueError("rows must be a 2-D array of non-negative counts")
    n = rows.shape[1]
    if k <= 1:
        return [(i, i + 1) for i in range(n)]
    if not _valid(rows, k):
        return None
    groups: list[tuple[int, int]] = []
    start = 0
    for stop in range(1, n + 1):
        block = rows[:, start:stop]
        if block.sum() > 0 and _valid(block, k):
            groups.append((start, stop))
            start = stop
    if start < n:  # a remainder: all zeros (append it) or not valid (merge backwards)
        groups.append((start, n))
    while len(groups) > 1 and not _valid(rows[:, groups[-1][0]:groups[-1][1]], k):
        (a, _), (_, b) = groups[-2], groups[-1]
        groups[-2:] = [(a, b)]
    return groups


def apply_groups(rows: np.ndarray, groups: Sequence[tuple[int, int]], place: str = "first") -> np.ndarray:
    """``rows`` with each group's total put in one bin of the group (``first``, ``middle`` or
    ``last``) and zeros in the rest: the same shape, so every reader of the original layout reads
    the coarsened one."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.int64))
    out = np.zeros_like(rows)
    for a, b in groups:
        at = {"first": a, "middle": (a + b - 1) // 2, "last": b - 1}[place]
        out[:, at] = rows[:, a:b].sum(axis=1)
    return out


def release_ordered(rows: np.ndarray, policy: DisclosurePolicy, place: str = "first"
                    ) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
    """(released rows, groups) for counts on one ordered axis: merged to cells of 0 or >= k, or all
    zeros with groups None when the table cannot be released (then it must be marked suppressed)."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.int64))
    groups = merge_ordered(rows, policy.k)
    if groups is None:
        return np.zeros_like(rows), None
    return apply_groups(rows, groups, place), groups


def suppress_unordered(counts: Sequence[int], policy: DisclosurePolicy) -> tuple[list[int], list[int]]:
    """(released counts, indices suppressed) for counts on an unordered axis whose total may be
    known to the receiver (a class-count vector, a confusion-matrix row).

    Primary suppression: every cell between 1 and k - 1. Secondary: while the suppressed cells
    together hold between 1 and k - 1 patients, the smallest released non-zero cell is suppressed
    too, so the total minus the released cells never reveals fewer than k patients. Suppressed
    cells are sent as 0 and named in the index list.
    """
    c = [int(x) for x in counts]
    if any(x < 0 for x in c):
        raise ValueError("counts must be non-negative")
    hidden = [i for i, x in enumerate(c) if not policy.ok(x)]
    while 0 < sum(c[i] for i in hidden) < policy.k:
        rest = [i for i, x in enumerate(c) if x > 0 and i not in hidden]
        if not rest:
            break
        hidden.append(min(rest, key=lambda i: (c[i], i)))
    hidden = sorted(hidden)
    return [0 if i in hidden else x for i, x in enumerate(c)], hidden


def release_km(km: np.ndarray, policy: DisclosurePolicy) -> tuple[np.ndarray, bool]:
    """(released (G, 2, K) Kaplan-Meier counts, released?) from ``km_counts`` output.

    Each group's patients leave the risk set once, by an event or by censoring; the cells a
    reader can derive are, per group and interval, the events and the censored (differences of
    the numbers at risk). Risk groups holding 1..k-1 patients are merged with their neighbours
    (the groups are ordered by predicted risk), then time intervals are merged on one grouping for
    all groups' event and censored rows, and each time group's exits are placed in its last
    interval: the numbers at risk then stay flat within a group and the curves step at group ends.
    When a group's events or censored total 1..k-1, risk groups are merged further. Not releasable (a row total between 1 and k - 1 after merging): all zeros and False.
    """
    km = np.asarray(km, dtype=np.int64)
    G, two, K = km.shape
    if two != 2:
        raise ValueError(f"km must be (G, 2, K), got {km.shape}")
    events, at_risk = km[:, 0], km[:, 1]
    leaving = at_risk - np.concatenate([at_risk[:, 1:], np.zeros((G, 1), dtype=np.int64)], axis=1)  # (G, K)
    censored = leaving - events
    sizes = at_risk[:, 0]  # (G,) patients per predicted risk group
    group_sets = merge_ordered(sizes[None, :], policy.k)
    if group_sets is None:
        return np.zeros_like(km), False
    while True:
        ev = np.stack([events[a:b].sum(axis=0) for a, b in group_sets])  # (G', K)
        ce = np.stack([censored[a:b].sum(axis=0) for a, b in group_sets])
        time_groups = merge_ordered(np.concatenate([ev, ce]), policy.k)
        if time_groups is not None:
            break
        if len(group_sets) == 1:
            return np.zeros_like(km), False
        # A group whose events or censored total 1..k-1: merge the smallest group into its
        # smaller neighbour (fewer, larger risk groups) and try again.
        sizes_now = [int(sizes[a:b].sum()) for a, b in group_sets]
        i = int(np.argmin(sizes_now))
        j = i - 1 if i == len(group_sets) - 1 or (i > 0 and sizes_now[i - 1] <= sizes_now[i + 1]) else i + 1
        lo, hi = min(i, j), max(i, j)
        group_sets[lo:hi + 1] = [(group_sets[lo][0], group_sets[hi][1])]
    ev, ce = apply_groups(ev, time_groups, "last"), apply_groups(ce, time_groups, "last")
    out = np.zeros_like(km)
    for (a, _), e, c in zip(group_sets, ev, ce):
        out[a, 0] = e
        out[a, 1] = np.cumsum((e + c)[::-1])[::-1]  # at risk at grid[k] = leaving at >= k
    return out, True
