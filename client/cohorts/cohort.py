"""Writing whole cohorts of site folders: what ``smm synth`` and ``smm tcga`` share.

Both commands build several site folders (client/site/folder.py, architecture.md "The site folder") under
one output folder plus a ``cohort.json`` that summarises them. This module holds the parts they must
agree on, so the two cohorts look the same to every reader:

* the label encoding in ``clinical.csv`` (integers, empty = unknown, see ``LABEL_ENCODING``);
* the WHO 2021 counting rule used for the per-class summaries in ``cohort.json`` (the labels module
  derives the training labels itself; this copy only counts, and both tests re-derive it);
* the gene-set id (the first 16 hex digits of the sha256 of ``geneset.csv``) in ``manifest.json``;
* byte-stable CSV writing, atomically (temporary file, then rename), and the "refuse a non-empty
  output folder unless --force" rule;
* the IID control of a cohort (``deal_iid``: the same patients dealt at random into sites of the
  real sizes; ``smm tcga --iid`` deals before writing, ``deal_site_folders`` deals written site
  folders, for cohorts whose sites' batch effects are already in their files, as ``smm synth``'s).
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.site.folder import SUBSPACES, Manifest, SiteLayout
from smm_model.contract.classes import DIAGNOSIS_KEYS, WHO2021_RULE, who2021_diagnosis
from smm_model.contract.atomic import atomic_path, atomic_write_text, sha256_file

__all__ = ["CLASS_NAMES", "CLINICAL_COLUMNS", "LABEL_ENCODING", "UNKNOWN", "CohortError", "prepare_out",
           "write_csv", "write_json", "gene_set_id", "who2021", "class_counts", "stratified_pick",
           "write_site_tables", "deal_iid", "deal_site_folders", "ONE_SITE"]

#: WHO 2021 diagnosis classes, in label-index order (method.md Part B 2.4).
CLASS_NAMES = DIAGNOSIS_KEYS
#: Name used in summaries for patients whose class the written columns cannot determine.
UNKNOWN = "unknown"
#: Required clinical.csv columns, in the order written.
CLINICAL_COLUMNS = ("patient_id", "idh", "codel_1p19q", "cdkn2ab", "grade", "survival_days", "event")
#: How the clinical columns are encoded (recorded in every cohort.json).
LABEL_ENCODING = {
    "idh": "1 = IDH-mutant, 0 = IDH-wildtype, empty = unknown",
    "codel_1p19q": "1 = 1p/19q codeleted, 0 = not codeleted, empty = unknown",
    "cdkn2ab": "1 = CDKN2A/B deletion, 0 = none, empty = unknown",
    "grade": "WHO grade 2, 3 or 4, empty = unknown",
    "survival_days": "days to death or last follow-up, empty = unknown",
    "event": "1 = death observed, 0 = censored, empty = unknown",
    "split": "train | val | test",
    "who2021_rule": WHO2021_RULE,
}


class CohortError(ValueError):
    """The input tables or the output folder do not allow writing the cohort; says which and why."""


def prepare_out(out: Path, force: bool, owned: Iterable[str] = ()) -> None:
    """Make sure ``out`` can take a new cohort.

    A non-empty folder is refused unless ``force``; with ``force``, the site folders this cohort
    will write (``owned``) and those listed in an existing ``cohort.json`` are removed first, so no
    stale slide or feature file survives. Anything else in ``out`` is left alone.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CohortError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CohortError(f"{out}: folder is not empty; pass --force to overwrite the cohort in it")
        stale = set(owned)
        previous = out / "cohort.json"
        if previous.is_file():
            try:
                stale |= {str(s.get("name", "")) for s in json.loads(previous.read_text()).get("sites", [])}
            except (json.JSONDecodeError, AttributeError, TypeError):
                pass
        for name in sorted(stale):
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                continue  # never follow a name out of `out`
            p = out / name
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """Write ``frame`` without its index, "\\n" line ends, atomically; same frame -> same bytes."""
    atomic_write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def gene_set_id(path: Path) -> str:
    """The schema id of a gene-set file: first 16 hex digits of its sha256 (what sites must share)."""
    return sha256_file(path)[:16]


def who2021(clinical: pd.DataFrame) -> pd.Series:
    """WHO 2021 class index per row (``CLASS_NAMES`` order), ``<NA>`` where it cannot be determined.

    Takes the encoded columns idh, codel_1p19q, cdkn2ab (1 = deletion) and grade, and applies the
    one rule (``smm_model.contract.classes.who2021_diagnosis``).
    """
    for col in ("idh", "codel_1p19q", "cdkn2ab", "grade"):
        if col not in clinical.columns:
            raise CohortError(f"clinical table has no column {col!r}")
    cols = [pd.to_numeric(clinical[c]).astype("Float64").to_numpy(dtype=float, na_value=np.nan)
            for c in ("idh", "codel_1p19q", "cdkn2ab", "grade")]
    diag = who2021_diagnosis(*cols)
    return pd.Series(np.where(diag >= 0, diag, 0), index=clinical.index, dtype="Int64").mask(diag < 0)


def class_counts(classes: pd.Series) -> dict[str, int]:
    """``{class name: count}`` for every class plus ``unknown`` (zeros included, fixed order)."""
    counts = {name: int((classes == i).sum()) for i, name in enumerate(CLASS_NAMES)}
    counts[UNKNOWN] = int(classes.isna().sum())
    return counts


def stratified_pick(strata: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask picking about ``fraction`` of the rows, proportionally within each stratum.

    Rows are shuffled, ordered by stratum, and every 1/fraction-th position is taken from a random
    offset (systematic sampling), so the total is round(fraction * n) up to one and each stratum
    gets its share even when strata are small. At least one row is picked when there are two or more.
    """
    n = len(strata)
    pick = np.zeros(n, dtype=bool)
    if n == 0 or fraction <= 0:
        return pick
    codes = pd.factorize(pd.Series(strata).astype(str), sort=True)[0]
    order = np.lexsort((rng.permutation(n), codes))
    u = rng.random()
    pos = np.arange(n)
    chosen = np.floor((pos + 1) * fraction + u) > np.floor(pos * fraction + u)
    pick[order[chosen]] = True
    if not pick.any() and n >= 2:
        pick[order[rng.integers(n)]] = True
    return pick


def deal_iid(site: pd.Series, seed: int) -> tuple[pd.Series, dict[str, str]]:
    """The IID control: the same patients dealt at random into sites of the real sites' sizes.

    Why: a federation over hospitals loses to pooled training for two reasons, the protocol
    (averaging, local steps, selection) and the heterogeneity of the hospitals (case mix, batch
    effects). Dealing the same patients at random into sites of the same sizes keeps the first and
    removes the second, so the gap it leaves is the protocol's alone. Returns the new site of every
    patient (``iid_<real site>`` holds as many patients as that real site) and that name mapping.
    """
    names = sorted(site.unique())
    sizes = [int((site == n).sum()) for n in names]
    order = np.random.default_rng([seed, zlib.crc32(b"iid")]).permutation(len(site))
    dealt = np.empty(len(site), dtype=object)
    dealt[order] = np.repeat([f"iid_{n}" for n in names], sizes)
    return pd.Series(dealt, index=site.index), {f"iid_{n}": n for n in names}


#: the site of the one-site control (``deal_site_folders(..., one_site=True)``)
ONE_SITE = "one_site"


def deal_site_folders(src: Path, out: Path, seed: int, force: bool = False, one_site: bool = False) -> dict[str, Any]:
    """Write the IID control of the cohort of site folders under ``src`` into ``out``.

    Every patient moves with all its rows (clinical, including its split; slides; genomics) and its
    feature files, as written, into the site ``deal_iid`` gives it; so batch effects stay with the
    patients who carry them and only their grouping into sites changes. Where a cohort generator
    cannot deal before it writes (``smm synth`` draws each site's batch effects into its features),
    this is the IID control. The sites must share their gene set and feature schema (they do when
    they can federate). ``one_site``: every patient into one site instead (``ONE_SITE``), the control
    in which a "federation" of one site has the rounds, the schedule and the optimizer restarts of
    federated training but no averaging. Returns what ``cohort.json`` in ``out`` holds.
    """
    src, out = Path(src), Path(out)
    roots = sorted(p for p in src.iterdir() if SiteLayout(p).clinical.is_file()) if src.is_dir() else []
    if not roots:
        raise CohortError(f"{src}: no site folders (folders with clinical.csv) to deal")
    tables = {name: [] for name in ("clinical", "slides", "genomics")}
    schema, geneset = None, None
    slide_records: dict[str, dict] = {}
    for root in roots:
        layout = SiteLayout(root)
        for name in tables:
            # as text, so every value is written back exactly as it was read
            frame = pd.read_csv(getattr(layout, name), dtype=str, keep_default_na=False)
            tables[name].append(frame.assign(_site=root.name, _root=str(root)))
        manifest = Manifest.load(layout.manifest)
        if schema is None:
            schema, geneset = manifest.schema, layout.geneset.read_bytes()
        elif manifest.schema != schema or layout.geneset.read_bytes() != geneset:
            raise CohortError(f"{root}: gene set or feature schema differs from {roots[0]}'s; "
                              "only sites that could federate can be dealt")
        slide_records.update(manifest.slides)
    clinical, slides, genomics = (pd.concat(tables[n], ignore_index=True) for n in ("clinical", "slides", "genomics"))
    if clinical["patient_id"].duplicated().any():
        raise CohortError(f"{src}: patient {clinical['patient_id'][clinical['patient_id'].duplicated()].iloc[0]} "
                          "is in more than one site")
    orphans = slides[~slides["patient_id"].isin(clinical["patient_id"])]
    if len(orphans):
        raise CohortError(f"{orphans['_root'].iloc[0]}/slides.csv: slide {orphans['slide_id'].iloc[0]} belongs to "
                          f"patient {orphans['patient_id'].iloc[0]}, who is in no clinical.csv")
    if slides["slide_id"].duplicated().any():
        raise CohortError(f"{src}: slide {slides['slide_id'][slides['slide_id'].duplicated()].iloc[0]} "
                          "is in more than one site")
    if one_site:
        dealt, real_of = pd.Series(ONE_SITE, index=clinical.index), {ONE_SITE: "all sites"}
    else:
        dealt, real_of = deal_iid(clinical["_site"], seed)
    site_of = dict(zip(clinical["patient_id"], dealt))
    prepare_out(out, force, owned=[*real_of, "cohort.json"])
    summary = []
    for name in sorted(real_of):
        layout = SiteLayout(out / name)
        keep = lambda frame: frame[frame["patient_id"].map(site_of) == name]  # noqa: E731
        clin, sl, gen = keep(clinical), keep(slides), keep(genomics)
        if "path" in sl.columns:  # slide paths are relative to their own site folder
            sl = sl.assign(path=[str((Path(r) / p).resolve()) if p else p for r, p in zip(sl["_root"], sl["path"])])
        layout.root.mkdir(parents=True, exist_ok=True)
        for frame, path in ((clin, layout.clinical), (sl, layout.slides), (gen, layout.genomics)):
            write_csv(path, frame.drop(columns=["_site", "_root"]))
        with atomic_path(layout.geneset) as tmp:
            tmp.write_bytes(geneset)
        layout.features_dir.mkdir(exist_ok=True)
        manifest = Manifest(layout.manifest)
        manifest.schema.update(schema)
        manifest.data["source"] = {"control_of": str(src), **({} if one_site else {"iid_control_seed": seed})}
        for sid, root in zip(sl["slide_id"], sl["_root"]):
            feature = SiteLayout(root).feature_file(sid)
            if feature.is_file():
                with atomic_path(layout.feature_file(sid), suffix=".h5") as tmp:
                    shutil.copyfile(feature, tmp)
            if sid in slide_records:
                manifest.slides[sid] = slide_records[sid]
        manifest.save()
        summary.append({"name": name, "n_patients": len(clin), "size_of": real_of[name],
                        "from_sites": {k: int(v) for k, v in clin["_site"].value_counts().sort_index().items()}})
    record = {"kind": "one_site_control" if one_site else "iid_control", "source": str(src),
              "iid_control_seed": None if one_site else seed, "sites": summary}
    write_json(out / "cohort.json", record)
    return record


def write_site_tables(layout: SiteLayout, clinical: pd.DataFrame, slides: pd.DataFrame,
                      genomics: pd.DataFrame, geneset: pd.DataFrame,
                      schema: Mapping[str, Any] | None = None,
                      source: Mapping[str, Any] | None = None) -> Manifest:
    """Write a site's four tables and a manifest whose schema carries the gene-set id.

    ``source`` (e.g. ``{"generator": "smm synth", "synthetic": True}``) is kept in the manifest, so
    every later report can say where the data came from (``SiteSummary.synthetic``).

    Checks the cross-table contract before writing anything: clinical and genomics name the same
    patients, every slide's patient is known, the gene set covers exactly the genomics columns with
    known subspaces, and genomics has no missing values. Returns the (saved) manifest so the caller
    can add slide records.
    """
    where = layout.root
    missing = [c for c in CLINICAL_COLUMNS if c not in clinical.columns]
    if missing:
        raise CohortError(f"{where}: clinical table lacks columns {missing}")
    pats = clinical["patient_id"]
    if pats.duplicated().any():
        raise CohortError(f"{where}: duplicate patient_id in clinical: {pats[pats.duplicated()].tolist()[:5]}")
    if set(genomics["patient_id"]) != set(pats):
        raise CohortError(f"{where}: clinical and genomics name different patients")
    unknown = sorted(set(slides["patient_id"]) - set(pats))
    if unknown:
        raise CohortError(f"{where}: slides of unknown patients {unknown[:5]}")
    if slides["slide_id"].duplicated().any():
        raise CohortError(f"{where}: duplicate slide_id in slides table")
    feats = [c for c in genomics.columns if c != "patient_id"]
    if list(geneset["feature"]) != feats:
        raise CohortError(f"{where}: geneset features differ from the genomics columns")
    bad = sorted(set(geneset["subspace"]) - set(SUBSPACES))
    if bad:
        raise CohortError(f"{where}: geneset subspaces {bad}; expected {list(SUBSPACES)}")
    if genomics[feats].isna().any().any():
        col = genomics[feats].columns[genomics[feats].isna().any()][0]
        raise CohortError(f"{where}: genomics column {col!r} has missing values")

    write_csv(layout.clinical, clinical)
    write_csv(layout.slides, slides)
    write_csv(layout.genomics, genomics)
    write_csv(layout.geneset, geneset)
    layout.features_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(layout.manifest)
    manifest.schema.update(dict(schema or {}))
    manifest.schema["gene_set"] = gene_set_id(layout.geneset)
    if source:
        manifest.data["source"] = dict(source)
    manifest.save()
    return manifest
