"""The classes every part of fedsmm names: the WHO 2021 rule that defines them, and their names.

The rule (method.md Part B 2.4; WHO CNS5, 2021) decides the diagnosis from IDH mutation, 1p/19q
codeletion, CDKN2A/B homozygous deletion and the WHO grade; the site reads its labels with it
(``client.site.labels``), the cohort writers count classes with it (``client.cohorts``), and the
report names the classes it draws (``server.report``). One copy, so a change of the rule or of a
name reaches all of them at once.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DIAGNOSES", "DIAGNOSIS_KEYS", "DIAGNOSIS_SHORT", "GRADES", "CLASS_NAMES", "SHORT_CLASS_NAMES",
           "WHO2021_RULE", "who2021_diagnosis", "grade_index"]

#: Diagnosis class index -> name (TASK_CLASSES["diagnosis"] == 4).
DIAGNOSES = ("GBM, IDH-wildtype", "astrocytoma, IDH-mutant, grade 4", "astrocytoma, IDH-mutant, grade 2-3",
             "oligodendroglioma, IDH-mutant, 1p/19q-codeleted")
#: The same classes as identifiers (cohort summaries, cohort.json).
DIAGNOSIS_KEYS = ("gbm_idhwt", "astro_g4", "astro_lg", "oligo")
#: The same classes for figure axes and tables.
DIAGNOSIS_SHORT = ("GBM IDH-wt", "astro IDH-mut G4", "astro IDH-mut G2-3", "oligo 1p/19q-codel")
#: Grade class index -> WHO grade.
GRADES = (2, 3, 4)
#: Per task: class index -> name, long and short.
CLASS_NAMES: dict[str, tuple[str, ...]] = {"diagnosis": DIAGNOSES, "grade": tuple(f"WHO grade {g}" for g in GRADES)}
SHORT_CLASS_NAMES: dict[str, tuple[str, ...]] = {"diagnosis": DIAGNOSIS_SHORT, "grade": tuple(f"grade {g}" for g in GRADES)}
#: The rule in words, over the encoded clinical columns (recorded in every cohort.json).
WHO2021_RULE = ("idh 0 -> gbm_idhwt; idh 1 & codel 1 -> oligo; idh 1 & codel 0 & (cdkn2ab 1 or "
                "grade 4) -> astro_g4; idh 1 & codel 0 & cdkn2ab 0 & grade 2/3 -> astro_lg; "
                "anything else undetermined -> unknown")


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def who2021_diagnosis(idh, codel, cdkn2ab, grade) -> np.ndarray:
    """WHO 2021 class per patient (int64; -1 = cannot be decided from the inputs).

    Inputs are arrays of 1/0/NaN (``idh`` mutant, ``codel`` 1p/19q-codeleted, ``cdkn2ab``
    homozygous deletion) and the WHO grade 2/3/4/NaN. Classes:

    * 0 GBM: IDH-wildtype (whatever the rest);
    * 3 oligodendroglioma: IDH-mutant and 1p/19q-codeleted;
    * 1 astrocytoma grade 4: IDH-mutant, non-codeleted, and CDKN2A/B deleted OR grade 4;
    * 2 lower-grade astrocytoma: IDH-mutant, non-codeleted, CDKN2A/B not deleted, grade 2 or 3.

    Undecided (masked, never guessed): IDH missing; IDH-mutant with 1p/19q missing; IDH-mutant
    non-codeleted with CDKN2A/B missing and grade not 4 (2, 3 or missing); IDH-mutant
    non-codeleted, CDKN2A/B not deleted and grade missing (grade 4 histology would make it
    class 1, so class 2 would be a guess).
    """
    idh, codel, cdkn, grade = _f(idh), _f(codel), _f(cdkn2ab), _f(grade)
    mut_nc = (idh == 1) & (codel == 0)
    g4 = grade == 4
    low = (grade == 2) | (grade == 3)
    return np.select(
        [idh == 0, (idh == 1) & (codel == 1), mut_nc & ((cdkn == 1) | g4), mut_nc & (cdkn == 0) & low],
        [0, 3, 1, 2], default=-1).astype(np.int64)


def grade_index(grade) -> np.ndarray:
    """WHO grade 2/3/4 -> class 0/1/2 (int64; -1 where missing)."""
    g = _f(grade)
    return np.where(np.isin(g, GRADES), g - 2, -1).astype(np.int64)
