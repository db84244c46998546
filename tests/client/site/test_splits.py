"""Patient-level splits: disjoint, seeded, stratified; the split column wins; k folds cover everyone."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from client.site.labels import parse_clinical
from client.site.splits import Splits, assert_disjoint, kfold_patients, make_splits, split_patients, strata
from client.site.validation import SiteDataError


def clinical(n: int, seed: int = 0, split=None):
    rng = np.random.default_rng(seed)
    # skewed classes (GBM common, oligo rare) so stratification has something to preserve
    idh = rng.choice(["wt", "mutant"], n, p=[0.55, 0.45])
    codel = rng.choice(["codel", "non-codel"], n, p=[0.3, 0.7])
    df = pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(n)], "idh": idh, "codel_1p19q": codel,
                       "cdkn2ab": rng.choice(["0", "-2"], n), "grade": rng.choice(["2", "3", "4"], n),
                       "survival_days": rng.integers(10, 2000, n).astype(str),
                       "event": rng.choice(["0", "1"], n)})
    if split is not None:
        df["split"] = split
    return parse_clinical(df)


def test_disjoint_and_cover_all_patients():
    lab = clinical(100)
    s = make_splits(lab, val_fraction=0.15, test_fraction=0.2, seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (65, 15, 20)
    assert sorted(s.train + s.val + s.test) == sorted(lab.patients)
    assert_disjoint(s.as_dict())


def test_seeded_and_deterministic():
    lab = clinical(60)
    a, b = make_splits(lab, seed=7), make_splits(lab, seed=7)
    assert a.as_dict() == b.as_dict()
    assert make_splits(lab, seed=8).test != a.test


def test_stratification_roughly_preserved():
    lab = clinical(400, seed=1)
    s = make_splits(lab, val_fraction=0.2, test_fraction=0.2, seed=0)
    keys = dict(zip(lab.patients, strata(lab)))
    whole = Counter(keys.values())
    for part in (s.train, s.val, s.test):
        c = Counter(keys[p] for p in part)
        for k, n in whole.items():
            assert abs(c[k] / len(part) - n / len(lab.patients)) < 0.02, (k, c[k], len(part))


def test_strata_fall_back_per_patient():
    df = pd.DataFrame({"patient_id": ["A", "B", "C", "D"], "idh": ["wt", "", "", ""],
                       "codel_1p19q": [""] * 4, "cdkn2ab": [""] * 4, "grade": ["4", "3", "", ""],
                       "survival_days": ["5", "5", "5", ""], "event": ["1", "1", "0", ""]})
    assert strata(parse_clinical(df)).tolist() == ["diagnosis=0", "grade=1", "event=0", "unlabelled"]


def test_tiny_classes_do_not_break_and_train_never_empty():
    s = split_patients(["a", "b", "c"], ["x", "y", "z"], val_fraction=0.3, test_fraction=0.3, seed=0)
    assert len(s.train) >= 1 and sorted(s.train + s.val + s.test) == ["a", "b", "c"]
    s1 = split_patients(["only"], None, val_fraction=0.5, test_fraction=0.4)
    assert s1.train == ("only",)


def test_split_column_wins():
    values = ["test", "train", "val"] * 10
    lab = clinical(30, split=values)
    s = make_splits(lab, val_fraction=0.0, test_fraction=0.0, seed=1)
    assert s.test == tuple(p for p, v in zip(lab.patients, values) if v == "test")
    assert "column 'split'" in s.source and len(s.val) == 10


def test_split_column_bad_value_names_the_row():
    with pytest.raises(SiteDataError, match=r"'split', row patient 'P001'"):
        clinical(3, split=["train", "dev", "test"])


def test_k_folds_cover_every_patient_exactly_once():
    lab = clinical(53)
    folds = kfold_patients(lab.patients, 5, strata(lab), seed=2)
    flat = [p for f in folds for p in f]
    assert sorted(flat) == sorted(lab.patients) and len(flat) == len(set(flat))
    assert {len(f) for f in folds} <= {10, 11}
    tests = [make_splits(lab, k=5, fold=f, seed=2).test for f in range(5)]
    assert sorted(p for t in tests for p in t) == sorted(lab.patients)
    with pytest.raises(ValueError, match="fold"):
        make_splits(lab, k=5, fold=5)


def test_disjointness_is_asserted():
    with pytest.raises(ValueError, match="'p1' is in both 'train' and 'test'"):
        Splits(train=("p1", "p2"), val=(), test=("p1",))
