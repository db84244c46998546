"""Evaluation metrics for diagnosis/grading (classification) and survival.

Everything here takes array-likes (lists, numpy arrays, torch tensors) and returns
plain Python floats, so results can go straight into federated metric dicts or JSON.
The actual statistics come from scikit-learn and lifelines; this module only adds the
conventions and the input checking around them.

Robustness policy (why metrics are sometimes ``nan`` rather than an error):
in federated evaluation a client's local split can be tiny or degenerate (one class,
no observed deaths).  Such *data-dependent* gaps give ``float('nan')`` plus a one-line
reason in :class:`MetricReport.reasons`, so a round never crashes on them.  *Caller bugs*
(shape/length mismatch, NaN/inf scores, labels out of range, probabilities that do not
sum to 1) raise :class:`ValueError` naming the offending argument, because silently
scoring garbage is worse than failing loudly.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit

# lifelines (1.7 s) and scikit-learn's metrics are imported where they are used: every message a
# site answers starts a new ClientApp process, and most never compute an exact metric.

__all__ = [
    "MetricReport",
    "risk_from_hazard_logits",
    "c_index",
    "classification_report",
    "survival_report",
]

_PROB_SUM_TOL = 1e-4
_CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


@dataclass
class MetricReport:
    """Named metric values plus the reason behind every undefined (``nan``) one.

    ``reasons`` has an entry for each ``nan`` value; it may additionally carry a note
    for a finite value that was computed on a reduced basis (e.g. AUC averaged over
    only the classes present), so consumers can tell "undefined" from "partial".
    """

    values: dict[str, float]
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{"values": {...}, "reasons": {...}}`` with plain ``float``/``str`` only.

        ``nan`` stays a float; ``json.dumps`` writes it as ``NaN`` (its default
        ``allow_nan=True``).
        """
        return {
            "values": {str(k): float(v) for k, v in self.values.items()},
            "reasons": {str(k): str(v) for k, v in self.reasons.items()},
        }


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a list / numpy array / torch tensor to a numpy array.

    torch is only consulted if it is already imported: a torch tensor cannot exist
    otherwise, and this keeps the module usable (and cheap to import) without torch.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _as_1d_float(x: Any, name: str) -> np.ndarray:
    """1-D float64 array; accepts (N, 1) column vectors (common model output)."""
    arr = _to_numpy(x)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    try:
        arr = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}") from exc
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")


# --------------------------------------------------------------------------- survival


def risk_from_hazard_logits(logits: Any) -> np.ndarray:
    """Scalar risk score per sample from discrete-time hazard logits.

    ``hazards = sigmoid(logits)``; ``S = cumprod(1 - hazards, axis=1)`` is the survival
    curve over the T time bins; ``risk = -S.sum(axis=1)``.  ``S.sum`` is (up to the bin
    width) the expected survival time, so its negation is a risk score.

    Sign convention: **higher risk = shorter expected survival**.  This is the convention
    :func:`c_index` expects.

    Args:
        logits: (N, T) hazard logits, numpy array or torch tensor (detached, moved to CPU).

    Returns:
        (N,) float64 risk scores, each in ``[-T, 0]``.

    Raises:
        ValueError: if ``logits`` is not 2-D or contains NaN (a NaN would silently
            propagate into every downstream ranking metric).
    """
    arr = _to_numpy(logits)
    if arr.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, T), got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError("logits contains NaN")
    hazards = expit(arr)  # numerically stable sigmoid; +/-inf map to 1/0
    survival = np.cumprod(1.0 - hazards, axis=1)
    return -survival.sum(axis=1)


def _validate_survival(time: Any, event: Any, risk: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = _as_1d_float(time, "time")
    e = _as_1d_float(event, "event")
    r = _as_1d_float(risk, "risk")
    for name, arr in (("time", t), ("event", e), ("risk", r)):
        if arr.size == 0:
            raise ValueError(f"{name} is empty")
    n = t.shape[0]
    for name, arr in (("event", e), ("risk", r)):
        if arr.shape[0] != n:
            raise ValueError(f"{name} has length {arr.shape[0]}, but time has length {n}")
    _check_finite(t, "time")
    _check_finite(e, "event")
    _check_finite(r, "risk")
    if not np.all((e == 0) | (e == 1)):
        bad = np.unique(e[(e != 0) & (e != 1)])[:5].tolist()
        raise ValueError(f"event must be 0/1 (1 = event observed), got values {bad}")
    return t, e.astype(bool), r


def _no_comparable_pair(t: np.ndarray, e: np.ndarray) -> bool:
    """True if lifelines would find no admissible pair.

    lifelines counts pair (i, j) when i had the event and j left later
    (``t_j > t_i``), or j was censored at the same time (``t_j == t_i``, not ``e_j``).
    The earliest event time gives the most chances, so checking it suffices.
    """
    t0 = t[e].min()
    return not (np.any(t > t0) or np.any((t == t0) & ~e))


def c_index(time: Any, event: Any, risk: Any) -> tuple[float, str | None]:
    """Harrell's concordance index of a risk score against right-censored times.

    Computed with ``lifelines.utils.concordance_index(time, -risk, event)``: lifelines
    wants scores where higher = *longer* survival, whereas ``risk`` follows this
    module's convention (higher = *shorter* survival, see
    :func:`risk_from_hazard_logits`), hence the negation.  Tied risks count 0.5.

    Args:
        time: (N,) observed times (event or censoring).
        event: (N,) 1 if the event was observed, 0 if censored (bools accepted).
        risk: (N,) risk scores, higher = shorter survival.

    Returns:
        ``(value, None)`` when defined, else ``(nan, reason)`` when the data admit no
        comparison: fewer than two samples, no observed event, or no comparable pair.
        Those are normal on small federated splits and must not crash evaluation.

    Raises:
        ValueError: empty input, length mismatch or bad shape (names the argument),
            NaN/inf in any input, event values other than 0/1.
    """
    t, e, r = _validate_survival(time, event, risk)
    if t.shape[0] < 2:
        return math.nan, f"only {t.shape[0]} sample; need at least 2 for a pairwise comparison"
    if not e.any():
        return math.nan, f"no observed events among {t.shape[0]} samples (all censored)"
    if _no_comparable_pair(t, e):
        return math.nan, "no comparable pair (no sample outlives an observed event)"
    try:
        from lifelines.utils import concordance_index

        value = concordance_index(t, -r, e)
    except ZeroDivisionError:  # lifelines: "No admissable pairs" (belt and braces)
        return math.nan, "no comparable pair (lifelines found no admissible pairs)"
    return float(value), None


def survival_report(time: Any, event: Any, risk: Any) -> MetricReport:
    """Survival metrics as a :class:`MetricReport`: ``{"c_index": ...}``.

    Same conventions and errors as :func:`c_index`.
    """
    value, reason = c_index(time, event, risk)
    reasons = {"c_index": reason} if reason is not None else {}
    return MetricReport(values={"c_index": value}, reasons=reasons)


# --------------------------------------------------------------------------- classification


def _validate_classification(y_true: Any, probs: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    n_classes = int(n_classes)

    y = _to_numpy(y_true)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (N,), got shape {y.shape}")
    p = _to_numpy(probs)
    if p.size == 0 and y.size == 0:
        return y.astype(np.int64), np.zeros((0, n_classes), dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"probs must have shape (N, {n_classes}), got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"probs has {p.shape[0]} rows, but y_true has length {y.shape[0]}")

    if y.dtype.kind not in "biuf":
        raise ValueError(f"y_true must hold integer class labels, got dtype {y.dtype}")
    y_float = y.astype(np.float64)
    _check_finite(y_float, "y_true")
    if not np.all(y_float == np.round(y_float)):
        bad = y_float[y_float != np.round(y_float)][0]
        raise ValueError(f"y_true must hold integer class labels, got {bad!r}")
    y_int = y_float.astype(np.int64)
    out_of_range = (y_int < 0) | (y_int >= n_classes)
    if out_of_range.any():
        bad = int(y_int[out_of_range][0])
        raise ValueError(f"y_true contains label {bad}, outside [0, {n_classes})")

    p = p.astype(np.float64)
    _check_finite(p, "probs")
    if (p < -_PROB_SUM_TOL).any() or (p > 1 + _PROB_SUM_TOL).any():
        raise ValueError("probs must lie in [0, 1] (pass softmax outputs, not logits)")
    row_err = np.abs(p.sum(axis=1) - 1.0)
    if (row_err > _PROB_SUM_TOL).any():
        i = int(np.argmax(row_err))
        raise ValueError(
            f"probs rows must sum to 1 within {_PROB_SUM_TOL:g}; row {i} sums to {p[i].sum():.6g}"
            " (pass softmax outputs, not logits)"
        )
    return y_int, p


def _ovr_macro_auc(y: np.ndarray, p: np.ndarray, n_classes: int) -> tuple[float, str | None]:
    """Macro one-vs-rest AUC over the classes where it is defined.

    A class's OvR AUC needs both positives and negatives in ``y``; classes absent from
    a client's split are skipped (and noted) rather than making the whole metric nan.
    With every class present this equals
    ``roc_auc_score(y, p, multi_class="ovr", average="macro")``.
    """
    aucs: list[float] = []
    skipped: list[int] = []
    for c in range(n_classes):
        pos = y == c
        if pos.all() or not pos.any():
            skipped.append(c)
            continue
        from sklearn.metrics import roc_auc_score

        aucs.append(float(roc_auc_score(pos, p[:, c])))
    if not aucs:
        present = np.unique(y).tolist()
        return math.nan, f"AUC undefined: only class(es) {present} present in y_true, no class has both positives and negatives"
    value = float(np.mean(aucs))
    if skipped:
        return value, (
            f"classes {skipped} absent from y_true; averaged over {len(aucs)} of {n_classes} classes"
        )
    return value, None


def classification_report(y_true: Any, probs: Any, n_classes: int) -> MetricReport:
    """Accuracy, balanced accuracy, macro-F1 and macro one-vs-rest AUC.

    Predictions are ``argmax(probs, axis=1)``.

    - ``accuracy``: ``sklearn.metrics.accuracy_score``.
    - ``balanced_accuracy``: ``sklearn.metrics.balanced_accuracy_score``, i.e. mean recall
      over the classes *present in* ``y_true`` (sklearn's warning about predicted classes
      absent from ``y_true`` is silenced: that is expected on small client splits).
    - ``macro_f1``: ``f1_score(average="macro", labels=range(n_classes), zero_division=0)``;
      all ``n_classes`` labels count, so a never-seen class contributes 0, keeping the
      value comparable across clients.
    - ``auc``: mean of per-class OvR ``roc_auc_score`` over classes that have both
      positives and negatives; ``nan`` if none has, with a note in ``reasons["auc"]``
      if some were skipped (the value is then still finite).

    Args:
        y_true: (N,) integer labels in ``[0, n_classes)``.
        probs: (N, n_classes) class probabilities; rows must sum to 1 within 1e-4.
        n_classes: number of classes of the task.

    Returns:
        :class:`MetricReport`; with N == 0 every value is ``nan`` with reason "no samples".

    Raises:
        ValueError: bad shapes/lengths, non-integer or out-of-range labels (names
            ``y_true`` and the bad value), non-finite probs, rows not summing to 1.
    """
    y, p = _validate_classification(y_true, probs, n_classes)
    n_classes = int(n_classes)
    if y.shape[0] == 0:
        return MetricReport(
            values={k: math.nan for k in _CLASSIFICATION_METRICS},
            reasons={k: "no samples" for k in _CLASSIFICATION_METRICS},
        )

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    pred = np.argmax(p, axis=1)
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    values["accuracy"] = float(accuracy_score(y, pred))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        values["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
    values["macro_f1"] = float(
        f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0)
    )
    auc, auc_reason = _ovr_macro_auc(y, p, n_classes)
    values["auc"] = auc
    if auc_reason is not None:
        reasons["auc"] = auc_reason
    return MetricReport(values=values, reasons=reasons)
