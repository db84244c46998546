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

This module writes them (``write_report``; ``report_after_run`` at the end of a run, which never
raises) and is the CLI (``main``, which ``smm_model.cli`` maps ``smm report`` to). The stages live in
the modules of ``server.report``, each holding one thing::

    load             run folders -> RunData (tolerant: says what is missing; ReportError if no run folder)
    series, stats    per-round series from rounds.jsonl; statistics from the pooled test counts
                     (km_lifelines: Kaplan-Meier and log-rank recomputed with lifelines)
    sections         RunData -> the report's Sections (ReportBuilder), guarded section by section; results
                     (warnings, pooled test metrics with the gaps, participation) first, provenance last
    document         the Section/block model both renderers read, so report.html and report.md agree
    render_html      report.html
    render_markdown  report.md
    metrics          metrics.json (build_metrics)
    plots            the figures (PNG bytes)
    files            the names of the files written

The names in ``__all__`` are the report's public API and stay importable from here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from smm_model.contract.atomic import atomic_write_bytes, atomic_write_text, dumps
from smm_model.contract.classes import CLASS_NAMES

from server.report.files import FIGURES_DIR, METRICS_JSON, REPORT_HTML, REPORT_MD
from server.report.load import ReportError, RunData, label_runs, load_run
from server.report.metrics import build_metrics
from server.report.render_html import render_html
from server.report.render_markdown import render_markdown
from server.report.sections import ReportBuilder
from server.report.stats import km_lifelines

__all__ = ["REPORT_HTML", "REPORT_MD", "METRICS_JSON", "FIGURES_DIR", "CLASS_NAMES", "ReportError", "RunData",
           "load_run", "km_lifelines", "build_metrics", "write_report", "report_after_run", "main"]


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
    label_runs(runs)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    builder = ReportBuilder(runs)
    sections = builder.sections()
    main = runs[0]
    title = f"fedsmm evaluation report: {main.name} ({main.mode})"
    meta = [f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by smm report from "
            f"{main.path}" + (f", compared with {', '.join(str(r.path) for r in runs[1:])}" if runs[1:] else "") + ".",
            f"Status: {main.status}." + ("" if main.complete else " Every warning opens section 1, Results.")]
    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    names = {f.name for f in builder.figures}
    for old in fig_dir.glob("*.png"):  # figures of an earlier report that this one no longer has
        if old.stem not in names:
            old.unlink()
    for f in builder.figures:
        atomic_write_bytes(fig_dir / f"{f.name}.png", f.png)
    atomic_write_text(out_dir / REPORT_MD, render_markdown(sections, title, meta))
    metrics = build_metrics(runs, builder.derived, [f.name for f in builder.figures], builder.errors,
                            builder.warnings)
    atomic_write_text(out_dir / METRICS_JSON, dumps(metrics, indent=2) + "\n")
    html_path = out_dir / REPORT_HTML
    atomic_write_text(html_path, render_html(sections, title, meta))
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
