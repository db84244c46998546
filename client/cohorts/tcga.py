"""``smm tcga``: site folders from the real TCGA GBM/LGG tables (shared/data/tcga_gbmlgg).

Why: the real cohort is the benchmark the method is judged on; turning the public tables into the
standard site folders (client/site/folder.py) lets every federated and centralized run read TCGA exactly
as it reads a hospital, split into "hospitals" by where the tissue came from.

Inputs (``--tables DIR``; file names as in the folder's README):

* ``porpoise_tcga_gbmlgg_all_clean_mutsig.csv.zip``: one row per diagnostic slide; genomics
  (1,544 ``*_rnaseq``, 30 ``*_cnv``, 16 ``*_mut``), survival and the tissue-source-site (TSS) code.
  Genomics and survival are per patient (``case_id``); the rows of one patient must agree, and one
  is taken. This table defines the cohort (569 patients): every patient in it has genomics and
  survival.
* ``pathomicfusion_grade_data.csv``: WHO grade and the IDH/1p19q molecular subtype, joined on the
  12-character patient barcode. Patients absent there, or with those values missing, are kept with
  empty ``grade`` / ``idh`` / ``codel_1p19q`` (the labels module masks them for those tasks).
  Patients only in this table have no genomics and are left out (counted in cohort.json).
* ``mcat_signatures.csv``: the MCAT functional gene groups, for ``geneset.csv`` (method.md A.5).
* ``flamby_tcga_tss_centers.csv``: TSS code -> region, for the site grouping.
* ``splits_5foldcv/splits_{fold}.csv``: the shared 5-fold patient splits.

Output columns (encoding in ``client.cohorts.cohort.LABEL_ENCODING``): ``idh`` 1 = IDH-mutant from the subtype
(IDHmut-codel / IDHmut-non-codel) and 0 for IDHwt; ``codel_1p19q`` 1 for IDHmut-codel, else 0 (IDHwt
implies not codeleted); ``cdkn2ab`` 1 when CDKN2A_cnv or CDKN2B_cnv is a GISTIC deletion (-1 or -2),
else 0 (those two columns are never model inputs, see below); ``grade`` 2/3/4; ``survival_days`` =
survival_months x 30.44; ``event`` = 1 - censorship. WHO 2021 classes are not written: the labels
module derives them; ``cohort.json`` counts them with the same rule.

Genomic inputs (``--genomics KINDS``, a comma-separated list of ``rna``, ``cnv``, ``mut``; default
``rna``, as the reference model): which column kinds go into genomics.csv and geneset.csv. ``rna``
is required (the microenvironment subspace is RNA only). Why RNA only by default: the labels are
defined by IDH mutation, 1p/19q codeletion and CDKN2A/B deletion, and the table's CNV and mutation
columns include IDH1_mut and CDKN2A_cnv/CDKN2B_cnv (``cdkn2ab`` is computed from them) besides
correlated markers (CIC_mut, FUBP1_mut, the 9p21 and chr7 neighbourhoods). With ``cnv`` or
``mut`` asked for, the columns that measure a label fact directly (``smm_model.contract.label_facts``:
IDH1_mut, CDKN2A_cnv, CDKN2B_cnv in this table; it has no IDH2 or 1p/19q arm-level column) are
still left out; the correlated markers stay, and cohort.json's ``genomics`` entry lists the
inputs used, every column left out with the fact it measures, and that caveat.

Sites: TSS code -> FLamby region (Midwest, South, ...), as FLamby does for Fed-TCGA-BRCA. The numeric
TSS codes 02, 06, 08, 12, 14, 15, 19, 26, 27, 41 (the original TCGA-GBM tissue-source sites; PORPOISE
writes them without the leading zero) are not in the FLamby table and form their own site,
``tcga_gbm_legacy``. FLamby's own "Other" region, any region (legacy group included) with fewer than
``--min-site-patients`` patients, and any TSS code found in neither list go to ``tcga_other``.

Splits: the fold file's ``val`` column is our ``test`` split (those are the patients the published
MCAT/PORPOISE numbers are reported on); a validation split (``--val-fraction``, default 15 %) is
carved from each site's training patients by patient, stratified by WHO class, seeded.

Gene set (method.md A.5): microenvironment = Cytokines and Growth Factors + Cell Differentiation
Markers; tumour = Oncogenes + Tumor Suppressor Genes + Protein Kinases + Transcription Factors, plus
every selected CNV and mutation feature; an RNA gene in both goes to tumour if it is an oncogene or
tumour suppressor, else to the microenvironment. On the 1,544 RNA genes, group membership is 739
micro and 841 tumour with 36 in both (the numbers quoted in method.md count membership before the
overlap is resolved); after resolving, 27 of the 36 go to tumour and 9 to micro: 712 micro and 832
tumour RNA genes. So the default (``--genomics rna``) gives 832 tumour and 712 micro features
(``model.genes_tumour`` / ``model.genes_micro``); ``--genomics rna,cnv,mut`` adds the 28 CNV and 15
mutation columns that remain after the label columns are left out: 875 tumour, 712 micro.
cohort.json records the counts.

``--features DIR`` optionally brings real feature files named ``<slide_id>.h5`` (slide_id = the
PORPOISE slide file name without ``.svs``) into each site's ``features/`` (hard link when possible,
else a copy), recording them in the manifest; absent ones are counted and skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smm_model.contract.label_facts import fact, label_feature_hits

from client.cohorts.cohort import (CLASS_NAMES, CLINICAL_COLUMNS, LABEL_ENCODING, CohortError, class_counts, deal_iid,
                     prepare_out, stratified_pick, who2021, write_json, write_site_tables)
from client.site.folder import FeatureFileError, SiteLayout, read_features
from smm_model.contract.atomic import atomic_path, sha256_file

__all__ = ["PORPOISE", "GRADES", "SIGNATURES", "TSS_CENTERS", "SPLITS", "LEGACY_GBM_TSS", "LEGACY_SITE", "OTHER_SITE",
           "MICRO_GROUPS", "TUMOUR_GROUPS", "TUMOUR_PRIORITY", "DAYS_PER_MONTH", "GENOMIC_KINDS",
           "DEFAULT_GENOMICS", "TcgaCohort", "load_porpoise", "load_grades", "load_split", "select_genomics",
           "derive_geneset", "assign_sites", "build_cohort", "write_cohort", "main"]

PORPOISE = "porpoise_tcga_gbmlgg_all_clean_mutsig.csv.zip"
GRADES = "pathomicfusion_grade_data.csv"
SIGNATURES = "mcat_signatures.csv"
TSS_CENTERS = "flamby_tcga_tss_centers.csv"
SPLITS = "splits_5foldcv/splits_{fold}.csv"
#: Original TCGA-GBM tissue-source sites, absent from the FLamby TSS table.
LEGACY_GBM_TSS = ("02", "06", "08", "12", "14", "15", "19", "26", "27", "41")
LEGACY_SITE = "tcga_gbm_legacy"
OTHER_SITE = "tcga_other"
MICRO_GROUPS = ("Cytokines and Growth Factors", "Cell Differentiation Markers")
TUMOUR_GROUPS = ("Oncogenes", "Tumor Suppressor Genes", "Protein Kinases", "Transcription Factors")
#: Tumour groups that win when a gene is in both subspaces.
TUMOUR_PRIORITY = ("Oncogenes", "Tumor Suppressor Genes")
DAYS_PER_MONTH = 30.44
#: ``--genomics`` kinds -> the column-name suffix that marks them in the PORPOISE table.
GENOMIC_KINDS = {"rna": "_rnaseq", "cnv": "_cnv", "mut": "_mut"}
GENOMIC_SUFFIXES = tuple(GENOMIC_KINDS.values())
#: The reference model's genomic input: bulk RNA only (see the module docstring for why).
DEFAULT_GENOMICS = ("rna",)
SUBTYPES = {"IDHwt": (0, 0), "IDHmut-non-codel": (1, 0), "IDHmut-codel": (1, 1)}


@dataclass
class TcgaCohort:
    """The converted cohort in memory, before writing: one clinical row per patient."""

    clinical: pd.DataFrame  # CLINICAL_COLUMNS + split + site
    slides: pd.DataFrame  # slide_id, patient_id
    genomics: pd.DataFrame  # patient_id + features
    geneset: pd.DataFrame  # feature, subspace
    geneset_stats: dict[str, int]
    groups: dict[str, dict[str, list[str]]]  # site -> {"regions": [...], "tss": [...]}
    info: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)  # select_genomics's record of the inputs


def _read_csv(path: Path, **kw: Any) -> pd.DataFrame:
    if not path.is_file():
        raise CohortError(f"{path}: file not found")
    try:
        return pd.read_csv(path, **kw)
    except (ValueError, OSError) as e:  # pandas parse errors are ValueErrors
        raise CohortError(f"{path}: cannot read as CSV ({e})") from None


def _require(frame: pd.DataFrame, cols: list[str] | tuple[str, ...], path: Path) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise CohortError(f"{path}: missing column(s) {missing}")


def load_porpoise(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(one row per patient: case_id, tss, survival and genomics; slides; genomic feature names).

    Checks that every row of a patient carries the same genomics and survival, so taking the first
    row loses nothing.
    """
    df = _read_csv(path, dtype={"site": str})
    _require(df, ["case_id", "slide_id", "site", "survival_months", "censorship"], path)
    feats = [c for c in df.columns if c.endswith(GENOMIC_SUFFIXES)]
    if not feats:
        raise CohortError(f"{path}: no genomic columns ({', '.join('*' + s for s in GENOMIC_SUFFIXES)})")
    per_patient = ["survival_months", "censorship", "site", *feats]
    nan_cols = [c for c in ["case_id", "slide_id", "survival_months", "censorship", *feats] if df[c].isna().any()]
    if nan_cols:
        raise CohortError(f"{path}: missing values in column(s) {nan_cols[:5]}")
    bad_ids = df.loc[~df["case_id"].astype(str).str.fullmatch(r"TCGA-[0-9A-Z]{2}-[0-9A-Z]{4}"), "case_id"]
    if len(bad_ids):
        raise CohortError(f"{path}: column case_id holds {bad_ids.iloc[0]!r}; expected a 12-character "
                          "TCGA patient barcode like TCGA-02-0001")
    df = df.sort_values(["case_id", "slide_id"], kind="stable").reset_index(drop=True)
    first = df.groupby("case_id", sort=False).cumcount() == 0
    head_idx = np.flatnonzero(first.to_numpy())
    owner = np.repeat(head_idx, np.diff(np.append(head_idx, len(df))))
    for cols in ([c for c in per_patient if c != "site"], ["site"]):
        vals = df[cols].to_numpy(dtype=float if cols != ["site"] else object)
        diff = vals != vals[owner]  # each row against its patient's first row
        if diff.any():
            r, c = np.argwhere(diff)[0]
            raise CohortError(f"{path}: patient {df['case_id'].iloc[r]} has slides that disagree on "
                              f"{cols[c]!r}; genomics, survival and site must be per patient")
    if df["slide_id"].duplicated().any():
        raise CohortError(f"{path}: duplicate slide_id {df.loc[df['slide_id'].duplicated(), 'slide_id'].iloc[0]!r}")
    patients = df.loc[first.to_numpy()].reset_index(drop=True)
    tss = patients["case_id"].str[5:7]
    site_col = patients["site"].astype(str).str.strip().str.zfill(2)
    if (site_col != tss).any():
        i = int(np.flatnonzero((site_col != tss).to_numpy())[0])
        raise CohortError(f"{path}: patient {patients['case_id'].iloc[i]} has site {patients['site'].iloc[i]!r} "
                          f"but barcode TSS {tss.iloc[i]!r}")
    patients = patients.assign(tss=tss)
    slides = pd.DataFrame({"slide_id": df["slide_id"].astype(str).str.replace(r"\.svs$", "", regex=True),
                           "patient_id": df["case_id"]})
    return patients, slides, feats


def load_grades(path: Path) -> pd.DataFrame:
    """patient_id, grade (Int64), idh, codel_1p19q (Int64) from the PathomicFusion table."""
    df = _read_csv(path)
    _require(df, ["TCGA ID", "Grade", "Molecular subtype"], path)
    ids = df["TCGA ID"].astype(str).str.strip()
    if ids.duplicated().any():
        raise CohortError(f"{path}: patient {ids[ids.duplicated()].iloc[0]!r} appears twice in column 'TCGA ID'")
    grade = pd.to_numeric(df["Grade"], errors="coerce")
    bad = df["Grade"].notna() & ~grade.isin([2, 3, 4])
    if bad.any():
        raise CohortError(f"{path}: column 'Grade' holds {df.loc[bad, 'Grade'].iloc[0]!r}; expected 2, 3, 4 or empty")
    sub = df["Molecular subtype"]
    bad = sub.notna() & ~sub.isin(list(SUBTYPES))
    if bad.any():
        raise CohortError(f"{path}: column 'Molecular subtype' holds {sub[bad].iloc[0]!r}; expected one of "
                          f"{list(SUBTYPES)} or empty")
    idh = sub.map(lambda s: SUBTYPES[s][0] if isinstance(s, str) else pd.NA)
    codel = sub.map(lambda s: SUBTYPES[s][1] if isinstance(s, str) else pd.NA)
    return pd.DataFrame({"patient_id": ids, "grade": grade.astype("Int64"), "idh": idh.astype("Int64"),
                         "codel_1p19q": codel.astype("Int64")})


def select_genomics(features: list[str], kinds: Sequence[str] = DEFAULT_GENOMICS
                    ) -> tuple[list[str], dict[str, Any]]:
    """The model's genomic input columns for ``kinds`` (``--genomics``), and a record of the choice.

    Keeps the columns of the asked-for kinds, then leaves out every column that measures a label
    fact directly (``smm_model.contract.label_facts``), whatever the kinds: an input the label is computed
    from lets the model read its answer. The record (cohort.json's ``genomics``) says which kinds
    were used, how many columns of each, which kinds were not asked for, and each column left out
    with the fact it measures.
    """
    kinds = tuple(dict.fromkeys(k.strip().lower() for k in kinds))
    unknown = [k for k in kinds if k not in GENOMIC_KINDS]
    if unknown or "rna" not in kinds:
        raise CohortError(f"--genomics {','.join(kinds)}: expected a comma-separated list of "
                          f"{', '.join(GENOMIC_KINDS)} that includes rna (the microenvironment subspace is RNA only)"
                          + (f"; unknown: {unknown}" if unknown else ""))
    kind_of = {f: next(k for k, suf in GENOMIC_KINDS.items() if f.endswith(suf)) for f in features}
    asked = [f for f in features if kind_of[f] in kinds]
    hits = dict(label_feature_hits(asked))
    kept = [f for f in asked if f not in hits]
    available, used = Counter(kind_of.values()), Counter(kind_of[f] for f in kept)
    record = {
        "inputs": list(kinds),
        "columns": {k: used[k] for k in kinds},
        "not_selected": {"columns": {k: available[k] for k in GENOMIC_KINDS if k not in kinds and available[k]},
                         "why": "kind not in --genomics (default rna, the reference model's input: the CNV and "
                                "mutation columns hold the labels' own markers and correlates)"},
        "left_out": [{"feature": f, "fact": name,
                      "why": f"measures {fact(name).what}, which the label rules read (smm_model.contract.label_facts)"}
                     for f, name in hits.items()],
        "caveat": ("correlated markers are kept (e.g. CIC_mut and FUBP1_mut for 1p/19q, the 9p21 neighbours of "
                   "CDKN2A/B, chr7 genes): they may still carry label information"
                   if set(kinds) - {"rna"} else None),
    }
    return kept, record


def derive_geneset(features: list[str], signatures: pd.DataFrame, source: str = SIGNATURES
                   ) -> tuple[pd.DataFrame, dict[str, int]]:
    """``geneset.csv`` rows for ``features`` (method.md A.5) and the counts behind it.

    RNA genes are matched by symbol (``<SYMBOL>_rnaseq``) to the MCAT groups; CNV and mutation
    features are tumour. Raises if an RNA gene is in no group (A.5 says every gene is in one).
    """
    _require(signatures, [*MICRO_GROUPS, *TUMOUR_GROUPS], Path(source))
    groups = {c: set(signatures[c].dropna().astype(str).str.strip()) for c in (*MICRO_GROUPS, *TUMOUR_GROUPS)}
    micro = set().union(*(groups[c] for c in MICRO_GROUPS))
    tumour = set().union(*(groups[c] for c in TUMOUR_GROUPS))
    priority = set().union(*(groups[c] for c in TUMOUR_PRIORITY))
    rows, orphans = [], []
    stats = dict.fromkeys(("rna_genes", "rna_in_micro_groups", "rna_in_tumour_groups", "rna_in_both",
                           "both_to_tumour", "both_to_micro", "rna_micro", "rna_tumour", "cnv", "mut"), 0)
    for f in features:
        if f.endswith("_rnaseq"):
            gene = f[: -len("_rnaseq")]
            in_m, in_t = gene in micro, gene in tumour
            stats["rna_genes"] += 1
            stats["rna_in_micro_groups"] += in_m
            stats["rna_in_tumour_groups"] += in_t
            if in_m and in_t:
                stats["rna_in_both"] += 1
                sub = "tumour" if gene in priority else "micro"
                stats["both_to_tumour" if sub == "tumour" else "both_to_micro"] += 1
            elif in_m or in_t:
                sub = "micro" if in_m else "tumour"
            else:
                orphans.append(f)
                continue
            stats["rna_micro" if sub == "micro" else "rna_tumour"] += 1
        elif f.endswith(("_cnv", "_mut")):
            sub = "tumour"
            stats["cnv" if f.endswith("_cnv") else "mut"] += 1
        else:
            raise CohortError(f"genomic feature {f!r} is neither *_rnaseq, *_cnv nor *_mut")
        rows.append((f, sub))
    if orphans:
        raise CohortError(f"{source}: {len(orphans)} RNA gene(s) in no MCAT group, e.g. {orphans[:5]}")
    geneset = pd.DataFrame(rows, columns=["feature", "subspace"])
    stats["tumour_features"] = int((geneset["subspace"] == "tumour").sum())
    stats["micro_features"] = int((geneset["subspace"] == "micro").sum())
    return geneset, stats


def assign_sites(tss: pd.Series, centers: pd.DataFrame, min_patients: int
                 ) -> tuple[pd.Series, dict[str, dict[str, list[str]]]]:
    """Site name per patient from its TSS code, and each site's regions and TSS codes.

    Region -> ``tcga_<region>``; legacy numeric GBM codes -> ``tcga_gbm_legacy``; FLamby's "Other",
    unmapped codes and every group under ``min_patients`` patients -> ``tcga_other``.
    """
    _require(centers, ["TSS Code", "Region"], Path(TSS_CENTERS))
    region_of = dict(zip(centers["TSS Code"].astype(str).str.strip(), centers["Region"].astype(str).str.strip()))

    def region(code: str) -> str:
        if code in LEGACY_GBM_TSS:
            return "gbm_legacy"
        return region_of.get(code, "unmapped")

    regions = tss.map(region)
    site = regions.map(lambda r: OTHER_SITE if r in ("Other", "unmapped") else f"tcga_{r.lower().replace(' ', '_')}")
    sizes = site.value_counts()
    small = [s for s in sizes.index if s != OTHER_SITE and sizes[s] < min_patients]
    site = site.where(~site.isin(small), OTHER_SITE)
    groups: dict[str, dict[str, list[str]]] = {}
    for name in sorted(site.unique()):
        m = site == name
        groups[name] = {"regions": sorted(regions[m].unique()), "tss": sorted(tss[m].unique())}
    return site, groups


def load_split(path: Path, patients: pd.Series) -> pd.Series:
    """``train`` / ``test`` per patient from a fold file (its ``val`` column is our test split)."""
    df = _read_csv(path, index_col=0)
    _require(df, ["train", "val"], path)
    train = set(df["train"].dropna().astype(str))
    test = set(df["val"].dropna().astype(str))
    both = sorted(train & test)
    if both:
        raise CohortError(f"{path}: patient {both[0]} is in both 'train' and 'val'")
    missing = sorted(set(patients) - train - test)
    if missing:
        raise CohortError(f"{path}: {len(missing)} patient(s) of the cohort are in neither 'train' nor 'val', "
                          f"e.g. {missing[:3]}")
    return patients.map(lambda p: "test" if p in test else "train")


def build_cohort(tables: Path, fold: int = 0, seed: int = 0, val_fraction: float = 0.15,
                 min_site_patients: int = 20, genomics: Sequence[str] = DEFAULT_GENOMICS,
                 iid_seed: int | None = None) -> TcgaCohort:
    """Read and join the tables in ``tables``; everything ``write_cohort`` needs, nothing written.

    ``genomics``: the column kinds that become model inputs (``select_genomics``). ``iid_seed``:
    deal the patients, after the real sites' splits are drawn (so every patient keeps its split),
    into IID sites of the real sites' sizes (``deal_iid``).
    """
    tables = Path(tables)
    if not tables.is_dir():
        raise CohortError(f"{tables}: tables folder not found")
    if not 0 <= val_fraction < 1:
        raise CohortError(f"--val-fraction {val_fraction}: expected 0 <= f < 1")
    patients, slides, all_feats = load_porpoise(tables / PORPOISE)
    feats, inputs = select_genomics(all_feats, genomics)
    grades = load_grades(tables / GRADES)
    geneset, gstats = derive_geneset(feats, _read_csv(tables / SIGNATURES), str(tables / SIGNATURES))
    site, groups = assign_sites(patients["tss"], _read_csv(tables / TSS_CENTERS, dtype=str), min_site_patients)
    split_path = tables / SPLITS.format(fold=fold)
    split = load_split(split_path, patients["case_id"])

    _require(patients, ["CDKN2A_cnv", "CDKN2B_cnv"], tables / PORPOISE)  # for cdkn2ab
    joined = patients[["case_id"]].merge(grades, left_on="case_id", right_on="patient_id", how="left")
    deleted = (patients["CDKN2A_cnv"] <= -1) | (patients["CDKN2B_cnv"] <= -1)  # GISTIC -1 / -2
    clinical = pd.DataFrame({
        "patient_id": patients["case_id"],
        "idh": joined["idh"].astype("Int64").array,
        "codel_1p19q": joined["codel_1p19q"].astype("Int64").array,
        "cdkn2ab": deleted.astype(int).astype("Int64"),
        "grade": joined["grade"].astype("Int64").array,
        "survival_days": (patients["survival_months"] * DAYS_PER_MONTH).round(2),
        "event": (1 - patients["censorship"]).astype("Int64"),
    })
    clinical["split"] = split.to_numpy()
    clinical["site"] = site.to_numpy()

    # Validation patients: carved from each site's training patients, stratified by WHO class.
    cls = who2021(clinical).astype("string").fillna("unknown").to_numpy()
    for name in sorted(groups):
        idx = np.flatnonzero(((clinical["site"] == name) & (clinical["split"] == "train")).to_numpy())
        rng = np.random.default_rng([seed, fold, zlib.crc32(name.encode())])
        pick = stratified_pick(cls[idx], val_fraction, rng)
        clinical.loc[idx[pick], "split"] = "val"

    if iid_seed is not None:
        clinical["site"], real_of = deal_iid(clinical["site"], iid_seed)
        groups = {name: {"regions": [f"IID control: random patients, as many as {real}"], "tss": []}
                  for name, real in real_of.items()}
    genomics = patients[["case_id", *feats]].rename(columns={"case_id": "patient_id"})
    info = {
        "patients": len(patients), "slides": len(slides),
        "patients_without_grade_table_row": int(joined["patient_id"].isna().sum()),
        "grade_table_patients_without_genomics": int((~grades["patient_id"].isin(patients["case_id"])).sum()),
        "split_file": SPLITS.format(fold=fold),
        "iid_control_seed": iid_seed,
    }
    return TcgaCohort(clinical=clinical, slides=slides, genomics=genomics, geneset=geneset,
                      geneset_stats=gstats, groups=groups, info=info, inputs=inputs)


def _n_patches(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["features"].shape[0])


def _feature_files(cohort: TcgaCohort, features_dir: Path
                   ) -> tuple[dict[str, tuple[Path, int]], list[str], dict[str, Any]]:
    """Valid feature files per slide (path, patches), the problems found, and their shared schema."""
    if not features_dir.is_dir():
        raise CohortError(f"{features_dir}: features folder not found")
    found: dict[str, tuple[Path, int]] = {}
    problems: list[str] = []
    schema: dict[str, Any] = {}
    for sid in cohort.slides["slide_id"]:
        src = features_dir / f"{sid}.h5"
        if not src.is_file():
            continue
        try:
            _, _, attrs = read_features(src, load=False)
            n = _n_patches(src)
        except (FeatureFileError, OSError) as e:
            problems.append(str(e))
            continue
        mine = {"encoder": str(attrs["encoder"]), "weights_sha256": str(attrs["weights_sha256"]),
                "feature_dim": int(attrs["feature_dim"])}
        if schema and mine != schema:
            raise CohortError(f"{src}: encoder/feature_dim {mine} differ from other files in {features_dir} "
                              f"({schema}); a site has one encoder")
        schema = mine
        found[sid] = (src, n)
    return found, problems, schema


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link ``src`` as ``dst`` (no extra disk), else copy; atomic either way."""
    with atomic_path(dst, suffix=".h5") as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def write_cohort(out: Path, cohort: TcgaCohort, force: bool = False, features_dir: Path | None = None,
                 tables: Path | None = None, fold: int = 0, seed: int = 0, val_fraction: float = 0.15,
                 min_site_patients: int = 20, log: Any = print) -> dict[str, Any]:
    """Write one site folder per site and ``cohort.json``; returns the summary written there."""
    out = Path(out)
    found: dict[str, tuple[Path, int]] = {}
    problems: list[str] = []
    feat_schema: dict[str, Any] = {}
    if features_dir is not None:
        found, problems, feat_schema = _feature_files(cohort, Path(features_dir))
    prepare_out(out, force, owned=[*cohort.groups, "cohort.json"])
    clin_all = cohort.clinical
    summaries = []
    for name in cohort.groups:
        t0 = time.perf_counter()
        clin = clin_all[clin_all["site"] == name].drop(columns="site").reset_index(drop=True)
        pats = set(clin["patient_id"])
        slides = cohort.slides[cohort.slides["patient_id"].isin(pats)].reset_index(drop=True)
        genomics = cohort.genomics[cohort.genomics["patient_id"].isin(pats)].reset_index(drop=True)
        layout = SiteLayout(out / name)
        manifest = write_site_tables(layout, clin[[*CLINICAL_COLUMNS, "split"]], slides, genomics, cohort.geneset,
                                     schema=feat_schema if any(s in found for s in slides["slide_id"]) else None,
                                     source={"generator": "smm tcga", "synthetic": False})
        linked = 0
        for sid in slides["slide_id"]:
            if sid in found:
                src, n = found[sid]
                dst = layout.feature_file(sid)
                _link_or_copy(src, dst)
                manifest.record(sid, "done", checksum=sha256_file(dst), n_patches=n)
                linked += 1
        if linked:
            manifest.save()
        classes = who2021(clin)
        summaries.append({
            "name": name, "regions": cohort.groups[name]["regions"], "tss_codes": cohort.groups[name]["tss"],
            "n_patients": len(clin), "n_slides": len(slides), "events": int(clin["event"].sum()),
            "class_counts": class_counts(classes),
            "grade_counts": {**{str(g): int((clin["grade"] == g).sum()) for g in (2, 3, 4)},
                             "missing": int(clin["grade"].isna().sum())},
            "subtype_missing": int(clin["idh"].isna().sum()),
            "split_counts": {s: int((clin["split"] == s).sum()) for s in ("train", "val", "test")},
            "feature_files": linked,
        })
        log(f"{name}: {len(clin)} patients, {len(slides)} slides"
            + (f", {linked} feature files" if features_dir is not None else "")
            + f" in {time.perf_counter() - t0:.1f} s")
    small = [s["name"] for s in summaries if s["n_patients"] < min_site_patients]
    summary = {
        "kind": "tcga_gbmlgg", "generator": "smm tcga", "fold": fold, "seed": seed, "val_fraction": val_fraction,
        "min_site_patients": min_site_patients, "classes": list(CLASS_NAMES), "encoding": LABEL_ENCODING,
        "sources": ({f: sha256_file(Path(tables) / f)[:16] for f in (PORPOISE, GRADES, SIGNATURES, TSS_CENTERS,
                                                                       SPLITS.format(fold=fold))}
                    if tables is not None else {}),
        "site_grouping": {
            "rule": "TSS code -> FLamby region (tcga_<region>); numeric TSS codes of the original TCGA-GBM "
                    f"sites {list(LEGACY_GBM_TSS)} (absent from the FLamby table) -> {LEGACY_SITE}; FLamby "
                    f"region 'Other', unmapped codes and groups under {min_site_patients} patients -> {OTHER_SITE}",
            "sites": cohort.groups,
            "sites_below_minimum": small,
        },
        "splits": "test = the fold file's 'val' column; val = carved from each site's training patients "
                  f"({val_fraction:.0%}, stratified by WHO class, seeded)",
        "gene_set": {**cohort.geneset_stats,
                     "rule": "micro = Cytokines and Growth Factors + Cell Differentiation Markers; tumour = "
                             "Oncogenes + Tumor Suppressor Genes + Protein Kinases + Transcription Factors + all "
                             "selected CNV and mutation features; in both -> tumour if oncogene or tumour "
                             "suppressor, else micro",
                     "note": "rna_in_*_groups count group membership before the overlap is resolved (the "
                             "739 / 841 / 36 of method.md A.5); rna_micro / rna_tumour after"},
        "genomics": cohort.inputs,
        "cohort": cohort.info,
        "feature_files": ({"dir": str(features_dir), "linked": len(found), "absent": len(cohort.slides) - len(found)
                           - len(problems), "invalid": problems} if features_dir is not None else None),
        "totals": {"patients": int(len(clin_all)), "slides": int(len(cohort.slides)),
                   "class_counts": class_counts(who2021(clin_all))},
        "sites": summaries,
    }
    write_json(out / "cohort.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``smm tcga``: site folders from the real TCGA GBM/LGG tables."""
    ap = argparse.ArgumentParser(prog="smm tcga", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", type=Path, required=True, help="folder with the TCGA GBM/LGG tables")
    ap.add_argument("--out", type=Path, required=True, help="output folder (one site folder per site + cohort.json)")
    ap.add_argument("--features", type=Path, default=None,
                    help="optional folder of real feature files <slide_id>.h5 to bring into the sites")
    ap.add_argument("--fold", type=int, default=0, help="which splits_5foldcv fold (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the validation carve-out (default 0)")
    ap.add_argument("--val-fraction", type=float, default=0.15, help="validation share of training patients")
    ap.add_argument("--min-site-patients", type=int, default=20,
                    help="regions with fewer patients are merged into tcga_other (default 20)")
    ap.add_argument("--genomics", default=",".join(DEFAULT_GENOMICS), metavar="KINDS",
                    help="genomic input kinds, comma-separated from rna, cnv, mut; rna required (default: rna, as "
                         "the reference model). Columns that measure a label fact (IDH1_mut, CDKN2A_cnv, "
                         "CDKN2B_cnv) are left out whatever is asked for")
    ap.add_argument("--iid", type=int, default=None, metavar="SEED",
                    help="IID control: deal the same patients (each keeping its split) at random into sites of the "
                         "real sites' sizes, named iid_<site>, with this seed")
    ap.add_argument("--force", action="store_true", help="overwrite a cohort in a non-empty --out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        cohort = build_cohort(args.tables, args.fold, args.seed, args.val_fraction, args.min_site_patients,
                              genomics=args.genomics.split(","), iid_seed=args.iid)
        summary = write_cohort(args.out, cohort, args.force, args.features, args.tables, args.fold, args.seed,
                               args.val_fraction, args.min_site_patients)
    except CohortError as e:
        print(f"smm tcga: {e}", file=sys.stderr)
        return 2
    gs = summary["gene_set"]
    print(f"wrote {len(summary['sites'])} sites, {summary['totals']['patients']} patients, "
          f"{summary['totals']['slides']} slides to {args.out} in {time.perf_counter() - t0:.1f} s; gene set: "
          f"{gs['tumour_features']} tumour ({gs['rna_tumour']} RNA), {gs['micro_features']} micro features")
    left_out = [f"{x['feature']} ({x['fact']})" for x in summary["genomics"]["left_out"]]
    print(f"genomic inputs: {', '.join(summary['genomics']['inputs'])}"
          + (f"; left out as label facts: {', '.join(left_out)}" if left_out else ""))
    ff = summary["feature_files"]
    if ff is not None:
        print(f"feature files: {ff['linked']} linked, {ff['absent']} absent, {len(ff['invalid'])} invalid")
        for p in ff["invalid"]:
            print(f"smm tcga: skipped {p}", file=sys.stderr)
        if ff["invalid"]:
            return 1
    if summary["site_grouping"]["sites_below_minimum"]:
        print(f"note: sites below {args.min_site_patients} patients: "
              f"{summary['site_grouping']['sites_below_minimum']}", file=sys.stderr)
    return 0
