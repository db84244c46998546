"""Patient-level, seeded, stratified splits (train/val/test, or k folds).

Splits are over PATIENTS, never slides: all slides of a patient follow it (a slide-level split
leaks a patient's tissue into the test set). A ``split`` column in clinical.csv
wins over drawing (a site may have agreed splits); otherwise splits are drawn with a seed.

Stratification uses one label per patient: the diagnosis when known, else the grade, else the
event, else a common "unlabelled" stratum. Within each stratum patients are shuffled and placed
at evenly spaced positions with a random phase (systematic sampling); taking the first fraction of
all patients ordered by position then gives every stratum about its share, and a stratum too small
to split (even one patient) needs no special case: it simply lands where its phase puts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from client.site.labels import SPLITS, ClinicalLabels
from client.site.validation import SiteDataError

__all__ = ["Splits", "strata", "split_patients", "kfold_patients", "splits_from_column", "assert_disjoint",
           "make_splits"]


@dataclass(frozen=True)
class Splits:
    """Patients per split (``train``/``val``/``test``), disjoint; ``source`` says how they were made."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    source: str = "drawn"

    def __post_init__(self) -> None:
        assert_disjoint(self.as_dict())

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def of(self, patient: str) -> str:
        for name in SPLITS:
            if patient in self[name]:
                return name
        raise KeyError(f"patient {patient!r} is in no split")


def assert_disjoint(groups: Mapping[str, Sequence[str]]) -> None:
    """Raise ValueError naming the first patient found in two groups (or twice in one)."""
    seen: dict[str, str] = {}
    for name, patients in groups.items():
        for p in patients:
            if p in seen:
                raise ValueError(f"patient {p!r} is in both {seen[p]!r} and {name!r}; splits must be "
                                 "patient-disjoint")
            seen[p] = name


def strata(labels: ClinicalLabels) -> np.ndarray:
    """One stratum key per patient: diagnosis, else grade, else event, else 'unlabelled'."""
    ev = labels.event
    return np.array([f"diagnosis={d}" if d >= 0 else f"grade={g}" if g >= 0
                     else f"event={int(e)}" if np.isfinite(e) else "unlabelled"
                     for d, g, e in zip(labels.diagnosis, labels.grade, ev)], dtype=object)


def _positions(keys: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Per patient, a position in [0, 1): stratum members evenly spaced with a random phase."""
    keys = np.asarray(keys, dtype=object)
    pos = np.empty(len(keys))
    for k in sorted(set(keys.tolist())):  # sorted: the rng draws do not depend on set order
        idx = np.flatnonzero(keys == k)
        idx = idx[rng.permutation(len(idx))]
        pos[idx] = (np.arange(len(idx)) + rng.uniform()) / len(idx)
    return pos


def _order(patients: Sequence[str], keys: Sequence[str] | None, seed: int) -> list[str]:
    if len(set(patients)) != len(patients):
        raise ValueError("split: duplicate patient ids")
    rng = np.random.default_rng(seed)
    keys = ["all"] * len(patients) if keys is None else list(keys)
    if len(keys) != len(patients):
        raise ValueError(f"split: {len(keys)} strata for {len(patients)} patients")
    pos = _positions(keys, rng)
    tiebreak = rng.permutation(len(patients))  # equal positions in different strata: random order
    return [patients[i] for i in np.lexsort((tiebreak, pos))]


def split_patients(patients: Sequence[str], keys: Sequence[str] | None = None, *, val_fraction: float = 0.15,
                   test_fraction: float = 0.15, seed: int = 42) -> Splits:
    """Draw train/val/test by fractions (rounded to whole patients; train keeps the rest)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"split fractions val={val_fraction}, test={test_fraction}: each in [0, 1), sum < 1")
    order = _order(list(patients), keys, seed)
    n = len(order)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n_test + n_val >= n and n > 0:  # tiny site: keep at least one training patient
        n_val = max(0, n - 1 - n_test)
        n_test = min(n_test, n - 1 - n_val)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    keep = {p: i for i, p in enumerate(patients)}  # report in the caller's (clinical) order
    srt = lambda xs: tuple(sorted(xs, key=keep.__getitem__))
    return Splits(train=srt(train), val=srt(val), test=srt(test),
                  source=f"drawn (seed {seed}, val {val_fraction}, test {test_fraction}, stratified)")


def kfold_patients(patients: Sequence[str], k: int, keys: Sequence[str] | None = None, *,
                   seed: int = 42) -> list[tuple[str, ...]]:
    """``k`` stratified, disjoint folds covering every patient exactly once (fold sizes differ by <= 1)."""
    patients = list(patients)
    if k < 2 or k > len(patients):
        raise ValueError(f"kfold: k={k} needs 2 <= k <= number of patients ({len(patients)})")
    order = _order(patients, keys, seed)
    keep = {p: i for i, p in enumerate(patients)}
    n = len(order)
    cuts = [round(f * n / k) for f in range(k + 1)]  # contiguous blocks of the stratified order
    folds = [tuple(sorted(order[cuts[f]:cuts[f + 1]], key=keep.__getitem__)) for f in range(k)]
    assert_disjoint({f"fold {i}": fold for i, fold in enumerate(folds)})
    return folds


def splits_from_column(patients: Sequence[str], values: Sequence[str], source: str = "clinical.csv") -> Splits:
    """Splits as given by the clinical ``split`` column (values already checked by the parser)."""
    groups: dict[str, list[str]] = {s: [] for s in SPLITS}
    for p, v in zip(patients, values):
        if v not in groups:
            raise SiteDataError(f"{source}: column 'split', row patient {p!r}: expected one of {list(SPLITS)}")
        groups[v].append(p)
    if not groups["train"]:
        raise SiteDataError(f"{source}: column 'split' puts no patient in 'train'")
    return Splits(**{k: tuple(v) for k, v in groups.items()}, source=f"{source} column 'split'")


def make_splits(labels: ClinicalLabels, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 42, fold: int | None = None, k: int | None = None) -> Splits:
    """The site's splits: the clinical ``split`` column when present, else drawn and stratified.

    With ``k`` and ``fold`` (cross-validation), fold ``fold`` is the test set, the next fold the
    validation set and the rest training, so k runs rotate every patient through test once.
    """
    if labels.split is not None:
        return splits_from_column(labels.patients, labels.split, labels.source)
    keys = strata(labels)
    if k is None:
        return split_patients(labels.patients, keys, val_fraction=val_fraction, test_fraction=test_fraction,
                              seed=seed)
    if fold is None or not 0 <= fold < k:
        raise ValueError(f"make_splits: fold must be in [0, {k}) with k={k}, got {fold}")
    folds = kfold_patients(labels.patients, k, keys, seed=seed)
    test = folds[fold]
    val = folds[(fold + 1) % k] if k > 2 else ()
    rest = set(test) | set(val)
    train = tuple(p for p in labels.patients if p not in rest)
    return Splits(train=train, val=val, test=test, source=f"fold {fold} of {k} (seed {seed}, stratified)")
