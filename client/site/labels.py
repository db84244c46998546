"""Labels from a site's ``clinical.csv``: WHO 2021 diagnosis, grade and survival.

Columns: ``patient_id, idh, codel_1p19q, cdkn2ab, grade, survival_days, event`` (+ optional
``split``). Hospitals write these fields in many spellings, so each parser accepts the common ones
(case-insensitive) and rejects anything else with the file, column and patient named: a typo must
not silently become "unknown" or, worse, a class.

A missing value masks that patient for the tasks that need it, and only those: a patient without
1p/19q status still trains grade and survival. Masks are never guesses; the reason for every
masked label is counted so the site check can say why a class is small. A value outside its
domain (a negative or zero survival time, an event that is not 0/1) is not missing: it is an
error naming the file, the column and the patient, because masking it would hide a broken export.

The diagnosis rule (method.md B.2.4) is the pure vectorised function ``who2021_diagnosis``. The
facts it reads (``DIAGNOSIS_READS``) are declared in ``smm_model.contract.label_facts``, together with the
genomic feature names that measure each fact directly, so that the site check and the server can
refuse a genomic input that would hand the model its own label.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from client.site.validation import MISSING_TOKENS, Report, SiteDataError, preview
from smm_model.contract.classes import DIAGNOSES, GRADES, grade_index, who2021_diagnosis
from smm_model.contract.label_facts import FACT_NAMES, fact

__all__ = ["DIAGNOSIS_READS", "GRADE_READS", "LABEL_COLUMNS", "DIAGNOSES", "GRADES", "SPLITS", "CDKN2AB_CODINGS",
           "ClinicalLabels", "who2021_diagnosis", "diagnosis_mask_reasons", "grade_index", "read_clinical",
           "parse_clinical"]

#: The clinical columns (facts) ``who2021_diagnosis`` reads, in its argument order: declared once in
#: smm_model.contract.label_facts, where the genomic features that measure each one are listed too.
DIAGNOSIS_READS = FACT_NAMES
#: The facts the grade task reads (``fact`` raises if label_facts stops declaring it).
GRADE_READS = (fact("grade").name,)
#: Columns clinical.csv must have (cells may be empty where unknown).
LABEL_COLUMNS = (*DIAGNOSIS_READS, "survival_days", "event")
SPLITS = ("train", "val", "test")
#: How cdkn2ab integers are read: ``binary`` 1 = homozygous deletion; ``gistic`` -2/-1 = deleted,
#: 0/1/2 = not; ``auto`` = gistic when any value is -2, -1 or 2, else binary.
CDKN2AB_CODINGS = ("auto", "binary", "gistic")

_IDH = {**dict.fromkeys(("mutant", "mut", "mutated", "1", "1.0", "true", "yes", "idhmut", "idh-mutant",
                         "idh mutant"), 1.0),
        **dict.fromkeys(("wildtype", "wild-type", "wild type", "wt", "0", "0.0", "false", "no", "idhwt",
                         "idh-wildtype", "idh wildtype"), 0.0)}
_CODEL = {**dict.fromkeys(("codel", "codeleted", "co-deleted", "1", "1.0", "true", "yes"), 1.0),
          **dict.fromkeys(("non-codel", "noncodel", "non codel", "non-codeleted", "not codeleted", "0", "0.0",
                           "false", "no", "intact"), 0.0)}
_CDKN_WORDS = {**dict.fromkeys(("homdel", "homozygous deletion", "deleted", "deletion", "del", "yes", "true"), 1.0),
               **dict.fromkeys(("not deleted", "no deletion", "intact", "no", "false", "wt", "wildtype"), 0.0)}
_GRADE = {**dict.fromkeys(("2", "2.0", "ii"), 2.0), **dict.fromkeys(("3", "3.0", "iii"), 3.0),
          **dict.fromkeys(("4", "4.0", "iv"), 4.0)}
_GRADE_PREFIX = re.compile(r"^(who)?\s*(grade)?\s*(g)?\s*")
_EVENT = {**dict.fromkeys(("1", "1.0", "true", "dead", "deceased", "event", "yes"), 1.0),
          **dict.fromkeys(("0", "0.0", "false", "alive", "living", "censored", "no"), 0.0)}
_TCGA_CASE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)


# --------------------------------------------------------------------------------------------- #
# the rule
# --------------------------------------------------------------------------------------------- #
def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def survival_bin_edges(time: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges (n_bins - 1) at quantiles of the observed-event times (training data only):
    the discrete-time survival labels every site and the synthetic cohort writer use."""
    t = np.asarray(time, dtype=float)[np.asarray(event) > 0]
    if t.size == 0:
        t = np.asarray(time, dtype=float)
    return np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1])


def assign_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index per time: 0 if t < edges[0], ..., len(edges) if t >= edges[-1]."""
    return np.searchsorted(np.asarray(edges, dtype=float), np.asarray(time, dtype=float), side="right")


def diagnosis_mask_reasons(idh, codel, cdkn2ab, grade) -> np.ndarray:
    """Why ``who2021_diagnosis`` is -1, per patient (object array; None where it is decided)."""
    idh, codel, cdkn, grade = _f(idh), _f(codel), _f(cdkn2ab), _f(grade)
    diag = who2021_diagnosis(idh, codel, cdkn, grade)
    mut_nc = (idh == 1) & (codel == 0)
    reason = np.select(
        [np.isnan(idh), (idh == 1) & np.isnan(codel), mut_nc & np.isnan(cdkn), mut_nc & (cdkn == 0)],
        ["idh missing", "codel_1p19q missing (IDH-mutant)",
         "cdkn2ab missing and grade not 4 (IDH-mutant, non-codeleted)",
         "grade missing and cdkn2ab not deleted (IDH-mutant, non-codeleted)"], default="undecided")
    return np.where(diag >= 0, None, reason).astype(object)


# --------------------------------------------------------------------------------------------- #
# the table
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class ClinicalLabels:
    """Parsed labels of a site, one entry per patient in clinical.csv order.

    ``diagnosis``/``grade`` are int64 with -1 for unknown; ``survival_time`` (days) and ``event``
    are float64, NaN where unknown; ``survival_known`` is True where both are usable. ``split`` holds
    the clinical ``split`` column when the site gives one. ``masked[task][reason]`` counts why labels
    are unknown. The raw markers (``idh`` ...) are kept for summaries and tests.
    """

    source: str
    patients: tuple[str, ...]
    idh: np.ndarray
    codel: np.ndarray
    cdkn2ab: np.ndarray
    grade_who: np.ndarray
    diagnosis: np.ndarray
    grade: np.ndarray
    survival_time: np.ndarray
    event: np.ndarray
    survival_known: np.ndarray
    split: tuple[str, ...] | None = None
    masked: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    report: Report = field(default_factory=Report)

    def __len__(self) -> int:
        return len(self.patients)

    def masks(self) -> dict[str, np.ndarray]:
        """Per task: True where the label is known (the ``label_mask`` of collate_patients)."""
        return {"diagnosis": self.diagnosis >= 0, "grade": self.grade >= 0, "survival": self.survival_known}

    def positions(self, patients) -> np.ndarray:
        """Row positions of ``patients`` (KeyError naming the first unknown one)."""
        where = {p: i for i, p in enumerate(self.patients)}
        try:
            return np.array([where[p] for p in patients], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"{self.source}: patient {e.args[0]!r} is not in the clinical table") from None


def read_clinical(path: Path | str, *, patient_column: str = "patient_id",
                  cdkn2ab_coding: str = "auto") -> ClinicalLabels:
    """Read and parse ``clinical.csv``; every bad cell is reported (one SiteDataError, all problems)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise SiteDataError(f"{path}: clinical table not found") from None
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise SiteDataError(f"{path}: not a readable CSV file ({e})") from None
    return parse_clinical(df, str(path), patient_column=patient_column, cdkn2ab_coding=cdkn2ab_coding)


def _norm(s: pd.Series) -> pd.Series:
    """Lower-cased, stripped text with every missing token turned into NA."""
    t = s.astype("string").str.strip().str.lower()
    return t.mask(t.isna() | t.isin(MISSING_TOKENS))


class _Parser:
    """Column parsers sharing the file name, patient ids and the problem list."""

    def __init__(self, df: pd.DataFrame, source: str, ids: pd.Index) -> None:
        self.df, self.source, self.ids = df, source, ids
        self.problems: list[str] = []

    def bad(self, column: str, mask: np.ndarray, expected: str, what: str = "unrecognised value") -> None:
        pos = np.flatnonzero(mask)
        if len(pos):
            more = f" ({len(pos)} rows are invalid)" if len(pos) > 1 else ""
            self.problems.append(f"{self.source}: column {column!r}, row patient {self.ids[pos[0]]!r}: "
                                 f"{what}; expected {expected}{more}")

    def tokens(self, column: str, mapping: Mapping[str, float], expected: str,
               pre: re.Pattern | None = None) -> np.ndarray:
        t = _norm(self.df[column])
        if pre is not None:
            t = t.str.replace(pre, "", regex=True).str.strip()
        v = t.map(mapping).astype("Float64")
        self.bad(column, (t.notna() & v.isna()).to_numpy(dtype=bool), expected)
        return v.to_numpy(dtype=np.float64, na_value=np.nan)

    def number(self, column: str, expected: str) -> np.ndarray:
        t = _norm(self.df[column])
        v = pd.to_numeric(t, errors="coerce").astype("Float64")
        arr = v.to_numpy(dtype=np.float64, na_value=np.nan)
        self.bad(column, (t.notna().to_numpy(dtype=bool) & ~np.isfinite(arr)), expected)
        return np.where(np.isfinite(arr), arr, np.nan)


def _parse_cdkn(p: _Parser, coding: str, report: Report) -> np.ndarray:
    col = "cdkn2ab"
    t = _norm(p.df[col])
    words = t.map(_CDKN_WORDS).astype("Float64")
    num = pd.to_numeric(t.mask(words.notna()), errors="coerce").astype("Float64")
    arr = num.to_numpy(dtype=np.float64, na_value=np.nan)
    is_num = np.isfinite(arr)
    allowed = {"binary": (0, 1), "gistic": (-2, -1, 0, 1, 2)}
    if coding == "auto":
        coding = "gistic" if np.isin(arr[is_num], (-2, -1, 2)).any() else "binary"
        if is_num.any():
            report.note(f"{p.source}: column 'cdkn2ab' read as {coding} "
                        + ("(-2/-1 = homozygous deletion)" if coding == "gistic"
                           else "(1 = homozygous deletion; no value is -2, -1 or 2)"))
    ok_num = is_num & np.isin(arr, allowed[coding])
    p.bad(col, (t.notna() & words.isna()).to_numpy(dtype=bool) & ~ok_num,
          "1/0 (homozygous deletion yes/no), a GISTIC integer -2..2 (-2/-1 = deleted), or homdel/not deleted"
          if coding != "binary" or not is_num.any() else
          "1/0 (homozygous deletion yes/no) or homdel/not deleted")
    deleted = (arr <= -1) if coding == "gistic" else (arr == 1)
    out = np.where(ok_num, deleted.astype(np.float64), np.nan)
    w = words.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(w), w, out)


def parse_clinical(df: pd.DataFrame, source: str = "clinical.csv", *, patient_column: str = "patient_id",
                   cdkn2ab_coding: str = "auto") -> ClinicalLabels:
    """Parse a clinical frame (all cells as text) into labels; see ``read_clinical``."""
    if cdkn2ab_coding not in CDKN2AB_CODINGS:
        raise ValueError(f"cdkn2ab_coding {cdkn2ab_coding!r}: expected one of {CDKN2AB_CODINGS}")
    missing = [c for c in (patient_column, *LABEL_COLUMNS) if c not in df.columns]
    if missing:
        raise SiteDataError(f"{source}: column(s) {missing} missing; expected {patient_column}, "
                            f"{', '.join(LABEL_COLUMNS)} [, split] (cells may be empty where unknown)")
    if len(df) == 0:
        raise SiteDataError(f"{source}: no patient rows")
    raw_ids = df[patient_column].astype("string").str.strip()
    problems: list[str] = []
    empty = (raw_ids.isna() | (raw_ids == "")).to_numpy(dtype=bool)
    if empty.any():
        problems.append(f"{source}: column {patient_column!r}: empty patient id on line(s) "
                        f"{preview([int(i) + 2 for i in np.flatnonzero(empty)])}")
        raise SiteDataError(problems)
    ids = pd.Index(raw_ids.astype(str))
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise SiteDataError(f"{source}: column {patient_column!r}: duplicate patient(s) {preview(dup)}; "
                            "expected one row per patient")
    cases: dict[str, list[str]] = {}
    for pid in ids:
        m = _TCGA_CASE.match(pid)
        if m:
            cases.setdefault(m.group(1).upper(), []).append(pid)
    shared = {c: v for c, v in cases.items() if len(v) > 1}
    if shared:
        c, v = next(iter(shared.items()))
        raise SiteDataError(f"{source}: column {patient_column!r}: patient ids {preview(v)} are one TCGA case "
                            f"({c}); use one row per patient (the 12-character case barcode) so splits stay "
                            f"patient-level ({len(shared)} case(s) affected)")

    p = _Parser(df, source, ids)
    report = Report()
    idh = p.tokens("idh", _IDH, "mutant/wildtype, mut/wt or 1/0")
    codel = p.tokens("codel_1p19q", _CODEL, "codel/non-codel or 1/0")
    cdkn = _parse_cdkn(p, cdkn2ab_coding, report)
    grade_who = p.tokens("grade", _GRADE, "2/3/4, G2/G3/G4 or II/III/IV", pre=_GRADE_PREFIX)
    days = p.number("survival_days", "a number of days (finite; empty if unknown)")
    # Not a mask: a time <= 0 is no follow-up at all (the discrete-time survival loss needs a time
    # > 0), so it is a broken export or a date subtraction the wrong way round. The TCGA tables hold
    # none (their shortest follow-up is 0.03 months).
    p.bad("survival_days", days <= 0, "a number of days > 0 (time from diagnosis to death or last "
          "follow-up; empty if unknown)", what="value out of range")
    event = p.tokens("event", _EVENT, "1 (death observed) or 0 (censored)")
    split = None
    if "split" in df.columns:
        s = _norm(df["split"])
        if s.notna().any():
            p.bad("split", (s.isna() | ~s.isin(SPLITS)).to_numpy(dtype=bool),
                  f"one of {list(SPLITS)} on every row (or leave the whole column empty)")
            split = tuple(str(v) for v in s.fillna("").to_numpy())
        else:
            report.note(f"{source}: column 'split' is empty; splits are drawn (seeded, stratified)")
    if p.problems:
        raise SiteDataError(p.problems)

    diagnosis = who2021_diagnosis(idh, codel, cdkn, grade_who)
    grade = grade_index(grade_who)
    no_days = np.isnan(days)
    no_event = ~no_days & np.isnan(event)
    survival_known = ~(no_days | no_event)
    masked = {
        "diagnosis": dict(Counter(r for r in diagnosis_mask_reasons(idh, codel, cdkn, grade_who) if r)),
        "grade": {"grade missing": int((grade < 0).sum())} if (grade < 0).any() else {},
        "survival": {k: int(v.sum()) for k, v in (("survival_days missing", no_days),
                                                  ("event missing", no_event)) if v.any()},
    }
    for task, reasons in masked.items():
        for reason, n in reasons.items():
            report.note(f"{source}: {n} patient(s) masked for {task}: {reason}")
    return ClinicalLabels(source=source, patients=tuple(ids), idh=idh, codel=codel, cdkn2ab=cdkn,
                          grade_who=grade_who, diagnosis=diagnosis, grade=grade,
                          survival_time=np.where(survival_known, days, np.nan),
                          event=np.where(survival_known, event, np.nan), survival_known=survival_known,
                          split=split, masked=masked, report=report)
