"""Genomic tables and gene sets -> per-patient tumour and microenvironment vectors.

A site's genomic table has one row per patient and one column per feature (RNA, CNV, mutation).
The gene-set file (``geneset.csv``: ``feature``, ``subspace``) says which feature feeds which
subspace's gene encoder, and in which ORDER: vector index ``i`` must mean the same gene at every
site, so the order comes from the gene set and never from a table's column order (the reference
code got this wrong, method.md B.7 item 7).

Pipeline, in the order applied::

    read table -> validate (patients, duplicates, numbers, gene-set features present, NaN policy, no Inf)
    -> log1p for features with a configured suffix (counts/FPKM; negative values rejected)
    -> GenomicsStats over TRAINING patients (count, sum, sum of squares; ``merge`` across sites)
    -> impute (policy) -> standardise with the handed-in stats -> clip -> split into subspaces
    -> (impute policies) one missingness column per subspace appended

The statistics are handed in rather than fitted here so that a federation can supply statistics
merged from every site's training patients (method.md A.6) and a local run can use its own.
Messages name file, column and row (the patient id); values are never printed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.site.folder import SUBSPACES
from client.site.validation import Report, SiteDataError, preview
from smm_model.contract.stats import STD_FLOOR, GenomicsStats

__all__ = ["GeneSet", "read_geneset", "read_table", "read_table_columns", "GenomicsStats", "GenomicsData",
           "load_genomics", "log1p_columns", "IMPUTE_POLICIES", "POLICIES", "STD_FLOOR"]

#: ``data.genomics_policy`` values (mirrors smm_model.config.GENOMICS_POLICIES).
POLICIES = ("error", "impute_mean", "impute_zero")
IMPUTE_POLICIES = ("impute_mean", "impute_zero")
#: How many offending columns one message lists before it summarises.
_MAX_COLUMN_MESSAGES = 5


# --------------------------------------------------------------------------------------------- #
# gene set
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class GeneSet:
    """Ordered features per subspace. ``features`` is tumour then micro (the stats' order)."""

    tumour: tuple[str, ...]
    micro: tuple[str, ...]
    source: str = "geneset.csv"

    @property
    def features(self) -> tuple[str, ...]:
        return self.tumour + self.micro

    @property
    def digest(self) -> str:
        """sha256 of the ordered (subspace, feature) list: equal digests mean equal vector layouts,
        so the server can refuse a site whose genes differ in name OR order."""
        text = "".join(f"{s}\t{f}\n" for s, fs in (("tumour", self.tumour), ("micro", self.micro)) for f in fs)
        return hashlib.sha256(text.encode()).hexdigest()

    def input_dims(self, policy: str = "error") -> tuple[int, int]:
        """Widths of the tumour and micro vectors the model receives (``model.genes_tumour``,
        ``model.genes_micro``): impute policies add one missingness column per subspace."""
        extra = 1 if policy in IMPUTE_POLICIES else 0
        return len(self.tumour) + extra, len(self.micro) + extra


def read_geneset(path: Path | str) -> GeneSet:
    """Read ``geneset.csv`` (columns ``feature``, ``subspace`` in SUBSPACES), keeping row order.

    A feature listed in both subspaces is an error (it would be counted twice, and the choice
    between them is a biological decision the file must make, method.md A.5); a feature listed
    twice in the same subspace is an error too (ambiguous position).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise SiteDataError(f"{path}: gene-set file not found (expected columns feature, subspace)") from None
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise SiteDataError(f"{path}: not a readable CSV file ({e})") from None
    missing = [c for c in ("feature", "subspace") if c not in df.columns]
    if missing:
        raise SiteDataError(f"{path}: column(s) {missing} missing; expected columns feature, subspace "
                            f"(found {preview(df.columns)})")
    feats = df["feature"].str.strip()
    subs = df["subspace"].str.strip().str.lower()
    problems: list[str] = []
    line = lambda i: i + 2  # header is line 1
    for i in np.flatnonzero((feats == "").to_numpy()):
        problems.append(f"{path}: line {line(i)}, column 'feature': empty feature name")
    bad = np.flatnonzero(~subs.isin(SUBSPACES).to_numpy())
    if len(bad):
        problems.append(f"{path}: line {line(bad[0])}, column 'subspace': expected one of {list(SUBSPACES)}"
                        + (f" ({len(bad)} lines are invalid)" if len(bad) > 1 else ""))
    first_line: dict[tuple[str, str], int] = {}
    for i, (f, s) in enumerate(zip(feats, subs)):
        if not f or s not in SUBSPACES:
            continue
        if (f, s) in first_line:
            problems.append(f"{path}: line {line(i)}, column 'feature': {f!r} is listed twice in subspace "
                            f"{s!r} (first on line {first_line[(f, s)]})")
            continue
        first_line[(f, s)] = line(i)
    both = [f for (f, s) in first_line if s == "tumour" and (f, "micro") in first_line]
    if both:
        problems.append(f"{path}: feature(s) {preview(both)} are listed in both subspaces; assign each "
                        "feature to exactly one of 'tumour' or 'micro'")
    tumour = tuple(f for (f, s) in first_line if s == "tumour")
    micro = tuple(f for (f, s) in first_line if s == "micro")
    for name, fs in (("tumour", tumour), ("micro", micro)):
        if not fs and not problems:
            problems.append(f"{path}: subspace {name!r} has no feature; each subspace's gene encoder needs "
                            "at least one input")
    if problems:
        raise SiteDataError(problems)
    return GeneSet(tumour=tumour, micro=micro, source=str(path))


# --------------------------------------------------------------------------------------------- #
# reading a table
# --------------------------------------------------------------------------------------------- #
def _is_tab_separated(name: str) -> bool:
    stem = name
    for comp in (".gz", ".zip", ".bz2", ".xz", ".zst"):
        if stem.endswith(comp):
            stem = stem[: -len(comp)]
    return stem.endswith((".tsv", ".txt", ".tab"))


def read_table(path: Path | str, patient_column: str = "patient_id") -> pd.DataFrame:
    """Read a patients x features table (CSV, zipped/gzipped CSV, TSV/TXT, Parquet).

    Returns a frame indexed by patient id (str, stripped), columns as in the file, values as the
    file holds them (not yet validated as numbers). Raises SiteDataError for an unreadable file, a
    missing patient column, empty patient ids and duplicate patients (each named).
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
            where, header = "row", None  # Parquet cannot hold two columns of one name
        else:
            sep = "\t" if _is_tab_separated(name) else ","
            df = pd.read_csv(path, sep=sep, dtype={patient_column: str}, low_memory=False)
            where = "line"
            # pandas renames a repeated header (x, x.1): read the raw header to refuse it instead
            header = pd.read_csv(path, sep=sep, nrows=1, header=None, dtype=str).iloc[0]
    except FileNotFoundError:
        raise SiteDataError(f"{path}: genomic table not found") from None
    except (OSError, ValueError, ImportError, pd.errors.ParserError) as e:
        raise SiteDataError(f"{path}: not a readable table ({type(e).__name__}: {e})") from None
    dup_cols = header[header.duplicated()].unique() if header is not None else []
    if len(dup_cols):
        raise SiteDataError(f"{path}: column(s) {preview(dup_cols)} appear more than once in the header; "
                            "expected one column per feature")
    if patient_column not in df.columns:
        raise SiteDataError(f"{path}: patient column {patient_column!r} missing (found "
                            f"{preview(df.columns)}); set the patient column or rename it")
    ids = df[patient_column]
    empty = ids.isna().to_numpy() | (ids.astype(str).str.strip() == "").to_numpy()
    if empty.any():
        pos = np.flatnonzero(empty)
        num = [int(i) + (2 if where == "line" else 0) for i in pos]
        raise SiteDataError(f"{path}: column {patient_column!r}: empty patient id on {where}(s) "
                            f"{preview(num)}")
    df = df.set_index(ids.astype(str).str.strip().rename(patient_column)).drop(columns=[patient_column])
    dup = df.index[df.index.duplicated()].unique()
    if len(dup):
        raise SiteDataError(f"{path}: column {patient_column!r}: duplicate patient(s) {preview(dup)}; "
                            "expected one row per patient (aggregate per-slide or per-sample rows first)")
    return df


def read_table_columns(path: Path | str, patient_column: str = "patient_id") -> list[str]:
    """The feature columns of a genomic table (every column but the patient column), from its header
    alone: for checks that look at names, never at values. Raises SiteDataError if unreadable."""
    path = Path(path)
    try:
        if path.name.lower().endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            cols = list(pq.read_schema(path).names)
        else:
            cols = list(pd.read_csv(path, sep="\t" if _is_tab_separated(path.name.lower()) else ",", nrows=0).columns)
    except FileNotFoundError:
        raise SiteDataError(f"{path}: genomic table not found") from None
    except (OSError, ValueError, ImportError, pd.errors.ParserError) as e:
        raise SiteDataError(f"{path}: not a readable table ({type(e).__name__}: {e})") from None
    return [str(c) for c in cols if str(c) != patient_column]


def log1p_columns(features: Iterable[str], suffixes: Sequence[str]) -> list[str]:
    """The features that ``data.log1p_features`` selects (name ends with one of the suffixes)."""
    suffixes = tuple(suffixes)
    return [f for f in features if suffixes and f.endswith(suffixes)]


# --------------------------------------------------------------------------------------------- #
# statistics
# --------------------------------------------------------------------------------------------- #
# --------------------------------------------------------------------------------------------- #
# validated site genomics
# --------------------------------------------------------------------------------------------- #
@dataclass
class GenomicsData:
    """A site's genomic values, validated and aligned: rows are the requested patients (in that
    order), columns the gene set's features (in its order), log1p applied where configured, NaN
    for a missing value (only possible under an impute policy)."""

    geneset: GeneSet
    values: pd.DataFrame
    policy: str = "error"
    source: str = "genomics.csv"
    report: Report = field(default_factory=Report)

    def stats(self, patients: Sequence[str] | None = None) -> GenomicsStats:
        """Statistics over ``patients`` (normally the training split); all rows when None."""
        frame = self.values if patients is None else self.values.loc[list(patients)]
        return GenomicsStats.from_frame(frame)

    def encode(self, patients: Sequence[str], stats: GenomicsStats,
               clip: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Tumour (P, Gt) and micro (P, Ge) float32 model inputs for ``patients``.

        Missing values: ``impute_mean`` fills the training mean (0 after standardising),
        ``impute_zero`` fills a raw 0; both then append, per subspace, the fraction of that
        subspace's features that were missing for the patient, so the vector width never depends on
        the data (``GeneSet.input_dims``).
        """
        if stats.features != self.geneset.features:
            raise ValueError(f"{self.source}: the standardisation statistics describe a different gene set "
                             f"({len(stats.features)} features) than {self.geneset.source} "
                             f"({len(self.geneset.features)}), or a different order")
        x = self.values.loc[list(patients)].to_numpy(dtype=np.float64)  # (P, F)
        missing = ~np.isfinite(x)
        if missing.any() and self.policy not in IMPUTE_POLICIES:
            col = int(np.flatnonzero(missing.any(0))[0])
            raise SiteDataError(f"{self.source}: column {self.geneset.features[col]!r} has missing values "
                                f"and data.genomics_policy is {self.policy!r}")
        mean, std = stats.mean(), stats.std()
        if self.policy == "impute_zero":
            x = np.where(missing, 0.0, x)
        z = (x - mean) / std
        if self.policy == "impute_mean":
            z = np.where(missing, 0.0, z)
        if clip > 0:
            z = np.clip(z, -clip, clip)
        nt = len(self.geneset.tumour)
        parts = [z[:, :nt], z[:, nt:]]
        if self.policy in IMPUTE_POLICIES:
            parts = [np.concatenate([p, m.mean(1, keepdims=True)], axis=1)
                     for p, m in zip(parts, (missing[:, :nt], missing[:, nt:]))]
        return parts[0].astype(np.float32), parts[1].astype(np.float32)


def _first_rows(mask: np.ndarray, index: pd.Index) -> tuple[str, int]:
    """(first offending patient, how many) for a boolean column mask."""
    pos = np.flatnonzero(mask)
    return str(index[pos[0]]), len(pos)


def load_genomics(path: Path | str, geneset: GeneSet, patients: Sequence[str] | None = None, *,
                  policy: str = "error", log1p_suffixes: Sequence[str] = (),
                  patient_column: str = "patient_id", clinical_name: str = "clinical.csv") -> GenomicsData:
    """Read, validate and align a genomic table to ``geneset`` and ``patients`` (the clinical ones).

    Errors (raised together as one SiteDataError): unreadable file, missing patient column,
    duplicate or empty patient ids, gene-set features absent from the table, non-numeric cells
    (column and first patient named), NaN/Inf under policy ``error`` and Inf under every policy,
    clinical patients without a genomic row under policy ``error``, negative values in log1p
    features.
    Warnings (``GenomicsData.report``): table patients not in the clinical table (left out),
    features without any observed value (impute policies).
    """
    if policy not in POLICIES:
        raise ValueError(f"genomics policy {policy!r}: expected one of {POLICIES}")
    path = Path(path)
    table = read_table(path, patient_column)
    report = Report()
    problems: list[str] = []
    absent = [f for f in geneset.features if f not in table.columns]
    if absent:
        raise SiteDataError(f"{path}: {len(absent)} gene-set feature(s) from {geneset.source} missing from the "
                            f"table: {preview(absent)}")
    table = table.loc[:, list(geneset.features)]

    # Numbers: coerce only non-numeric columns (fast path for the usual all-float table).
    cols: dict[str, np.ndarray] = {}
    bad_cols = []
    for f in geneset.features:
        s = table[f]
        if pd.api.types.is_bool_dtype(s):
            s = s.astype("Float64")  # also takes nullable booleans (Parquet) with missing cells
        elif not pd.api.types.is_numeric_dtype(s):
            num = pd.to_numeric(s, errors="coerce")
            bad = (num.isna() & s.notna()).to_numpy(dtype=bool)
            if bad.any():
                bad_cols.append((f, *_first_rows(bad, table.index)))
            s = num
        cols[f] = s.to_numpy(dtype=np.float64, na_value=np.nan)
    for f, who, n in bad_cols[:_MAX_COLUMN_MESSAGES]:
        problems.append(f"{path}: column {f!r}, row patient {who!r}: not a number (expected numeric values; "
                        f"{n} non-numeric cell(s) in this column)")
    if len(bad_cols) > _MAX_COLUMN_MESSAGES:
        problems.append(f"{path}: {len(bad_cols) - _MAX_COLUMN_MESSAGES} more column(s) hold non-numeric cells: "
                        f"{preview([c[0] for c in bad_cols[_MAX_COLUMN_MESSAGES:]])}")
    x = pd.DataFrame(cols, index=table.index)

    # Patients: align to the clinical table.
    if patients is None:
        patients = list(table.index)
    patients = [str(p) for p in patients]
    pset = set(patients)
    extra = [p for p in table.index if p not in pset]
    if extra:
        report.warn(f"{path}: {len(extra)} patient(s) have genomic rows but no row in {clinical_name}; "
                    "they are left out")
    lacking = [p for p in patients if p not in table.index]
    if lacking:
        if policy in IMPUTE_POLICIES:
            report.warn(f"{path}: {len(lacking)} patient(s) of {clinical_name} have no genomic row; all their "
                        f"features are imputed ({policy}) and their missingness columns are 1")
        else:
            problems.append(f"{path}: {len(lacking)} patient(s) of {clinical_name} have no genomic row: "
                            f"{preview(lacking)} (add them, or set data.genomics_policy to impute_mean or "
                            "impute_zero)")
    x = x.reindex(patients)

    # Missing / non-finite values (non-numeric cells are already reported, so not counted twice).
    # NaN is a missing value, and the policy decides what happens to it; +-Inf is a value outside
    # the domain of any measurement (a log of 0 or a division by 0 upstream), so it is an error
    # under every policy rather than a missing value to impute.
    bad_names = {c[0] for c in bad_cols}
    arr = x.to_numpy()
    present = x.index.isin(table.index)
    flagged = ~np.isfinite(arr) if policy == "error" else np.isinf(arr)
    offending = [j for j, f in enumerate(geneset.features) if f not in bad_names and flagged[present, j].any()]
    for j in offending[:_MAX_COLUMN_MESSAGES]:
        col = flagged[:, j] & present
        who, n = _first_rows(col, x.index)
        where = f"{path}: column {geneset.features[j]!r}, row patient {who!r}"
        if policy == "error":
            kinds = "NaN" if not np.isinf(arr[col, j]).any() else "NaN/Inf"
            problems.append(f"{where}: missing or {kinds} value ({n} in this column); data.genomics_policy is "
                            "'error' (expected finite numbers, or set impute_mean / impute_zero)")
        else:
            problems.append(f"{where}: infinite value ({n} in this column); expected finite numbers (a missing "
                            f"value is an empty cell, which {policy} imputes)")
    if len(offending) > _MAX_COLUMN_MESSAGES:
        rest = [geneset.features[j] for j in offending[_MAX_COLUMN_MESSAGES:]]
        what = "missing or non-finite" if policy == "error" else "infinite"
        problems.append(f"{path}: {len(rest)} more column(s) hold {what} values: {preview(rest)}")
    if policy != "error":
        missing = np.isnan(arr)
        n_missing = int(missing[present].sum())
        if n_missing:
            report.note(f"{path}: {n_missing} missing value(s) will be imputed ({policy})")
        all_missing = [f for j, f in enumerate(geneset.features) if missing[:, j].all()]
        if all_missing:
            report.warn(f"{path}: {len(all_missing)} feature(s) have no observed value at this site: "
                        f"{preview(all_missing)}")

    # log1p, after validation so the negative check sees real numbers.
    logs = log1p_columns(geneset.features, log1p_suffixes)
    if logs:
        idx = [geneset.features.index(f) for f in logs]
        sub = arr[:, idx]
        neg = np.isfinite(sub) & (sub < 0)
        for k in np.flatnonzero(neg.any(0))[:_MAX_COLUMN_MESSAGES]:
            who, n = _first_rows(neg[:, k], x.index)
            problems.append(f"{path}: column {logs[k]!r}, row patient {who!r}: negative value ({n} in this column) "
                            "but data.log1p_features selects this column; log1p needs values >= 0 (raw "
                            "counts or FPKM, not z-scores)")
        arr = arr.copy()
        arr[:, idx] = np.log1p(np.where(neg, np.nan, sub))
    if problems:
        raise SiteDataError(problems)
    values = pd.DataFrame(arr, index=pd.Index(patients, name=patient_column), columns=list(geneset.features))
    return GenomicsData(geneset=geneset, values=values, policy=policy, source=str(path), report=report)
