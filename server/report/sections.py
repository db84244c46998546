"""The report's content: ``ReportBuilder`` turns loaded runs into the document model's ``Section``s.

The first run is the one reported on; the others are compared with it (a centralized baseline, a
local-only run, another federated run, an external evaluation). The sections are in the order a
coordinator reads them after a run, a fault included: results first (every warning in one list,
the selected model's pooled test metrics beside the compared runs with the gaps, and which site
took part in which round), then learning curves (with every round), final test results per task
and scope, diagnosis and grade (confusion matrices, ROC curves), survival (Kaplan-Meier curves by
predicted risk group and the log-rank test, recomputed with lifelines and checked against the
recorded value), gradient coordination, the run summary (with the sites and their data), what
these numbers cannot say, and last the provenance (folders, versions, hashes, data digests).

Every section and every figure is built under a guard: one that fails becomes a sentence saying
so (and an entry of ``errors``) rather than taking the report down, since the report is written at
the end of every run. What a section computes from the pooled statistics beyond the records is
kept in ``derived`` for metrics.json. Figures come from ``server.report.plots``, imported inside
the sections that draw (matplotlib only once a report is drawn); all text formatting of numbers
for the tables (``_num``, ``_bytes``, ``_seconds``) is here too, since only the sections format.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from smm_model.config import TASK_CLASSES
from smm_model.contract import wire
from smm_model.contract.classes import CLASS_NAMES, SHORT_CLASS_NAMES
from smm_model.contract.label_facts import LABEL_FACTS
from smm_model.contract.runfolder import C_INDEX_NOTE
from smm_model.metrics.federated import SCORE_BINS

from server.report.document import Bullets, Fig, Heading, Para, Section, Table
from server.report.load import NOT_RECORDED, RunData, fmt_rounds, fmt_sites, natural_key
from server.report.series import coordination_counts, metric_value, train_loss, val_series
from server.report.stats import count_matrix, km_lifelines, pooled_km, pooled_stats, score_hist

__all__ = ["ReportBuilder", "METRIC_LABELS", "TASK_METRICS", "CURVE_METRICS", "GAP_METRICS", "FALLBACK_REASONS",
           "PROVENANCE_ROWS"]

log = logging.getLogger("fedsmm.server.report")

METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
                 "auc": "AUC (one-vs-rest, macro)", "c_index": "C-index (within-site)",
                 "logrank_chi2": "log-rank chi-square", "logrank_p": "log-rank p", "loss": "loss"}
TASK_METRICS = {"diagnosis": ("accuracy", "balanced_accuracy", "macro_f1", "auc"),
                "grade": ("accuracy", "balanced_accuracy", "macro_f1", "auc"),
                "survival": ("c_index", "logrank_chi2", "logrank_p")}
CURVE_METRICS = {"diagnosis": ("accuracy", "balanced_accuracy", "macro_f1", "auc"),
                 "grade": ("accuracy", "balanced_accuracy", "macro_f1", "auc"), "survival": ("c_index",)}
#: Metrics where higher is better, so a difference between two runs reads as a gap; the log-rank
#: statistics measure how far apart the risk groups are, and their difference means nothing.
GAP_METRICS = frozenset({"accuracy", "balanced_accuracy", "macro_f1", "auc", "c_index"})
#: Rows of the runs table that identify what ran (the provenance section at the end), not how it went.
PROVENANCE_ROWS = ("folder", "versions", "config sha256", "model sha256")
#: Why a metric can be undefined when the run recorded no reason (older folders).
FALLBACK_REASONS = {"logrank_chi2": "the log-rank test needs patients in at least two predicted risk groups",
                    "logrank_p": "the log-rank test needs patients in at least two predicted risk groups",
                    "c_index": "no comparable pair", "auc": "no class has both positives and negatives"}


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


def _metric(rec: dict | None, task: str, metric: str) -> float | None:
    return metric_value(rec, f"{task}.{metric}")


def _gap(a: Any, b: Any) -> str:
    """``a - b`` of two metric values, signed ("+0.012"), "n/a" when either is undefined."""
    if _num(a) == "n/a" or _num(b) == "n/a":
        return "n/a"
    return f"{a - b:+.3f}"



class ReportBuilder:
    """Builds the sections of one report (the first run plus comparisons)."""

    def __init__(self, runs: Sequence[RunData]) -> None:
        self.runs = list(runs)
        self.main = self.runs[0]
        self.others = self.runs[1:]
        self.figures: list[Fig] = []
        self.errors: list[str] = []
        self.derived: dict[str, Any] = {}
        try:
            self.warnings: list[str] = self._warnings()
        except Exception as e:  # noqa: BLE001 - like a section: the report is written at the end of every run
            self.errors.append(f"warnings: {type(e).__name__}: {e}")
            log.warning("report warnings failed: %s", traceback.format_exc())
            self.warnings = [*self.main.problems, f"The report's other warnings could not be collected "
                                                  f"({type(e).__name__}: {e}); read every section."]

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
        return [self.guarded("results", "Results", self.results),
                self.guarded("curves", "Learning curves", self.curves),
                self.guarded("test", "Final test results", self.test_tables),
                self.guarded("classification", "Diagnosis and grade", self.classification),
                self.guarded("survival", "Survival", self.survival),
                self.guarded("coordination", "Gradient coordination", self.coordination),
                self.guarded("summary", "Run summary", self.summary),
                self.guarded("limits", "What these numbers cannot say", self.limits),
                self.guarded("provenance", "Provenance", self.provenance)]

    # -- 1. results: what a coordinator reads first

    def _warnings(self) -> list[str]:
        """Every warning of the report in one list, the first thing it shows: what is incomplete or
        failed (with the reason and how to resume), the sites that missed a step, a selection over
        different sites, the server's selection note, the compared runs' problems, then the data
        caveats (inputs that may encode the labels, suppressed sites, synthetic data, random encoder
        weights). Built before the sections, so a section that fails cannot hide one."""
        main = self.main
        out = list(main.problems)
        part = main.participation
        if part is not None and part.selection_warning:
            out.append(part.selection_warning[0].upper() + part.selection_warning[1:])
        note = (main.final or {}).get("selection_note")
        if note:
            out.append(f"Selection note recorded by the server: {note}")
        for other in self.others:
            out += [f"Compared run {other.label}: {p}" for p in other.problems]
        out += self._caveats()[0]
        if main.events:
            out.append(f"{len(main.events)} event(s) during the run (dropped or clamped updates, sites joining "
                       "late or refused) are listed in the run summary.")
        return out

    def _caveats(self) -> tuple[list[str], list[str]]:
        """(warnings, notes) about the data behind the numbers: the warnings open the report and
        head its limits section; the notes (nothing suppressed, provenance not recorded) only the latter."""
        main = self.main
        warn: list[str] = []
        notes: list[str] = []
        final = main.final or {}
        min_p = main.section("federation").get("min_site_patients")
        opted_in = [r.name for r in (main, *self.others) if r.section("data").get("allow_label_features") is True]
        if opted_in:
            facts = ", ".join(f.what for f in LABEL_FACTS)
            warn.append(f"INPUTS MAY ENCODE THE LABELS: {', '.join(opted_in)} ran with data.allow_label_features: "
                        f"true, so sites could feed genomic features that measure a fact the labels are defined by "
                        f"({facts}). Diagnosis and grade numbers may then show the model reading the label off its "
                        "input, not what slides or expression tell it.")
        suppressed = [str(s) for s in (final.get("suppressed_sites") or (main.test or {}).get("suppressed") or [])]
        if suppressed:
            warn.append(f"Small sites suppressed on the test split: {fmt_sites(main, suppressed)}. A site with "
                        f"fewer than {min_p if min_p is not None else 'the minimum number of'} patients in a split "
                        "sends no numbers for it, so it is in neither the pooled nor the per-site results.")
        val_supp: dict[str, int] = {}
        for r in main.rounds:
            for s in (r.get("val") or {}).get("suppressed") or []:
                val_supp[main.site_name(s)] = val_supp.get(main.site_name(s), 0) + 1
        if val_supp:
            warn.append("Suppressed in validation rounds (fewer patients than the minimum): "
                        + ", ".join(f"{s} in {n} round(s)" for s, n in val_supp.items()) + ".")
        if not suppressed and not val_supp:
            notes.append(f"No site was suppressed (minimum {min_p if min_p is not None else '?'} patient(s) per "
                         "site and split); a site below it would report nothing and be missing from every table.")
        info = main.site_info or {k: v for c in main.local.values() for k, v in c.site_info.items()}
        if info:
            synth = [main.site_name(k) for k, v in info.items() if (v or {}).get("synthetic")]
            if synth:
                warn.append(f"SYNTHETIC DATA: {', '.join(synth)} hold synthetic patients (written by smm synth). "
                            "These numbers show that the pipeline runs end to end, not how the model would do on "
                            "real patients.")
            random_w = [main.site_name(k) for k, v in info.items()
                        if str((v or {}).get("weights") or "").lower() == "random"]
            if random_w:
                warn.append(f"The slide encoder had random weights at {', '.join(random_w)}: histology features "
                            "carry no pretrained information, so any histology signal is what the small model "
                            "learned on top of random projections.")
        else:
            notes.append("Whether the data is synthetic and which encoder weights were used is not recorded in this "
                         "run folder (no site_info: an older run).")
        return warn, notes

    def results(self, sec: Section) -> None:
        main = self.main
        final = main.final or {}
        if not main.complete:
            status = f": {len(main.problems)} problem(s), the first warnings below."
        elif main.participation is not None:
            status = " (every configured site took part in every round and the final test)."
        else:
            status = "."
        sec.blocks.append(Para(f"Status: {main.status_word}{status}", "" if main.complete else "warning"))
        if self.warnings:
            sec.blocks.append(Para(f"Warnings ({len(self.warnings)}): read these before the numbers.", "warning"))
            sec.blocks.append(Bullets(list(self.warnings), "warning"))
        else:
            sec.blocks.append(Para("No warnings: the run finished, every configured site took part in every "
                                   "round and the final test, and no caveat about the data applies.", "note"))
        if main.final is None and not main.local:
            sec.blocks.append(Para("No test results: final_metrics.json is missing (the run did not finish); the "
                                   "rounds recorded so far are in the learning curves.", "missing"))
        else:
            if final.get("best_round") is not None:
                sec.blocks.append(Para(
                    f"The selected model: round {final.get('best_round')} by validation "
                    f"{final.get('selection_metric', '?')}, on every site's test split "
                    f"({(main.test or {}).get('patients', '?')} patients, all sites pooled)"
                    + (", beside the compared runs; gap rows are this run minus the compared one (positive: this "
                       "run is better)" if self.others else "") + ". Per-site results are in the final test results."))
            for task in main.tasks or [t for r in self.runs for t in r.tasks]:
                sec.blocks.append(self._headline_table(task))
        if main.participation is not None:
            sec.blocks.append(Heading("Participation"))
            sec.blocks.append(self._participation_table(main))

    def _headline_table(self, task: str) -> Table:
        """One task's pooled test metrics: this run, each compared run, then the gaps to the
        centralized runs, the best and the mean local-only model, and the other runs."""
        metrics = TASK_METRICS[task]
        notes = _Notes()
        rows = []
        pooled: list[tuple[RunData, Any, dict | None]] = []
        for run in self.runs:
            for label, patients, rec, why in self._rows_for(run, None):
                rows.append([label, str(patients) if patients is not None else "—",
                             *self._metric_cells(task, metrics, rec, why, notes)])
                pooled.append((run, patients, rec))
        mine = pooled[0][2] if pooled and pooled[0][0] is self.main and not self.main.local else None
        if mine is not None:
            for other in self.others:
                recs = [rec for run, _p, rec in pooled if run is other and rec is not None]
                if not recs:
                    continue
                theirs = {n for run, n, rec in pooled if run is other and rec is not None}
                if theirs != {pooled[0][1]}:  # a gap over other patients is no like-for-like comparison
                    notes_ref = notes.ref(f"{other.label} was tested on other patients ("
                                          f"{'/'.join(map(str, sorted(theirs, key=str)))}) than this run "
                                          f"({pooled[0][1]}): its gap compares different test sets")
                else:
                    notes_ref = None
                mark = f" [{notes_ref}]" if notes_ref else ""
                if other.local:
                    best = {m: max((v for v in (_metric(r, task, m) for r in recs) if v is not None), default=None)
                                for m in metrics}
                    mean = {m: (float(np.mean(vals)) if (vals := [v for v in (_metric(r, task, m) for r in recs)
                                                                  if v is not None]) else None) for m in metrics}
                    rows.append([f"gap: minus the best local-only model ({other.label}; best per metric){mark}", "",
                                 *self._gap_cells(task, metrics, mine, best)])
                    rows.append([f"gap: minus the local-only mean ({len(recs)} site models){mark}", "",
                                 *self._gap_cells(task, metrics, mine, mean)])
                else:
                    rows.append([f"gap: minus {other.label}{mark}", "",
                                 *self._gap_cells(task, metrics, mine, {m: _metric(recs[0], task, m)
                                                                        for m in metrics})])
        return Table(["run", "test patients", *[METRIC_LABELS[m] for m in metrics]], rows,
                     caption=f"{task}: the selected model's test metrics, all sites pooled"
                             + (", with the compared runs and the gaps" if self.others else ""), notes=notes.items)

    @staticmethod
    def _gap_cells(task: str, metrics: Sequence[str], mine: dict, ref: dict[str, float | None]) -> list[str]:
        return [_gap(_metric(mine, task, m), ref.get(m)) if m in GAP_METRICS else "—" for m in metrics]

    @staticmethod
    def _participation_table(run: RunData) -> Table:
        part = run.participation
        assert part is not None
        rows = []
        for key, sp in part.per_site.items():
            missed = [w for w in (f"training: {fmt_rounds(sp.missed_train, False)}" if sp.missed_train else "",
                                  f"validation: {fmt_rounds(sp.missed_val, False)}" if sp.missed_val else "",
                                  "final test" if sp.final_test is False else "") if w]
            rows.append([run.site_name(key), f"{fmt_rounds(sp.trained, False)} of {fmt_rounds(part.aggregated, False)}",
                         f"{fmt_rounds(sp.validated, False)} of {fmt_rounds(list(part.val_sites), False)}",
                         {True: "yes", False: "NO"}.get(sp.final_test, "not recorded (no final test)"),
                         "; ".join(missed) or "—"])
        return Table(["site", "rounds trained (of aggregated)", "models validated (of validated rounds; 0: the "
                      "initial model)", "final test", "missed"], rows,
                     caption=f"Participation of the configured sites ({part.source}); a suppressed site took part, "
                             "it had too few patients to send numbers"
                             + ("; with partial sampling (fraction_train or fraction_evaluate below 1) a site is "
                                "expected only in the rounds it was sampled for" if part.sampled_only else ""))

    def _metric_cells(self, task: str, metrics: Sequence[str], rec: dict | None, why: str,
                      notes: _Notes) -> list[str]:
        """One row's metric cells: the value, or n/a with a numbered note saying why."""
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
        return cells

    # -- 7. summary

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
        sites = final.get("sites") if "sites" in final else (run.failure or {}).get("sites")
        if run.local:
            sites_s = ", ".join(run.local)
        elif isinstance(sites, list):
            sites_s = f"{len(sites)}: {fmt_sites(run, sites)}"
            missed = [k for k, sp in (run.participation.per_site if run.participation else {}).items()
                      if not sp.took_part_everywhere]
            if missed:
                sites_s += (f"; {fmt_sites(run, missed)} did not take part in every round and the final test "
                            "(participation: Results)")
        else:
            sites_s = NOT_RECORDED
        msha = (final.get("model") or {}).get("sha256")
        return {
            "folder": str(run.path), "mode": run.mode + ("" if final.get("mode") or run.local else
                                                         " (no mode recorded; inferred)"),
            "status": run.status, "run name": run.name, "sites": sites_s,
            "tasks": ", ".join(run.tasks) or NOT_RECORDED, "model": model, "strategy": strategy,
            "rounds": rounds, "selected model": sel, "wall time": wall_s, "bytes exchanged": bytes_s,
            "versions": versions_s,
            "config sha256": (f"{run.config_sha256} ({run.config_sha_source})" if run.config_sha256
                              else NOT_RECORDED),
            "model sha256": str(msha) if msha else NOT_RECORDED,
        }

    def _runs_table(self, provenance: bool, caption: str) -> Table:
        """The runs side by side: what ran and how it went (``provenance`` False) or what identifies
        it (the ``PROVENANCE_ROWS``), one column per run."""
        rows = [self._summary_rows(r) for r in self.runs]
        keys = [k for k in rows[0] if (k in PROVENANCE_ROWS) == provenance]
        return Table(["", *[r.label for r in self.runs]], [[k, *[row[k] for row in rows]] for k in keys],
                     caption=caption)

    def summary(self, sec: Section) -> None:
        main = self.main
        if not main.complete:
            sec.blocks.append(Para("The status row lists every problem; they open the report too (Results).", "note"))
        sec.blocks.append(self._runs_table(False, "Runs in this report (the first is the one reported on)"))
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
                             NOT_RECORDED])
            sec.blocks.append(Para("Per-site data provenance (patients and events per split, data digests, "
                                   "synthetic or not, encoder weights) is not recorded in this run folder "
                                   "(site_info is absent: an older run). Patients below are those evaluated.",
                                   "missing"))
            sec.blocks.append(Table(["site", "key", "train patients", "val patients (round 0)", "test patients",
                                     "events"], rows))
            return
        rows = []
        for key, si in info.items():
            si = si if isinstance(si, dict) else {}
            splits = si.get("splits") or {}

            def split(s: str, f: str) -> str:
                v = (splits.get(s) or {}).get(f)
                return str(v) if v is not None else "—"

            excluded = si.get("excluded") or {}
            rows.append([
                run.site_name(key), str(key),
                " / ".join(split(s, "patients") for s in ("train", "val", "test")),
                " / ".join(split(s, "events") for s in ("train", "val", "test")),
                " / ".join(split(s, "survival_labelled") for s in ("train", "val", "test")),
                ", ".join(f"{k}: {v}" for k, v in excluded.items()) or "none",
                {True: "yes", False: "no"}.get(si.get("synthetic"), NOT_RECORDED),
                f"{si.get('encoder') or '—'} ({si.get('weights') or 'weights not recorded'})",
            ])
        sec.blocks.append(Table(["site", "key", "patients train / val / test", "events train / val / test",
                                 "survival-labelled train / val / test", "excluded patients", "synthetic",
                                 "encoder (weights)"], rows,
                                caption="Sites as recorded by the run (their data digests: provenance)"))
        notes = []
        for key, si in info.items():
            d = (si or {}).get("disclosure") or {}
            if d.get("min_cell"):
                what = "; ".join(d.get("coarsened") or []) or "nothing needed coarsening"
                notes.append(f"{run.site_name(key)} (k = {d['min_cell']}): {what}")
        if notes:
            sec.blocks.append(Para("Disclosure control at the sites: every count a site sent is 0 or at least k "
                                   "(suppressed counts are shown as 0, merged histograms at coarser resolution; "
                                   "Kaplan-Meier counts come from the test split only). What each site coarsened "
                                   "in its preflight summary: " + " · ".join(notes) + ".", "note"))
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
                for name, (x, y) in train_loss(child).items():
                    loss_series.append(Series(f"{site} alone", x, y))
        else:
            loss_series = [Series(n, x, y) for n, (x, y) in train_loss(main).items()]
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
                        x, y, _ = val_series(child, key)
                        series.append(Series(f"{site} alone (own validation split)", x, y))
                else:
                    x, y, sites = val_series(main, key)
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
            tables = [t for t in (self._privacy_table(main), self._central_dp_table(main)) if t is not None]
            if tables:
                sec.blocks.append(Heading("Differential privacy"))
                sec.blocks.extend(tables)

    @staticmethod
    def _privacy_table(run: RunData) -> Table | None:
        """Per round and site, what each site's DP-SGD accounted (the sites' own ledgers: epsilon is
        cumulative over everything a site's ledger holds, earlier runs included)."""
        rows = []
        for r in run.training_rounds:
            for node, m in sorted(((r.get("train") or {}).get("per_site") or {}).items()):
                if not isinstance(m, dict) or wire.DP_EPSILON not in m:
                    continue
                rows.append([str(r["round"]), run.site_name(node), f"{m[wire.DP_EPSILON]:.3f}",
                             f"{m.get(wire.DP_DELTA, float('nan')):.0e}", f"{m.get(wire.DP_SIGMA, float('nan')):.3f}",
                             f"{m.get(wire.DP_CLIP, float('nan')):.3g}", f"{m.get(wire.DP_SAMPLE_RATE, float('nan')):.3f}",
                             str(m.get(wire.STEPS, "—"))])
        if not rows:
            return None
        return Table(["round", "site", "epsilon (cumulative at the site)", "delta", "noise multiplier",
                      "clipping norm", "sample rate", "steps"], rows,
                     caption="Patient-level DP-SGD as each site accounted it (Opacus; one ledger per site, "
                             "never reset by a round, a run or a restart). The statistics the sites sent "
                             "(counts, evaluation) are protected by the cell rules, not by DP.")

    @staticmethod
    def _central_dp_table(run: RunData) -> Table | None:
        """Per aggregated round, the server's central DP release (privacy.central_dp)."""
        rows = []
        for r in run.training_rounds:
            c = (r.get("train") or {}).get("central_dp")
            if not isinstance(c, dict):
                continue
            rows.append([str(r["round"]), f"{c.get('epsilon', float('nan')):.3f}", f"{c.get('delta', float('nan')):.0e}",
                         f"{c.get('sigma', float('nan')):.3f}", f"{c.get('clip', float('nan')):.3g}",
                         f"{c.get('clipped', '—')} of {c.get('sites', '—')}"])
        if not rows:
            return None
        return Table(["round", "epsilon (cumulative, site-level)", "delta", "noise multiplier", "clipping norm",
                      "updates clipped"], rows,
                     caption="Central DP at the server: each site's update clipped, the sum noised before the "
                             "model left the server (one release per aggregated round, no sampling "
                             "amplification claimed). It protects a site's contribution from the other sites "
                             "and anyone given a model, not from the server, which sees every update.")

    def _comparison_curve(self, run: RunData, key: str):
        if run.local:
            for site, child in run.local.items():
                x, y, _ = val_series(child, key)
                if x:
                    yield x, y, f"{run.label} ({site} alone)"
        else:
            x, y, _ = val_series(run, key)
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
                   _num(metric_value(val.get("global"), "loss"), "loss")]
            if extra:
                row.append(_num(metric_value(val.get("global"), str(sel_metric)), str(sel_metric)))
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
        return sorted(names, key=natural_key)

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
                        cells = self._metric_cells(task, metrics, rec, why, notes)
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
        stats = pooled_stats(main.test)
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
            cm = count_matrix(stats.get(f"{task}-confusion"), C)
            hist = score_hist(stats.get(f"{task}-hist"), C)
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
        stats = pooled_stats(main.test)
        km = pooled_km(stats, main.test or {}) if stats else None
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

        recorded_p = metric_value((main.test or {}).get("global"), "survival.logrank_p")
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
        stats = pooled_stats(self.main.test)
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
        rounds, per_task = coordination_counts(main)
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

    # -- 8. limits

    def limits(self, sec: Section) -> None:
        main = self.main
        warn, notes = self._caveats()
        items: list[str] = [*warn, *notes]
        final = main.final or {}
        if "survival" in main.tasks:
            items.append(str((final.get("notes") or {}).get("survival.c_index") or C_INDEX_NOTE) + ". It is not "
                         "the C-index of the pooled patients, and sites with one patient or no event add no pairs.")
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
            more.append(f"Refused sites (not in any result): {fmt_sites(main, list(refused))}.")
        for k, v in (final.get("notes") or {}).items():
            if k != "survival.c_index":
                more.append(f"{k}: {v}")
        if main.problems:
            more.append("The run is incomplete (see the warnings in Results): results cover only what was recorded.")
        if self.errors:
            more.append("Parts of this report could not be built: " + "; ".join(self.errors))
        sec.blocks.append(Bullets(items + more))

    # -- 9. provenance

    def provenance(self, sec: Section) -> None:
        """What identifies the runs and the data (folders, versions, hashes, the sites' data digests),
        last: needed to reproduce or audit a result, not to read it."""
        sec.blocks.append(self._runs_table(True, "What identifies each run (the first is the one reported on)"))
        main = self.main
        info = main.site_info or {k: v for c in main.local.values() for k, v in c.site_info.items()}
        if not info:
            sec.blocks.append(Para(f"The sites' data digests: {NOT_RECORDED} (no site_info: an older run).",
                                   "missing"))
            return
        rows = [[main.site_name(k), str(k), (str(d)[:16] + "…") if (d := (v or {}).get("data_digest")) else NOT_RECORDED]
                for k, v in info.items()]
        sec.blocks.append(Table(["site", "key", "data digest (sha256, first 16)"], rows,
                                caption="The sites' data as preflighted (full digests in metrics.json)"))

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
