"""What a site's evaluation statistics become at the boundary (client/local/release.py), and what the
server can honestly compute from them (smm_model.contract.protocol.metrics_from_eval)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from client.local.release import release_eval
from smm_model.contract.disclosure import DisclosurePolicy
from smm_model.contract.protocol import EvalStats, metrics_from_eval
from smm_model.metrics.federated import confusion_counts


def stats_of(y_true, y_pred) -> EvalStats:
    return EvalStats(n=len(y_true), loss_sum=float(len(y_true)),
                     confusion={"diagnosis": confusion_counts(y_true, y_pred, 3).ravel().tolist()})


def test_a_suppressed_confusion_cell_makes_accuracy_and_f1_not_computable():
    """25 patients, 3 misclassified in small cells: with k = 5 those cells leave as 0 (and the
    diagonal cells that would give them away), so the server must not report accuracy from what is
    left (it would read 100 %); with the policy off the pooled sum gives scikit-learn's values."""
    y_true = np.array([0] * 10 + [1] * 8 + [2] * 7)
    y_pred = y_true.copy()
    y_pred[[0, 10, 18]] = [1, 2, 0]
    exact = stats_of(y_true, y_pred)
    sent = release_eval(exact, DisclosurePolicy(5), "test")
    assert sent.hidden.get("diagnosis")
    rep = metrics_from_eval(EvalStats.merge([sent, release_eval(exact, DisclosurePolicy(5), "test")]), {"diagnosis": 3})
    for m in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert math.isnan(rep.values[f"diagnosis.{m}"]) and "suppressed" in rep.reasons[f"diagnosis.{m}"]
    off = metrics_from_eval(EvalStats.merge([release_eval(exact, DisclosurePolicy(1), "test")]), {"diagnosis": 3})
    assert off.values["diagnosis.accuracy"] == accuracy_score(y_true, y_pred)
    assert np.isclose(off.values["diagnosis.macro_f1"], f1_score(y_true, y_pred, average="macro"))


def test_a_complete_matrix_is_used_as_it_is():
    """Every cell 0 or at least k: nothing is hidden and the metrics are the exact ones."""
    y_true = np.array([0] * 10 + [1] * 10 + [2] * 5)
    y_pred = np.array([0] * 5 + [1] * 5 + [1] * 10 + [2] * 5)
    sent = release_eval(stats_of(y_true, y_pred), DisclosurePolicy(5), "test")
    assert not sent.hidden.get("diagnosis")
    rep = metrics_from_eval(EvalStats.merge([sent]), {"diagnosis": 3})
    assert rep.values["diagnosis.accuracy"] == accuracy_score(y_true, y_pred)


def _scored_site(seed: int, y: np.ndarray, signal: float) -> tuple[EvalStats, np.ndarray]:
    from smm_model.metrics.federated import score_histograms

    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(3), size=len(y)) * (1 - signal)
    probs[np.arange(len(y)), y] += signal  # informative scores
    hist = score_histograms(y, probs, 3)
    return EvalStats(n=len(y), loss_sum=1.0, histograms={"diagnosis": hist.ravel().tolist()},
                     confusion={"diagnosis": confusion_counts(y, probs.argmax(1), 3).ravel().tolist()}), hist


def _wire(stats: EvalStats) -> EvalStats:
    """What the server parses from the MetricRecord the site sends."""
    return EvalStats.from_record(stats.to_record())


def test_coarsened_score_histograms_give_no_pooled_auc_the_sites_own_aucs_instead():
    """A class's positive/negative score histograms merged to cells of 0 or >= k are named
    ``<task>-hist-coarsened`` and the server computes no pooled AUC from them (ties deflate it);
    it reports the site's own AUC on its full histograms instead, labelled as such; with the
    policy off the pooled AUC is the full histograms' one."""
    from smm_model.metrics.federated import auc_from_histograms

    y = np.array([0] * 9 + [1] * 8 + [2] * 8)
    exact, hist = _scored_site(0, y, 0.5)
    sent = _wire(release_eval(exact, DisclosurePolicy(5), "test"))
    assert "diagnosis-hist-coarsened" in sent.withheld
    rep = metrics_from_eval(EvalStats.merge([sent]), {"diagnosis": 3})
    assert rep.values["diagnosis.auc"] == auc_from_histograms(hist).values["auc"] > 0.8
    why = rep.reasons["diagnosis.auc"]
    assert "own AUCs" in why and "not the pooled AUC" in why and "coarsened" in why
    off = metrics_from_eval(EvalStats.merge([_wire(release_eval(exact, DisclosurePolicy(1), "test"))]), {"diagnosis": 3})
    assert off.values["diagnosis.auc"] == auc_from_histograms(hist).values["auc"]
    assert "diagnosis.auc" not in off.reasons  # the pooled one, nothing to qualify


def test_site_aucs_pool_as_a_patient_weighted_mean_over_their_well_populated_classes():
    """Two sites at k = 5: the server's AUC is the patient-weighted mean of each site's own macro
    AUC, where a site's macro AUC leaves out a class with fewer than k positives (its histograms
    never leave); a site with fewer than k labelled patients for the task sends no AUC at all."""
    from smm_model.metrics.federated import auc_from_histograms

    k = 5
    y_a = np.array([0] * 12 + [1] * 10 + [2] * 3)      # class 2: 3 positives, below k
    y_b = np.array([0] * 10 + [1] * 10 + [2] * 10 + [0] * 10)
    a, hist_a = _scored_site(1, y_a, 0.3)
    b, hist_b = _scored_site(2, y_b, 0.6)
    hist_a[2] = 0  # what site a's own macro AUC covers: classes 0 and 1
    auc_a, auc_b = auc_from_histograms(hist_a).values["auc"], auc_from_histograms(hist_b).values["auc"]
    sent = [_wire(release_eval(s, DisclosurePolicy(k), "val")) for s in (a, b)]
    rep = metrics_from_eval(EvalStats.merge(sent), {"diagnosis": 3})
    assert np.isclose(rep.values["diagnosis.auc"], (25 * auc_a + 40 * auc_b) / 65)
    assert "2 site(s)" in rep.reasons["diagnosis.auc"] and "65 of 65 patients" in rep.reasons["diagnosis.auc"]
    # Per site (the report's per-site table): each its own value.
    assert np.isclose(metrics_from_eval(sent[0], {"diagnosis": 3}).values["diagnosis.auc"], auc_a)
    # A site whose 6 patients hold only 4 with a diagnosis: no site AUC leaves it.
    small = EvalStats(n=6, loss_sum=1.0, histograms=dict(b.histograms),
                      confusion={"diagnosis": [2, 0, 0, 0, 2, 0, 0, 0, 0]})
    assert "diagnosis-site-auc" not in release_eval(small, DisclosurePolicy(k), "val").to_record()
