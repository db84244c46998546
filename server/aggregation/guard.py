"""Guards between the sites' replies and the aggregation.

Flower's strategies trust their input: a NaN in one reply makes a NaN model, a wrong shape or a
missing metric key raises ``InconsistentMessageReplies`` and ends the whole run, and a site that
claims 1e9 examples owns the weighted average. Everything here runs *before* the Flower strategy
sees a reply, on neutral ``Reply`` objects, and never lets one site end the run: a bad reply is
dropped with a short reason code, logged by node id, and the round goes on with the others.

Nothing a site sent is logged except node ids, reason codes and aggregate numbers; metric names are
whitelisted, so even a metric *key* cannot smuggle text into the logs.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from smm_model.config import FederationConfig
from smm_model.metrics.federated import SCORE_BINS
from smm_model.contract.protocol import EvalStats

from server.federation.messages import Reply
from smm_model.contract.wire import NUM_EXAMPLES, TRAINED, TRAINED_TENSORS

__all__ = ["TRAIN_METRIC_KEY", "guard_replies", "trained_names", "clean_train_metrics", "update_norms", "control_norms", "flag_outliers",
           "guard_eval_replies"]

log = logging.getLogger("fedsmm.server.guard")

#: Train-reply metric names the server accepts (and logs); anything else is ignored.
TRAIN_METRIC_KEY = re.compile(r"^(num-examples|train-loss|steps|seconds|coord-[a-z]+-(?:tumour|micro|conflicts)"
                              r"|dp-(?:epsilon|delta|sigma|clip|sample-rate))$")


def _scalar(v: Any) -> float | None:
    """A finite real scalar (not bool, not a list), else None."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def clean_train_metrics(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    """Whitelisted, finite, scalar train metrics (ints stay ints)."""
    out: dict[str, int | float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or not TRAIN_METRIC_KEY.match(k):
            continue
        f = _scalar(v)
        if f is None:
            continue
        out[k] = int(v) if isinstance(v, (int, np.integer)) else f
    return out


def _check_arrays(arrays: Mapping[str, Any], reference: Mapping[str, np.ndarray]) -> str | None:
    """Reason code when ``arrays`` cannot be averaged with the global model, else None."""
    if set(arrays) != set(reference):
        return "E_ARRAY_KEYS"
    for k, ref in reference.items():
        a = arrays[k]
        if not isinstance(a, np.ndarray):
            return "E_ARRAY_TYPE"
        if a.shape != ref.shape:
            return "E_ARRAY_SHAPE"
        if a.dtype != ref.dtype:
            return "E_ARRAY_DTYPE"
    for a in arrays.values():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return "E_NONFINITE"
    return None


def trained_names(reply: Reply) -> set[str] | None:
    """The weight names a reply says its site trained (``wire.TRAINED``), or None: all of them."""
    rec = reply.records.get(TRAINED)
    return None if rec is None else set(rec.get(TRAINED_TENSORS) or ())


def _check_trained(reply: Reply, reference: Mapping[str, np.ndarray]) -> str | None:
    """``E_TRAINED_KEYS`` when a reply's list of trained weights is not a non-empty list of distinct
    names of the global model, else None (no list: the site trained everything)."""
    rec = reply.records.get(TRAINED)
    if rec is None:
        return None
    names = rec.get(TRAINED_TENSORS)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names) or not set(names) <= set(reference):
        return "E_TRAINED_KEYS"
    return None


def guard_replies(replies: Sequence[Reply], reference_arrays: Mapping[str, np.ndarray], cfg: FederationConfig,
                  control_reference: Mapping[str, np.ndarray] | None = None
                  ) -> tuple[list[Reply], list[tuple[int, str]]]:
    """Split train replies into those safe to aggregate and those dropped, with reason codes.

    Dropped: error replies (their sanitized code, e.g. ``E_CLIENT_ERROR``), a second reply from
    the same node (``E_DUPLICATE``), no arrays (``E_MISSING_ARRAYS``) or metrics
    (``E_MISSING_METRICS``), no usable ``num-examples`` (``E_MISSING_NUM_EXAMPLES``,
    ``E_BAD_NUM_EXAMPLES``), arrays whose keys, types, shapes or dtypes differ from the current
    global arrays (``E_ARRAY_KEYS``, ``E_ARRAY_TYPE``, ``E_ARRAY_SHAPE``, ``E_ARRAY_DTYPE``), or
    non-finite values (``E_NONFINITE``). With ``control_reference`` (SCAFFOLD) a reply must also
    carry a control variate of the same keys, shapes and dtypes, finite (``E_MISSING_CONTROL``,
    ``E_CONTROL_`` + the array code). A site lacking a modality lists the weights it trained
    (``wire.TRAINED``); a list that is empty or names a weight the model does not have is
    ``E_TRAINED_KEYS``.

    Kept replies are copies whose metrics are whitelisted (``TRAIN_METRIC_KEY``) and whose
    ``num-examples`` is clamped to ``[1, cfg.max_examples_per_site]``, so no site can claim zero
    weight (an all-zero round would divide by zero, flower#7645) or an outsized one; a clamp is
    logged and recorded in ``Reply.clamped_from``.
    """
    kept: list[Reply] = []
    dropped: list[tuple[int, str]] = []
    seen: set[int] = set()
    for r in replies:
        nid = int(r.node_id)
        if nid in seen:
            code = "E_DUPLICATE"
        elif r.error is not None:
            code = r.error
        elif r.arrays is None:
            code = "E_MISSING_ARRAYS"
        elif r.metrics is None:
            code = "E_MISSING_METRICS"
        elif NUM_EXAMPLES not in r.metrics:
            code = "E_MISSING_NUM_EXAMPLES"
        elif _scalar(r.metrics[NUM_EXAMPLES]) is None:
            code = "E_BAD_NUM_EXAMPLES"
        else:
            code = _check_arrays(r.arrays, reference_arrays)
        if code is None:
            code = _check_trained(r, reference_arrays)
        if code is None and control_reference is not None:
            if r.control is None:
                code = "E_MISSING_CONTROL"
            else:
                bad = _check_arrays(r.control, control_reference)
                code = None if bad is None else "E_CONTROL_" + bad[len("E_"):]
        seen.add(nid)
        if code is not None:
            dropped.append((nid, code))
            log.warning("dropped the reply of node %d: %s", nid, code)
            continue
        metrics = clean_train_metrics(r.metrics)
        claimed = float(r.metrics[NUM_EXAMPLES])
        used = int(min(max(math.floor(claimed), 1), cfg.max_examples_per_site))
        metrics[NUM_EXAMPLES] = used
        clamped = None
        if used != claimed:
            clamped = claimed
            log.warning("node %d claimed %s examples; clamped to %d (allowed range [1, %d])", nid,
                        f"{claimed:.6g}", used, cfg.max_examples_per_site)
        kept.append(replace(r, metrics=metrics, clamped_from=clamped))
    return kept, dropped


def update_norms(replies: Sequence[Reply], reference_arrays: Mapping[str, np.ndarray]) -> dict[int, float]:
    """``||w_site - w_global||_2`` over all floating-point arrays, per node (float64 arithmetic)."""
    out: dict[int, float] = {}
    for r in replies:
        assert r.arrays is not None
        out[int(r.node_id)] = _l2(r.arrays[k].astype(np.float64) - ref.astype(np.float64)
                                  for k, ref in reference_arrays.items() if ref.dtype.kind in "fc")
    return out


def _l2(arrays: Iterable[np.ndarray]) -> float:
    """The L2 norm over several arrays together, in float64."""
    return math.sqrt(sum(float(np.vdot(a, a).real) for a in (np.asarray(x, dtype=np.float64) for x in arrays)))


def control_norms(replies: Sequence[Reply]) -> dict[int, float]:
    """``||c_i||_2`` of each reply's SCAFFOLD control variate (float64 arithmetic): a site that sends
    a huge c_i moves every other site's correction, so it is flagged like an outlying update."""
    return {int(r.node_id): _l2(r.control.values()) for r in replies if r.control is not None}


def flag_outliers(norms: Mapping[int, float], k: float = 3.0) -> list[int]:
    """Nodes whose update norm exceeds ``median + k * MAD`` (alert only).

    Honest sites with unusual data (scanner, stain, case mix) look like outliers too, so this
    never drops a site; it names it in the round log for review. With fewer than three sites there
    is no majority to compare against and nothing is flagged.
    """
    if len(norms) < 3:
        return []
    values = np.array(list(norms.values()), dtype=np.float64)
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med)))
    threshold = med + k * mad
    # With MAD == 0 (most sites identical), anything measurably above the median stands out.
    eps = 1e-9 * max(abs(med), 1e-12)
    return sorted(n for n, v in norms.items() if v > threshold + eps)


def _eval_problem(stats: EvalStats, n_classes: Mapping[str, int], km_len: int | None) -> str | None:
    if stats.n < 0 or not math.isfinite(stats.loss_sum):
        return "E_BAD_METRICS"
    if stats.suppressed:
        return None  # a suppressed site sends no numbers; nothing else to check
    for t, flat in stats.confusion.items():
        if t not in n_classes or t == "survival" or len(flat) != n_classes[t] ** 2:
            return "E_BAD_METRICS"
    for t, flat in stats.histograms.items():
        if t not in n_classes or t == "survival" or len(flat) != n_classes[t] * 2 * SCORE_BINS:
            return "E_BAD_METRICS"
    if stats.cindex is not None and len(stats.cindex) != 4:
        return "E_BAD_METRICS"
    if stats.km is not None:
        if stats.km_groups <= 0 or km_len is None or len(stats.km) != stats.km_groups * 2 * km_len:
            return "E_BAD_METRICS"
    for seq in (*stats.confusion.values(), *stats.histograms.values(), stats.cindex or [], stats.km or []):
        if any((not math.isfinite(float(x))) or x < 0 for x in seq):
            return "E_BAD_METRICS"
    return None


def guard_eval_replies(replies: Sequence[Reply], n_classes: Mapping[str, int], km_len: int | None
                       ) -> tuple[dict[int, EvalStats], list[tuple[int, str]]]:
    """Parse evaluate replies into ``EvalStats`` per node, dropping those that cannot be summed.

    ``km_len`` is the length of the shared Kaplan-Meier grid. Sites must agree on the number of
    risk groups to be summed; a minority that disagrees is dropped (``E_BAD_METRICS``).
    """
    parsed: dict[int, EvalStats] = {}
    dropped: list[tuple[int, str]] = []
    for r in replies:
        nid = int(r.node_id)
        code: str | None
        stats = None
        if nid in parsed or any(n == nid for n, _ in dropped):
            code = "E_DUPLICATE"
        elif r.error is not None:
            code = r.error
        elif r.metrics is None:
            code = "E_MISSING_METRICS"
        elif NUM_EXAMPLES not in r.metrics:
            code = "E_MISSING_NUM_EXAMPLES"
        else:
            try:
                stats = EvalStats.from_record(r.metrics)
                code = _eval_problem(stats, n_classes, km_len)
            except (KeyError, TypeError, ValueError):
                code = "E_BAD_METRICS"
        if code is not None or stats is None:
            dropped.append((nid, code or "E_BAD_METRICS"))
            log.warning("dropped the evaluation reply of node %d: %s", nid, code)
            continue
        parsed[nid] = stats
    groups = Counter(s.km_groups for s in parsed.values() if s.km is not None and not s.suppressed)
    if len(groups) > 1:
        want = max(sorted(groups), key=lambda g: groups[g])
        for nid in sorted(parsed):
            s = parsed[nid]
            if s.km is not None and not s.suppressed and s.km_groups != want:
                del parsed[nid]
                dropped.append((nid, "E_BAD_METRICS"))
                log.warning("dropped the evaluation reply of node %d: E_BAD_METRICS (risk groups differ)", nid)
    return parsed, dropped
