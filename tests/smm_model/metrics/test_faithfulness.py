"""Tests for smm_model.metrics.faithfulness: attention AUC against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smm_model.metrics.faithfulness import attention_auc, mean_attention_auc


def test_auc_counts_pairs_with_ties_as_half():
    # planted {0.9, 0.4}, unplanted {0.4, 0.1, 0.2}: pairs won 3 + (0.5 + 2) = 5.5 of 6
    w = [0.9, 0.4, 0.4, 0.1, 0.2]
    p = np.array([True, True, False, False, False])
    assert attention_auc(w, p) == pytest.approx(5.5 / 6)
    assert attention_auc(torch.tensor(w), torch.tensor(p)) == pytest.approx(5.5 / 6)  # tensors too


def test_perfect_inverted_and_constant_maps():
    p = np.array([False, True, True, False])
    assert attention_auc([0.1, 0.8, 0.7, 0.2], p) == 1.0
    assert attention_auc([0.9, 0.1, 0.2, 0.8], p) == 0.0
    assert attention_auc([0.25] * 4, p) == 0.5


def test_degenerate_masks_have_no_auc():
    assert math.isnan(attention_auc([0.1, 0.2], np.array([True, True])))
    assert math.isnan(attention_auc([0.1, 0.2], np.array([False, False])))


def test_mean_skips_and_counts_degenerate_slides():
    weights = [[0.9, 0.4, 0.4, 0.1, 0.2], [0.3, 0.7], [0.1, 0.2, 0.3], [0.5, 0.1, 0.2]]
    planted = [np.array([True, True, False, False, False]), np.array([True, True]),
               np.array([False, False, False]), np.array([False, True, False])]
    rep = mean_attention_auc(weights, planted)
    # slide 0: 5.5/6; slide 3: planted 0.1 beats nothing of {0.5, 0.2} -> 0
    assert rep.mean == pytest.approx((5.5 / 6 + 0.0) / 2)
    assert (rep.n_scored, rep.skipped) == (2, 2) and rep.reason is None
    assert [math.isnan(a) for a in rep.per_slide] == [False, True, True, False]


def test_mean_with_no_scorable_slide_is_nan_with_a_reason():
    rep = mean_attention_auc([[0.1, 0.2]], [np.array([True, True])])
    assert math.isnan(rep.mean) and rep.n_scored == 0 and rep.skipped == 1
    assert "no slide has both planted and unplanted patches" in rep.reason


@pytest.mark.parametrize("weights, planted, match", [
    ([0.1, 0.2], np.array([1, 0]), "boolean"),
    ([0.1, 0.2, 0.3], np.array([True, False]), "3 weights but 2 planted"),
    ([0.1, float("nan")], np.array([True, False]), "non-finite"),
    ([[0.1, 0.2]], np.array([[True, False]]), "1-D"),
])
def test_bad_input_is_refused(weights, planted, match):
    with pytest.raises(ValueError, match=match):
        attention_auc(weights, planted)


def test_mean_checks_every_slide_and_the_lengths():
    with pytest.raises(ValueError, match="slide 1 weights contains 1 non-finite"):
        mean_attention_auc([[0.1, 0.2], [float("inf"), 0.0]], [np.array([True, False]), np.array([True, True])])
    with pytest.raises(ValueError, match="2 weight vectors but 1 planted"):
        mean_attention_auc([[0.1], [0.2]], [np.array([True])])
