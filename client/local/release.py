"""What a site lets out: its preflight summary and evaluation statistics after disclosure control.

The rules are ``smm_model.contract.disclosure``'s; this applies them to the site's protocol
objects just before they leave (``client.local.round`` calls these last), and records in each
what was coarsened, so the server and the report can say it. Every count leaves as 0 or at least
k; sums (genomic, patch) only over at least k patients; the survival histogram at the resolution
that keeps each of its event and censored cells at 0 or at least k.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from smm_model.contract.disclosure import KM_SPLITS, DisclosurePolicy, release_km, release_ordered, suppress_unordered
from smm_model.contract.protocol import EvalStats, SiteSummary
from smm_model.metrics.federated import SCORE_BINS, auc_from_histograms

__all__ = ["release_summary", "release_eval", "check_training_size"]


class TooFewPatients(ValueError):
    """The site's split is below the minimum cell count: nothing about it may leave the site."""


def check_training_size(n_train: int, policy: DisclosurePolicy) -> None:
    """A model update and a mean loss over fewer than k patients describe those few patients: refuse."""
    if 0 < n_train < policy.k:
        raise TooFewPatients(f"{n_train} training patients, fewer than the minimum cell count {policy.k}")


def _release_split(counts: dict[str, Any], policy: DisclosurePolicy, notes: list[str], split: str) -> dict[str, Any]:
    out = dict(counts)
    n = int(counts["patients"])
    if not policy.ok(n):
        notes.append(f"{split}: patients")
        return {k: ([0] * len(v) if isinstance(v, list) else 0) for k, v in counts.items()}
    for task in ("diagnosis", "grade"):
        released, hidden = suppress_unordered([*counts[task], counts[f"{task}_unknown"]], policy)
        out[task], out[f"{task}_unknown"] = released[:-1], released[-1]
        if hidden:
            out[f"{task}_hidden"] = hidden  # indices into [*classes, unknown]: present, count not released
            notes.append(f"{split}: {task} counts")
    labelled, events = int(counts["survival_labelled"]), int(counts["events"])
    released, hidden = suppress_unordered([events, labelled - events, n - labelled], policy)
    if hidden:
        notes.append(f"{split}: survival counts")
    out["events"], out["survival_labelled"] = released[0], released[0] + released[1]
    return out


def release_summary(summary: SiteSummary, policy: DisclosurePolicy) -> SiteSummary:
    """The preflight summary as it may leave the site (a new object; ``summary`` is unchanged)."""
    if not policy.active:
        return dataclasses.replace(summary, disclosure={"min_cell": policy.k, "coarsened": []})
    notes: list[str] = []
    splits = {s: _release_split(c, policy, notes, s) for s, c in summary.splits.items()}
    events = np.asarray(summary.survival_hist_events, dtype=np.int64)
    censored = np.asarray(summary.survival_hist_all, dtype=np.int64) - events
    # Events and censored on one grouping; if no grouping keeps both at 0 or >= k (e.g. 3 censored
    # patients in all), the exits alone (events withheld: the server then finds the survival bin
    # edges from all times), else nothing.
    rows, groups = release_ordered(np.stack([events, censored]), policy, place="middle")
    hist_ev, hist_all = rows[0], rows[0] + rows[1]
    if groups is None:
        rows, groups = release_ordered((events + censored)[None, :], policy, place="middle")
        hist_ev, hist_all = np.zeros_like(events), rows[0]
        if groups is not None and events.any():
            notes.append("survival event histogram withheld")
    if groups is None and (events.any() or censored.any()):
        notes.append("survival histogram withheld")
    elif groups is not None and len(groups) < events.size:
        notes.append(f"survival histogram merged to {int(np.count_nonzero(hist_all))} cells")
    genomics = summary.genomics
    if genomics:
        count = np.asarray(genomics["count"], dtype=np.int64)
        n_train = int(summary.splits["train"]["patients"])
        # A feature's count, and the number of patients missing it, must both be 0 or >= k.
        def ok(a: np.ndarray) -> np.ndarray:
            return (a == 0) | (a >= policy.k)
        bad = ~(ok(count) & ok(n_train - count))
        if not policy.release_allowed(n_train):
            genomics = None
            notes.append("genomic sums withheld")
        elif np.any(bad):
            genomics = {**genomics, **{k: np.where(bad, 0, np.asarray(genomics[k])).tolist()
                                       for k in ("count", "sum", "sum_sq")}}
            notes.append(f"genomic sums withheld for {int(np.sum(bad))} features")
    patches = summary.patches
    if patches and not policy.release_allowed(int(summary.splits["train"]["patients"])):
        patches = None
        notes.append("patch sums withheld")
    excluded = dict(zip(summary.excluded, suppress_unordered(list(summary.excluded.values()), policy)[0]))
    if excluded != summary.excluded:
        notes.append("exclusion counts")
    return dataclasses.replace(summary, splits=splits, survival_hist_events=hist_ev.tolist(),
                               survival_hist_all=hist_all.tolist(), genomics=genomics, patches=patches,
                               excluded={k: v for k, v in excluded.items() if v},
                               disclosure={"min_cell": policy.k, "coarsened": notes})


def _site_aucs(stats: EvalStats, policy: DisclosurePolicy) -> dict[str, list[float]]:
    """Each task's AUC on this site's own full-resolution score histograms, for the server to use
    where the pooled histograms are coarsened: only when the task has at least k labelled patients
    here, macro over the classes with at least k positives and k negatives (the classes whose
    histograms may leave at all), as ``[n x auc, n, 1]`` (``EvalStats.site_values``). A rank
    statistic over at least k x k pairs, like the C-index pair counts; the confusion-matrix metrics
    (accuracy, F1) are not sent this way: with the released cells they would give back the
    suppressed ones (the diagonal sum less the released diagonal)."""
    out: dict[str, list[float]] = {}
    for task, flat in stats.histograms.items():
        if not policy.release_allowed(int(np.sum(stats.confusion.get(task, [0])))):
            continue
        hist = np.asarray(flat, dtype=np.int64).reshape(-1, 2, SCORE_BINS)
        kept = hist.sum(axis=2).min(axis=1) >= policy.k  # (C,): both positives and negatives >= k
        if not kept.any():
            continue
        auc = auc_from_histograms(np.where(kept[:, None, None], hist, 0)).values["auc"]
        if np.isfinite(auc):
            out[f"{task}.auc"] = [stats.n * float(auc), float(stats.n), 1.0]
    return out


def release_eval(stats: EvalStats, policy: DisclosurePolicy, split: str) -> EvalStats:
    """Evaluation statistics as they may leave the site: a split below k is suppressed whole;
    confusion rows by ``suppress_unordered`` (a row's total, the class count, is known), each
    class's positive and negative score histograms merged on one grouping (a class with fewer
    than k positives or negatives sends none: its one-vs-rest AUC is then left out of this
    site's and the pooled macro AUC, with the class named in ``withheld``; a merged one is named by
    ``<task>-hist-coarsened``), Kaplan-Meier counts only
    for ``KM_SPLITS`` and then by ``release_km``. C-index pair counts and the loss sum are sums
    over the split's (at least k) patients and leave as they are."""
    if stats.suppressed:
        return stats
    if not policy.release_allowed(stats.n):
        return EvalStats(n=0, suppressed=True)
    out = dataclasses.replace(stats, confusion=dict(stats.confusion), histograms=dict(stats.histograms),
                              hidden={}, withheld=[], min_cell=policy.k, site_values=_site_aucs(stats, policy))
    if not policy.active:
        return out
    for task, flat in stats.confusion.items():
        C = int(round(len(flat) ** 0.5))
        rows = np.asarray(flat, dtype=np.int64).reshape(C, C)
        released, hidden = [], []
        for i, row in enumerate(rows):
            r, h = suppress_unordered(row.tolist(), policy)
            released.append(r)
            hidden += [i * C + j for j in h]
        out.confusion[task] = [x for r in released for x in r]
        if hidden:
            out.hidden[task] = hidden
    for task, flat in stats.histograms.items():
        hist = np.asarray(flat, dtype=np.int64).reshape(-1, 2, SCORE_BINS)
        released = np.zeros_like(hist)
        coarsened = False
        for c, pair in enumerate(hist):  # (2, bins): class c's positives and negatives, one grouping
            rows, groups = release_ordered(pair, policy)
            if groups is None:  # fewer than k positives (or negatives): this class's curve stays home
                out.withheld.append(f"{task}-hist-class-{c}")
            else:
                released[c] = rows
                coarsened |= not np.array_equal(rows, pair)
        if coarsened:  # sent, but merged: the server must not read it as the full-resolution histogram
            out.withheld.append(f"{task}-hist-coarsened")
        if released.any():
            out.histograms[task] = released.ravel().tolist()
        else:
            del out.histograms[task]
            out.withheld.append(f"{task}-hist")
    if stats.km is not None:
        released_km, ok = (release_km(np.asarray(stats.km).reshape(stats.km_groups, 2, -1), policy)
                           if split in KM_SPLITS else (None, False))
        if ok:
            out.km = released_km.ravel().tolist()
        else:
            out.km, out.km_groups = None, 0
            out.withheld.append("survival-km")
    return out
