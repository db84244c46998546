"""Pooled metrics from per-site statistics equal the metrics of the pooled records."""

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from smm_model.metrics.federated import (auc_from_histograms, c_index_counts, c_index_from_counts, confusion_counts,
                                 km_counts, km_from_counts, logrank_from_counts, metrics_from_confusion,
                                 score_histograms)


def sites(seed, n_sites=3, n_classes=4):
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_sites):
        n = int(rng.integers(30, 80))
        y = rng.choice(n_classes, n, p=rng.dirichlet(np.ones(n_classes) * 2))
        logits = rng.normal(0, 1, (n, n_classes)) + 1.5 * np.eye(n_classes)[y]
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        t = np.round(rng.exponential(500, n))  # rounded: ties in time
        e = rng.random(n) < 0.6
        r = np.round(-np.log(t + 1) + rng.normal(0, 0.5, n), 1)  # rounded: ties in risk
        out.append((y, p, t, e, r))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_sums_give_pooled_classification_metrics(seed):
    data = sites(seed)
    cm = sum(confusion_counts(y, p.argmax(1), 4) for y, p, *_ in data)
    y = np.concatenate([d[0] for d in data])
    pred = np.concatenate([d[1].argmax(1) for d in data])
    m = metrics_from_confusion(cm).values
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=range(4), zero_division=0),
                                          abs=1e-12)


def test_confusion_handles_absent_class_and_empty():
    cm = confusion_counts([0, 0, 1], [0, 1, 1], 3)
    m = metrics_from_confusion(cm).values
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score([0, 0, 1], [0, 1, 1]))
    empty = metrics_from_confusion(np.zeros((3, 3)))
    assert np.isnan(empty.values["accuracy"]) and empty.reasons["accuracy"] == "no samples"
    with pytest.raises(ValueError, match="outside"):
        confusion_counts([0, 5], [0, 1], 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_from_summed_histograms_within_bin_resolution(seed):
    data = sites(seed)
    bins = 200
    h = sum(score_histograms(y, p, 4, bins) for y, p, *_ in data)
    y = np.concatenate([d[0] for d in data])
    p = np.concatenate([d[1] for d in data])
    rep = auc_from_histograms(h)
    for c in range(4):
        exact = roc_auc_score(y == c, p[:, c])
        assert abs(rep.values[f"auc_class_{c}"] - exact) < 2.0 / bins
    assert abs(rep.values["auc"] - roc_auc_score(y, p, multi_class="ovr", average="macro")) < 2.0 / bins


def test_auc_with_a_missing_class_is_noted():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1, 0], [0.6, 0.4, 0], [0.2, 0.8, 0], [0.3, 0.7, 0]])
    rep = auc_from_histograms(score_histograms(y, p, 3))
    assert rep.values["auc_class_0"] == 1.0 and np.isnan(rep.values["auc_class_2"])
    assert "classes [2]" in rep.reasons["auc"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_c_index_counts_match_lifelines_per_site_and_sum_within_sites(seed):
    data = sites(seed)
    total = np.zeros(4, dtype=np.int64)
    for *_, t, e, r in data:
        counts = c_index_counts(t, e, r)
        c, reason = c_index_from_counts(counts)
        assert reason is None
        assert c == pytest.approx(concordance_index(t, -r, e), abs=1e-12)
        total += counts
    # The summed counts give the C-index over the pooled records restricted to within-site pairs.
    t = np.concatenate([d[2] for d in data])
    e = np.concatenate([d[3] for d in data]).astype(bool)
    r = np.concatenate([d[4] for d in data])
    site = np.concatenate([np.full(len(d[2]), k) for k, d in enumerate(data)])
    same = site[:, None] == site[None, :]
    comp = same & e[:, None] & ((t[:, None] < t[None]) | ((t[:, None] == t[None]) & ~e[None]))
    brute = ((comp & (r[:, None] > r[None])).sum() + 0.5 * (comp & (r[:, None] == r[None])).sum()) / comp.sum()
    assert total[3] == comp.sum() and total[3] == total[0] + total[1] + total[2]
    assert c_index_from_counts(total)[0] == pytest.approx(brute, abs=1e-12)


def test_c_index_without_events_is_nan_with_reason():
    c, reason = c_index_from_counts(c_index_counts([1.0, 2.0], [0, 0], [0.1, 0.2]))
    assert np.isnan(c) and "no comparable pair" in reason


@pytest.mark.parametrize("seed", [0, 1])
def test_kaplan_meier_and_logrank_from_counts_equal_pooled_records(seed):
    data = sites(seed)
    rng = np.random.default_rng(seed + 10)
    grid = np.arange(0, 3000, 100.0)
    groups = [rng.integers(0, 3, len(d[2])) for d in data]
    counts = sum(km_counts(t, e, g, 3, grid) for (*_, t, e, r), g in zip(data, groups))
    t = np.concatenate([d[2] for d in data])
    e = np.concatenate([d[3] for d in data])
    g = np.concatenate(groups)
    t_grid = grid[np.searchsorted(grid, t, side="right") - 1]  # times rounded down to the grid
    surv = km_from_counts(counts)
    for k in range(3):
        km = KaplanMeierFitter().fit(t_grid[g == k], e[g == k])
        ref = km.survival_function_at_times(grid).to_numpy()
        np.testing.assert_allclose(surv[k], ref, atol=1e-12)
    chi2, p, df = logrank_from_counts(counts)
    ref = multivariate_logrank_test(t_grid, g, e)
    assert df == 2
    assert chi2 == pytest.approx(ref.test_statistic, rel=1e-9)
    assert p == pytest.approx(ref.p_value, rel=1e-9)


def test_km_counts_validate_input():
    with pytest.raises(ValueError, match="grid"):
        km_counts([5.0], [1], [0], 1, [10.0, 20.0])
    with pytest.raises(ValueError, match="group"):
        km_counts([5.0], [1], [3], 2, [0.0, 10.0])
