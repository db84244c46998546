"""Disclosure control rules on every statistic type: ordered merges, unordered suppression with
secondary suppression, Kaplan-Meier counts, and the site floor that a run cannot lower."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from smm_model.contract.disclosure import (DisclosurePolicy, apply_groups, merge_ordered, release_km, release_ordered,
                                           suppress_unordered)
from smm_model.metrics.federated import km_counts

K5 = DisclosurePolicy(5)


def cells_ok(a: np.ndarray, k: int) -> bool:
    a = np.asarray(a)
    return bool(np.all((a == 0) | (a >= k)))


def test_site_floor_can_raise_but_not_lower_the_threshold():
    assert DisclosurePolicy.at_site(5, None).k == 5
    assert DisclosurePolicy.at_site(3, 10).k == 10
    assert DisclosurePolicy.at_site(1, 5).k == 5  # a run switching the policy off cannot at a site with a floor
    assert not DisclosurePolicy.at_site(1, None).active


@pytest.mark.parametrize("seed", range(20))
def test_ordered_merge_leaves_only_zero_or_k_cells_in_every_row_and_keeps_totals(seed):
    rng = np.random.default_rng(seed)
    rows = rng.poisson(0.4, size=(2, 60))
    rows[:, rng.integers(0, 60, 3)] += rng.integers(0, 4, (2, 3))
    groups = merge_ordered(rows, 5)
    if groups is None:
        assert any(0 < t < 5 for t in rows.sum(axis=1))
        return
    assert groups[0][0] == 0 and groups[-1][1] == 60 and all(a < b for a, b in groups)
    assert all(b == c for (_, b), (c, _) in zip(groups, groups[1:]))  # contiguous cover
    out = apply_groups(rows, groups)
    assert cells_ok(out, 5) and (out.sum(axis=1) == rows.sum(axis=1)).all()
    # no union of consecutive released groups, nor its complement, isolates 1..4 patients
    for i, j in itertools.combinations(range(len(groups) + 1), 2):
        a, b = groups[i][0], groups[j - 1][1]
        assert cells_ok(rows[:, a:b].sum(axis=1), 5)


def test_ordered_merge_refuses_a_table_whose_total_is_small():
    assert merge_ordered(np.array([[0, 1, 2, 0]]), 5) is None
    out, groups = release_ordered(np.array([[0, 1, 2, 0]]), K5)
    assert groups is None and not out.any()
    assert merge_ordered(np.array([[0, 1, 2, 0]]), 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # k = 1: unchanged


def test_ordered_merge_of_paired_rows_hides_each_row_not_just_their_sum():
    events = np.array([1, 0, 4, 0, 5, 0])
    censored = np.array([4, 5, 0, 0, 0, 5])
    out = apply_groups(np.stack([events, censored]), merge_ordered(np.stack([events, censored]), 5))
    assert cells_ok(out, 5)
    assert (out.sum(axis=1) == [10, 14]).all()


def test_unordered_suppression_is_secondary_when_one_cell_would_be_recomputable():
    released, hidden = suppress_unordered([10, 2, 7, 0], K5)
    # the 2 alone would be total - released = 2: the smallest other non-zero cell goes too
    assert hidden == [1, 2] and released == [10, 0, 0, 0]
    released, hidden = suppress_unordered([10, 2, 3, 0], K5)
    assert hidden == [1, 2] and released == [10, 0, 0, 0]  # 2 + 3 = 5: no more needed
    assert suppress_unordered([10, 5, 0], K5) == ([10, 5, 0], [])
    released, hidden = suppress_unordered([3], K5)
    assert released == [0] and hidden == [0]  # nothing else to hide it with: suppressed alone


def test_kaplan_meier_counts_are_coarsened_on_every_derivable_cell():
    rng = np.random.default_rng(3)
    n = 40
    t = rng.uniform(0, 2000, n)
    e = rng.random(n) < 0.6
    g = rng.integers(0, 4, n)
    g[:3] = 3  # group 3 likely small
    grid = np.arange(0, 2100, 30.0)
    km = km_counts(t, e, g, 4, grid)
    out, ok = release_km(km, K5)
    assert ok
    events, at_risk = out[:, 0], out[:, 1]
    leaving = at_risk - np.concatenate([at_risk[:, 1:], np.zeros((4, 1), dtype=int)], axis=1)
    for arr in (events, leaving - events, at_risk[:, :1]):
        assert cells_ok(arr, 5)
    assert out[:, 1, 0].sum() == n and out[:, 0].sum() == e.sum()
    assert (np.diff(at_risk, axis=1) <= 0).all()  # still numbers at risk


def test_kaplan_meier_of_a_tiny_split_is_not_released():
    km = km_counts(np.array([10.0, 50.0, 70.0]), np.array([1, 0, 1]), np.array([0, 1, 1]), 2, np.arange(0, 120, 30.0))
    out, ok = release_km(km, K5)
    assert not ok and not out.any()
