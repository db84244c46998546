"""Attention faithfulness: how well a slide's patch attention finds the patches that carry the signal.

On a synthetic cohort the patches that carry the class signal are known (planted); a model's patch
weights (``smm_model.nn.attention_maps``) are scored against that boolean mask by ROC AUC: the
probability that a random planted patch gets more weight than a random unplanted one (ties count
half). It depends only on the ranking, so maps of different models (ABMIL's softmax, SMM's
attention mass) compare on one scale; 0.5 is chance.

A slide whose mask is all planted or all unplanted has no AUC. The mean over slides skips such
slides and counts them, rather than returning nan for the cohort; only when no slide is scorable
is the mean nan (with the reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from smm_model.metrics.exact import _as_1d_float, _check_finite, _to_numpy

__all__ = ["FaithfulnessReport", "attention_auc", "mean_attention_auc"]


def _slide_inputs(weights: Any, planted: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    w = _as_1d_float(weights, f"{name} weights")
    p = _to_numpy(planted)
    if p.ndim != 1 or p.dtype != np.bool_:
        raise ValueError(f"{name} planted mask must be a 1-D boolean array (N,), got {p.dtype} of shape {p.shape}")
    if p.shape != w.shape:
        raise ValueError(f"{name}: {w.shape[0]} weights but {p.shape[0]} planted flags; expected one per patch")
    _check_finite(w, f"{name} weights")
    return w, p


def attention_auc(weights: Any, planted: Any) -> float:
    """ROC AUC of one slide's patch ``weights`` (N,) against its boolean ``planted`` mask (N,);
    nan when the mask is all True or all False (no AUC exists)."""
    w, p = _slide_inputs(weights, planted, "slide")
    if p.all() or not p.any():
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(p, w))


@dataclass
class FaithfulnessReport:
    """Mean attention AUC over the scorable slides.

    ``per_slide`` has one AUC per input slide (nan for a skipped one), ``n_scored`` and ``skipped``
    count the slides that had both kinds of patch and those that did not; ``reason`` says why
    ``mean`` is nan when no slide was scorable.
    """

    mean: float
    n_scored: int
    skipped: int
    per_slide: list[float] = field(default_factory=list)
    reason: str | None = None


def mean_attention_auc(weights: Sequence[Any], planted: Sequence[Any]) -> FaithfulnessReport:
    """Attention AUC per slide (``weights[i]`` (N_i,) against ``planted[i]`` (N_i,) bool) and its mean."""
    if len(weights) != len(planted):
        raise ValueError(f"{len(weights)} weight vectors but {len(planted)} planted masks; expected one per slide")
    aucs = []
    for i, (w, p) in enumerate(zip(weights, planted)):
        _slide_inputs(w, p, f"slide {i}")  # every slide is checked, scorable or not
        aucs.append(attention_auc(w, p))
    scored = [a for a in aucs if not math.isnan(a)]
    skipped = len(aucs) - len(scored)
    if not scored:
        return FaithfulnessReport(math.nan, 0, skipped, aucs,
                                  reason=f"no slide has both planted and unplanted patches ({skipped} skipped)")
    return FaithfulnessReport(float(np.mean(scored)), len(scored), skipped, aucs)
