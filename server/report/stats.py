"""Statistics the report derives from a run's pooled test counts, and the readers of those counts.

A site sends no patient-level value, only sums (``smm_model.metrics.federated``): confusion counts,
score histograms per class, C-index pair counts and Kaplan-Meier event/at-risk counts on a shared
time grid; the server adds them up into the test record's ``global.stats``. The readers here
(``pooled_stats``, ``count_matrix``, ``score_hist``, ``pooled_km``) reshape those flat lists and
return None where a record does not hold them (an older run folder), so the caller can say so.
``km_lifelines`` recomputes the Kaplan-Meier curves and the log-rank test from the counts with
lifelines, independently of the run's own arithmetic, so the report can check the value the run
recorded. lifelines (and ``server.report.plots`` for the result type) is imported only when called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["km_lifelines", "pooled_stats", "count_matrix", "score_hist", "pooled_km"]


def km_lifelines(counts: Any, grid: Sequence[float] | None = None):
    """Kaplan-Meier curves and the log-rank test of (G, 2, K) grid counts, with lifelines.

    The counts are expanded into weighted pseudo-records: at grid time ``grid[k]``, ``d[g, k]`` events
    and ``n[g, k] - n[g, k+1] - d[g, k]`` censorings (patients whose time falls in
    ``[grid[k], grid[k+1])``, rounded down to the grid as the sites did). ``KaplanMeierFitter`` and
    ``multivariate_logrank_test`` with ``weights`` then give exactly
    ``smm_model.metrics.federated.km_from_counts`` / ``logrank_from_counts``. Returns
    ``report_plots.KMCurves``; survival is nan for a group without patients.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    from server.report.plots import KMCurves

    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 3 or counts.shape[1] != 2:
        raise ValueError(f"KM counts must be (groups, 2, grid), got {counts.shape}")
    G, _, K = counts.shape
    grid_a = np.arange(K, dtype=np.float64) if grid is None else np.asarray(grid, dtype=np.float64)
    if grid_a.shape != (K,):
        raise ValueError(f"KM grid has {grid_a.size} times, the counts {K}")
    d, n = counts[:, 0], counts[:, 1]
    n_next = np.concatenate([n[:, 1:], np.zeros((G, 1), dtype=np.int64)], axis=1)
    censored = n - n_next - d
    if (censored < 0).any() or (d < 0).any():
        raise ValueError("inconsistent KM counts (fewer at risk than events and departures)")
    survival = np.full((G, K), np.nan)
    T, E, W, groups = [], [], [], []
    for g in range(G):
        t_g, e_g, w_g = [], [], []
        for k in range(K):
            if d[g, k] > 0:
                t_g.append(grid_a[k]), e_g.append(1), w_g.append(int(d[g, k]))
            if censored[g, k] > 0:
                t_g.append(grid_a[k]), e_g.append(0), w_g.append(int(censored[g, k]))
        if not t_g:
            continue
        kmf = KaplanMeierFitter().fit(t_g, e_g, weights=w_g)
        survival[g] = kmf.survival_function_at_times(grid_a).to_numpy()
        T += t_g
        E += e_g
        W += w_g
        groups += [g] * len(t_g)
    used = sorted(set(groups))
    chi2, p, df = float("nan"), float("nan"), 0
    if len(used) >= 2 and sum(E) > 0:
        res = multivariate_logrank_test(np.asarray(T), np.asarray(groups), np.asarray(E), weights=np.asarray(W))
        chi2, p, df = float(res.test_statistic), float(res.p_value), int(res.degrees_of_freedom)
    labels = []
    for g in range(G):
        extra = " (highest predicted risk)" if g == 0 else (" (lowest predicted risk)" if g == G - 1 else "")
        labels.append(f"risk group {g + 1}{extra}")
    return KMCurves(grid=grid_a, survival=survival, at_risk=n, events=d, labels=labels, chi2=chi2, p=p, df=df)


def pooled_stats(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An evaluation record's pooled ``global.stats``, or None (not recorded: an older run folder)."""
    stats = ((record or {}).get("global") or {}).get("stats")
    return stats if isinstance(stats, dict) else None


def count_matrix(flat: Any, C: int) -> np.ndarray | None:
    """A (C, C) confusion matrix from its flat list, or None if the list is not one."""
    a = np.asarray(flat, dtype=np.int64) if isinstance(flat, list) else None
    return a.reshape(C, C) if a is not None and a.size == C * C else None


def score_hist(flat: Any, C: int) -> np.ndarray | None:
    """(C, 2, bins) score histograms (positives, negatives per class) from the flat list, or None."""
    a = np.asarray(flat, dtype=np.int64) if isinstance(flat, list) else None
    if a is None or a.size % (2 * C):
        return None
    return a.reshape(C, 2, -1)


def pooled_km(stats: Mapping[str, Any], record: Mapping[str, Any]) -> tuple[np.ndarray, list[float] | None] | None:
    """The pooled Kaplan-Meier counts (G, 2, K) and their grid times (None if not recorded), or None."""
    flat, G = stats.get("survival-km"), int(stats.get("km-groups") or 0)
    if not isinstance(flat, list) or G <= 0 or len(flat) % (2 * G):
        return None
    counts = np.asarray(flat, dtype=np.int64).reshape(G, 2, -1)
    grid = record.get("km_grid")
    grid = [float(x) for x in grid] if isinstance(grid, list) and len(grid) == counts.shape[2] else None
    return counts, grid
