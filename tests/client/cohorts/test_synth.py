"""`smm synth`: a synthetic multi-site cohort with known ground truth, written as site folders."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.site.folder import Manifest, SiteLayout, read_features
from smm_model.contract.atomic import sha256_file
from client.cohorts.synth import CohortSpec, PatientState, Stain, draw_layout, main, render_slide, write_cohort

SMALL = replace(CohortSpec(), sites=2, patients_per_site=6, seed=7, slide_size=1024)
CSVS = ("clinical.csv", "slides.csv", "genomics.csv", "geneset.csv")
CLASSES = ("gbm_idhwt", "astro_g4", "astro_lg", "oligo")


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module")
def slide_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "slides"
    write_cohort(out, SMALL, log=quiet)
    return out


@pytest.fixture(scope="module")
def feature_cohort(tmp_path_factory) -> Path:
    """Same spec and seed as ``slide_cohort`` (so the same patients and layouts), features only."""
    out = tmp_path_factory.mktemp("synth") / "features"
    write_cohort(out, replace(SMALL, features_only=True), log=quiet)
    return out


@pytest.fixture(scope="module")
def big_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "big"
    write_cohort(out, replace(CohortSpec(), sites=3, patients_per_site=40, seed=11, features_only=True,
                              slide_size=1024), log=quiet)
    return out


def sites(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def is_tissue(rgb: np.ndarray) -> np.ndarray:
    """Stained pixels: coloured (glass is grey-white), or dark."""
    return (rgb.max(-1) - rgb.min(-1) > 20) | (rgb.mean(-1) < 200)


def who2021(row: pd.Series) -> int | None:
    """The WHO 2021 rule, re-derived here independently of client.cohorts.cohort."""
    idh, codel, cdkn, grade = (None if pd.isna(row[c]) else int(row[c])
                               for c in ("idh", "codel_1p19q", "cdkn2ab", "grade"))
    if idh is None:
        return None
    if idh == 0:
        return 0
    if codel is None:
        return None
    if codel == 1:
        return 3
    if cdkn == 1 or grade == 4:
        return 1
    if cdkn == 0 and grade in (2, 3):
        return 2
    return None


def test_site_folders_are_complete_and_consistent(slide_cohort):
    summary = json.loads((slide_cohort / "cohort.json").read_text())
    assert [s["name"] for s in summary["sites"]] == ["site_1", "site_2"]
    assert [p.name for p in sites(slide_cohort)] == ["site_1", "site_2"]
    for root in sites(slide_cohort):
        lay = SiteLayout(root)
        clin, slides = pd.read_csv(lay.clinical), pd.read_csv(lay.slides)
        genomics, geneset = pd.read_csv(lay.genomics), pd.read_csv(lay.geneset)
        assert list(clin.columns) == ["patient_id", "idh", "codel_1p19q", "cdkn2ab", "grade", "survival_days",
                                      "event", "split"]
        assert len(clin) == SMALL.patients_per_site and clin["patient_id"].is_unique
        assert set(clin["split"]) <= {"train", "val", "test"} and (clin["split"] == "train").any()
        assert list(genomics["patient_id"]) == list(clin["patient_id"])
        assert not genomics.isna().any().any()
        assert list(geneset["feature"]) == list(genomics.columns[1:])
        assert set(geneset["subspace"]) == {"tumour", "micro"}
        assert all(c.startswith("GENE") and c.endswith("_rnaseq") for c in geneset["feature"])
        assert set(slides["patient_id"]) == set(clin["patient_id"])  # every patient has a slide
        assert slides["patient_id"].value_counts().max() <= 2
        for rel in slides["path"]:
            assert rel.startswith("slides/") and (root / rel).is_file()
        assert sorted(p.name for p in (root / "slides").iterdir()) == sorted(
            Path(r).name for r in slides["path"])
        assert lay.features_dir.is_dir() and not any(lay.features_dir.iterdir())  # for `smm extract`
        m = Manifest.load(lay.manifest)
        assert m.schema == {"gene_set": sha256_file(lay.geneset)[:16]} and m.slides == {}
    assert "smm extract" in summary["next_step"]
    truth = pd.read_csv(slide_cohort / "truth.csv")
    assert len(truth) == SMALL.sites * SMALL.patients_per_site


def test_same_seed_same_bytes_and_pixels(slide_cohort, tmp_path):
    import tifffile

    again = tmp_path / "again"
    write_cohort(again, SMALL, log=quiet)
    for rel in ["cohort.json", "truth.csv", *(f"{s}/{f}" for s in ("site_1", "site_2") for f in CSVS)]:
        assert (again / rel).read_bytes() == (slide_cohort / rel).read_bytes(), rel
    for tif in sorted((slide_cohort / "site_1" / "slides").glob("*.tiff")):
        with tifffile.TiffFile(tif) as a, tifffile.TiffFile(again / "site_1" / "slides" / tif.name) as b:
            assert len(a.pages) == len(b.pages) == 3
            for pa, pb in zip(a.pages, b.pages):
                assert np.array_equal(pa.asarray(), pb.asarray())
    other = tmp_path / "other"
    write_cohort(other, replace(SMALL, seed=8, sites=1), log=quiet)
    assert (other / "site_1/genomics.csv").read_bytes() != (slide_cohort / "site_1/genomics.csv").read_bytes()


def test_parallel_rendering_gives_the_same_slides(slide_cohort, tmp_path):
    import tifffile

    out = tmp_path / "par"
    write_cohort(out, replace(SMALL, sites=1), workers=2, log=quiet)
    for tif in sorted((out / "site_1" / "slides").glob("*.tiff")):
        assert np.array_equal(tifffile.imread(tif), tifffile.imread(slide_cohort / "site_1" / "slides" / tif.name))


def test_slides_open_in_openslide_with_mpp_and_levels(slide_cohort):
    import openslide

    for tif in sorted((slide_cohort / "site_2" / "slides").glob("*.tiff")):
        with openslide.OpenSlide(str(tif)) as s:
            assert s.level_count == 3
            assert s.dimensions == (SMALL.slide_size, SMALL.slide_size)
            assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
            thumb = np.asarray(s.read_region((0, 0), 2, s.level_dimensions[2]).convert("RGB"), dtype=float)
        tissue = is_tissue(thumb)
        assert 0.15 < tissue.mean() < 0.8  # an irregular section on white glass
        assert thumb[~tissue].mean() > 225


def test_latent_states_drive_the_image():
    """Same layout and stain; only one latent state changes at a time."""
    size = 1024
    stain = Stain.draw(np.random.default_rng(0), 0.0, 0.0)

    def render(state: PatientState, seed: int = 3) -> tuple[np.ndarray, object]:
        layout = draw_layout(np.random.default_rng(seed), size, tumour_fraction=0.4)
        return render_slide(np.random.default_rng(seed + 1), layout, state, stain).astype(float), layout

    def up(mask: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(mask, 4, 0), 4, 1)

    low, layout = render(PatientState(2, 0.0, -1.5))
    high, _ = render(PatientState(2, 0.0, 1.5))
    stroma = up(layout.tissue & ~layout.tumour)
    dark = lambda img, m: float((img.mean(2)[m] < 110).mean())  # noqa: E731  lymphocyte-dark pixels
    assert dark(high, stroma) > 2.5 * dark(low, stroma) > 0
    slow, _ = render(PatientState(2, -1.5, 0.0))
    fast, _ = render(PatientState(2, 1.5, 0.0))
    tumour = up(layout.tumour)
    nuclear = lambda img, m: float((img.mean(2)[m] < 175).mean())  # noqa: E731  nuclei-covered pixels
    assert nuclear(fast, tumour) > 1.4 * nuclear(slow, tumour)
    # Oligodendroglioma: clear halos make its tumour brighter than a lower-grade astrocytoma's.
    oligo, _ = render(PatientState(3, 0.0, 0.0))
    astro, _ = render(PatientState(2, 0.0, 0.0))
    assert (oligo.mean(2)[tumour] > 235).mean() > 3 * (astro.mean(2)[tumour] > 235).mean()


def test_features_only_mode_writes_valid_files_with_checksums(feature_cohort, slide_cohort):
    import openslide

    for root in sites(feature_cohort):
        lay = SiteLayout(root)
        slides = pd.read_csv(lay.slides)
        assert list(slides.columns) == ["slide_id", "patient_id"]  # no images, no path
        m = Manifest.load(lay.manifest)
        assert m.schema == {"gene_set": sha256_file(lay.geneset)[:16], "encoder": "synthetic",
                            "weights_sha256": "synthetic", "feature_dim": 64}
        assert sorted(m.slides) == sorted(slides["slide_id"])
        for sid in slides["slide_id"]:
            feats, coords, attrs = read_features(lay.feature_file(sid))
            rec = m.slides[sid]
            assert rec["status"] == "done" and rec["checksum"] == sha256_file(lay.feature_file(sid))
            assert rec["n_patches"] == len(feats) >= 1 and feats.shape[1] == 64
            assert attrs == {"encoder": "synthetic", "weights_sha256": "synthetic", "feature_dim": 64,
                             "patch_size": 224, "mpp": 0.5, "level": 0}
            assert (coords % 224 == 0).all() and (coords >= 0).all() and (coords + 224 <= SMALL.slide_size).all()
        # Same seed: same patients and tables as the slide cohort, and the feature grid sits on the
        # tissue of the rendered slide.
        for f in ("clinical.csv", "genomics.csv", "geneset.csv"):
            assert (root / f).read_bytes() == (slide_cohort / root.name / f).read_bytes()
        sid = slides["slide_id"].iloc[0]
        _, coords, _ = read_features(lay.feature_file(sid))
        with openslide.OpenSlide(str(slide_cohort / root.name / "slides" / f"{sid}.tiff")) as s:
            for x, y in coords:
                patch = np.asarray(s.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB"), dtype=float)
                assert is_tissue(patch).mean() > 0.4


#: cohort_digest of SMALL's features-only and slide cohorts as main wrote them before the cohort
#: families existed (commit 0fa15cf): the additive family must stay byte-identical.
ADDITIVE_DIGESTS = {"features": "3deddef7dbfe7ed6e105e554d67f83fd93feb11681956ddfcbdd2c8998aad632",
                    "slides": "710b3395987dc5509b6f4cb0fe0c5185ac894a7007e3ef0287af37d7c8971962"}


def cohort_digest(root: Path) -> str:
    """sha256 over every file of a cohort but truth_patches.h5 (new with the families).

    Byte for byte, except: feature files by their arrays, manifest.json without its ``updated`` times,
    cohort.json without the keys the families added (``family``, ``family_model``,
    ``truth_patches_file``; spec ``family``, ``patches_per_slide``, ``layout_scale``).
    """
    import h5py

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == "truth_patches.h5":
            continue
        h.update(p.relative_to(root).as_posix().encode())
        if p.suffix == ".h5":
            with h5py.File(p, "r") as f:
                for name in ("features", "coords"):
                    h.update(f[name][()].tobytes())
        elif p.name == "manifest.json":
            m = json.loads(p.read_text())
            for rec in m["slides"].values():
                rec.pop("updated", None)
            h.update(json.dumps(m, sort_keys=True).encode())
        elif p.name == "cohort.json":
            c = json.loads(p.read_text())
            for k in ("family", "family_model", "truth_patches_file"):
                c.pop(k)
            for k in ("family", "patches_per_slide", "layout_scale"):
                c["spec"].pop(k)
            h.update(json.dumps(c, sort_keys=True).encode())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


def test_additive_family_is_byte_identical_to_before(feature_cohort, slide_cohort):
    assert json.loads((feature_cohort / "cohort.json").read_text())["family"] == "additive"
    assert cohort_digest(feature_cohort) == ADDITIVE_DIGESTS["features"]
    assert cohort_digest(slide_cohort) == ADDITIVE_DIGESTS["slides"]
    assert (feature_cohort / "truth_patches.h5").is_file() and not (slide_cohort / "truth_patches.h5").exists()


def test_features_reproducible(feature_cohort, tmp_path):
    again = tmp_path / "again"
    write_cohort(again, replace(SMALL, features_only=True), log=quiet)
    for sid in pd.read_csv(feature_cohort / "site_1" / "slides.csv")["slide_id"]:
        a = read_features(feature_cohort / "site_1" / "features" / f"{sid}.h5")
        b = read_features(again / "site_1" / "features" / f"{sid}.h5")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_case_mixes_differ_between_sites(big_cohort):
    summary = json.loads((big_cohort / "cohort.json").read_text())
    priors = np.array([s["class_prior"] for s in summary["sites"]])
    assert priors.shape == (3, 4) and np.allclose(priors.sum(1), 1, atol=1e-3)
    assert np.abs(priors[:, None] - priors[None]).max() > 0.1
    truth = pd.read_csv(big_cohort / "truth.csv")
    counts = pd.crosstab(truth["site"], truth["diagnosis"]).reindex(columns=range(4), fill_value=0).to_numpy()
    assert len({tuple(r) for r in counts}) == 3
    for s, row in zip(summary["sites"], counts):
        assert [s["latent_class_counts"][c] for c in CLASSES] == row.tolist()
    # Site batch effects: the same biology, shifted per site in the genes.
    means = [pd.read_csv(big_cohort / f"site_{k}" / "genomics.csv").iloc[:, 1:].to_numpy().mean(0) for k in (1, 2, 3)]
    assert np.abs(means[0] - means[1]).mean() > 0.2


def test_who_rule_recovers_the_latent_class_and_labels_are_missing_on_purpose(big_cohort):
    truth = pd.read_csv(big_cohort / "truth.csv").set_index("patient_id")
    summary = json.loads((big_cohort / "cohort.json").read_text())
    determined = 0
    for root, s in zip(sites(big_cohort), summary["sites"]):
        clin = pd.read_csv(root / "clinical.csv")
        derived = clin.apply(who2021, axis=1)
        known = derived.notna()
        determined += int(known.sum())
        latent = truth.loc[clin["patient_id"][known], "diagnosis"].to_numpy()
        assert (derived[known].astype(int).to_numpy() == latent).all()
        # Grade follows the class: GBM is grade 4; lower-grade astrocytoma and oligo are 2 or 3.
        y = truth.loc[clin["patient_id"], "diagnosis"].to_numpy()
        g = clin["grade"]
        assert (g[(y == 0) & g.notna()] == 4).all() and g[(y >= 2) & g.notna()].isin([2, 3]).all()
        # A few labels are missing on purpose (masking must be exercised) and nothing else is.
        assert clin["grade"].isna().sum() >= 1 and clin["cdkn2ab"].isna().sum() >= 1
        assert clin["survival_days"].isna().sum() >= 1
        assert (clin["survival_days"].isna() == clin["event"].isna()).all()
        assert clin["grade"].isna().mean() < 0.1
        assert clin["idh"].notna().all() and clin["codel_1p19q"].notna().all()
        assert s["missing"]["grade"] == int(clin["grade"].isna().sum())
        assert [s["who2021_counts"][c] for c in CLASSES] == [int((derived == i).sum()) for i in range(4)]
        ev = clin.dropna(subset=["event"])
        assert 0.2 < ev["event"].mean() < 0.9 and (ev["survival_days"] > 0).all()
    assert determined >= 0.9 * len(truth)


def test_signal_is_planted_in_both_modalities(big_cohort):
    """Each modality alone predicts the diagnosis clearly better than the majority class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    truth = pd.read_csv(big_cohort / "truth.csv").set_index("patient_id")
    genes, patches, ids = [], [], []
    for root in sites(big_cohort):
        g = pd.read_csv(root / "genomics.csv").set_index("patient_id")
        slides = pd.read_csv(root / "slides.csv")
        for pid in g.index:
            f = np.concatenate([read_features(root / "features" / f"{s}.h5")[0]
                                for s in slides.loc[slides["patient_id"] == pid, "slide_id"]])
            patches.append(np.concatenate([f.mean(0), f.max(0)]))
            genes.append(g.loc[pid].to_numpy())
            ids.append(pid)
    y = truth.loc[ids, "diagnosis"].to_numpy()
    majority = np.bincount(y).max() / len(y)
    for X in (np.array(genes), np.array(patches)):
        X = (X - X.mean(0)) / X.std(0)
        acc = cross_val_score(LogisticRegression(C=0.05, max_iter=2000), X, y, cv=4).mean()
        assert acc > majority + 0.1


def test_cli_refuses_a_non_empty_out_unless_forced(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["--out", str(out), "--sites", "3", "--patients-per-site", "3", "--features-only", "--slide-size", "512"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert all(f"site_{k}: 3 patients" in printed for k in (1, 2, 3))
    before = hashlib.sha256((out / "site_1" / "clinical.csv").read_bytes()).hexdigest()
    assert main([*args[:3], "2", *args[4:]]) == 2
    assert "--force" in capsys.readouterr().err
    assert hashlib.sha256((out / "site_1" / "clinical.csv").read_bytes()).hexdigest() == before
    assert main([*args[:3], "2", *args[4:], "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cohort.json", "site_1", "site_2", "truth.csv", "truth_patches.h5"]
    assert main(["--out", str(tmp_path / "x"), "--slide-size", "500"]) == 2
    assert "--slide-size" in capsys.readouterr().err
