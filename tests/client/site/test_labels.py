"""Labels from clinical.csv: the WHO 2021 rule on every branch, spellings, masks and their reasons."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from client.site.labels import (diagnosis_mask_reasons, grade_index, parse_clinical, read_clinical,
                           who2021_diagnosis)
from client.site.validation import SiteDataError

nan = np.nan

# (idh, codel, cdkn2ab deleted, WHO grade) -> expected class (-1 = undecided), one row per branch.
BRANCHES = [
    # IDH-wildtype -> GBM whatever the rest (including all of it missing)
    (0, nan, nan, nan, 0), (0, 1, 1, 2, 0), (0, 0, 0, 3, 0),
    # IDH missing -> undecided, even with every other marker known
    (nan, 1, 1, 4, -1), (nan, 0, 0, 2, -1),
    # IDH-mutant, 1p/19q codeleted -> oligodendroglioma (cdkn/grade irrelevant)
    (1, 1, nan, nan, 3), (1, 1, 1, 4, 3),
    # IDH-mutant, codel missing -> undecided
    (1, nan, 1, 4, -1), (1, nan, 0, 2, -1),
    # IDH-mutant, non-codel: CDKN2A/B deleted -> astro G4 whatever the grade
    (1, 0, 1, 2, 1), (1, 0, 1, 3, 1), (1, 0, 1, nan, 1),
    # ... or histological grade 4 -> astro G4 whatever CDKN2A/B
    (1, 0, 0, 4, 1), (1, 0, nan, 4, 1),
    # ... not deleted and grade 2/3 -> lower-grade astrocytoma
    (1, 0, 0, 2, 2), (1, 0, 0, 3, 2),
    # ... CDKN2A/B missing and grade not 4 -> undecided
    (1, 0, nan, 2, -1), (1, 0, nan, 3, -1), (1, 0, nan, nan, -1),
    # ... not deleted, grade missing -> undecided (grade-4 histology would make it class 1)
    (1, 0, 0, nan, -1),
]


def test_who2021_every_branch_vectorised():
    arr = np.array(BRANCHES, dtype=float)
    got = who2021_diagnosis(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
    assert got.dtype == np.int64
    assert got.tolist() == arr[:, 4].astype(int).tolist()
    reasons = diagnosis_mask_reasons(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
    assert all((r is None) == (e >= 0) for r, e in zip(reasons, arr[:, 4]))
    assert reasons[3] == "idh missing" and reasons[7] == "codel_1p19q missing (IDH-mutant)"
    assert reasons[16].startswith("cdkn2ab missing") and reasons[19].startswith("grade missing")


def test_grade_index():
    assert grade_index([2, 3, 4, nan, 5]).tolist() == [0, 1, 2, -1, -1]


def frame(**cols):
    base = {"patient_id": ["A"], "idh": ["mutant"], "codel_1p19q": ["non-codel"], "cdkn2ab": ["0"],
            "grade": ["2"], "survival_days": ["100"], "event": ["1"]}
    base.update(cols)
    n = max(len(v) for v in base.values())
    if len(base["patient_id"]) < n:
        base["patient_id"] = [f"P{i}" for i in range(n)]
    return pd.DataFrame({k: (v if len(v) == n else v * n) for k, v in base.items()})


def test_spellings_are_accepted():
    df = frame(idh=["Mutant", "WT", "mut", "1", "wildtype", "0", ""],
               codel_1p19q=["codel", "NON-CODEL", "1", "0", "non-codel", "codel", "NA"],
               grade=["G2", "III", "4", "ii", "G4", "2.0", "[Not Available]"])
    lab = parse_clinical(df)
    assert lab.idh.tolist()[:6] == [1, 0, 1, 1, 0, 0] and np.isnan(lab.idh[6])
    assert lab.codel.tolist()[:6] == [1, 0, 1, 0, 0, 1] and np.isnan(lab.codel[6])
    assert lab.grade.tolist() == [0, 1, 2, 0, 2, 0, -1]
    assert lab.diagnosis.tolist() == [3, 0, 3, 2, 0, 0, -1]


def test_cdkn2ab_codings():
    gistic = parse_clinical(frame(cdkn2ab=["-2", "-1", "0", "1", "2"], grade=["3"]))
    assert gistic.cdkn2ab.tolist() == [1, 1, 0, 0, 0]  # 1 is a gain in GISTIC, not a deletion
    assert gistic.diagnosis.tolist() == [1, 1, 2, 2, 2]
    assert any("gistic" in n for n in gistic.report.notes)
    binary = parse_clinical(frame(cdkn2ab=["1", "0", "homdel", "not deleted"], grade=["3"]))
    assert binary.cdkn2ab.tolist() == [1, 0, 1, 0]
    with pytest.raises(SiteDataError, match=r"'cdkn2ab', row patient 'P0'"):
        parse_clinical(frame(cdkn2ab=["5", "0"]))
    with pytest.raises(SiteDataError, match=r"'cdkn2ab'"):
        parse_clinical(frame(cdkn2ab=["-2", "1"]), cdkn2ab_coding="binary")


def test_bad_values_name_column_and_patient():
    with pytest.raises(SiteDataError) as e:
        parse_clinical(frame(idh=["mutant", "maybe"], grade=["2", "V"], event=["1", "2"]), "site/clinical.csv")
    msg = str(e.value)
    assert "site/clinical.csv: column 'idh', row patient 'P1'" in msg
    assert "column 'grade', row patient 'P1'" in msg and "column 'event', row patient 'P1'" in msg
    assert len(e.value.problems) == 3  # all columns reported at once
    with pytest.raises(SiteDataError, match=r"'survival_days', row patient 'P1'.*days"):
        parse_clinical(frame(survival_days=["10", "ten"]))
    with pytest.raises(SiteDataError, match=r"missing"):
        parse_clinical(frame().drop(columns=["event"]))
    with pytest.raises(SiteDataError, match=r"duplicate patient"):
        parse_clinical(frame(patient_id=["A", "A"], idh=["wt", "wt"]))


def test_survival_masks_with_counted_reasons():
    lab = parse_clinical(frame(survival_days=["100", "", "200", "300.5", "0.9"],
                               event=["1", "1", "", "false", "1"]))
    assert lab.survival_known.tolist() == [True, False, False, True, True]
    assert lab.masked["survival"] == {"survival_days missing": 1, "event missing": 1}
    assert lab.survival_time[3] == 300.5 and lab.event.tolist()[3] == 0.0
    assert np.isnan(lab.survival_time[1]) and np.isnan(lab.event[1])
    # a missing label masks only its own task
    m = lab.masks()
    assert m["diagnosis"].all() and m["grade"].all()


@pytest.mark.parametrize("bad", ["-5", "0", "-0.0"])
def test_survival_time_not_above_zero_is_an_error_not_a_mask(bad):
    # A time <= 0 is out of the domain (the discrete-time loss needs > 0): naming file, column and
    # patient, never masking it (the TCGA tables have no such time, so 0 is not a real value here).
    with pytest.raises(SiteDataError) as e:
        parse_clinical(frame(survival_days=["100", bad, "-3"], event=["1", "0", "1"]), "site/clinical.csv")
    msg = str(e.value)
    assert "site/clinical.csv: column 'survival_days', row patient 'P1': value out of range" in msg
    assert "> 0" in msg and "(2 rows are invalid)" in msg and len(e.value.problems) == 1


def test_the_diagnosis_rule_reads_exactly_the_declared_facts():
    import inspect

    from client.site.labels import DIAGNOSIS_READS, GRADE_READS, LABEL_COLUMNS
    from smm_model.contract.label_facts import FACT_NAMES

    assert DIAGNOSIS_READS == FACT_NAMES and set(GRADE_READS) <= set(FACT_NAMES)
    assert LABEL_COLUMNS[: len(FACT_NAMES)] == FACT_NAMES  # clinical.csv's columns come from the declaration
    assert len(inspect.signature(who2021_diagnosis).parameters) == len(FACT_NAMES)
    # every declared fact changes the diagnosis of some patient when only it changes
    arr = np.array(BRANCHES, dtype=float)[:, :4]
    base = who2021_diagnosis(*arr.T)
    for k, name in enumerate(FACT_NAMES):
        flipped = arr.copy()
        flipped[:, k] = np.where(np.isnan(arr[:, k]), 0, np.nan)  # known <-> unknown
        assert (who2021_diagnosis(*flipped.T) != base).any(), name


def test_missing_label_masks_only_that_task():
    lab = parse_clinical(frame(grade=["", "3"], cdkn2ab=["1", "0"]))
    assert lab.grade.tolist() == [-1, 1]
    assert lab.diagnosis.tolist() == [1, 2]  # deleted CDKN2A/B decides class 1 without the grade
    assert lab.masked["grade"] == {"grade missing": 1}


def test_split_column_values():
    lab = parse_clinical(frame(split=["train", "VAL", " test "]))
    assert lab.split == ("train", "val", "test")
    with pytest.raises(SiteDataError, match=r"'split', row patient 'P1'"):
        parse_clinical(frame(split=["train", "holdout", "test"]))
    with pytest.raises(SiteDataError, match=r"'split', row patient 'P2'"):
        parse_clinical(frame(split=["train", "val", ""]))
    assert parse_clinical(frame(split=["", ""])).split is None  # an empty column is no split


def test_tcga_sample_barcodes_of_one_case_are_refused():
    with pytest.raises(SiteDataError, match="one TCGA case"):
        parse_clinical(frame(patient_id=["TCGA-02-0001-01", "TCGA-02-0001-02"], idh=["wt", "wt"]))


def test_read_clinical_file(tmp_path):
    p = tmp_path / "clinical.csv"
    frame(idh=["wt", "mutant"], codel_1p19q=["", "codel"]).to_csv(p, index=False)
    lab = read_clinical(p)
    assert lab.patients == ("P0", "P1") and lab.diagnosis.tolist() == [0, 3]
    with pytest.raises(SiteDataError, match="not found"):
        read_clinical(tmp_path / "nope.csv")
