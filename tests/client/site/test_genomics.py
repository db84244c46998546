"""Genomic tables and gene sets: validation messages, gene order, statistics, transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.site.genomics import GeneSet, GenomicsStats, load_genomics, read_geneset, read_table
from client.site.validation import SiteDataError

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
TCGA = SHARED / "data" / "tcga_gbmlgg"

GS = GeneSet(tumour=("b", "a"), micro=("d", "c", "e"))


def table(tmp_path: Path, df: pd.DataFrame, name: str = "genomics.csv") -> Path:
    p = tmp_path / name
    if name.endswith(".parquet"):
        df.to_parquet(p, index=False)
    elif name.endswith((".tsv", ".txt")):
        df.to_csv(p, sep="\t", index=False)
    else:
        df.to_csv(p, index=False)
    return p


def frame(n: int = 6, seed: int = 0, cols=("a", "b", "c", "d", "e")) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.gamma(2.0, 1.0, (n, len(cols))), columns=list(cols))
    df.insert(0, "patient_id", [f"P{i}" for i in range(n)])
    return df


def ident(g: GeneSet = GS) -> GenomicsStats:
    """Stats with mean 0, std 1: encode() then returns the raw values."""
    F = len(g.features)
    return GenomicsStats(g.features, np.full(F, 2), np.zeros(F), np.full(F, 2.0))


# --- gene set ---------------------------------------------------------------------------------
def test_geneset_order_and_errors(tmp_path):
    p = tmp_path / "geneset.csv"
    pd.DataFrame({"feature": ["z", "a", "m"], "subspace": ["micro", "tumour", "Micro"]}).to_csv(p, index=False)
    gs = read_geneset(p)
    assert gs.tumour == ("a",) and gs.micro == ("z", "m") and gs.features == ("a", "z", "m")
    assert gs.input_dims() == (1, 2) and gs.input_dims("impute_mean") == (2, 3)
    assert gs.digest != GeneSet(("a",), ("m", "z")).digest  # order is part of the identity

    pd.DataFrame({"feature": ["x", "y", "x"], "subspace": ["tumour", "micro", "micro"]}).to_csv(p, index=False)
    with pytest.raises(SiteDataError, match=r"'x'.* both subspaces"):
        read_geneset(p)
    pd.DataFrame({"feature": ["x", "y"], "subspace": ["tumour", "stroma"]}).to_csv(p, index=False)
    with pytest.raises(SiteDataError, match=r"line 3, column 'subspace'"):
        read_geneset(p)
    pd.DataFrame({"feature": ["x", "x", "y"], "subspace": ["tumour"] * 2 + ["micro"]}).to_csv(p, index=False)
    with pytest.raises(SiteDataError, match=r"line 3.*listed twice"):
        read_geneset(p)


# --- reading and validation ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["genomics.csv", "genomics.tsv", "genomics.txt", "genomics.parquet",
                                  "genomics.csv.zip"])
def test_formats(tmp_path, name):
    df = frame()
    p = tmp_path / name
    if name.endswith(".zip"):
        df.to_csv(p, index=False, compression="zip")
    else:
        table(tmp_path, df, name)
    g = load_genomics(p, GS)
    np.testing.assert_allclose(g.values.to_numpy(), df.set_index("patient_id")[list(GS.features)].to_numpy())


def test_gene_order_follows_geneset_not_table(tmp_path):
    df = frame()
    shuffled = df[["patient_id", "e", "c", "a", "d", "b"]]
    g = load_genomics(table(tmp_path, shuffled), GS)
    t, m = g.encode(["P2", "P0"], ident())
    src = df.set_index("patient_id")
    np.testing.assert_allclose(t, src.loc[["P2", "P0"], ["b", "a"]].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(m, src.loc[["P2", "P0"], ["d", "c", "e"]].to_numpy(), rtol=1e-6)
    assert t.dtype == np.float32 and m.shape == (2, 3)


def test_patient_column_is_configurable_and_alignment(tmp_path):
    df = frame().rename(columns={"patient_id": "case_id"})
    p = table(tmp_path, df)
    with pytest.raises(SiteDataError, match="patient column 'patient_id' missing"):
        load_genomics(p, GS)
    g = load_genomics(p, GS, ["P3", "P1"], patient_column="case_id")
    assert list(g.values.index) == ["P3", "P1"]
    assert any("4 patient(s) have genomic rows but no row in clinical.csv" in w for w in g.report.warnings)


def test_clinical_patient_missing_is_an_error_unless_imputing(tmp_path):
    p = table(tmp_path, frame(3))
    with pytest.raises(SiteDataError, match=r"1 patient\(s\) of clinical.csv have no genomic row: 'X9'"):
        load_genomics(p, GS, ["P0", "X9"])
    g = load_genomics(p, GS, ["P0", "X9"], policy="impute_zero")
    t, m = g.encode(["X9"], ident())
    assert t[0, -1] == 1.0 and m[0, -1] == 1.0  # everything missing


def test_duplicate_and_empty_patients(tmp_path):
    df = frame(4)
    df.loc[2, "patient_id"] = "P0"
    with pytest.raises(SiteDataError, match=r"duplicate patient\(s\) 'P0'"):
        load_genomics(table(tmp_path, df), GS)
    df.loc[2, "patient_id"] = ""
    with pytest.raises(SiteDataError, match=r"empty patient id on line\(s\) '4'"):
        load_genomics(table(tmp_path, df), GS)


def test_non_numeric_names_column_and_first_patient(tmp_path):
    df = frame().astype({"c": object})
    df.loc[3, "c"] = "high"
    df.loc[5, "c"] = "low"
    with pytest.raises(SiteDataError) as e:
        load_genomics(table(tmp_path, df), GS)
    msg = str(e.value)
    assert "column 'c', row patient 'P3': not a number" in msg and "2 non-numeric" in msg
    assert "high" not in msg  # values are never printed


def test_missing_geneset_features(tmp_path):
    df = frame(cols=("a", "c"))
    with pytest.raises(SiteDataError, match=r"3 gene-set feature\(s\).*'b', 'd', 'e'"):
        load_genomics(table(tmp_path, df), GS)


def test_nan_inf_error_by_default_named(tmp_path):
    df = frame()
    df.loc[1, "d"] = np.nan
    df.loc[4, "a"] = np.inf
    with pytest.raises(SiteDataError) as e:
        load_genomics(table(tmp_path, df), GS)
    msg = str(e.value)
    assert "column 'a', row patient 'P4': missing or NaN/Inf" in msg
    assert "column 'd', row patient 'P1': missing or NaN" in msg and "genomics_policy is 'error'" in msg


@pytest.mark.parametrize("policy", ["impute_mean", "impute_zero"])
def test_imputation_with_missingness_indicator(tmp_path, policy):
    df = frame()
    df.loc[1, "d"] = np.nan
    df.loc[1, "c"] = np.nan
    df.loc[2, "a"] = np.nan
    g = load_genomics(table(tmp_path, df), GS, policy=policy)
    stats = g.stats()
    assert stats.count.tolist() == [6, 5, 5, 5, 6]  # b, a, d, c, e: missing cells are not counted
    t, m = g.encode([f"P{i}" for i in range(6)], stats)
    assert t.shape == (6, 3) and m.shape == (6, 4)  # one indicator column per subspace, always
    assert t[:, -1].tolist() == [0, 0, 0.5, 0, 0, 0]  # 1 of 2 tumour features missing for P2
    np.testing.assert_allclose(m[:, -1], [0, 2 / 3, 0, 0, 0, 0], rtol=1e-6)
    mean, std = stats.mean(), stats.std()
    j = GS.features.index("d")
    want = 0.0 if policy == "impute_mean" else (0 - mean[j]) / std[j]
    assert m[1, 0] == pytest.approx(want, abs=1e-6)
    assert np.isfinite(t).all() and np.isfinite(m).all()
    # the width does not depend on the data: a complete table gets the columns too (all 0)
    t2, _ = load_genomics(table(tmp_path, frame()), GS, policy=policy).encode(["P0"], stats)
    assert t2.shape == (1, 3) and t2[0, -1] == 0


@pytest.mark.parametrize("policy", ["impute_mean", "impute_zero"])
def test_inf_is_an_error_under_imputation_too(tmp_path, policy):
    # Inf is outside the domain of a measurement (log of 0 upstream), not a missing value to impute.
    df = frame()
    df.loc[3, "c"] = -np.inf
    df.loc[1, "d"] = np.nan  # a real missing value stays imputable
    with pytest.raises(SiteDataError) as e:
        load_genomics(table(tmp_path, df), GS, policy=policy)
    msg = str(e.value)
    assert "column 'c', row patient 'P3': infinite value" in msg and "'d'" not in msg


# --- statistics and transforms ---------------------------------------------------------------
def test_stats_merge_of_halves_equals_whole(tmp_path):
    df = frame(11).set_index("patient_id")
    df.iloc[3, 2] = np.nan
    whole = GenomicsStats.from_frame(df)
    merged = GenomicsStats.merge(GenomicsStats.from_frame(df.iloc[:5]), GenomicsStats.from_frame(df.iloc[5:]))
    assert merged.features == whole.features
    np.testing.assert_array_equal(merged.count, whole.count)
    np.testing.assert_allclose(merged.sum, whole.sum)
    np.testing.assert_allclose(merged.sum_sq, whole.sum_sq)
    np.testing.assert_allclose(merged.mean(), df.mean().to_numpy())
    np.testing.assert_allclose(merged.std(), df.std(ddof=0).to_numpy())
    assert GenomicsStats.from_dict(merged.to_dict()).count.tolist() == merged.count.tolist()
    with pytest.raises(ValueError, match="different feature"):
        GenomicsStats.merge(whole, GenomicsStats.from_frame(df[df.columns[::-1]]))


def test_constant_feature_std_floor():
    s = GenomicsStats.from_frame(pd.DataFrame({"k": [3.0, 3.0, 3.0], "v": [0.0, 1.0, 2.0]}))
    assert s.std().tolist()[0] == 1.0 and s.mean().tolist()[0] == 3.0
    assert s.degenerate().tolist() == [True, False]
    empty = GenomicsStats(("u",), np.array([0]), np.array([0.0]), np.array([0.0]))
    assert empty.mean().tolist() == [0.0] and empty.std().tolist() == [1.0]


def test_standardise_with_handed_in_stats_and_clip(tmp_path):
    df = frame()
    g = load_genomics(table(tmp_path, df), GS)
    F = len(GS.features)
    stats = GenomicsStats(GS.features, np.full(F, 4), np.full(F, 4.0), np.full(F, 4.0 * (1 + 0.25)))  # mean 1, sd .5
    t, m = g.encode(["P0"], stats)
    src = df.set_index("patient_id").loc["P0"]
    assert t[0, 0] == pytest.approx((src["b"] - 1) / 0.5, rel=1e-5)
    assert m[0, 2] == pytest.approx((src["e"] - 1) / 0.5, rel=1e-5)
    tc, mc = g.encode(list(df["patient_id"]), stats, clip=0.75)
    assert tc.max() <= 0.75 and tc.min() >= -0.75 and mc.max() <= 0.75
    with pytest.raises(ValueError, match="different gene set"):
        g.encode(["P0"], GenomicsStats.from_frame(df.set_index("patient_id")))  # table order, not gene-set


def test_log1p_suffix(tmp_path):
    df = frame().rename(columns={"a": "a_rnaseq", "c": "c_rnaseq"})
    gs = GeneSet(("b", "a_rnaseq"), ("d", "c_rnaseq", "e"))
    g = load_genomics(table(tmp_path, df), gs, log1p_suffixes=("_rnaseq",))
    src = df.set_index("patient_id")
    np.testing.assert_allclose(g.values["a_rnaseq"], np.log1p(src["a_rnaseq"]))
    np.testing.assert_allclose(g.values["b"], src["b"])  # no suffix: untouched
    df.loc[2, "c_rnaseq"] = -0.5
    with pytest.raises(SiteDataError, match=r"column 'c_rnaseq', row patient 'P2': negative value"):
        load_genomics(table(tmp_path, df), gs, log1p_suffixes=("_rnaseq",))


# --- the real TCGA table (read from shared/, never copied) -----------------------------------
@pytest.mark.skipif(not TCGA.is_dir(), reason="shared/data/tcga_gbmlgg not available")
def test_tcga_zip_reads_and_per_slide_rows_are_duplicates():
    """The PORPOISE table is per slide: as a per-patient table it must be refused, naming the key."""
    with pytest.raises(SiteDataError, match=r"column 'case_id': duplicate patient"):
        read_table(TCGA / "porpoise_tcga_gbmlgg_all_clean_mutsig.csv.zip", "case_id")


@pytest.mark.skipif(not TCGA.is_dir(), reason="shared/data/tcga_gbmlgg not available")
def test_tcga_features_per_patient(tmp_path):
    """Real column names and values: one row per case (first slide), three feature kinds."""
    raw = pd.read_csv(TCGA / "porpoise_tcga_gbmlgg_all_clean_mutsig.csv.zip",
                      usecols=["case_id", "TP53_rnaseq", "EGFR_rnaseq", "CDKN2A_cnv", "IDH1_mut", "CD4_rnaseq"])
    per_patient = raw.drop_duplicates("case_id").head(60)
    p = tmp_path / "genomics.parquet"
    per_patient.to_parquet(p, index=False)
    gs = GeneSet(("IDH1_mut", "CDKN2A_cnv", "EGFR_rnaseq"), ("CD4_rnaseq", "TP53_rnaseq"))
    g = load_genomics(p, gs, patient_column="case_id")
    assert list(g.values.columns) == list(gs.features) and len(g.values) == 60
    t, m = g.encode(list(g.values.index), g.stats())
    assert t.shape == (60, 3) and m.shape == (60, 2)
    np.testing.assert_allclose(t.mean(0), 0, atol=1e-5)  # standardised with its own statistics
    assert np.abs(g.encode(list(g.values.index), g.stats(), clip=2.0)[0]).max() <= 2.0


def test_repeated_header_column_is_refused(tmp_path):
    p = tmp_path / "genomics.csv"
    p.write_text("patient_id,a,b,a,c,d,e\nP0,1,2,3,4,5,6\n")
    with pytest.raises(SiteDataError, match=r"column\(s\) 'a' appear more than once"):
        load_genomics(p, GS)


def test_parquet_nullable_columns_are_missing_values(tmp_path):
    df = frame(4).astype({"a": "Float64"})
    df["b"] = pd.array([1, None, 0, 2], dtype="Int64")
    df["e"] = pd.array([True, False, None, True], dtype="boolean")
    p = table(tmp_path, df, "genomics.parquet")
    with pytest.raises(SiteDataError, match=r"(?s)column 'b', row patient 'P1'.*column 'e', row patient 'P2'"):
        load_genomics(p, GS)
    g = load_genomics(p, GS, policy="impute_mean")
    assert g.values["e"].tolist()[:2] == [1.0, 0.0] and np.isnan(g.values.loc["P1", "b"])
