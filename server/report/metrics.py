"""metrics.json: the report's numbers for machines (``build_metrics``).

One entry per run (the first is the run reported on): its test record exactly as
final_metrics.json holds it minus the bulky pooled statistics (``_strip_stats``; they stay in
final_metrics.json), what is missing or happened (``problems``, ``events``), the curves per round
and its coordination counts; a local-only run nests its per-site runs. ``derived`` is what the
report's sections computed from the first run's pooled statistics (``ReportBuilder.derived``:
confusion matrices, per-class AUC, Kaplan-Meier curves, the lifelines log-rank test).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from server.report.files import FIGURES_DIR, REPORT_HTML, REPORT_MD
from server.report.load import RunData
from server.report.series import coordination_counts, train_loss

__all__ = ["METRICS_FORMAT", "build_metrics"]

METRICS_FORMAT = "fedsmm-report-metrics"


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


def _participation(run: RunData) -> dict[str, Any] | None:
    """A federated run's participation as the report shows it: per configured site, the rounds it
    trained in, whose model it validated and missed, and whether it took part in the final test."""
    part = run.participation
    if part is None:
        return None
    return {"sites": part.sites, "source": part.source, "aggregated_rounds": part.aggregated,
            "validated_by": {str(n): keys for n, keys in part.val_sites.items()},
            "sampled_only": part.sampled_only, "selection_warning": part.selection_warning,
            "per_site": {k: {"name": run.site_name(k), "trained": sp.trained, "validated": sp.validated,
                             "missed_train": sp.missed_train, "missed_val": sp.missed_val,
                             "final_test": sp.final_test} for k, sp in part.per_site.items()}}


def _run_metrics(run: RunData) -> dict[str, Any]:
    """One run's entry of ``runs`` (a local-only run's per-site runs nested under ``local``)."""
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
    curves["train_loss"] = {name: {"rounds": x, "values": y} for name, (x, y) in train_loss(run).items()}
    c_rounds, c_tasks = coordination_counts(run)
    sites = {}
    keys = list(run.site_info) or [str(s) for s in (final.get("sites") or [])]
    for k in keys:
        sites[str(k)] = {"name": run.site_name(k), "info": run.site_info.get(str(k))}
    out: dict[str, Any] = {
        "path": str(run.path), "label": run.label, "mode": run.mode, "mode_recorded": final.get("mode"),
        "complete": run.complete, "status": run.status, "participation": _participation(run),
        "problems": run.problems, "events": run.events, "run": run.name,
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
                  figures: Sequence[str] = (), errors: Sequence[str] = (),
                  warnings: Sequence[str] = ()) -> dict[str, Any]:
    """metrics.json's content: one entry per run (the first is the reported run), test records as the
    runs recorded them (pooled ``stats`` left out), curves per round, and ``derived``: what the report
    computed from the pooled statistics of the first run (confusion matrices, per-class AUC, KM curves,
    the lifelines log-rank test); ``warnings``: the report's warnings, as its Results section lists them."""
    return {"format": METRICS_FORMAT, "version": 1,
            "generated_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "files": {"html": REPORT_HTML, "markdown": REPORT_MD,
                      "figures": [f"{FIGURES_DIR}/{n}.png" for n in figures]},
            "warnings": list(warnings), "runs": [_run_metrics(r) for r in runs], "derived": dict(derived or {}),
            "report_errors": list(errors)}
