"""Global metrics from per-site aggregate statistics.

A site never sends patient records or per-patient predictions. It sends counts, computed here by
the ``*_counts`` / ``*_histograms`` functions on its own patients, and the server adds the counts of
all sites and turns the sums into metrics with the ``*_from_*`` functions. Every statistic is a sum
over patients, so adding sites' statistics gives exactly the statistic of the pooled patients:

* classification: the confusion matrix -> accuracy, balanced accuracy, macro F1 (exact);
* ROC AUC: histograms of each class's score for positives and negatives on fixed bins -> AUC
  within the bin resolution (scores in one bin count as ties);
* C-index: concordant / discordant / tied / comparable pair counts. Pairs are formed within a site
  only (a site cannot compare its patients with another site's), so the pooled value is the
  within-site C-index: say so wherever it is reported;
* Kaplan-Meier and log-rank: events and numbers at risk per predicted risk group on a shared time
  grid -> curves and test exactly as for the pooled records with times rounded down to the grid.
"""

from __future__ import annotations

import numpy as np

from smm_model.metrics.exact import MetricReport

__all__ = ["confusion_counts", "metrics_from_confusion", "score_histograms", "auc_from_histograms",
           "c_index_counts", "c_index_from_counts", "km_counts", "km_from_counts", "logrank_from_counts"]

#: Default number of score bins for the ROC histograms (AUC error <= about 1/bins).
SCORE_BINS = 200


def confusion_counts(y_true, y_pred, n_classes: int) -> np.ndarray:
    """(C, C) int64, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} holds labels outside [0, {n_classes})")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray) -> MetricReport:
    """Accuracy, balanced accuracy (mean recall over classes present) and macro F1 (all classes,
    0 where undefined), with scikit-learn's definitions."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    if n == 0:
        nan = float("nan")
        return MetricReport({"accuracy": nan, "balanced_accuracy": nan, "macro_f1": nan},
                            {k: "no samples" for k in ("accuracy", "balanced_accuracy", "macro_f1")})
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return MetricReport({"accuracy": float(tp.sum() / n), "balanced_accuracy": float(recall[present].mean()),
                         "macro_f1": float(f1.mean())}, {})


def score_histograms(y_true, probs, n_classes: int, bins: int = SCORE_BINS) -> np.ndarray:
    """(C, 2, bins) int64: for each class c, the histogram of probs[:, c] over [0, 1] for the
    patients of class c ([c, 0]) and for the others ([c, 1])."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (y.shape[0], n_classes):
        raise ValueError(f"probs must be ({y.shape[0]}, {n_classes}), got {p.shape}")
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)  # (N, C) bin of each score
    out = np.zeros((n_classes, 2, bins), dtype=np.int64)
    for c in range(n_classes):  # C is 3 or 4: a loop over classes, not patients
        pos = y == c
        out[c, 0] = np.bincount(idx[pos, c], minlength=bins)
        out[c, 1] = np.bincount(idx[~pos, c], minlength=bins)
    return out


def auc_from_histograms(hist: np.ndarray) -> MetricReport:
    """Macro one-vs-rest AUC from (C, 2, bins) histograms; scores sharing a bin count as ties.

    Values: ``auc`` and ``auc_class_<c>``; a class without positives or negatives is left out of the
    mean, with a note.
    """
    hist = np.asarray(hist, dtype=np.float64)
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    aucs, skipped = [], []
    for c in range(hist.shape[0]):
        pos, neg = hist[c, 0], hist[c, 1]
        P, N = pos.sum(), neg.sum()
        if P == 0 or N == 0:
            values[f"auc_class_{c}"] = float("nan")
            reasons[f"auc_class_{c}"] = "no positives" if P == 0 else "no negatives"
            skipped.append(c)
            continue
        neg_below = np.concatenate(([0.0], np.cumsum(neg)[:-1]))  # negatives in lower bins
        auc = float((pos * (neg_below + 0.5 * neg)).sum() / (P * N))
        values[f"auc_class_{c}"] = auc
        aucs.append(auc)
    values["auc"] = float(np.mean(aucs)) if aucs else float("nan")
    if not aucs:
        reasons["auc"] = "no class has both positives and negatives"
    elif skipped:
        reasons["auc"] = f"classes {skipped} lack positives or negatives; averaged over {len(aucs)} classes"
    return MetricReport(values, reasons)


def c_index_counts(time, event, risk) -> np.ndarray:
    """[concordant, discordant, tied_risk, comparable] pair counts, Harrell's C as lifelines.

    A pair is comparable when the one with the shorter time had the event, or when both times are
    equal and only one had the event (the censored one outlived it). Concordant: the earlier
    failure has the higher risk. O(N^2) memory in blocks, fine for a site's validation split.
    """
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    r = np.asarray(risk, dtype=np.float64)
    if not (t.shape == e.shape == r.shape) or t.ndim != 1:
        raise ValueError(f"time {t.shape}, event {e.shape} and risk {r.shape} must be equal 1-D shapes")
    if not (np.isfinite(t).all() and np.isfinite(r).all()):
        raise ValueError("time and risk must be finite")
    counts = np.zeros(4, dtype=np.int64)
    block = 2048
    for s in range(0, len(t), block):  # rows i = the earlier failure
        ti, ei, ri = t[s:s + block, None], e[s:s + block, None], r[s:s + block, None]
        comparable = ei & ((ti < t[None]) | ((ti == t[None]) & ~e[None]))  # (b, N)
        counts[0] += int((comparable & (ri > r[None])).sum())
        counts[1] += int((comparable & (ri < r[None])).sum())
        counts[2] += int((comparable & (ri == r[None])).sum())
        counts[3] += int(comparable.sum())
    return counts


def c_index_from_counts(counts) -> tuple[float, str | None]:
    """(concordant + tied / 2) / comparable, or nan with a reason when nothing is comparable."""
    conc, _disc, tied, comp = (int(x) for x in counts)
    if comp == 0:
        return float("nan"), "no comparable pair (no event, or all events at the last time)"
    return (conc + 0.5 * tied) / comp, None


def km_counts(time, event, group, n_groups: int, grid) -> np.ndarray:
    """(n_groups, 2, K) int64: events and numbers at risk at each grid time.

    ``grid`` (K,) increasing times starting at 0; a patient's time is rounded down to the grid.
    [g, 0, k] = events of group g in [grid[k], grid[k+1]); [g, 1, k] = patients of group g with
    time >= grid[k].
    """
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    g = np.asarray(group, dtype=np.int64)
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or np.any(np.diff(grid) <= 0) or grid[0] > t.min(initial=np.inf):
        raise ValueError("grid must be increasing and start at or below the smallest time")
    if g.size and (g.min() < 0 or g.max() >= n_groups):
        raise ValueError(f"group labels outside [0, {n_groups})")
    k = np.searchsorted(grid, t, side="right") - 1  # (N,) grid interval of each time
    K = grid.size
    out = np.zeros((n_groups, 2, K), dtype=np.int64)
    np.add.at(out[:, 0], (g[e], k[e]), 1)
    leaving = np.zeros((n_groups, K), dtype=np.int64)  # patients whose last interval is k
    np.add.at(leaving, (g, k), 1)
    out[:, 1] = np.cumsum(leaving[:, ::-1], axis=1)[:, ::-1]  # at risk at grid[k] = leaving at >= k
    return out


def km_from_counts(counts: np.ndarray) -> np.ndarray:
    """(G, K) Kaplan-Meier survival just after each grid time, from (G, 2, K) counts."""
    d, n = counts[:, 0].astype(np.float64), counts[:, 1].astype(np.float64)
    frac = np.divide(d, n, out=np.zeros_like(d), where=n > 0)
    return np.cumprod(1.0 - frac, axis=1)


def logrank_from_counts(counts: np.ndarray) -> tuple[float, float, int]:
    """Multi-group log-rank test from (G, 2, K) counts: (chi-square, p-value, degrees of freedom)."""
    d, n = counts[:, 0].astype(np.float64), counts[:, 1].astype(np.float64)  # (G, K)
    D, N = d.sum(axis=0), n.sum(axis=0)  # (K,)
    used = n.sum(axis=1) > 0
    d, n = d[used], n[used]
    G = d.shape[0]
    if G < 2:
        return float("nan"), float("nan"), 0
    ok = N > 0
    share = np.divide(n, N, out=np.zeros_like(n), where=ok)  # (G, K)
    observed_minus_expected = (d - share * D).sum(axis=1)  # (G,)
    w = np.divide(D * (N - D), N - 1, out=np.zeros_like(D), where=N > 1)  # (K,)
    V = np.einsum("k,gk,gh->gh", w, share, np.eye(G)) - np.einsum("k,gk,hk->gh", w, share, share)
    z = observed_minus_expected[:-1]
    chi2 = float(z @ np.linalg.pinv(V[:-1, :-1]) @ z)
    df = G - 1
    from scipy import stats  # 1 s to import; most ClientApp processes never need it

    return chi2, float(stats.chi2.sf(chi2, df)), df
