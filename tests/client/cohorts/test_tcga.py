"""`smm tcga` on the real TCGA GBM/LGG tables: every count re-derived here from the raw tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.site.folder import Manifest, SiteLayout, write_features
from smm_model.contract.atomic import sha256_file
from client.cohorts.tcga import main

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
TABLES = SHARED / "data" / "tcga_gbmlgg"
pytestmark = pytest.mark.skipif(not (TABLES / "pathomicfusion_grade_data.csv").is_file(),
                                reason=f"TCGA tables not found under {TABLES}")

LEGACY = {"02", "06", "08", "12", "14", "15", "19", "26", "27", "41"}
CLASSES = ("gbm_idhwt", "astro_g4", "astro_lg", "oligo")
N_FEATURE_FILES = 3


@pytest.fixture(scope="module")
def raw() -> dict[str, pd.DataFrame]:
    """The raw tables, read plainly with pandas (no project code)."""
    por = pd.read_csv(TABLES / "porpoise_tcga_gbmlgg_all_clean_mutsig.csv.zip")
    return {"porpoise": por,
            "grades": pd.read_csv(TABLES / "pathomicfusion_grade_data.csv"),
            "signatures": pd.read_csv(TABLES / "mcat_signatures.csv"),
            "tss": pd.read_csv(TABLES / "flamby_tcga_tss_centers.csv", dtype=str),
            "fold0": pd.read_csv(TABLES / "splits_5foldcv" / "splits_0.csv")}


@pytest.fixture(scope="module")
def expected(raw) -> pd.DataFrame:
    """One row per PORPOISE patient: expected site, labels and WHO 2021 class."""
    por, pf = raw["porpoise"], raw["grades"]
    pat = por.drop_duplicates("case_id").set_index("case_id")
    tss = pd.Series(pat.index.str[5:7], index=pat.index)
    region = dict(zip(raw["tss"]["TSS Code"], raw["tss"]["Region"]))
    site = tss.map(lambda c: "tcga_gbm_legacy" if c in LEGACY else
                   ("tcga_other" if region.get(c, "Other") == "Other" else "tcga_" + region[c].lower()))
    small = site.value_counts()[lambda n: n < 20].index
    site[site.isin(small)] = "tcga_other"
    pf = pf.set_index("TCGA ID").reindex(pat.index)
    sub = pf["Molecular subtype"]
    out = pd.DataFrame({
        "site": site,
        "idh": sub.map({"IDHwt": 0, "IDHmut-non-codel": 1, "IDHmut-codel": 1}),
        "codel": sub.map({"IDHwt": 0, "IDHmut-non-codel": 0, "IDHmut-codel": 1}),
        "cdkn": ((pat["CDKN2A_cnv"] < 0) | (pat["CDKN2B_cnv"] < 0)).astype(int),
        "grade": pf["Grade"],
        "days": pat["survival_months"] * 30.44,
        "event": 1 - pat["censorship"],
        "n_slides": por.groupby("case_id").size().reindex(pat.index),
    })

    def who(r: pd.Series) -> str:
        if pd.isna(r.idh):
            return "unknown"
        if r.idh == 0:
            return "gbm_idhwt"
        if r.codel == 1:
            return "oligo"
        if r.cdkn == 1 or r.grade == 4:
            return "astro_g4"
        return "astro_lg" if r.grade in (2, 3) else "unknown"

    out["who"] = out.apply(who, axis=1)
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, raw) -> Path:
    """`smm tcga` run once, with a features folder holding a few real-format feature files."""
    base = tmp_path_factory.mktemp("tcga")
    feats = base / "feats"
    rng = np.random.default_rng(0)
    for sid in raw["porpoise"]["slide_id"].str.replace(".svs", "", regex=False).iloc[:N_FEATURE_FILES]:
        write_features(feats / f"{sid}.h5", rng.normal(size=(5, 8)), np.arange(10).reshape(5, 2) * 224,
                       encoder="resnet50_trunc", weights_sha256="abc", feature_dim=8, patch_size=224, mpp=0.5,
                       level=0)
    out = base / "out"
    assert main(["--tables", str(TABLES), "--out", str(out), "--features", str(feats)]) == 0
    return out


def read_sites(out: Path) -> dict[str, dict[str, pd.DataFrame]]:
    return {p.name: {t: pd.read_csv(p / f"{t}.csv") for t in ("clinical", "slides", "genomics", "geneset")}
            for p in sorted(out.iterdir()) if p.is_dir()}


def test_sites_and_class_counts_match_the_source_tables(cohort, expected):
    sites = read_sites(cohort)
    summary = json.loads((cohort / "cohort.json").read_text())
    assert set(sites) == set(expected["site"]) and "tcga_gbm_legacy" in sites
    assert sum(len(s["clinical"]) for s in sites.values()) == len(expected) == 569
    for name, s in sites.items():
        exp = expected[expected["site"] == name]
        assert set(s["clinical"]["patient_id"]) == set(exp.index)
        assert len(s["slides"]) == exp["n_slides"].sum()
        counts = exp["who"].value_counts()
        site_sum = next(x for x in summary["sites"] if x["name"] == name)
        assert site_sum["class_counts"] == {c: int(counts.get(c, 0)) for c in (*CLASSES, "unknown")}
        assert site_sum["n_patients"] == len(exp) and site_sum["n_slides"] == exp["n_slides"].sum()
    legacy = next(x for x in summary["sites"] if x["name"] == "tcga_gbm_legacy")
    assert set(legacy["tss_codes"]) == LEGACY
    assert "tcga_gbm_legacy" in summary["site_grouping"]["rule"]
    totals = expected["who"].value_counts()
    assert summary["totals"]["class_counts"] == {c: int(totals.get(c, 0)) for c in (*CLASSES, "unknown")}


def test_clinical_columns_follow_the_source(cohort, expected):
    for s in read_sites(cohort).values():
        c = s["clinical"].set_index("patient_id")
        e = expected.loc[c.index]
        for col, ecol in (("idh", "idh"), ("codel_1p19q", "codel"), ("cdkn2ab", "cdkn"), ("grade", "grade"),
                          ("event", "event")):
            assert c[col].isna().equals(e[ecol].isna()), col
            known = c[col].notna()
            assert (c.loc[known, col].astype(int) == e.loc[known, ecol].astype(int)).all(), col
        assert np.allclose(c["survival_days"], e["days"], atol=0.006)


def test_patients_missing_grade_or_subtype_are_kept(cohort, raw):
    clin = pd.concat(s["clinical"] for s in read_sites(cohort).values())
    pf = raw["grades"].set_index("TCGA ID")
    no_row = ~clin["patient_id"].isin(pf.index)
    assert no_row.sum() == 79  # in PORPOISE, not in the PathomicFusion table
    assert clin.loc[no_row, ["grade", "idh", "codel_1p19q"]].isna().all().all()
    grade_na = pf["Grade"].reindex(clin["patient_id"]).isna().to_numpy()
    assert clin["grade"].isna().to_numpy().tolist() == grade_na.tolist()
    assert clin["grade"].isna().sum() == 111 and clin["idh"].isna().sum() == 80
    assert clin["event"].notna().all() and clin["survival_days"].notna().all()


def test_splits_follow_the_fold_file(cohort, raw):
    fold = raw["fold0"]
    test_ids, train_ids = set(fold["val"].dropna()), set(fold["train"].dropna())
    seen: set[str] = set()
    for name, s in read_sites(cohort).items():
        c = s["clinical"]
        assert set(c["split"]) <= {"train", "val", "test"}
        assert not seen & set(c["patient_id"])
        seen |= set(c["patient_id"])
        assert set(c.loc[c["split"] == "test", "patient_id"]) == test_ids & set(c["patient_id"])
        carved = c.loc[c["split"] != "test"]
        assert set(carved["patient_id"]) <= train_ids
        n_val = int((carved["split"] == "val").sum())
        assert abs(n_val - 0.15 * len(carved)) <= 2 and n_val >= 1, name
    assert seen == test_ids | train_ids


@pytest.fixture(scope="module")
def cohort_all(tmp_path_factory) -> Path:
    """`smm tcga --genomics rna,cnv,mut`: the option mode, run once."""
    out = tmp_path_factory.mktemp("tcga_all") / "out"
    assert main(["--tables", str(TABLES), "--out", str(out), "--genomics", "rna,cnv,mut"]) == 0
    return out


def _gene_set_checks(out: Path, raw: dict[str, pd.DataFrame], feats: list[str]) -> pd.Series:
    """Every site's genomics.csv and geneset.csv hold exactly ``feats`` with the source's values; the
    RNA genes sit in the subspace method.md A.5 gives them. Returns the gene set (feature -> subspace)."""
    por, sig = raw["porpoise"], raw["signatures"]
    pat = por.drop_duplicates("case_id").set_index("case_id")
    for name, s in read_sites(out).items():
        g = s["genomics"]
        assert list(g.columns) == ["patient_id", *feats] and not g.isna().any().any()
        assert np.array_equal(g.set_index("patient_id")[feats].to_numpy(), pat.loc[g["patient_id"], feats].to_numpy())
        assert list(s["geneset"]["feature"]) == feats
        m = Manifest.load(out / name / "manifest.json")
        assert m.schema["gene_set"] == sha256_file(out / name / "geneset.csv")[:16]
    gs = s["geneset"].set_index("feature")["subspace"]
    group = {c: set(sig[c].dropna()) for c in sig.columns}
    micro = group["Cytokines and Growth Factors"] | group["Cell Differentiation Markers"]
    tumour = group["Oncogenes"] | group["Tumor Suppressor Genes"] | group["Protein Kinases"] | \
        group["Transcription Factors"]
    genes = {f[:-7] for f in feats if f.endswith("_rnaseq")}
    assert len(genes) == 1544 and genes <= micro | tumour
    assert (len(genes & micro), len(genes & tumour), len(genes & micro & tumour)) == (739, 841, 36)
    to_tumour = genes & micro & tumour & (group["Oncogenes"] | group["Tumor Suppressor Genes"])
    assert len(to_tumour) == 27
    for gene in genes:
        assert gs[f"{gene}_rnaseq"] == ("tumour" if gene in to_tumour or gene not in micro else "micro")
    assert (gs[[f for f in feats if not f.endswith("_rnaseq")]] == "tumour").all()
    return gs


def test_default_genomics_are_rna_only_and_hold_no_label_fact(cohort, raw):
    from smm_model.contract.label_facts import label_feature_hits

    rna = [c for c in raw["porpoise"].columns if c.endswith("_rnaseq")]
    gs = _gene_set_checks(cohort, raw, rna)
    assert label_feature_hits(gs.index) == [] and all(f.endswith("_rnaseq") for f in gs.index)
    assert ((gs == "tumour").sum(), (gs == "micro").sum()) == (832, 712)
    summary = json.loads((cohort / "cohort.json").read_text())
    stats = summary["gene_set"]
    assert (stats["rna_in_micro_groups"], stats["rna_in_tumour_groups"], stats["rna_in_both"]) == (739, 841, 36)
    assert (stats["rna_micro"], stats["rna_tumour"], stats["cnv"], stats["mut"]) == (712, 832, 0, 0)
    assert (stats["tumour_features"], stats["micro_features"]) == (832, 712)
    rec = summary["genomics"]
    n_cnv = sum(c.endswith("_cnv") for c in raw["porpoise"].columns)
    n_mut = sum(c.endswith("_mut") for c in raw["porpoise"].columns)
    assert rec["inputs"] == ["rna"] and rec["columns"] == {"rna": 1544} and rec["left_out"] == []
    assert rec["not_selected"]["columns"] == {"cnv": n_cnv, "mut": n_mut} == {"cnv": 30, "mut": 16}
    assert "--genomics" in rec["not_selected"]["why"]


def test_option_mode_adds_cnv_and_mutations_but_never_the_label_columns(cohort_all, raw):
    from smm_model.contract.label_facts import label_feature_hits

    label_cols = {"IDH1_mut", "CDKN2A_cnv", "CDKN2B_cnv"}
    assert label_cols <= set(raw["porpoise"].columns)  # the table has them: leaving them out is a choice
    feats = [c for c in raw["porpoise"].columns if c.endswith(("_rnaseq", "_cnv", "_mut")) and c not in label_cols]
    gs = _gene_set_checks(cohort_all, raw, feats)
    assert not label_cols & set(gs.index) and not {"IDH2_mut"} & set(gs.index)
    assert label_feature_hits(gs.index) == []
    assert {"CIC_mut", "FUBP1_mut", "MTAP_cnv", "EGFR_cnv", "TP53_mut"} <= set(gs.index)  # correlates stay
    assert ((gs == "tumour").sum(), (gs == "micro").sum()) == (875, 712)
    for s in read_sites(cohort_all).values():
        assert not label_cols & set(s["genomics"].columns)
        assert "cdkn2ab" in s["clinical"]  # the label is still computed from the left-out columns
    summary = json.loads((cohort_all / "cohort.json").read_text())
    rec = summary["genomics"]
    assert rec["inputs"] == ["rna", "cnv", "mut"] and rec["columns"] == {"rna": 1544, "cnv": 28, "mut": 15}
    assert {(x["feature"], x["fact"]) for x in rec["left_out"]} == {
        ("IDH1_mut", "idh"), ("CDKN2A_cnv", "cdkn2ab"), ("CDKN2B_cnv", "cdkn2ab")}
    assert all("label" in x["why"] for x in rec["left_out"]) and "CIC_mut" in rec["caveat"]
    stats = summary["gene_set"]
    assert (stats["cnv"], stats["mut"], stats["tumour_features"], stats["micro_features"]) == (28, 15, 875, 712)


def test_genomics_option_is_validated(tmp_path, capsys):
    for bad in ("cnv,mut", "rna,methylation"):
        assert main(["--tables", str(TABLES), "--out", str(tmp_path / "o"), "--genomics", bad]) == 2
        err = capsys.readouterr().err
        assert "--genomics" in err and "rna" in err
    assert not (tmp_path / "o").exists()


def test_feature_files_are_linked_and_recorded(cohort, raw):
    sids = raw["porpoise"]["slide_id"].str.replace(".svs", "", regex=False)
    summary = json.loads((cohort / "cohort.json").read_text())
    assert summary["feature_files"]["linked"] == N_FEATURE_FILES
    assert summary["feature_files"]["absent"] == len(sids) - N_FEATURE_FILES
    found = 0
    for site in (p for p in cohort.iterdir() if p.is_dir()):
        lay, m = SiteLayout(site), Manifest.load(site / "manifest.json")
        for sid, rec in m.slides.items():
            assert rec["status"] == "done" and rec["checksum"] == sha256_file(lay.feature_file(sid))
            assert rec["n_patches"] == 5 and sid in set(sids.iloc[:N_FEATURE_FILES])
            assert m.schema["encoder"] == "resnet50_trunc" and m.schema["feature_dim"] == 8
            found += 1
        assert sorted(p.stem for p in lay.features_dir.iterdir()) == sorted(m.slides)
    assert found == N_FEATURE_FILES


def test_refuses_non_empty_out_and_bad_tables(cohort, tmp_path, capsys):
    before = (cohort / "cohort.json").read_bytes()
    assert main(["--tables", str(TABLES), "--out", str(cohort)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (cohort / "cohort.json").read_bytes() == before
    assert main(["--tables", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["--tables", str(TABLES), "--out", str(tmp_path / "o"), "--fold", "9"]) == 2
    assert "splits_9.csv" in capsys.readouterr().err


def test_invalid_feature_files_are_reported_and_fail_the_run(raw, tmp_path, capsys):
    feats = tmp_path / "feats"
    feats.mkdir()
    sid = raw["porpoise"]["slide_id"].iloc[0].removesuffix(".svs")
    (feats / f"{sid}.h5").write_bytes(b"not an hdf5 file")
    assert main(["--tables", str(TABLES), "--out", str(tmp_path / "o"), "--features", str(feats)]) == 1
    captured = capsys.readouterr()
    assert f"{sid}.h5" in captured.err and "0 linked" in captured.out
    summary = json.loads((tmp_path / "o" / "cohort.json").read_text())
    assert summary["feature_files"]["invalid"] and summary["feature_files"]["linked"] == 0
    assert not any((tmp_path / "o").glob("*/features/*.h5"))


def test_table_errors_name_the_file_and_column(tmp_path):
    from client.cohorts.cohort import CohortError
    from client.cohorts.tcga import derive_geneset, load_porpoise

    rows = pd.DataFrame({"case_id": ["TCGA-02-0001", "TCGA-02-0001"], "slide_id": ["a.svs", "b.svs"],
                         "site": ["2", "2"], "survival_months": [3.0, 3.0], "censorship": [0, 0],
                         "TP53_rnaseq": [0.5, 0.7], "IDH1_mut": [1, 1]})
    path = tmp_path / "por.csv"
    rows.to_csv(path, index=False)
    with pytest.raises(CohortError, match=r"por\.csv.*TCGA-02-0001.*'TP53_rnaseq'"):
        load_porpoise(path)
    rows["TP53_rnaseq"] = 0.5
    rows.to_csv(path, index=False)
    patients, slides, feats = load_porpoise(path)
    assert len(patients) == 1 and patients["tss"].tolist() == ["02"] and slides["slide_id"].tolist() == ["a", "b"]
    sig = pd.DataFrame({c: ["TP53"] if c == "Tumor Suppressor Genes" else [None] for c in
                        ("Cytokines and Growth Factors", "Cell Differentiation Markers", "Oncogenes",
                         "Tumor Suppressor Genes", "Protein Kinases", "Transcription Factors")})
    geneset, stats = derive_geneset(["TP53_rnaseq", "IDH1_mut"], sig)
    assert geneset["subspace"].tolist() == ["tumour", "tumour"] and stats["mut"] == 1
    with pytest.raises(CohortError, match="no MCAT group.*XYZ_rnaseq"):
        derive_geneset(["XYZ_rnaseq"], sig)
    with pytest.raises(CohortError, match="Oncogenes"):
        derive_geneset(["TP53_rnaseq"], sig.drop(columns="Oncogenes"))


def test_iid_control_deals_the_same_patients_into_sites_of_the_real_sizes(cohort, tmp_path):
    """`smm tcga --iid SEED`: every patient keeps its split, each `iid_<site>` holds as many patients
    as the real site, and the deal mixes the regions (the real `tcga_gbm_legacy` is all grade 4)."""
    out = tmp_path / "iid"
    assert main(["--tables", str(TABLES), "--out", str(out), "--iid", "0"]) == 0
    real, iid = read_sites(cohort), read_sites(out)
    assert sorted(iid) == sorted(f"iid_{name}" for name in real)
    for name, tables in real.items():
        assert len(iid[f"iid_{name}"]["clinical"]) == len(tables["clinical"])
    split = {}
    for tables in real.values():
        split.update(dict(zip(tables["clinical"]["patient_id"], tables["clinical"]["split"])))
    dealt = pd.concat([t["clinical"] for t in iid.values()])
    assert len(dealt) == len(split) and dict(zip(dealt["patient_id"], dealt["split"])) == split
    assert iid["iid_tcga_gbm_legacy"]["clinical"]["grade"].nunique() > 1  # mixed, unlike the real site
    region = {pid: name for name, t in real.items() for pid in t["clinical"]["patient_id"]}
    for tables in iid.values():  # each site's other tables follow its patients
        pids = set(tables["clinical"]["patient_id"])
        assert set(tables["genomics"]["patient_id"]) == pids and set(tables["slides"]["patient_id"]) <= pids
        assert len({region[p] for p in pids}) > 1
    again = tmp_path / "again"
    assert main(["--tables", str(TABLES), "--out", str(again), "--iid", "0"]) == 0  # the deal is seeded
    assert all(read_sites(again)[n]["clinical"]["patient_id"].tolist() == t["clinical"]["patient_id"].tolist()
               for n, t in iid.items())
