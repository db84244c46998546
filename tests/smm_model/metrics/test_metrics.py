"""Tests for smm_model.metrics.exact: agreement with lifelines/sklearn, sign conventions, edge cases."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index as lifelines_ci
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from smm_model.metrics.exact import (
    MetricReport,
    c_index,
    classification_report,
    risk_from_hazard_logits,
    survival_report,
)


def brute_force_harrell(time, event, risk) -> float:
    """Harrell's C for data without tied times: pairs (i, j) with t_i < t_j and event_i."""
    num = 0.0
    den = 0
    n = len(time)
    for i in range(n):
        if not event[i]:
            continue
        for j in range(n):
            if time[i] < time[j]:
                den += 1
                if risk[i] > risk[j]:
                    num += 1.0
                elif risk[i] == risk[j]:
                    num += 0.5
    return num / den


# --------------------------------------------------------------------------- c-index


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_c_index_matches_lifelines_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    time = rng.integers(1, 12, size=n).astype(float)  # many tied times
    event = rng.integers(0, 2, size=n)
    event[0] = 1
    risk = rng.integers(0, 6, size=n).astype(float)  # many tied risks
    value, reason = c_index(time, event, risk)
    assert reason is None
    assert value == pytest.approx(lifelines_ci(time, -risk, event), abs=1e-12)
    assert 0.0 <= value <= 1.0


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_c_index_matches_brute_force_without_tied_times(seed):
    rng = np.random.default_rng(seed)
    n = 40
    time = rng.permutation(n).astype(float) + rng.uniform(0, 0.5, size=n)  # distinct
    assert len(np.unique(time)) == n
    event = rng.integers(0, 2, size=n)
    event[0] = 1
    risk = rng.integers(0, 5, size=n).astype(float)  # tied risks -> 0.5 credit
    value, reason = c_index(time, event, risk)
    assert reason is None
    assert value == pytest.approx(brute_force_harrell(time, event, risk), abs=1e-12)


def test_c_index_sign_convention():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    event = np.array([1, 1, 0, 1, 1, 0])
    risk = -time * 2.0 + 7.0  # strictly decreasing in survival time
    assert c_index(time, event, risk) == (1.0, None)
    assert c_index(time, event, -risk) == (0.0, None)


def test_c_index_accepts_lists_and_tensors():
    time = [1.0, 2.0, 3.0, 4.0]
    event = [True, True, False, True]
    risk = [4.0, 3.0, 2.0, 1.0]
    v_list, _ = c_index(time, event, risk)
    v_torch, _ = c_index(torch.tensor(time), torch.tensor(event), torch.tensor(risk).unsqueeze(1))
    assert v_list == v_torch == 1.0


def test_c_index_no_events_is_nan_with_reason():
    value, reason = c_index([1.0, 2.0, 3.0], [0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(value)
    assert isinstance(reason, str) and reason


def test_c_index_single_sample_is_nan_with_reason():
    value, reason = c_index([1.0], [1], [0.5])
    assert math.isnan(value)
    assert isinstance(reason, str) and reason


def test_c_index_no_comparable_pair_is_nan_with_reason():
    # The only event is at the latest time and nobody outlives it.
    value, reason = c_index([1.0, 2.0, 3.0], [0, 0, 1], [0.1, 0.2, 0.3])
    assert math.isnan(value)
    assert reason
    # All events tied at one time: lifelines finds no admissible pair either.
    value, reason = c_index([2.0, 2.0], [1, 1], [0.1, 0.2])
    assert math.isnan(value)
    assert reason


def test_c_index_tied_event_and_censoring_is_comparable():
    # lifelines treats "censored at the same time as an event" as outliving it.
    time, event, risk = [2.0, 2.0], [1, 0], [0.9, 0.1]
    value, reason = c_index(time, event, risk)
    assert reason is None
    assert value == lifelines_ci(time, [-0.9, -0.1], event) == 1.0


@pytest.mark.parametrize("arg", ["time", "event", "risk"])
def test_c_index_nan_or_inf_raises(arg):
    kwargs = {"time": [1.0, 2.0, 3.0], "event": [1, 1, 0], "risk": [0.3, 0.2, 0.1]}
    for bad in (float("nan"), float("inf")):
        bad_kwargs = dict(kwargs)
        bad_kwargs[arg] = list(kwargs[arg])
        bad_kwargs[arg][1] = bad
        with pytest.raises(ValueError, match=arg):
            c_index(**bad_kwargs)


def test_c_index_empty_and_length_mismatch_raise_naming_argument():
    with pytest.raises(ValueError, match="time"):
        c_index([], [], [])
    with pytest.raises(ValueError, match="risk"):
        c_index([1.0, 2.0], [1, 0], [0.1])
    with pytest.raises(ValueError, match="event"):
        c_index([1.0, 2.0], [1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="event"):
        c_index([1.0, 2.0], [1, 2], [0.1, 0.2])


def test_survival_report():
    rep = survival_report([1.0, 2.0, 3.0], [1, 1, 0], [3.0, 2.0, 1.0])
    assert rep.values == {"c_index": 1.0}
    assert rep.reasons == {}
    rep = survival_report([1.0, 2.0], [0, 0], [1.0, 2.0])
    assert math.isnan(rep.values["c_index"])
    assert rep.reasons["c_index"]
    json.dumps(rep.to_dict())


# --------------------------------------------------------------------------- risk from hazards


def test_risk_from_hazard_logits_hand_computed():
    logits = np.array([[0.0, 0.0, 0.0], [np.log(3.0), -np.log(3.0), 0.0]])
    # row 0: h = 0.5 each, S = [0.5, 0.25, 0.125] -> risk = -0.875
    # row 1: h = [0.75, 0.25, 0.5], S = [0.25, 0.1875, 0.09375] -> risk = -0.53125
    expected = np.array([-0.875, -0.53125])
    np.testing.assert_allclose(risk_from_hazard_logits(logits), expected, rtol=1e-12)
    out_t = risk_from_hazard_logits(torch.tensor(logits, requires_grad=True))
    assert isinstance(out_t, np.ndarray) and out_t.shape == (2,)
    np.testing.assert_allclose(out_t, expected, rtol=1e-12)


def test_risk_from_hazard_logits_monotone_in_hazard():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 8))
    risk_lo = risk_from_hazard_logits(base)
    risk_hi = risk_from_hazard_logits(base + 1.0)
    assert np.all(risk_hi > risk_lo)
    # higher hazard -> shorter survival -> higher risk -> c-index 1 on matching times
    risks = risk_from_hazard_logits(np.stack([np.full(4, v) for v in (2.0, 1.0, 0.0, -1.0)]))
    assert np.all(np.diff(risks) < 0)
    assert c_index([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1], risks) == (1.0, None)


def test_risk_from_hazard_logits_rejects_bad_input():
    with pytest.raises(ValueError):
        risk_from_hazard_logits(np.zeros(3))
    with pytest.raises(ValueError):
        risk_from_hazard_logits(np.array([[0.0, np.nan]]))


# --------------------------------------------------------------------------- classification


def _random_probs(rng, n, k):
    logits = rng.normal(size=(n, k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_sklearn_all_classes_present(seed):
    rng = np.random.default_rng(seed)
    n, k = 80, 4
    y = np.concatenate([np.arange(k), rng.integers(0, k, size=n - k)])
    probs = _random_probs(rng, n, k)
    pred = probs.argmax(axis=1)
    rep = classification_report(y, probs, k)
    assert rep.reasons == {}
    assert rep.values["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert rep.values["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert rep.values["macro_f1"] == pytest.approx(
        f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0)
    )
    assert rep.values["auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12
    )
    # torch input gives the same result
    rep_t = classification_report(torch.tensor(y), torch.tensor(probs, dtype=torch.float64), k)
    assert rep_t.values == rep.values


def test_classification_absent_class_auc_finite_with_note():
    rng = np.random.default_rng(5)
    n, k = 50, 4
    y = rng.choice([0, 1, 3], size=n)
    y[:3] = [0, 1, 3]
    probs = _random_probs(rng, n, k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # balanced-accuracy warning must be silenced
        rep = classification_report(y, probs, k)
    assert math.isfinite(rep.values["auc"])
    expected = np.mean([roc_auc_score(y == c, probs[:, c]) for c in (0, 1, 3)])
    assert rep.values["auc"] == pytest.approx(expected)
    assert "[2]" in rep.reasons["auc"] and "3 of 4" in rep.reasons["auc"]
    assert all(math.isfinite(v) for v in rep.values.values())


def test_classification_single_class_auc_nan_accuracy_finite():
    rng = np.random.default_rng(6)
    y = np.full(10, 2)
    probs = _random_probs(rng, 10, 3)
    rep = classification_report(y, probs, 3)
    assert math.isnan(rep.values["auc"])
    assert rep.reasons["auc"]
    assert rep.values["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == 2)))
    assert math.isfinite(rep.values["balanced_accuracy"])
    assert math.isfinite(rep.values["macro_f1"])


def test_classification_empty_all_nan():
    rep = classification_report(np.array([], dtype=int), np.zeros((0, 3)), 3)
    assert set(rep.values) == {"accuracy", "balanced_accuracy", "macro_f1", "auc"}
    assert all(math.isnan(v) for v in rep.values.values())
    assert rep.reasons == {k: "no samples" for k in rep.values}


def test_classification_probs_not_summing_to_one_raises():
    probs = np.array([[0.5, 0.4], [0.5, 0.5]])
    with pytest.raises(ValueError, match="probs"):
        classification_report([0, 1], probs, 2)
    # within tolerance is fine
    classification_report([0, 1], np.array([[0.5, 0.50005], [0.3, 0.7]]), 2)


def test_classification_label_out_of_range_raises():
    probs = np.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"y_true.*\b3\b"):
        classification_report([0, 1, 3], probs, 3)
    with pytest.raises(ValueError, match=r"y_true.*-1"):
        classification_report([0, -1, 2], probs, 3)


def test_classification_shape_mismatch_raises():
    with pytest.raises(ValueError, match="probs"):
        classification_report([0, 1], np.full((2, 3), 1 / 3), 2)
    with pytest.raises(ValueError, match="probs"):
        classification_report([0, 1, 1], np.full((2, 2), 0.5), 2)


# --------------------------------------------------------------------------- serialisation


def test_to_dict_is_json_serialisable():
    rng = np.random.default_rng(7)
    rep = classification_report(np.full(6, 1), _random_probs(rng, 6, 3), 3)  # has a nan
    d = rep.to_dict()
    assert set(d) == {"values", "reasons"}
    assert all(type(v) is float for v in d["values"].values())
    back = json.loads(json.dumps(d))
    assert back["reasons"] == rep.reasons
    assert math.isnan(back["values"]["auc"])
    json.dumps(MetricReport(values={"x": np.float32(0.5)}).to_dict())
