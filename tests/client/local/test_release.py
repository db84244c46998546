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


def test_coarsened_score_histograms_give_no_auc_full_resolution_ones_do():
    """A class's positive/negative score histograms merged to cells of 0 or >= k are named
    ``<task>-hist-coarsened`` and the server reports no AUC from them; the same site with the
    policy off gives the AUC of its full histograms."""
    from smm_model.metrics.federated import auc_from_histograms, score_histograms

    rng = np.random.default_rng(0)
    y = np.array([0] * 9 + [1] * 8 + [2] * 8)
    probs = rng.dirichlet(np.ones(3), size=len(y)) * 0.5
    probs[np.arange(len(y)), y] += 0.5  # informative scores
    hist = score_histograms(y, probs, 3)
    exact = EvalStats(n=len(y), loss_sum=1.0, histograms={"diagnosis": hist.ravel().tolist()},
                      confusion={"diagnosis": confusion_counts(y, probs.argmax(1), 3).ravel().tolist()})
    sent = release_eval(exact, DisclosurePolicy(5), "test")
    assert "diagnosis-hist-coarsened" in sent.withheld
    rep = metrics_from_eval(EvalStats.merge([sent]), {"diagnosis": 3})
    assert math.isnan(rep.values["diagnosis.auc"]) and "coarsened" in rep.reasons["diagnosis.auc"]
    off = metrics_from_eval(EvalStats.merge([release_eval(exact, DisclosurePolicy(1), "test")]), {"diagnosis": 3})
    assert off.values["diagnosis.auc"] == auc_from_histograms(hist).values["auc"] > 0.8
