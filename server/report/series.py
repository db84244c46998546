"""Per-round series read from a run's rounds.jsonl records: validation values, training loss and
gradient-coordination counts, each as (rounds, values) lists with None where a round recorded nothing.

Both the learning-curve section (``server.report.sections``) and ``metrics.json``
(``server.report.metrics``) show them, so they are read once, here. Sites are named by
``RunData.site_name``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from server.report.load import RunData

__all__ = ["metric_value", "val_series", "train_loss", "coordination_counts"]


def metric_value(rec: Mapping[str, Any] | None, metric: str) -> float | None:
    """``metric`` of an evaluation record as a float, None when absent or not finite."""
    v = ((rec or {}).get("values") or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def val_series(run: RunData, metric: str) -> tuple[list[int], list[float | None], dict[str, tuple[list[int], list]]]:
    """Global and per-site validation values of ``metric`` per recorded round."""
    xs, ys = [], []
    sites: dict[str, tuple[list[int], list]] = {}
    for r in run.rounds:
        val = r.get("val")
        if not isinstance(val, dict):
            continue
        xs.append(int(r["round"]))
        ys.append(metric_value(val.get("global"), metric))
        for key, rec in (val.get("per_site") or {}).items():
            sx, sy = sites.setdefault(run.site_name(key), ([], []))
            sx.append(int(r["round"]))
            sy.append(metric_value(rec, metric))
    return xs, ys, sites


def train_loss(run: RunData) -> dict[str, tuple[list[int], list]]:
    """Training loss per round: per site (federated) or pooled (centralized)."""
    out: dict[str, tuple[list[int], list]] = {}
    for r in run.training_rounds:
        train = r.get("train") or {}
        per_site = train.get("per_site") or {}
        if per_site:
            for key, m in per_site.items():
                v = (m or {}).get("train-loss")
                xs, ys = out.setdefault(run.site_name(key), ([], []))
                xs.append(int(r["round"]))
                ys.append(float(v) if isinstance(v, (int, float)) else None)
        elif isinstance((train.get("aggregate") or {}).get("train-loss"), (int, float)):
            xs, ys = out.setdefault("all sites pooled", ([], []))
            xs.append(int(r["round"]))
            ys.append(float(train["aggregate"]["train-loss"]))
    return out


def coordination_counts(run: RunData) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """Per round, per task: coordination counts summed over the sites that trained."""
    rounds: list[int] = []
    per_task: dict[str, dict[str, list[float]]] = {}
    found = False
    for r in run.training_rounds:
        per_site = ((r.get("train") or {}).get("per_site")) or {}
        rounds.append(int(r["round"]))
        for task in run.tasks:
            parts = per_task.setdefault(task, {"tumour": [], "micro": [], "conflicts": []})
            for part in parts:
                vals = [m.get(f"coord-{task}-{part}") for m in per_site.values() if isinstance(m, dict)]
                vals = [float(v) for v in vals if isinstance(v, (int, float))]
                found = found or bool(vals)
                parts[part].append(float(sum(vals)))
    return (rounds, per_task) if found else ([], {})
