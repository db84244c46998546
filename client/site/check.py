"""``smm site check SITE_DIR``: validate a site folder end to end before it joins a federation.

Run locally at the hospital. It checks the schema of every file, the feature files against
slides.csv and the manifest (every slide extracted, readable, same encoder and feature width,
checksums), the genomic table against the gene set, the labels and the splits, then prints a
summary: counts per split, per class and events. It never prints genomic values or a patient's
labels; patient ids appear only in error messages, which the operator needs to fix the row.

A gene set that feeds the model a feature measuring a fact the label rules read (IDH1_mut,
CDKN2A_cnv, a 1p/19q or grade column: ``smm_model.contract.label_facts``) is an error: the model would
read its labels off its input. ``data.allow_label_features: true`` turns it into a warning (the
server's preflight applies the same rule and the same opt-in). Such a column in the genomic table
that the gene set does not list is not an input, and only warned about.

Exit status: 0 when the folder is usable (warnings allowed), 1 when it has errors, 2 for a usage
or configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smm_model.config import ConfigError, DataConfig, ExperimentConfig
from smm_model.contract.sites import MODALITIES

if TYPE_CHECKING:  # the data modules (pandas, h5py, torch) load only when a check runs, not for --help
    from client.site.dataset import SiteData
    from client.site.validation import Report

__all__ = ["main", "check_site", "MIN_TRAIN_EVENTS", "LEAKAGE_RANK_CORR"]

#: Fewer training events than this makes the survival loss and C-index unreliable.
MIN_TRAIN_EVENTS = 5
#: A genomic feature whose rank correlation with survival time reaches this is suspect.
LEAKAGE_RANK_CORR = 0.99
_DIAG_SHORT = ("GBM", "A4", "A2-3", "Oligo")


def _survival_leakage(site: SiteData, report: Report) -> None:
    """Warn about genomic features that track survival time almost perfectly in the training split:
    usually a label copied into the genomic table (lifelines' complete-separation heuristic)."""
    import warnings

    import numpy as np
    import pandas as pd

    pos = site.clinical.positions(site.patients("train"))
    known = site.clinical.survival_known[pos]
    if known.sum() < 10:
        return
    patients = [site.patients("train")[i] for i in np.flatnonzero(known)]
    x = site.genomics.values.loc[patients]
    t = pd.Series(site.clinical.survival_time[pos][known], index=x.index)
    with warnings.catch_warnings():  # constant features have no rank correlation: nan, not a finding
        warnings.simplefilter("ignore")
        rho = x.corrwith(t, method="spearman").abs()
    leaky = list(rho[rho >= LEAKAGE_RANK_CORR].index)
    if leaky:
        report.warn(f"{site.genomics.source}: feature(s) {', '.join(repr(f) for f in leaky[:5])}"
                    f"{' and more' if len(leaky) > 5 else ''} have |rank correlation| >= {LEAKAGE_RANK_CORR} with "
                    "survival time in the training split: is a label in the genomic table?")


def _label_features(site_dir: Path | str, data: DataConfig, report: Report) -> None:
    """Refuse genomic inputs that measure a label fact (an error, or a warning with the opt-in), and
    warn about such columns of the genomic table that the gene set leaves out (not inputs).

    Reads the gene set and the table's header itself, so it still runs when another stage failed
    (their errors are already in the report, so failures to read are not reported twice).
    """
    from client.site.dataset import find_genomics_file
    from client.site.genomics import read_geneset, read_table_columns
    from client.site.folder import SiteLayout
    from client.site.validation import SiteDataError
    from smm_model.contract.label_facts import OPT_IN_HINT, describe_hits, label_feature_hits

    layout = SiteLayout(Path(site_dir))
    try:
        inputs = read_geneset(layout.geneset).features
    except SiteDataError:
        inputs = ()
    try:
        table = find_genomics_file(layout)
        columns = read_table_columns(table)
    except SiteDataError:
        table, columns = None, []
    hits = label_feature_hits(inputs)
    if hits:
        where = f" (values in {table})" if table is not None else ""
        msg = (f"{layout.geneset}: feature(s) {describe_hits(hits)} measure a fact the label rules read, so the "
               f"model could read its labels off its input{where}")
        if data.allow_label_features:
            report.warn(f"{msg}; accepted because data.allow_label_features is true (the run's report says so)")
        else:
            report.error(f"{msg}; {OPT_IN_HINT}")
    listed = set(inputs)
    unused = label_feature_hits(c for c in columns if c not in listed)
    if unused and table is not None:
        report.warn(f"{table}: column(s) {describe_hits(unused)} measure a fact the label rules read; they are not "
                    f"model inputs ({layout.geneset.name} does not list them), but keeping them out of the table "
                    "avoids listing them by mistake")


def check_site(site_dir: Path | str, cfg: ExperimentConfig | None = None, *, explicit_config: bool = False,
               checksums: bool = True) -> dict[str, Any]:
    """Check one site folder; returns ``{"site", "ok", "errors", "warnings", "notes", "summary"}``.

    ``explicit_config``: the run's config was given, so its model dimensions must match the site
    (feature width, gene-vector widths); otherwise they are reported as what the config needs.
    """
    from client.site.dataset import inspect_site
    from client.site.labels import DIAGNOSES

    cfg = cfg or ExperimentConfig()
    model, data = cfg.model, cfg.data
    require_features = model.arch != "snn"
    site, report = inspect_site(site_dir, data, require_features=require_features,
                                feature_dim=model.feature_dim if explicit_config else None, checksums=checksums)
    summary: dict[str, Any] = {}
    if site is not None:
        agg = site.aggregate_stats()
        agg.pop("genomics_stats", None)  # aggregate, but long; the preflight sends it, the check need not
        summary = agg
        summary["slides"] = {"listed": len(site.slide_status), "usable": sum(s.ok for s in site.slide_status)}
        gt, ge = site.geneset.input_dims(site.genomics_policy)
        if explicit_config and (gt, ge) != (model.genes_tumour, model.genes_micro):
            report.error(f"{site.layout.geneset}: the gene set gives vectors of {gt} (tumour) and {ge} (micro) "
                         f"values, but the config has model.genes_tumour={model.genes_tumour} and "
                         f"model.genes_micro={model.genes_micro}")
        elif not explicit_config:
            report.note(f"the model needs model.genes_tumour={gt}, model.genes_micro={ge}"
                        + (f", model.feature_dim={site.feature_schema['feature_dim']}"
                           if "feature_dim" in site.feature_schema else ""))
        train = summary["splits"]["train"]
        if "survival" in model.tasks:
            if train["survival_labelled"] and train["events"] == 0:
                report.warn("train split: every survival label is censored (no event); the survival loss and "
                            "C-index carry no signal")
            elif train["events"] < MIN_TRAIN_EVENTS:
                report.warn(f"train split: {train['events']} event(s), fewer than {MIN_TRAIN_EVENTS}; survival "
                            "training at this site is unreliable")
        if "diagnosis" in model.tasks:
            empty = [DIAGNOSES[c] for c, n in enumerate(train["diagnosis"]) if n == 0]
            if empty:
                report.warn(f"train split: no patient of diagnosis class(es) {', '.join(empty)}")
        for s in ("val", "test"):
            if summary["splits"][s]["patients"] == 0:
                report.warn(f"{s} split is empty")
        if site.genomics is not None:
            const = int(site.genomics_stats("train").degenerate().sum())
            if const:
                report.note(f"{const} genomic feature(s) are constant (or unobserved) in the training split; they "
                            "standardise to 0")
            _survival_leakage(site, report)
    _label_features(site_dir, data, report)
    return {"site": str(site_dir), "ok": report.ok, "errors": report.errors, "warnings": report.warnings,
            "notes": report.notes, "summary": summary}


def _table(summary: dict[str, Any]) -> list[str]:
    head = ["split", "patients", *_DIAG_SHORT, "dx?", "G2", "G3", "G4", "gr?", "surv", "events"]
    rows = [head]
    for s in ("train", "val", "test"):
        r = summary["splits"][s]
        rows.append([s, r["patients"], *r["diagnosis"], r["diagnosis_unknown"], *r["grade"], r["grade_unknown"],
                     r["survival_labelled"], r["events"]])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return ["  " + "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
            for row in rows]


def _print_result(res: dict[str, Any]) -> None:
    print(f"smm site check: {res['site']}")
    s = res["summary"]
    if s:
        sch = s["schema"]
        print(f"  patients   {s['patients']} in clinical.csv"
              + (f"; excluded from histology runs: {', '.join(f'{k} {v}' for k, v in s['excluded'].items())}"
                 if s["excluded"] else ""))
        print(f"  slides     {s['slides']['usable']} of {s['slides']['listed']} usable"
              + (f"; encoder {sch['encoder']!r}, feature_dim {sch['feature_dim']}" if "encoder" in sch else ""))
        if list(sch.get("modalities", [])) != ["histology", "genomics"]:
            print(f"  modalities {', '.join(sch['modalities'])} only (declared in manifest.json)")
        print(f"  genomics   vectors of {sch['genes_tumour']} (tumour) + {sch['genes_micro']} (micro); policy "
              f"{sch['genomics_policy']}; gene set sha256 {sch['gene_set'][:16]}")
        print(f"  splits     {s['split_source']}")
        print("\n".join(_table(s)))
    for title, key in (("errors", "errors"), ("warnings", "warnings"), ("notes", "notes")):
        if res[key]:
            print(f"{title} ({len(res[key])}):")
            for m in res[key]:
                print(f"  - {m}")
    n_e, n_w = len(res["errors"]), len(res["warnings"])
    print(f"FAILED: {n_e} error(s), {n_w} warning(s)" if n_e else f"OK ({n_w} warning(s))")


def _declare(site_dir: Path, modalities: list[str]) -> int:
    """``smm site modalities``: record the declaration in the site's manifest."""
    from client.site.folder import Manifest, SiteLayout

    layout = SiteLayout(site_dir)
    if not layout.clinical.is_file():
        print(f"smm site modalities: {layout.clinical} not found (not a site folder)", file=sys.stderr)
        return 2
    try:
        manifest = Manifest.load(layout.manifest)
        manifest.declare_modalities(modalities)
    except ValueError as e:
        print(f"smm site modalities: {e}", file=sys.stderr)
        return 2
    manifest.save()
    print(f"{layout.manifest}: modalities {', '.join(manifest.modalities)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``smm site check SITE_DIR [--config FILE] [--set key=value ...] [--json] [--no-checksums]`` and
    ``smm site modalities SITE_DIR MODALITY...``."""
    ap = argparse.ArgumentParser(prog="smm site", description="Site folder tools.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chk = sub.add_parser("check", help="validate a site folder end to end and print a summary",
                         description="Validate a site folder end to end (clinical labels, gene set, genomics, "
                                     "slides, manifest, feature files, splits) and print a summary. Exit status "
                                     "0: usable (warnings allowed); 1: errors; 2: usage or config error.")
    chk.add_argument("site_dir", type=Path, metavar="SITE_DIR")
    chk.add_argument("--config", type=Path, help="the run's YAML config (its model and data sections apply)")
    chk.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set data.genomics_policy=impute_mean (repeatable)")
    chk.add_argument("--json", action="store_true", help="print the result as JSON")
    chk.add_argument("--no-checksums", action="store_true",
                     help="skip comparing feature files' sha256 with the manifest (faster)")
    mod = sub.add_parser("modalities", help="declare which modalities the site holds (manifest.json)",
                         description="Declare the modalities a site holds, e.g. 'genomics' for a site without "
                                     "slides. Without a declaration a site holds both, and missing slides or "
                                     "feature files are errors. Run 'smm site check' afterwards.")
    mod.add_argument("site_dir", type=Path, metavar="SITE_DIR")
    mod.add_argument("modalities", nargs="+", choices=MODALITIES, metavar="MODALITY",
                     help=f"one or more of {', '.join(MODALITIES)}")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "modalities":
        return _declare(args.site_dir, args.modalities)
    try:
        text = args.config.read_text() if args.config else ""
        cfg = ExperimentConfig.from_yaml_text(text, args.overrides, source=str(args.config or "<defaults>"))
    except OSError as e:
        print(f"smm site check: cannot read {args.config}: {e.strerror}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"smm site check: {e}", file=sys.stderr)
        return 2
    res = check_site(args.site_dir, cfg, explicit_config=args.config is not None,
                     checksums=not args.no_checksums)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        _print_result(res)
    if not res["ok"]:
        print(f"smm site check: {len(res['errors'])} error(s) in {args.site_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
