"""``smm report RUN_DIR [RUN_DIR ...] [--out DIR]``: the evaluation report coordinators read.

The first folder is the run the report is about; any others are shown beside it (a centralized
baseline, a local-only run, another federated run, an external evaluation). Three files are
written to ``--out`` (default: the first run folder)::

    report.html     one self-contained page: figures embedded as base64 PNG, CSS inline, no script,
                    no external reference of any kind; prints on A4/Letter (figures never split)
    report.md       the same content as Markdown; its figures are the same PNG files, written to
                    report_files/<name>.png next to it and linked relatively (move the folder whole)
    metrics.json    machine-readable: every run's test record exactly as final_metrics.json holds it
                    (minus the bulky pooled statistics), curves per round, figures' numbers

Reading is tolerant by design: the report is written at the end of every run, including runs that
stopped early or failed, and it must then say what is missing rather than fail. Every field added
to the run-folder format after the first release (``mode``, ``site_info``, ``wall_s``, ``bytes``,
``config_sha256``, pooled ``stats`` and ``km_grid`` in evaluation records) is optional here and
reported as "not recorded" when absent. A folder that is not a run folder at all (no config.yaml,
rounds.jsonl, final_metrics.json or local_only.json) is refused with ``ReportError``.

The plain data model (``RunData``, one per folder) is built by ``load_run``; the report itself is a
list of ``Section``s of simple blocks rendered twice, to HTML and to Markdown, so the two never
disagree. Figures come from ``server.report.plots``. Kaplan-Meier curves and the log-rank test are
recomputed with lifelines from the pooled counts (``km_lifelines``) and checked against the values
the run recorded.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import logging
import math
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from smm_model.config import TASK_CLASSES, TASKS
from smm_model.metrics.federated import SCORE_BINS
from smm_model.contract.label_facts import LABEL_FACTS
from smm_model.contract.protocol import evaluation_round

from smm_model.contract.atomic import atomic_write_bytes, atomic_write_text, dumps

__all__ = ["REPORT_HTML", "REPORT_MD", "METRICS_JSON", "FIGURES_DIR", "CLASS_NAMES", "ReportError", "RunData",
           "load_run", "km_lifelines", "build_metrics", "write_report", "report_after_run", "main"]

log = logging.getLogger("fedsmm.server.report")

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
METRICS_JSON = "metrics.json"
FIGURES_DIR = "report_files"
METRICS_FORMAT = "fedsmm-report-metrics"

#: Class names (client.site.labels.DIAGNOSES / GRADES; repeated because server may not import client,
#: tests/server/test_report.py checks that they agree).
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "diagnosis": ("GBM, IDH-wildtype", "astrocytoma, IDH-mutant, grade 4", "astrocytoma, IDH-mutant, grade 2-3",
                  "oligodendroglioma, IDH-mutant, 1p/19q-codeleted"),
    "grade": ("WHO grade 2", "WHO grade 3", "WHO grade 4"),
}
#: Short names for figure axes.
SHORT_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "diagnosis": ("GBM IDH-wt", "astro IDH-mut G4", "astro IDH-mut G2-3", "oligo 1p/19q-codel"),
    "grade": ("grade 2", "grade 3", "grade 4"),
}
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
                 "auc": "AUC (one-vs-rest, macro)", "c_index": "C-index (within-site)",
                 "logrank_chi2": "log-rank chi-square", "logrank_p": "log-rank p", "loss": "loss"}
TASK_METRICS = {"diagnosis": ("accuracy", "balanced_accuracy", "macro_f1", "auc"),
                "grade": ("accuracy", "balanced_accuracy", "macro_f1", "auc"),
                "survival": ("c_index", "logrank_chi2", "logrank_p")}
CURVE_METRICS = {"diagnosis": ("accuracy", "balanced_accuracy", "macro_f1", "auc"),
                 "grade": ("accuracy", "balanced_accuracy", "macro_f1", "auc"), "survival": ("c_index",)}
#: Default text of the within-site C-index note (server.federation.loop.C_INDEX_NOTE), for folders without notes.
C_INDEX_NOTE = ("survival.c_index is the within-site C-index: concordance pairs are formed within each site only "
                "(a site cannot compare its patients with another site's), and the pair counts are summed over sites")
#: Why a metric can be undefined when the run recorded no reason (older folders).
FALLBACK_REASONS = {"logrank_chi2": "the log-rank test needs patients in at least two predicted risk groups",
                    "logrank_p": "the log-rank test needs patients in at least two predicted risk groups",
                    "c_index": "no comparable pair", "auc": "no class has both positives and negatives"}
NOT_RECORDED = "not recorded"
MODES = ("federated", "centralized", "local-only", "evaluate")


class ReportError(ValueError):
    """A folder cannot be reported on at all (not a folder, not a run folder)."""


# --- the data model -------------------------------------------------------------------------------------

@dataclass
class RunData:
    """One run folder as read: raw records plus what is missing or went wrong.

    ``problems``: sentences saying what is incomplete or failed (missing files, rounds not recorded,
    skipped rounds); ``events``: things that happened and matter for reading the numbers (dropped or
    clamped updates, sites joining late, refused sites). ``local``: a local-only run's per-site runs.
    """

    path: Path
    mode: str
    config: dict[str, Any]
    config_sha256: str | None
    config_sha_source: str
    rounds: list[dict[str, Any]]
    final: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    local: dict[str, "RunData"] = field(default_factory=dict)
    local_summary: dict[str, Any] | None = None
    label: str = ""

    # -- convenience views (all tolerant of missing pieces)

    def section(self, name: str) -> dict[str, Any]:
        v = self.config.get(name)
        return v if isinstance(v, dict) else {}

    @property
    def name(self) -> str:
        return str((self.final or {}).get("run") or self.config.get("name") or (self.local_summary or {}).get("run")
                   or self.path.name)

    @property
    def tasks(self) -> list[str]:
        tasks = self.section("model").get("tasks")
        if isinstance(tasks, list) and tasks:
            return [t for t in tasks if t in TASKS]
        found = set()
        for rec in [self.test, *[r.get("val") for r in self.rounds]]:
            for k in ((rec or {}).get("global") or {}).get("values", {}):
                found.add(k.partition(".")[0])
        for child in self.local.values():
            found.update(child.tasks)
        return [t for t in TASKS if t in found]

    @property
    def rounds_configured(self) -> int | None:
        r = self.section("federation").get("rounds")
        return int(r) if isinstance(r, int) else None

    @property
    def training_rounds(self) -> list[dict[str, Any]]:
        return [r for r in self.rounds if int(r.get("round", 0)) >= 1]

    @property
    def skipped(self) -> list[int]:
        return [int(r["round"]) for r in self.rounds if r.get("status") == "skipped"]

    @property
    def missing_rounds(self) -> list[int]:
        have = {int(r["round"]) for r in self.rounds}
        last = max([*have, 0])
        return [r for r in range(0, last + 1) if r not in have]

    @property
    def test(self) -> dict[str, Any] | None:
        t = (self.final or {}).get("test")
        return t if isinstance(t, dict) else None

    @property
    def site_info(self) -> dict[str, Any]:
        """final_metrics.json's ``site_info`` (a local-only run: its site runs' merged)."""
        info = (self.final or {}).get("site_info")
        if not isinstance(info, dict):
            info = {}
            for child in self.local.values():
                info.update(child.site_info)
        # in the order of their names (site_2 before site_10), not of node ids
        return dict(sorted(info.items(), key=lambda kv: _natural(str((kv[1] or {}).get("label") or kv[0]))))

    @property
    def complete(self) -> bool:
        return not self.problems

    def site_name(self, key: Any) -> str:
        """Display name of a site key: its recorded label, else the key (node ids shortened)."""
        key = str(key)
        label = (self.site_info.get(key) or {}).get("label")
        if label:
            return str(label)
        if key.isdigit() and len(key) > 8:
            return f"node …{key[-6:]}"
        return key


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{path.name} cannot be read ({type(e).__name__}: {e}); it is left out")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} does not hold a JSON object; it is left out")
        return None
    return data


def _read_rounds(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        problems.append(f"{path.name} cannot be read ({e.strerror}); no round is shown")
        return []
    lines = text.split("\n")
    by_round: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        torn = i == len(lines) - 1  # no newline after it: the run stopped while writing it
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if torn:
            problems.append(f"the last line of {path.name} is incomplete (the run stopped while writing it); "
                            "it is left out")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
            problems.append(f"{path.name} line {i + 1} is not a round record; it is left out")
            continue
        by_round[int(rec["round"])] = rec  # a repeated round (an old resume): the later record wins
    return [by_round[r] for r in sorted(by_round)]


def _guess_mode(final: dict[str, Any] | None, rounds: list[dict[str, Any]], has_local: bool) -> str:
    if has_local:
        return "local-only"
    if final and final.get("mode") in MODES:
        return str(final["mode"])
    statuses = {r.get("status") for r in rounds}
    if "trained" in statuses:
        return "centralized"
    if final is not None and not rounds and final.get("split"):
        return "evaluate"
    return "federated"


def load_run(path: str | Path) -> RunData:
    """Read one run folder (federated, centralized, local-only parent or child, evaluate)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder")
    names = ("config.yaml", "rounds.jsonl", "final_metrics.json", "local_only.json")
    if not any((path / n).exists() for n in names):
        raise ReportError(f"{path}: not a run folder (none of {', '.join(names)})")
    problems: list[str] = []
    events: list[str] = []
    config: dict[str, Any] = {}
    sha, sha_source = None, NOT_RECORDED
    cfg_path = path / "config.yaml"
    if cfg_path.exists():
        try:
            raw = cfg_path.read_bytes()
            loaded = yaml.safe_load(raw.decode("utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
            sha, sha_source = hashlib.sha256(raw).hexdigest(), "sha256 of config.yaml, computed by the report"
        except (OSError, ValueError, yaml.YAMLError) as e:
            problems.append(f"config.yaml cannot be read ({type(e).__name__}); configuration not shown")
    final = _read_json(path / "final_metrics.json", problems)
    rounds = _read_rounds(path / "rounds.jsonl", problems)
    local_summary = _read_json(path / "local_only.json", problems)
    mode = _guess_mode(final, rounds, local_summary is not None)
    if final and isinstance(final.get("config_sha256"), str):
        recorded = final["config_sha256"]
        if sha is not None and recorded != sha:
            events.append("config_sha256 in final_metrics.json differs from the sha256 of config.yaml; the recorded "
                          "value is shown")
        sha, sha_source = recorded, "recorded by the run"
    run = RunData(path=path, mode=mode, config=config, config_sha256=sha, config_sha_source=sha_source,
                  rounds=rounds, final=final, problems=problems, events=events, local_summary=local_summary)
    if local_summary is not None:
        sites = local_summary.get("sites") if isinstance(local_summary.get("sites"), dict) else {}
        for site, entry in sites.items():
            sub = path / str((entry or {}).get("run_dir") or Path("local") / site)
            try:
                run.local[str(site)] = load_run(sub)
            except ReportError as e:
                problems.append(f"local-only run of {site}: {e}")
                continue
            run.local[str(site)].label = f"local-only: {site}'s model"
            problems += [f"local-only run of {site}: {p}" for p in run.local[str(site)].problems]
        if not run.local:
            problems.append("local_only.json lists no readable per-site run")
    else:
        _check_run(run)
    return run


def _fmt_sites(run: RunData, keys: Sequence[Any]) -> str:
    return ", ".join(sorted((run.site_name(k) for k in keys), key=_natural))


def _check_run(run: RunData) -> None:
    """Fill ``problems`` and ``events`` from the records (a stopped run, skipped rounds, ...)."""
    p, ev = run.problems, run.events
    if run.mode != "evaluate":
        if run.final is None:
            p.append("final_metrics.json is missing: the run did not finish (it was stopped, crashed or failed); "
                     "there are no test results, only the rounds recorded so far")
        if not run.rounds:
            p.append("rounds.jsonl is missing or empty: no round was recorded, so there are no learning curves")
        else:
            numbers = [int(r["round"]) for r in run.rounds]
            if run.missing_rounds:
                p.append(f"round(s) {', '.join(map(str, run.missing_rounds))} not recorded in rounds.jsonl")
            last = max(numbers)
            conf = run.rounds_configured
            if conf is not None and last < conf:
                p.append(f"only {last} of {conf} configured training rounds were recorded (the run stopped early)")
            every = int(run.section("federation").get("eval_every") or 1)  # validated every k-th round and the last
            for r in run.rounds:
                status = r.get("status")
                if status == "skipped":
                    p.append(f"round {r['round']} was skipped (no update aggregated): "
                             f"{r.get('skip_reason') or 'no reason recorded'}")
                elif status not in ("initial", "aggregated", "trained"):
                    p.append(f"round {r['round']} has status {status!r}")
                elif (status != "initial" and not r.get("val")
                      and evaluation_round(int(r["round"]), conf or last, every)):
                    p.append(f"round {r['round']} has no validation record")
    for r in run.rounds:
        train = r.get("train") or {}
        for d in train.get("dropped") or []:
            ev.append(f"round {r['round']}: the update of {run.site_name(d.get('node'))} was dropped "
                      f"({d.get('reason')})")
        for c in train.get("clamped") or []:
            ev.append(f"round {r['round']}: {run.site_name(c.get('node'))} claimed {c.get('claimed')} examples, "
                      f"{c.get('used')} were used for its weight")
        for d in (r.get("val") or {}).get("dropped") or []:
            ev.append(f"round {r['round']}: the validation reply of {run.site_name(d.get('node'))} was dropped "
                      f"({d.get('reason')})")
        if r.get("joined"):
            ev.append(f"round {r['round']}: {_fmt_sites(run, r['joined'])} joined the federation")
    final = run.final or {}
    for site, why in (final.get("refused_sites") or {}).items():
        ev.append(f"{run.site_name(site)} was refused: {why}")
    for d in (run.test or {}).get("dropped") or []:
        ev.append(f"test: the reply of {run.site_name(d.get('node'))} was dropped ({d.get('reason')})")
    if final.get("selection_note"):
        ev.append(str(final["selection_note"]))
    recorded_skips = final.get("skipped_rounds") or []
    if sorted(recorded_skips) != sorted(run.skipped) and run.rounds and run.final is not None:
        ev.append(f"final_metrics.json lists skipped rounds {recorded_skips}, rounds.jsonl {run.skipped}")


def _natural(name: str) -> list[tuple[int, Any]]:
    """Sort key putting site_2 before site_10 (node ids, all digits, sort numerically)."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", str(name)) if t]


def _short_path(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(path)


def _label_runs(runs: Sequence[RunData]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        label = f"{run.mode}: {_short_path(run.path)}"
        seen[label] = seen.get(label, 0) + 1
        run.label = label if seen[label] == 1 else f"{label} ({seen[label]})"


# --- statistics -----------------------------------------------------------------------------------------

def km_lifelines(counts: Any, grid: Sequence[float] | None = None):
    """Kaplan-Meier curves and the log-rank test of (G, 2, K) grid counts, with lifelines.

    The counts are expanded into weighted pseudo-records: at grid time ``grid[k]``, ``d[g, k]`` events
    and ``n[g, k] - n[g, k+1] - d[g, k]`` censorings (patients whose time falls in
    ``[grid[k], grid[k+1])``, rounded down to the grid as the sites did). ``KaplanMeierFitter`` and
    ``multivariate_logrank_test`` with ``weights`` then give exactly
    ``smm_model.metrics.federated.km_from_counts`` / ``logrank_from_counts``. Returns
    ``report_plots.KMCurves``; survival is nan for a group without patients.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    from server.report.plots import KMCurves

    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 3 or counts.shape[1] != 2:
        raise ValueError(f"KM counts must be (groups, 2, grid), got {counts.shape}")
    G, _, K = counts.shape
    grid_a = np.arange(K, dtype=np.float64) if grid is None else np.asarray(grid, dtype=np.float64)
    if grid_a.shape != (K,):
        raise ValueError(f"KM grid has {grid_a.size} times, the counts {K}")
    d, n = counts[:, 0], counts[:, 1]
    n_next = np.concatenate([n[:, 1:], np.zeros((G, 1), dtype=np.int64)], axis=1)
    censored = n - n_next - d
    if (censored < 0).any() or (d < 0).any():
        raise ValueError("inconsistent KM counts (fewer at risk than events and departures)")
    survival = np.full((G, K), np.nan)
    T, E, W, groups = [], [], [], []
    for g in range(G):
        t_g, e_g, w_g = [], [], []
        for k in range(K):
            if d[g, k] > 0:
                t_g.append(grid_a[k]), e_g.append(1), w_g.append(int(d[g, k]))
            if censored[g, k] > 0:
                t_g.append(grid_a[k]), e_g.append(0), w_g.append(int(censored[g, k]))
        if not t_g:
            continue
        kmf = KaplanMeierFitter().fit(t_g, e_g, weights=w_g)
        survival[g] = kmf.survival_function_at_times(grid_a).to_numpy()
        T += t_g
        E += e_g
        W += w_g
        groups += [g] * len(t_g)
    used = sorted(set(groups))
    chi2, p, df = float("nan"), float("nan"), 0
    if len(used) >= 2 and sum(E) > 0:
        res = multivariate_logrank_test(np.asarray(T), np.asarray(groups), np.asarray(E), weights=np.asarray(W))
        chi2, p, df = float(res.test_statistic), float(res.p_value), int(res.degrees_of_freedom)
    labels = []
    for g in range(G):
        extra = " (highest predicted risk)" if g == 0 else (" (lowest predicted risk)" if g == G - 1 else "")
        labels.append(f"risk group {g + 1}{extra}")
    return KMCurves(grid=grid_a, survival=survival, at_risk=n, events=d, labels=labels, chi2=chi2, p=p, df=df)


def _pooled_stats(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    stats = ((record or {}).get("global") or {}).get("stats")
    return stats if isinstance(stats, dict) else None


def _matrix(flat: Any, C: int) -> np.ndarray | None:
    a = np.asarray(flat, dtype=np.int64) if isinstance(flat, list) else None
    return a.reshape(C, C) if a is not None and a.size == C * C else None


def _hist(flat: Any, C: int) -> np.ndarray | None:
    a = np.asarray(flat, dtype=np.int64) if isinstance(flat, list) else None
    if a is None or a.size % (2 * C):
        return None
    return a.reshape(C, 2, -1)


def _km(stats: Mapping[str, Any], record: Mapping[str, Any]) -> tuple[np.ndarray, list[float] | None] | None:
    flat, G = stats.get("survival-km"), int(stats.get("km-groups") or 0)
    if not isinstance(flat, list) or G <= 0 or len(flat) % (2 * G):
        return None
    counts = np.asarray(flat, dtype=np.int64).reshape(G, 2, -1)
    grid = record.get("km_grid")
    grid = [float(x) for x in grid] if isinstance(grid, list) and len(grid) == counts.shape[2] else None
    return counts, grid


# --- per-round series -----------------------------------------------------------------------------------

def _value(rec: Mapping[str, Any] | None, metric: str) -> float | None:
    v = ((rec or {}).get("values") or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _val_series(run: RunData, metric: str) -> tuple[list[int], list[float | None], dict[str, tuple[list[int], list]]]:
    """Global and per-site validation values of ``metric`` per recorded round."""
    xs, ys = [], []
    sites: dict[str, tuple[list[int], list]] = {}
    for r in run.rounds:
        val = r.get("val")
        if not isinstance(val, dict):
            continue
        xs.append(int(r["round"]))
        ys.append(_value(val.get("global"), metric))
        for key, rec in (val.get("per_site") or {}).items():
            sx, sy = sites.setdefault(run.site_name(key), ([], []))
            sx.append(int(r["round"]))
            sy.append(_value(rec, metric))
    return xs, ys, sites


def _train_loss(run: RunData) -> dict[str, tuple[list[int], list]]:
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


def _coordination(run: RunData) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
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


# --- report blocks --------------------------------------------------------------------------------------

@dataclass
class Para:
    text: str
    kind: str = ""  # "", "warning", "missing", "note"


@dataclass
class Bullets:
    """A list; an item may be (text, [sub-items])."""

    items: list[Any]
    kind: str = ""


@dataclass
class Heading:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Fig:
    name: str
    png: bytes
    caption: str
    alt: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)


class _Notes:
    """Numbered table notes for undefined cells ("n/a [1]") with their reasons."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def ref(self, text: str) -> int:
        if text not in self.items:
            self.items.append(text)
        return self.items.index(text) + 1


def _num(v: Any, metric: str = "") -> str:
    """A metric value for a table: 3 decimals, p-values to 3 significant digits, "n/a" if undefined."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "n/a"
    if metric.endswith("logrank_p"):
        return f"{v:.3g}" if v >= 1e-4 else f"{v:.1e}"
    return f"{v:.3f}"


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return NOT_RECORDED
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _seconds(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return NOT_RECORDED
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min ({s:.0f} s)"
    return f"{s / 3600:.2f} h ({s:.0f} s)"


# --- report sections ------------------------------------------------------------------------------------

class _Builder:
    """Builds the sections of one report (the first run plus comparisons)."""

    def __init__(self, runs: Sequence[RunData]) -> None:
        self.runs = list(runs)
        self.main = self.runs[0]
        self.others = self.runs[1:]
        self.figures: list[Fig] = []
        self.errors: list[str] = []
        self.derived: dict[str, Any] = {}

    # -- helpers

    def fig(self, name: str, draw: Callable[[], bytes], caption: str, alt: str) -> Fig | Para:
        try:
            f = Fig(name=name, png=draw(), caption=caption, alt=alt)
        except Exception as e:  # noqa: BLE001 - a figure must never take the report down
            self.errors.append(f"figure {name}: {type(e).__name__}: {e}")
            log.warning("report figure %s failed: %s", name, traceback.format_exc())
            return Para(f"Figure {name} could not be drawn ({type(e).__name__}: {e}).", "missing")
        self.figures.append(f)
        return f

    def guarded(self, sid: str, title: str, build: Callable[[Section], None]) -> Section:
        sec = Section(sid, title)
        try:
            build(sec)
        except Exception as e:  # noqa: BLE001 - the report is written at the end of every run
            self.errors.append(f"section {sid}: {type(e).__name__}: {e}")
            log.warning("report section %s failed: %s", sid, traceback.format_exc())
            sec.blocks.append(Para(f"This section could not be built ({type(e).__name__}: {e}).", "missing"))
        return sec

    def sections(self) -> list[Section]:
        return [self.guarded("summary", "Run summary", self.summary),
                self.guarded("curves", "Learning curves", self.curves),
                self.guarded("test", "Final test results", self.test_tables),
                self.guarded("classification", "Diagnosis and grade", self.classification),
                self.guarded("survival", "Survival", self.survival),
                self.guarded("coordination", "Gradient coordination", self.coordination),
                self.guarded("limits", "What these numbers cannot say", self.limits)]

    # -- 1. summary

    def _summary_rows(self, run: RunData) -> dict[str, str]:
        cfg_model, fed, train = run.section("model"), run.section("federation"), run.section("train")
        final = run.final or {}
        model = NOT_RECORDED
        if cfg_model:
            model = (f"{cfg_model.get('arch', '?')} (hidden {cfg_model.get('hidden_dim', '?')}, layout "
                     f"{cfg_model.get('layout', '?')}, {cfg_model.get('survival_bins', '?')} survival bins)")
        strategy = NOT_RECORDED
        if run.mode in ("centralized", "evaluate"):
            strategy = f"none ({run.mode} run)"
        elif run.mode == "local-only":
            strategy = "none (each site alone)"
        elif fed:
            strategy = str(fed.get("strategy", "?"))
            if train.get("proximal_mu"):
                strategy += f", proximal mu {train['proximal_mu']}"
            strategy += (f"; {fed.get('fraction_train', '?')} of sites train per round, at least "
                         f"{fed.get('min_nodes', '?')}")
        conf = run.rounds_configured
        last = max([int(r["round"]) for r in run.rounds], default=None)
        if run.mode == "evaluate":
            rounds = f"model of round {final.get('best_round', '?')} (evaluation only)"
        elif run.mode == "local-only" and run.local:
            rounds = "; ".join(f"{s}: {max([int(r['round']) for r in c.rounds], default=0)}"
                               for s, c in run.local.items()) + f" of {conf if conf is not None else '?'}"
        else:
            rounds = f"{last if last is not None else 0} recorded of {conf if conf is not None else '?'} configured"
            if run.skipped:
                rounds += f"; skipped: {', '.join(map(str, run.skipped))}"
            if run.mode == "federated" and fed.get("local_steps"):
                rounds += f"; {fed['local_steps']} local optimizer steps per site and round"
            elif fed.get("local_epochs"):
                rounds += f"; {fed['local_epochs']} local epoch(s) per round"
        sel = NOT_RECORDED
        if final:
            direction = "lower is better" if final.get("lower_is_better") else "higher is better"
            sel = (f"round {final.get('best_round', '?')} by validation {final.get('selection_metric', '?')} = "
                   f"{_num(final.get('selection_value'), str(final.get('selection_metric')))} ({direction})")
        wall = final.get("wall_s")
        if isinstance(wall, (int, float)):
            wall_s = _seconds(wall)
            if isinstance(final.get("resumed_after_round"), int):
                wall_s += f" (since the run was resumed after round {final['resumed_after_round']})"
        else:
            timed = sum(float(v) for r in run.rounds for v in (r.get("timings") or {}).values()
                        if isinstance(v, (int, float)))
            wall_s = f"{NOT_RECORDED} (rounds' recorded timings add up to {_seconds(timed)})" if timed else NOT_RECORDED
        b = final.get("bytes")
        if isinstance(b, dict):
            bytes_s = f"sent {_bytes(b.get('sent'))}, received {_bytes(b.get('received'))}"
        else:
            sent = [((r.get("bytes") or {}).get("sent")) for r in run.rounds]
            recv = [((r.get("bytes") or {}).get("received")) for r in run.rounds]
            if any(isinstance(x, (int, float)) for x in sent + recv):
                bytes_s = (f"sent {_bytes(sum(x for x in sent if isinstance(x, (int, float))))}, received "
                           f"{_bytes(sum(x for x in recv if isinstance(x, (int, float))))} (sum over recorded "
                           "rounds; the final test evaluation not included)")
            elif run.mode == "federated":
                bytes_s = NOT_RECORDED
            else:
                bytes_s = "none (not a federated run)"
        versions = final.get("versions") or (run.local_summary or {}).get("versions")
        versions_s = ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else NOT_RECORDED
        sites = final.get("sites")
        if run.local:
            sites_s = ", ".join(run.local)
        elif isinstance(sites, list):
            sites_s = f"{len(sites)}: {_fmt_sites(run, sites)}"
        else:
            sites_s = NOT_RECORDED
        status = "complete" if run.complete else "INCOMPLETE: " + "; ".join(run.problems)
        msha = (final.get("model") or {}).get("sha256")
        return {
            "folder": str(run.path), "mode": run.mode + ("" if final.get("mode") or run.local else
                                                         " (no mode recorded; inferred)"),
            "status": status, "run name": run.name, "sites": sites_s,
            "tasks": ", ".join(run.tasks) or NOT_RECORDED, "model": model, "strategy": strategy,
            "rounds": rounds, "selected model": sel, "wall time": wall_s, "bytes exchanged": bytes_s,
            "versions": versions_s,
            "config sha256": (f"{run.config_sha256} ({run.config_sha_source})" if run.config_sha256
                              else NOT_RECORDED),
            "model sha256": str(msha) if msha else NOT_RECORDED,
        }

    def summary(self, sec: Section) -> None:
        main = self.main
        if main.problems:
            sec.blocks.append(Para(f"This run is incomplete or had failures ({len(main.problems)}):", "warning"))
            sec.blocks.append(Bullets(list(main.problems), "warning"))
        for other in self.others:
            if other.problems:
                sec.blocks.append(Para(f"Compared run {other.label} is incomplete or had failures:", "warning"))
                sec.blocks.append(Bullets(list(other.problems), "warning"))
        rows = [self._summary_rows(r) for r in self.runs]
        headers = ["", *[r.label for r in self.runs]]
        sec.blocks.append(Table(headers, [[k, *[row[k] for row in rows]] for k in rows[0]],
                                caption="Runs in this report (the first is the one reported on)"))
        if main.events:
            sec.blocks.append(Para("Events during the run:", "note"))
            sec.blocks.append(Bullets(list(main.events)))
        sec.blocks.append(Heading("Sites"))
        self._sites_table(sec, main)

    def _sites_table(self, sec: Section, run: RunData) -> None:
        info = run.site_info
        if not info:
            known = (run.final or {}).get("sites") or (run.test or {}).get("per_site", {}) or run.local
            keys = [str(k) for k in known]
            if not keys:  # a run that stopped before its final record: the sites its rounds saw
                for r in run.rounds:
                    for part in ((r.get("val") or {}).get("per_site") or {}, (r.get("train") or {}).get("per_site")
                                 or {}, {str(x): 1 for x in (r.get("val") or {}).get("suppressed") or []}):
                        keys += [str(k) for k in part if str(k) not in keys]
            rows = []
            test_ps = (run.test or {}).get("per_site") or {}
            val0 = next((r.get("val") for r in run.rounds if r.get("val")), None) or {}
            val_ps = val0.get("per_site") or {}
            for k in keys:
                k = str(k)
                val_supp = map(str, val0.get("suppressed") or [])
                rows.append([run.site_name(k), k, NOT_RECORDED,
                             str((val_ps.get(k) or {}).get("patients", "suppressed" if k in val_supp else "—")),
                             str((test_ps.get(k) or {}).get("patients", "suppressed" if k in map(
                                 str, (run.test or {}).get("suppressed") or []) else "—")),
                             NOT_RECORDED, NOT_RECORDED])
            sec.blocks.append(Para("Per-site data provenance (patients and events per split, data digests, "
                                   "synthetic or not, encoder weights) is not recorded in this run folder "
                                   "(site_info is absent: an older run). Patients below are those evaluated.",
                                   "missing"))
            sec.blocks.append(Table(["site", "key", "train patients", "val patients (round 0)", "test patients",
                                     "events", "data digest"], rows))
            return
        rows = []
        for key, si in info.items():
            si = si if isinstance(si, dict) else {}
            splits = si.get("splits") or {}

            def split(s: str, f: str) -> str:
                v = (splits.get(s) or {}).get(f)
                return str(v) if v is not None else "—"

            excluded = si.get("excluded") or {}
            digest = si.get("data_digest")
            rows.append([
                run.site_name(key), str(key),
                " / ".join(split(s, "patients") for s in ("train", "val", "test")),
                " / ".join(split(s, "events") for s in ("train", "val", "test")),
                " / ".join(split(s, "survival_labelled") for s in ("train", "val", "test")),
                ", ".join(f"{k}: {v}" for k, v in excluded.items()) or "none",
                (str(digest)[:16] + "…") if digest else NOT_RECORDED,
                {True: "yes", False: "no"}.get(si.get("synthetic"), NOT_RECORDED),
                f"{si.get('encoder') or '—'} ({si.get('weights') or 'weights not recorded'})",
            ])
        sec.blocks.append(Table(["site", "key", "patients train / val / test", "events train / val / test",
                                 "survival-labelled train / val / test", "excluded patients",
                                 "data digest (sha256, first 16)", "synthetic", "encoder (weights)"], rows,
                                caption="Sites as recorded by the run (full digests in metrics.json)"))
        classes = []
        for key, si in info.items():
            splits = (si or {}).get("splits") or {}
            for s in ("train", "val", "test"):
                sp = splits.get(s) or {}
                classes.append([run.site_name(key), s,
                                *[" / ".join(str(x) for x in (sp.get(t) or [])) or "—" for t in ("diagnosis", "grade")],
                                f"{sp.get('diagnosis_unknown', '—')} / {sp.get('grade_unknown', '—')}"])
        sec.blocks.append(Table(["site", "split", "diagnosis classes (" + ", ".join(SHORT_CLASS_NAMES["diagnosis"])
                                 + ")", "grades (2 / 3 / 4)", "unknown diagnosis / grade"], classes,
                                caption="Class counts per site and split"))

    # -- 2. learning curves

    def curves(self, sec: Section) -> None:
        main = self.main
        if main.mode == "evaluate" or (not main.rounds and not main.local):
            sec.blocks.append(Para("No rounds recorded for this run"
                                   + (" (an evaluation of a finished model)." if main.mode == "evaluate" else "."),
                                   "missing"))
            return
        skipped, missing = main.skipped, [r for r in main.missing_rounds if r > 0]
        best = (main.final or {}).get("best_round")
        notes = []
        if skipped:
            notes.append(f"Grey band: skipped round(s) {', '.join(map(str, skipped))}")
        if missing:
            notes.append(f"Hatched: round(s) {', '.join(map(str, missing))} not recorded")
        if isinstance(best, int):
            notes.append(f"Dotted line: the selected round ({best})")
        marks = (" " + ". ".join(notes) + ".") if notes else ""
        from server.report.plots import Panel, Series, curves

        # training loss
        loss_series: list = []
        if main.local:
            for site, child in main.local.items():
                for name, (x, y) in _train_loss(child).items():
                    loss_series.append(Series(f"{site} alone", x, y))
        else:
            loss_series = [Series(n, x, y) for n, (x, y) in _train_loss(main).items()]
        if loss_series:
            sec.blocks.append(self.fig("train-loss", lambda: curves(
                [Panel("training loss", "loss (mean per patient, last local epoch)", loss_series)],
                skipped=skipped, missing=missing, best_round=best, cols=1),
                f"Training loss per round and site.{marks}", "training loss per round"))
        else:
            sec.blocks.append(Para("Training loss: not recorded.", "missing"))

        def panels(metric_names: Sequence[str], task: str | None) -> list:
            out = []
            for m in metric_names:
                key = f"{task}.{m}" if task else m
                series = []
                if main.local:
                    for site, child in main.local.items():
                        x, y, _ = _val_series(child, key)
                        series.append(Series(f"{site} alone (own validation split)", x, y))
                else:
                    x, y, sites = _val_series(main, key)
                    series.append(Series("all sites pooled", x, y, "global"))
                    series += [Series(n, sx, sy) for n, (sx, sy) in sites.items()]
                for other in self.others:
                    for ox, oy, olabel in self._comparison_curve(other, key):
                        series.append(Series(olabel, ox, oy, "comparison"))
                unit = "loss (mean per patient)" if m == "loss" else METRIC_LABELS.get(m, m)
                lim = None if m in ("loss", "logrank_chi2") else (-0.02, 1.02)
                out.append(Panel(METRIC_LABELS.get(m, m) if task is None else f"{task}: {METRIC_LABELS.get(m, m)}",
                                 unit, series, lim))
            return out

        cmp = (" Dashed: the pooled validation curve of each compared run." if self.others else "")
        whose = ("each site's own model on its own validation split (local-only: no pooled model)" if main.local
                 else "all sites pooled (black) and per site")
        sec.blocks.append(self.fig("val-loss", lambda: curves(panels(["loss"], None), skipped=skipped,
                                                              missing=missing, best_round=best, cols=1),
                                   f"Validation loss per round: {whose}.{marks}{cmp}", "validation loss per round"))
        for task in main.tasks:
            sec.blocks.append(self.fig(
                f"val-{task}", lambda t=task: curves(panels(CURVE_METRICS[t], t), skipped=skipped, missing=missing,
                                                     best_round=best),
                f"Validation metrics for {task} per round: {whose}."
                f"{' The C-index is the within-site C-index.' if task == 'survival' else ''}{marks}{cmp}",
                f"validation {task} metrics per round"))
        sec.blocks.append(Heading("Rounds"))
        if main.local:
            for site, child in main.local.items():
                table = self._rounds_table(child)
                table.caption = f"Every round of {site}'s local run (0 = the initial model, evaluated only)"
                sec.blocks.append(table)
        else:
            sec.blocks.append(self._rounds_table(main))

    def _comparison_curve(self, run: RunData, key: str):
        if run.local:
            for site, child in run.local.items():
                x, y, _ = _val_series(child, key)
                if x:
                    yield x, y, f"{run.label} ({site} alone)"
        else:
            x, y, _ = _val_series(run, key)
            if x:
                yield x, y, run.label

    def _rounds_table(self, run: RunData) -> Table:
        rows = []
        present = {int(r["round"]): r for r in run.rounds}
        last = max([*present, run.rounds_configured or 0])
        sel_metric = (run.final or {}).get("selection_metric") or run.section("federation").get("selection_metric")
        extra = bool(sel_metric) and sel_metric != "loss"
        for n in range(0, last + 1):
            r = present.get(n)
            if r is None:
                rows.append([str(n), "NOT RECORDED", *["—"] * (5 + extra)])
                continue
            train = r.get("train") or {}
            if run.mode == "federated" or train.get("sampled") is not None:
                trained = (f"{len(train.get('kept') or [])} of {len(train.get('sampled') or [])}"
                           if train else "—")
            else:
                trained = ", ".join(train.get("sites") or []) or "—"
            val = r.get("val") or {}
            status = str(r.get("status"))
            if status == "skipped":
                status += f" ({r.get('skip_reason') or 'no reason recorded'})"
            timings = r.get("timings") or {}
            secs = sum(v for v in timings.values() if isinstance(v, (int, float)))
            b = r.get("bytes") or {}
            row = [str(n), status, trained, str(val.get("patients", "—")),
                   _num(_value(val.get("global"), "loss"), "loss")]
            if extra:
                row.append(_num(_value(val.get("global"), str(sel_metric)), str(sel_metric)))
            rows.append(row + [f"{secs:.1f}" if timings else "—",
                               (f"{_bytes(b.get('sent'))} / {_bytes(b.get('received'))}" if b else "—")])
        trained_h = "sites trained (kept of sampled)" if run.mode == "federated" else "sites trained"
        return Table(["round", "status", trained_h, "val patients", "val loss",
                      *([f"val {sel_metric} (selection)"] if extra else []), "seconds", "bytes sent / received"],
                     rows, caption="Every round of the run (0 = the initial model, evaluated only)")

    # -- 3. test tables

    def _scopes(self) -> list[str]:
        names: list[str] = []
        for run in self.runs:
            recs = [run] + list(run.local.values())
            for r in recs:
                test = r.test or {}
                for key in [*(test.get("per_site") or {}), *map(str, test.get("suppressed") or [])]:
                    n = r.site_name(key)
                    if n not in names:
                        names.append(n)
            for site in run.local:
                if site not in names:
                    names.append(site)
        return sorted(names, key=_natural)

    def _rows_for(self, run: RunData, scope: str | None) -> list[tuple[str, Any, dict | None, str]]:
        """(run label, patients, metric record or None, why None) for one scope (None = pooled)."""
        if run.local:
            out = []
            for site, child in run.local.items():
                if scope is None:
                    rec = (child.final or {}).get("all_sites_test") or {}
                    out.append((f"local-only: {site}'s model (all sites' test splits)", rec.get("patients"),
                                rec.get("global"), "no test results (run incomplete)"))
                elif scope == site:
                    t = child.test or {}
                    out.append((f"local-only: {site}'s own model", t.get("patients"), t.get("global"),
                                "no test results (run incomplete)"))
            return out
        test = run.test
        all_sites = (run.final or {}).get("all_sites_test")
        if isinstance(all_sites, dict):  # one local-only site run: its model on every site's test split
            test = all_sites
        if test is None:
            return [(run.label, None, None, "no test results (final_metrics.json missing)")] if scope is None else []
        if scope is None:
            return [(run.label, test.get("patients"), test.get("global"), "")]
        for key, rec in (test.get("per_site") or {}).items():
            if run.site_name(key) == scope:
                return [(run.label, (rec or {}).get("patients"), rec, "")]
        for key in test.get("suppressed") or []:
            if run.site_name(key) == scope:
                return [(run.label, None, None, "suppressed: fewer test patients than the minimum; no numbers "
                                                "were sent")]
        return []

    def test_tables(self, sec: Section) -> None:
        main = self.main
        final = main.final or {}
        if main.final is None and not main.local:
            sec.blocks.append(Para("No test results: final_metrics.json is missing (the run did not finish).",
                                   "missing"))
        elif final:
            sel = final.get("selection_metric")
            sec.blocks.append(Para(
                f"The global model of round {final.get('best_round', '?')} (selected by validation {sel}) was "
                f"evaluated on every site's test split: {(main.test or {}).get('patients', '?')} patients. "
                "\"All sites pooled\" is computed from the sum of the sites' statistics (the same as pooling the "
                "patients, except the C-index, which is within-site); per-site rows are each site's own split."))
        if self.others:
            sec.blocks.append(Para("Rows are grouped by evaluation scope; within a scope, the first row is this "
                                   "run and the others are the compared runs. A local-only run has one model per "
                                   "site: its per-site row is the site's own model on its own test split.", "note"))
        scopes: list[str | None] = [None, *self._scopes()]
        for task in main.tasks or [t for r in self.runs for t in r.tasks]:
            metrics = TASK_METRICS[task]
            notes = _Notes()
            rows = []
            for scope in scopes:
                for run in self.runs:
                    for label, patients, rec, why in self._rows_for(run, scope):
                        cells = []
                        for m in metrics:
                            key = f"{task}.{m}"
                            if rec is None:
                                cells.append(f"n/a [{notes.ref(why)}]" if why else "n/a")
                                continue
                            v = (rec.get("values") or {}).get(key)
                            reason = (rec.get("reasons") or {}).get(key)
                            s = _num(v, key)
                            if s == "n/a":
                                reason = reason or ("not recorded" if key not in (rec.get("values") or {}) else
                                                    f"no reason recorded ({FALLBACK_REASONS.get(m, 'undefined')})")
                            if reason:
                                s += f" [{notes.ref(reason)}]"
                            cells.append(s)
                        rows.append(["all sites pooled" if scope is None else scope, label,
                                     str(patients) if patients is not None else "—", *cells])
            headers = ["scope", "run", "test patients", *[METRIC_LABELS[m] for m in metrics]]
            sec.blocks.append(Heading(task))
            sec.blocks.append(Table(headers, rows, caption=f"Test results: {task}", notes=notes.items))
        if "survival" in main.tasks:
            sec.blocks.append(Para(str((final.get("notes") or {}).get("survival.c_index") or C_INDEX_NOTE), "note"))

    # -- 4. classification

    def classification(self, sec: Section) -> None:
        main = self.main
        tasks = [t for t in main.tasks if t in TASK_CLASSES]
        if not tasks:
            sec.blocks.append(Para("Neither diagnosis nor grade is a task of this run.", "missing"))
            return
        stats = _pooled_stats(main.test)
        if stats is None:
            why = ("final_metrics.json is missing" if main.final is None else
                   "this run folder's test record has no pooled statistics (global.stats: an older run folder)")
            sec.blocks.append(Para(f"Confusion matrices and ROC curves: {NOT_RECORDED} ({why}).", "missing"))
            return
        from server.report.plots import confusion, roc, roc_points

        sec.blocks.append(Para("From the pooled test statistics of all unsuppressed sites (summed confusion "
                               "matrices and score histograms; no patient-level value leaves a site)."))
        for task in tasks:
            C = TASK_CLASSES[task]
            names = SHORT_CLASS_NAMES[task]
            sec.blocks.append(Heading(task))
            cm = _matrix(stats.get(f"{task}-confusion"), C)
            hist = _hist(stats.get(f"{task}-hist"), C)
            derived: dict[str, Any] = {"classes": list(CLASS_NAMES[task])}
            if cm is not None:
                derived["confusion"] = cm.tolist()
                sec.blocks.append(self.fig(f"confusion-{task}", lambda cm=cm, t=task: confusion(
                    cm, SHORT_CLASS_NAMES[t], f"{t}: test confusion matrix"),
                    f"{task}: confusion matrix of the test split, all sites pooled (rows: true class, columns: "
                    "predicted class; cell colour: share of the true class).", f"{task} confusion matrix"))
                rows = [[CLASS_NAMES[task][i], str(int(cm[i].sum())), str(int(cm[:, i].sum())), str(int(cm[i, i]))]
                        for i in range(C)]
                sec.blocks.append(Table(["class", "true patients", "predicted", "correct"], rows,
                                        caption=f"{task}: class counts on the test split"))
            else:
                sec.blocks.append(Para(f"{task}: confusion matrix {NOT_RECORDED}.", "missing"))
            if hist is not None:
                aucs = []
                for c in range(C):
                    pos, neg = hist[c, 0], hist[c, 1]
                    if pos.sum() and neg.sum():
                        fpr, tpr = roc_points(pos, neg)
                        aucs.append(float(np.trapezoid(tpr, fpr)))
                    else:
                        aucs.append(None)
                derived["auc_per_class"] = aucs
                derived["roc_bins"] = int(hist.shape[2])
                sec.blocks.append(self.fig(f"roc-{task}", lambda h=hist, t=task: roc(
                    h, SHORT_CLASS_NAMES[t], f"{t}: test ROC curves (one-vs-rest)"),
                    f"{task}: one-vs-rest ROC curves per class from the pooled score histograms "
                    f"({hist.shape[2]} bins over [0, 1]; scores sharing a bin count as ties).", f"{task} ROC curves"))
            else:
                sec.blocks.append(Para(f"{task}: ROC curves {NOT_RECORDED}.", "missing"))
            self.derived[task] = derived

    # -- 5. survival

    def survival(self, sec: Section) -> None:
        main = self.main
        if "survival" not in main.tasks:
            sec.blocks.append(Para("Survival is not a task of this run.", "missing"))
            return
        stats = _pooled_stats(main.test)
        km = _km(stats, main.test or {}) if stats else None
        if km is None:
            why = ("final_metrics.json is missing" if main.final is None else
                   "this run folder's test record has no pooled Kaplan-Meier counts (global.stats: an older run "
                   "folder)")
            sec.blocks.append(Para(f"Kaplan-Meier curves by predicted risk group: {NOT_RECORDED} ({why}).", "missing"))
            self._survival_values(sec)
            return
        counts, grid = km
        res = km_lifelines(counts, grid)
        from server.report.plots import kaplan_meier

        recorded_p = _value((main.test or {}).get("global"), "survival.logrank_p")
        sec.blocks.append(self.fig("km", lambda: kaplan_meier(res, "Test split, all sites pooled"),
                                   "Kaplan-Meier survival by predicted risk group (group 1: the earliest predicted "
                                   "survival bin) on the test split, from the pooled event and at-risk counts on the "
                                   "shared time grid" + ("" if grid else " (grid times not recorded: x is the grid "
                                                         "index, not days)") + "; log-rank test with lifelines.",
                                   "Kaplan-Meier curves by risk group"))
        if grid is None:
            sec.blocks.append(Para("The time grid (km_grid) is not recorded: times are grid steps.", "missing"))
        last = int(np.max(np.flatnonzero(res.at_risk.sum(axis=0) > 0), initial=0))
        idx = sorted(set(np.linspace(0, last, num=min(6, last + 1)).round().astype(int).tolist()))
        rows = [[lab, *[str(int(res.at_risk[g, k])) for k in idx]] for g, lab in enumerate(res.labels)]
        sec.blocks.append(Table(["numbers at risk", *[f"{res.grid[k]:.0f} d" if grid else f"step {k}" for k in idx]],
                                rows, caption="Patients at risk at selected times"))
        agree = ("agrees with" if recorded_p is not None and np.isfinite(res.p) and abs(recorded_p - res.p) <= 1e-6
                 * max(1.0, abs(res.p)) else "differs from" if recorded_p is not None and np.isfinite(res.p)
                 else "cannot be compared with")
        groups = int((res.at_risk[:, 0] > 0).sum())
        if groups < 2 or not np.isfinite(res.p):
            sec.blocks.append(Para(f"Log-rank test: not defined: {groups} predicted risk group(s) hold test patients"
                                   + (" and none had an event" if groups >= 2 else "")
                                   + ", so the groups cannot be compared.", "missing"))
        else:
            sec.blocks.append(Para(f"Log-rank test (lifelines, {res.df} degrees of freedom): chi-square "
                                   f"{_num(res.chi2, 'logrank_chi2')}, p = {_num(res.p, 'logrank_p')}; this {agree} "
                                   f"the run's recorded p = {_num(recorded_p, 'logrank_p')}."))
        if agree == "differs from":
            self.errors.append("log-rank p recomputed with lifelines differs from the recorded value")
        self.derived["survival"] = {"km_grid": res.grid.tolist(), "km_survival": res.survival.tolist(),
                                    "at_risk": res.at_risk.tolist(), "events": res.events.tolist(),
                                    "groups": res.labels,
                                    "logrank_lifelines": {"chi2": res.chi2, "p": res.p, "df": res.df}}
        self._survival_values(sec)

    def _survival_values(self, sec: Section) -> None:
        stats = _pooled_stats(self.main.test)
        ci = (stats or {}).get("survival-cindex")
        if isinstance(ci, list) and len(ci) == 4:
            sec.blocks.append(Para(f"C-index pairs (within sites, summed): {ci[0]} concordant, {ci[1]} discordant, "
                                   f"{ci[2]} tied in risk, of {ci[3]} comparable pairs."))
            self.derived.setdefault("survival", {})["cindex_pairs"] = {
                "concordant": ci[0], "discordant": ci[1], "tied": ci[2], "comparable": ci[3]}

    # -- 6. coordination

    def coordination(self, sec: Section) -> None:
        main = self.main
        mode = main.section("train").get("coordination")
        sec.blocks.append(Para("Gradient coordination (method Part B, section 4) compares, for each task head, the "
                               "gradient of its tumour half with that of its microenvironment half; where they "
                               "conflict (negative cosine per output row), the less confident half's rows are "
                               "projected. Counts are head rows per local step, summed over a round's local epochs "
                               "and over the sites that trained."
                               + (f" This run used train.coordination: {mode}." if mode else "")))
        rounds, per_task = _coordination(main)
        if not rounds:
            why = ("coordination is off in this run" if mode == "off" else
                   "this run type records no coordination counts" if main.mode in ("centralized", "evaluate",
                                                                                  "local-only")
                   else "no round recorded coordination counts")
            sec.blocks.append(Para(f"Coordination counts: {NOT_RECORDED} ({why}).", "missing"))
            return
        from server.report.plots import coordination

        sec.blocks.append(self.fig("coordination", lambda: coordination(rounds, per_task, main.skipped),
                                   "How often each subspace was corrected per round and task (stacked bars: rows "
                                   "projected in the tumour or the microenvironment half; line: rows whose halves "
                                   "conflicted), summed over sites.", "gradient coordination per round"))
        rows = []
        for i, r in enumerate(rounds):
            row = [str(r)]
            for task in per_task:
                p = per_task[task]
                row.append(f"{p['tumour'][i]:.0f} / {p['micro'][i]:.0f} / {p['conflicts'][i]:.0f}")
            rows.append(row)
        sec.blocks.append(Table(["round", *[f"{t}: tumour / micro / conflicts" for t in per_task]], rows,
                                caption="Coordination counts per round (all sites)"))
        self.derived["coordination"] = {"rounds": rounds, **per_task}

    # -- 7. limits

    def limits(self, sec: Section) -> None:
        main = self.main
        items: list[str] = []
        final = main.final or {}
        fed = main.section("federation")
        min_p = fed.get("min_site_patients")
        opted_in = [r.name for r in (main, *self.others) if r.section("data").get("allow_label_features") is True]
        if opted_in:
            facts = ", ".join(f.what for f in LABEL_FACTS)
            items.append(f"INPUTS MAY ENCODE THE LABELS: {', '.join(opted_in)} ran with data.allow_label_features: "
                         f"true, so sites could feed genomic features that measure a fact the labels are defined by "
                         f"({facts}). Diagnosis and grade numbers may then show the model reading the label off its "
                         "input, not what slides or expression tell it.")
        suppressed = [str(s) for s in (final.get("suppressed_sites") or (main.test or {}).get("suppressed") or [])]
        if suppressed:
            items.append(f"Small sites suppressed on the test split: {_fmt_sites(main, suppressed)}. A site with "
                         f"fewer than {min_p if min_p is not None else 'the minimum number of'} patients in a split "
                         "sends no numbers for it, so it is in neither the pooled nor the per-site results.")
        val_supp: dict[str, int] = {}
        for r in main.rounds:
            for s in (r.get("val") or {}).get("suppressed") or []:
                val_supp[main.site_name(s)] = val_supp.get(main.site_name(s), 0) + 1
        if val_supp:
            items.append("Suppressed in validation rounds (fewer patients than the minimum): "
                         + ", ".join(f"{s} in {n} round(s)" for s, n in val_supp.items()) + ".")
        if not suppressed and not val_supp:
            items.append(f"No site was suppressed (minimum {min_p if min_p is not None else '?'} patient(s) per "
                         "site and split); a site below it would report nothing and be missing from every table.")
        if "survival" in main.tasks:
            items.append(str((final.get("notes") or {}).get("survival.c_index") or C_INDEX_NOTE) + ". It is not "
                         "the C-index of the pooled patients, and sites with one patient or no event add no pairs.")
        info = main.site_info or {k: v for c in main.local.values() for k, v in c.site_info.items()}
        if info:
            synth = [main.site_name(k) for k, v in info.items() if (v or {}).get("synthetic")]
            if synth:
                items.append(f"SYNTHETIC DATA: {', '.join(synth)} hold synthetic patients (written by smm synth). "
                             "These numbers show that the pipeline runs end to end, not how the model would do on "
                             "real patients.")
            random_w = [main.site_name(k) for k, v in info.items()
                        if str((v or {}).get("weights") or "").lower() == "random"]
            if random_w:
                items.append(f"The slide encoder had random weights at {', '.join(random_w)}: histology features "
                             "carry no pretrained information, so any histology signal is what the small model "
                             "learned on top of random projections.")
        else:
            items.append("Whether the data is synthetic and which encoder weights were used is not recorded in this "
                         "run folder (no site_info: an older run).")
        n_test = (main.test or {}).get("patients")
        if isinstance(n_test, int) and n_test > 0:
            items.append(f"Sample size: {n_test} test patients in all. One patient moves a pooled accuracy by "
                         f"{100 / n_test:.1f} percentage points; no confidence intervals are given, and small "
                         "per-site splits make per-site metrics very noisy.")
        nan_lines = []
        for scope, rec in self._records_for_nan(main):
            values, reasons = (rec or {}).get("values") or {}, (rec or {}).get("reasons") or {}
            for k, v in values.items():
                if v is None or (isinstance(v, float) and not math.isfinite(v)):
                    metric = k.partition(".")[2] or k
                    why = reasons.get(k) or f"no reason recorded ({FALLBACK_REASONS.get(metric, 'undefined')})"
                    nan_lines.append(f"{scope}: {k} is undefined: {why}")
                elif k in reasons:
                    nan_lines.append(f"{scope}: {k} = {_num(v, k)} is partial: {reasons[k]}")
        if nan_lines:
            items.append(("Undefined or partial metrics on the test split (n/a or a note in the tables):",
                          nan_lines))
        bins = next((d["roc_bins"] for d in self.derived.values() if isinstance(d, dict) and "roc_bins" in d),
                    SCORE_BINS)
        more = [f"ROC curves and AUC come from score histograms with {bins} bins: scores within one bin "
                "count as ties, so AUC is exact only to about 1/bins.",
                f"Kaplan-Meier curves use times rounded down to the shared time grid{self._grid_step()}; risk groups "
                "are the model's predicted survival bins, and the log-rank test compares them on the test split (no "
                "adjustment for the groups being model-defined).",
                "Validation metrics guided model selection (the selected round is the best on validation), so "
                "validation curves are optimistic; only the test tables are held out."]
        if main.mode == "centralized" or any(r.mode == "centralized" for r in self.others):
            more.append("A centralized run pools all sites' training data on one machine: a reference for what the "
                        "data allows, not something a federation of hospitals could deploy.")
        refused = final.get("refused_sites") or {}
        if refused:
            more.append(f"Refused sites (not in any result): {_fmt_sites(main, list(refused))}.")
        for k, v in (final.get("notes") or {}).items():
            if k != "survival.c_index":
                more.append(f"{k}: {v}")
        if main.problems:
            more.append("The run is incomplete (see the run summary): results cover only what was recorded.")
        if self.errors:
            more.append("Parts of this report could not be built: " + "; ".join(self.errors))
        sec.blocks.append(Bullets(items + more))

    def _grid_step(self) -> str:
        grid = (self.main.test or {}).get("km_grid")
        if isinstance(grid, list) and len(grid) > 1 and all(isinstance(x, (int, float)) for x in grid[:2]):
            return f" ({grid[1] - grid[0]:g}-day steps)"
        return ""

    def _records_for_nan(self, run: RunData):
        test = run.test or {}
        if test.get("global"):
            yield "all sites pooled", test["global"]
        for key, rec in (test.get("per_site") or {}).items():
            yield run.site_name(key), rec


# --- metrics.json ---------------------------------------------------------------------------------------

def _strip_stats(record: Any) -> Any:
    """An evaluation record without the bulky pooled statistics (kept in final_metrics.json)."""
    if not isinstance(record, dict):
        return record
    out = {k: v for k, v in record.items() if k != "km_grid"}
    if isinstance(out.get("global"), dict):
        out["global"] = {k: v for k, v in out["global"].items() if k != "stats"}
    if isinstance(out.get("per_site"), dict):
        out["per_site"] = {s: ({k: v for k, v in r.items() if k != "stats"} if isinstance(r, dict) else r)
                           for s, r in out["per_site"].items()}
    return out


def _run_metrics(run: RunData) -> dict[str, Any]:
    final = run.final or {}
    curves: dict[str, Any] = {"rounds": [int(r["round"]) for r in run.rounds],
                              "status": [r.get("status") for r in run.rounds]}
    val_global: dict[str, list] = {}
    val_sites: dict[str, dict[str, list]] = {}
    for r in run.rounds:
        val = r.get("val") or {}
        for k in ((val.get("global") or {}).get("values") or {}):
            val_global.setdefault(k, [])
    for k in val_global:
        val_global[k] = [((r.get("val") or {}).get("global") or {}).get("values", {}).get(k) for r in run.rounds]
    for r in run.rounds:
        for key in ((r.get("val") or {}).get("per_site") or {}):
            val_sites.setdefault(str(key), {})
    for key in val_sites:
        for k in val_global:
            val_sites[key][k] = [(((r.get("val") or {}).get("per_site") or {}).get(key) or {}).get("values", {}).get(k)
                                 for r in run.rounds]
    curves["val_global"] = val_global
    curves["val_per_site"] = val_sites
    curves["train_loss"] = {name: {"rounds": x, "values": y} for name, (x, y) in _train_loss(run).items()}
    c_rounds, c_tasks = _coordination(run)
    sites = {}
    keys = list(run.site_info) or [str(s) for s in (final.get("sites") or [])]
    for k in keys:
        sites[str(k)] = {"name": run.site_name(k), "info": run.site_info.get(str(k))}
    out: dict[str, Any] = {
        "path": str(run.path), "label": run.label, "mode": run.mode, "mode_recorded": final.get("mode"),
        "complete": run.complete, "problems": run.problems, "events": run.events, "run": run.name,
        "tasks": run.tasks,
        "rounds": {"configured": run.rounds_configured,
                   "recorded": max([int(r["round"]) for r in run.rounds], default=None),
                   "skipped": run.skipped, "missing": run.missing_rounds},
        "selection": {k: final.get(k) for k in ("best_round", "selection_metric", "selection_value",
                                                "lower_is_better", "selection_note")} if final else None,
        "wall_s": final.get("wall_s"), "bytes": final.get("bytes"), "versions": final.get("versions"),
        "config_sha256": run.config_sha256, "config_sha256_source": run.config_sha_source,
        "model": final.get("model"), "sites": sites, "refused_sites": final.get("refused_sites"),
        "suppressed_sites": final.get("suppressed_sites"), "notes": final.get("notes"),
        "test": _strip_stats(run.test),
        "curves": curves,
        "coordination": {"rounds": c_rounds, **c_tasks} if c_rounds else None,
    }
    if "all_sites_test" in final:
        out["all_sites_test"] = _strip_stats(final["all_sites_test"])
    if run.local:
        out["local"] = {site: _run_metrics(child) for site, child in run.local.items()}
    return out


def build_metrics(runs: Sequence[RunData], derived: Mapping[str, Any] | None = None,
                  figures: Sequence[str] = (), errors: Sequence[str] = ()) -> dict[str, Any]:
    """metrics.json's content: one entry per run (the first is the reported run), test records as the
    runs recorded them (pooled ``stats`` left out), curves per round, and ``derived``: what the report
    computed from the pooled statistics of the first run (confusion matrices, per-class AUC, KM curves,
    the lifelines log-rank test)."""
    return {"format": METRICS_FORMAT, "version": 1,
            "generated_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "files": {"html": REPORT_HTML, "markdown": REPORT_MD,
                      "figures": [f"{FIGURES_DIR}/{n}.png" for n in figures]},
            "runs": [_run_metrics(r) for r in runs], "derived": dict(derived or {}), "report_errors": list(errors)}


# --- rendering ------------------------------------------------------------------------------------------

CSS = """
:root { --fg: #1a1a1a; --muted: #555; --line: #d0d0d0; --warn-bg: #fff4e5; --warn: #8a4b00; --miss: #6b6b6b; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: var(--fg);
       max-width: 1100px; margin: 0 auto; padding: 1.5rem; line-height: 1.45; font-size: 15px; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { border-bottom: 2px solid var(--fg); padding-bottom: .2rem; margin-top: 2.2rem; }
h3 { margin-top: 1.4rem; }
.meta { color: var(--muted); font-size: .9rem; }
nav.toc { border: 1px solid var(--line); padding: .6rem 1rem; display: inline-block; }
nav.toc ol { margin: .2rem 0; padding-left: 1.4rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .85rem; width: 100%; }
caption { text-align: left; font-weight: 600; padding: .2rem 0; }
th, td { border: 1px solid var(--line); padding: .25rem .45rem; text-align: left; vertical-align: top; }
td.long { overflow-wrap: anywhere; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
thead th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
ol.notes { font-size: .8rem; color: var(--muted); margin-top: -.4rem; }
figure { margin: 1rem 0; break-inside: avoid; page-break-inside: avoid; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: .85rem; color: var(--muted); }
.warning { background: var(--warn-bg); color: var(--warn); border-left: 4px solid var(--warn); padding: .4rem .7rem; }
ul.warning { padding-left: 2rem; }
.missing { color: var(--miss); font-style: italic; }
.note { color: var(--muted); }
code { font-size: .9em; }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  nav.toc { display: block; page-break-after: always; border: none; }
  h2 { page-break-before: always; break-after: avoid; }
  h2:first-of-type { page-break-before: avoid; }
  h3, caption { break-after: avoid; }
  tr, figure { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
  tbody tr:nth-child(even) { background: none; }
}
@page { size: A4; margin: 15mm; }
"""


def _is_num(cell: str) -> bool:
    """A cell to right-align: a short number or n/a (not a digest or a node id)."""
    head = cell.split(" [")[0]
    if len(head) > 12:
        return False
    try:
        float(head)
        return True
    except ValueError:
        return head == "n/a"


def _td(cell: str, col: int) -> str:
    """A table cell: numbers right-aligned; long tokens (digests, paths) may wrap anywhere."""
    if col and _is_num(cell):
        return f'<td class="num">{html.escape(cell)}</td>'
    if any(len(tok) > 24 for tok in cell.split()):
        return f'<td class="long">{html.escape(cell)}</td>'
    return f"<td>{html.escape(cell)}</td>"


def _html(sections: Sequence[Section], title: str, meta: Sequence[str]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<header><h1>{e(title)}</h1>", *[f'<p class="meta">{e(m)}</p>' for m in meta], "</header>",
           '<nav class="toc" id="contents"><strong>Contents</strong><ol>',
           *[f'<li><a href="#{s.id}">{e(s.title)}</a></li>' for s in sections], "</ol></nav>"]
    n_fig = 0
    for i, s in enumerate(sections, 1):
        out.append(f'<section id="{s.id}"><h2>{i}. {e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Para):
                out.append(f'<p class="{b.kind}">{e(b.text)}</p>' if b.kind else f"<p>{e(b.text)}</p>")
            elif isinstance(b, Bullets):
                cls = f' class="{b.kind}"' if b.kind else ""
                out.append(f"<ul{cls}>" + "".join(
                    f"<li>{e(x[0])}<ul>" + "".join(f"<li>{e(y)}</li>" for y in x[1]) + "</ul></li>"
                    if isinstance(x, tuple) else f"<li>{e(x)}</li>" for x in b.items) + "</ul>")
            elif isinstance(b, Heading):
                out.append(f"<h3>{e(b.text)}</h3>")
            elif isinstance(b, Table):
                out.append("<table>" + (f"<caption>{e(b.caption)}</caption>" if b.caption else ""))
                out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr></thead><tbody>")
                for row in b.rows:
                    out.append("<tr>" + "".join(_td(c, j) for j, c in enumerate(row)) + "</tr>")
                out.append("</tbody></table>")
                if b.notes:
                    out.append('<ol class="notes">' + "".join(f"<li>{e(n)}</li>" for n in b.notes) + "</ol>")
            elif isinstance(b, Fig):
                n_fig += 1
                data = base64.b64encode(b.png).decode("ascii")
                out.append(f'<figure id="fig-{b.name}"><img src="data:image/png;base64,{data}" alt="{e(b.alt)}">'
                           f"<figcaption>Figure {n_fig}. {e(b.caption)}</figcaption></figure>")
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    keep = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return keep.strip().replace(" ", "-")


def _markdown(sections: Sequence[Section], title: str, meta: Sequence[str]) -> str:
    out = [f"# {title}", "", *[f"{m}  " for m in meta], "", "## Contents", ""]
    out += [f"{i}. [{s.title}](#{_slug(f'{i}. {s.title}')})" for i, s in enumerate(sections, 1)]
    n_fig = 0
    for i, s in enumerate(sections, 1):
        out += ["", f"## {i}. {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Para):
                text = b.text
                out += [f"> **{text}**" if b.kind == "warning" else f"*{text}*" if b.kind == "missing" else text, ""]
            elif isinstance(b, Bullets):
                for x in b.items:
                    out += [f"- {x[0]}", *[f"  - {y}" for y in x[1]]] if isinstance(x, tuple) else [f"- {x}"]
                out.append("")
            elif isinstance(b, Heading):
                out += [f"### {b.text}", ""]
            elif isinstance(b, Table):
                if b.caption:
                    out += [f"**{b.caption}**", ""]
                out.append("| " + " | ".join(_md_cell(h) or " " for h in b.headers) + " |")
                out.append("|" + "".join(" ---: |" if j and b.rows and all(_is_num(r[j]) for r in b.rows)
                                         else " --- |" for j in range(len(b.headers))))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
                if b.notes:
                    out += [f"[{k}] {n}  " for k, n in enumerate(b.notes, 1)] + [""]
            elif isinstance(b, Fig):
                n_fig += 1
                out += [f"![{b.alt}]({FIGURES_DIR}/{b.name}.png)", "", f"*Figure {n_fig}. {b.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


def report_after_run(run_dir: str | Path) -> tuple[Path | None, str | None]:
    """Write a just-finished run's report: (report.html, None), or (None, why) when it could not be
    drawn. Never raises: a report must not turn a finished run, whose results are already on
    disk, into a failed one; the caller says why and how to retry (``smm report RUN_DIR``)."""
    try:
        return write_report([Path(run_dir)]), None
    except Exception as e:  # noqa: BLE001 - see the docstring
        return None, (f"the report could not be written ({type(e).__name__}: {e}); retry with "
                      f"`smm report {run_dir}`")


def write_report(run_dirs: Sequence[Path], out_dir: Path | None = None) -> Path:
    """Write report.html, report.md (+ report_files/*.png) and metrics.json; returns report.html's path.

    ``run_dirs[0]`` is the run reported on, the others are compared with it; ``out_dir`` defaults to
    ``run_dirs[0]``. Raises ``ReportError`` when a folder is not a run folder; anything missing
    inside a run folder is reported in the text instead.
    """
    if not run_dirs:
        raise ReportError("no run folder given")
    runs = [load_run(d) for d in run_dirs]
    _label_runs(runs)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    builder = _Builder(runs)
    sections = builder.sections()
    main = runs[0]
    title = f"fedsmm evaluation report: {main.name} ({main.mode})"
    meta = [f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by smm report from "
            f"{main.path}" + (f", compared with {', '.join(str(r.path) for r in runs[1:])}" if runs[1:] else "") + ".",
            ("Status: complete." if main.complete else
             f"Status: INCOMPLETE ({len(main.problems)} problem(s), listed in the run summary).")]
    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    names = {f.name for f in builder.figures}
    for old in fig_dir.glob("*.png"):  # figures of an earlier report that this one no longer has
        if old.stem not in names:
            old.unlink()
    for f in builder.figures:
        atomic_write_bytes(fig_dir / f"{f.name}.png", f.png)
    atomic_write_text(out_dir / REPORT_MD, _markdown(sections, title, meta))
    metrics = build_metrics(runs, builder.derived, [f.name for f in builder.figures], builder.errors)
    atomic_write_text(out_dir / METRICS_JSON, dumps(metrics, indent=2) + "\n")
    html_path = out_dir / REPORT_HTML
    atomic_write_text(html_path, _html(sections, title, meta))
    return html_path


def main(argv: Sequence[str] | None = None) -> int:
    """``smm report RUN_DIR [RUN_DIR ...] [--out DIR]``."""
    ap = argparse.ArgumentParser(prog="smm report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                    help="run folder(s): the first is reported on, the others are compared with it (centralized, "
                         "local-only, other federated runs, smm evaluate output)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="where report.html, report.md, report_files/ and metrics.json go (default: the first "
                         "RUN_DIR)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        path = write_report(args.run_dirs, args.out)
    except ReportError as e:
        print(f"smm report: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"smm report: cannot write the report: {e}", file=sys.stderr)
        return 1
    print(f"smm report: wrote {path}, {path.with_name(REPORT_MD)}, {path.with_name(METRICS_JSON)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
