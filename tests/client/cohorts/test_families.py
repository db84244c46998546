"""Cohort families of `smm synth` (client/cohorts/families.py): where the signal sits, and its ground truth."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.cohorts.cohort import CohortError
from client.cohorts.families import BACKGROUND, FAMILIES, MICRO, TUMOUR, read_planted
from client.cohorts.synth import CohortSpec, main, with_patches_per_slide, write_cohort
from client.site.folder import read_features

#: Big enough for a linear probe to tell signal from chance (CV over 90 patients), small enough for seconds:
#: the tissue mask at 8 cells per patch side (as --patches-per-slide has it) instead of 4 px per cell.
PROBE = replace(CohortSpec(), sites=2, patients_per_site=45, seed=3, features_only=True, layout_scale=28)
TINY = replace(PROBE, patients_per_site=6)


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """``cohort(family, spec=PROBE)``: the path of that family's cohort, written once per module."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family: str, spec: CohortSpec = PROBE) -> Path:
        key = (family, spec)
        if key not in made:
            made[key] = root / f"{family}-{len(made)}"
            write_cohort(made[key], replace(spec, family=family), log=quiet)
        return made[key]
    return get


def site_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def slide_ids(root: Path) -> list[str]:
    return [s for site in site_dirs(root) for s in pd.read_csv(site / "slides.csv")["slide_id"]]


def patient_table(root: Path) -> pd.DataFrame:
    """Per patient: genes, mean of all patches, mean of the planted patches, diagnosis, z (if any)."""
    truth = pd.read_csv(root / "truth.csv").set_index("patient_id")
    rows = []
    for site in site_dirs(root):
        genes = pd.read_csv(site / "genomics.csv").set_index("patient_id")
        slides = pd.read_csv(site / "slides.csv")
        for pid, group in slides.groupby("patient_id"):
            feats = np.concatenate([read_features(site / "features" / f"{s}.h5")[0] for s in group["slide_id"]])
            planted = np.concatenate([read_planted(root, s)[2] for s in group["slide_id"]])
            rows.append({"patient_id": pid, "genes": genes.loc[pid].to_numpy(), "pooled": feats.mean(0),
                         "oracle": feats[planted].mean(0) if planted.any() else feats.mean(0),
                         "y": int(truth.loc[pid, "diagnosis"])})
    return pd.DataFrame(rows)


def probe(table: pd.DataFrame, *inputs: str) -> float:
    """4-fold CV diagnosis accuracy of a standardised logistic regression on the named inputs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.hstack([np.stack(table[c].to_list()) for c in inputs])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    cv = StratifiedKFold(4, shuffle=True, random_state=0)
    return float(cross_val_score(model, X, table["y"].to_numpy(), cv=cv).mean())


def majority(table: pd.DataFrame) -> float:
    return float(np.bincount(table["y"]).max() / len(table))


def test_unknown_family_and_slide_mode_are_refused(tmp_path, capsys):
    with pytest.raises(CohortError, match="--family 'nope'.*gene-conditioned"):
        replace(PROBE, family="nope").validate()
    with pytest.raises(CohortError, match="--family gene-conditioned needs --features-only"):
        replace(PROBE, family="gene-conditioned", features_only=False).validate()
    assert main(["--out", str(tmp_path / "x"), "--features-only", "--family", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown cohort family" in err and all(f in err for f in FAMILIES)
    assert not (tmp_path / "x").exists()


def test_families_share_patients_and_labels_and_differ_in_genes(cohort):
    cohorts = {f: cohort(f, TINY) for f in FAMILIES}
    base = cohorts["additive"]
    for family in FAMILIES[1:]:
        for site in ("site_1", "site_2"):
            for f in ("clinical.csv", "slides.csv", "geneset.csv"):
                assert (cohorts[family] / site / f).read_bytes() == (base / site / f).read_bytes(), (family, f)
            genes = pd.read_csv(cohorts[family] / site / "genomics.csv")
            assert all(c.startswith("GENE") and c.endswith("_rnaseq") for c in genes.columns[1:])  # no label
        truth = pd.read_csv(cohorts[family] / "truth.csv")
        assert (truth["family"] == family).all()
        summary = json.loads((cohorts[family] / "cohort.json").read_text())
        assert summary["family"] == summary["family_model"]["name"] == family
        assert summary["truth_patches_file"] == "truth_patches.h5"
    same = (pd.read_csv(cohorts["genomics-only"] / "site_1/genomics.csv").equals(
        pd.read_csv(base / "site_1/genomics.csv")))
    assert same  # genomics-only keeps additive's genes; the patches lose their signal
    assert not pd.read_csv(cohorts["gene-conditioned"] / "site_1/genomics.csv").equals(
        pd.read_csv(base / "site_1/genomics.csv"))
    assert "family" not in pd.read_csv(base / "truth.csv").columns  # additive's truth.csv as before


def test_same_seed_same_output_and_another_seed_differs(tmp_path):
    spec = replace(PROBE, family="gene-conditioned", sites=1, patients_per_site=8)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_cohort(a, spec, log=quiet)
    write_cohort(b, spec, log=quiet)
    write_cohort(c, replace(spec, seed=4), log=quiet)
    for f in ("truth.csv", "site_1/clinical.csv", "site_1/genomics.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "site_1/genomics.csv").read_bytes() != (c / "site_1/genomics.csv").read_bytes()
    for sid in slide_ids(a):
        fa, ca, _ = read_features(a / "site_1" / "features" / f"{sid}.h5")
        fb, cb, _ = read_features(b / "site_1" / "features" / f"{sid}.h5")
        assert np.array_equal(fa, fb) and np.array_equal(ca, cb)
        for x, y in zip(read_planted(a, sid), read_planted(b, sid)):
            assert np.array_equal(x, y)


def test_truth_patches_match_the_feature_files(cohort):
    for family in FAMILIES:
        root = cohort(family, TINY)
        for site in site_dirs(root)[:1]:
            for sid in pd.read_csv(site / "slides.csv")["slide_id"][:5]:
                feats, coords, _ = read_features(site / "features" / f"{sid}.h5")
                t_coords, region, planted = read_planted(root, sid)
                assert t_coords.dtype == np.int64 and np.array_equal(t_coords, coords)
                assert region.shape == planted.shape == (len(feats),) and planted.dtype == bool
                assert set(np.unique(region)) <= {TUMOUR, MICRO, BACKGROUND}
                if family in ("additive", "histology-only"):
                    assert MICRO not in region and np.array_equal(planted, region == TUMOUR)
                if family == "genomics-only":
                    assert not planted.any()
    with pytest.raises(KeyError, match="no slide 'SYN9-0001-S1'"):
        read_planted(cohort("additive", TINY), "SYN9-0001-S1")


def test_gene_conditioned_label_area_flips_with_the_programme(cohort):
    root = cohort("gene-conditioned")
    truth = pd.read_csv(root / "truth.csv").set_index("patient_id")
    assert 0.3 < truth["z"].mean() < 0.7
    assert (truth["decoy"] != truth["diagnosis"]).all() and set(truth["decoy"]) == {0, 1, 2, 3}
    seen, counts = set(), np.zeros(3)
    for sid in slide_ids(root):
        _, region, planted = read_planted(root, sid)
        z = int(truth.loc[sid.rsplit("-", 1)[0], "z"])
        assert np.array_equal(planted, region == (MICRO if z else TUMOUR)), sid
        seen.add(z)
        counts += np.bincount(region, minlength=3)
    assert seen == {0, 1}
    # The tumour area and the micro areas are about equally large (pooling sees them symmetrically).
    assert counts[TUMOUR] == pytest.approx(counts[MICRO], rel=0.15) and counts[BACKGROUND] > counts[TUMOUR]


def test_planted_areas_are_spatially_clustered(tmp_path):
    spec = with_patches_per_slide(replace(PROBE, family="gene-conditioned", sites=1, patients_per_site=4), 600)
    write_cohort(tmp_path / "c", spec, log=quiet)
    step = spec.patch_step
    for sid in slide_ids(tmp_path / "c"):
        coords, region, planted = read_planted(tmp_path / "c", sid)
        assert 400 < len(coords) < 900  # about --patches-per-slide
        cells = {tuple(c) for c in (coords[planted] // step)}
        assert len(cells) > 50
        with_neighbour = [any((x + dx, y + dy) in cells for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)))
                          for x, y in cells]
        assert np.mean(with_neighbour) > 0.95
        # Micro areas: a few clusters, not scattered patches (4-connected components of MICRO cells).
        micro = {tuple(c) for c in (coords[region == MICRO] // step)}
        components = 0
        while micro:
            components += 1
            stack = [micro.pop()]
            while stack:
                x, y = stack.pop()
                for nb in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if nb in micro:
                        micro.remove(nb)
                        stack.append(nb)
        assert 1 <= components <= 6


def test_patches_per_slide_sets_the_geometry():
    spec = with_patches_per_slide(PROBE, 2000)
    assert spec.slide_size % 64 == 0 and spec.patches_per_slide == 2000
    assert spec.layout_scale == spec.patch_step // 8
    spec.validate()
    with pytest.raises(CohortError, match="--patches-per-slide needs --features-only"):
        replace(spec, features_only=False).validate()
    with pytest.raises(CohortError, match="--patches-per-slide 0"):
        with_patches_per_slide(PROBE, 0)


def test_signal_placement_gene_conditioned(cohort):
    """Linear probes on the written files: only the right area, which the genes point to, tells the class."""
    table = patient_table(cohort("gene-conditioned"))
    base = majority(table)
    genes, pooled_genes = probe(table, "genes"), probe(table, "pooled", "genes")
    oracle_genes = probe(table, "oracle", "genes")
    assert genes < base + 0.1  # the genes hardly tell the class ...
    z = pd.read_csv(cohort("gene-conditioned") / "truth.csv").set_index("patient_id").loc[table["patient_id"], "z"]
    assert probe(table.assign(y=z.to_numpy()), "genes") > 0.95  # ... but z, plainly
    assert pooled_genes < base + 0.1  # pooling mixes the true class with the decoy
    assert oracle_genes > 0.7 and oracle_genes > pooled_genes + 0.2  # the right area carries the class


def test_signal_placement_controls(cohort):
    histo = patient_table(cohort("histology-only"))
    genes, pooled = probe(histo, "genes"), probe(histo, "pooled")
    assert genes < majority(histo) + 0.05 and pooled > max(genes + 0.15, majority(histo) + 0.05)
    geno = patient_table(cohort("genomics-only"))
    genes, pooled = probe(geno, "genes"), probe(geno, "pooled")
    assert pooled < majority(geno) + 0.05 and genes > max(pooled + 0.15, majority(geno) + 0.15)
