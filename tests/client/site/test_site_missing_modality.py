"""Sites without slides: declared in the manifest, accepted by the site check and the dataset, and
told apart from a broken folder (slides listed but missing stays an error)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from client.cohorts.synth import drop_slides
from client.site.check import check_site, main
from client.site.collate import collate_patients
from client.site.dataset import SiteData
from client.site.folder import Manifest, SiteLayout
from client.site.validation import SiteDataError
from site_builder import build_site
from smm_model.config import ExperimentConfig


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("good") / "site", n=18)


@pytest.fixture
def genomics_only(good, tmp_path):
    site = shutil.copytree(good, tmp_path / "site")
    drop_slides(site)
    return site


def test_a_declared_genomics_only_site_passes_the_check_for_smm(genomics_only, capsys):
    res = check_site(genomics_only, ExperimentConfig())  # arch smm: would need features from a full site
    assert res["ok"], res["errors"]
    assert res["summary"]["schema"]["modalities"] == ["genomics"]
    assert "encoder" not in res["summary"]["schema"] and res["summary"]["slides"] == {"listed": 0, "usable": 0}
    assert main(["check", str(genomics_only)]) == 0
    assert "modalities genomics only" in capsys.readouterr().out


def test_the_dataset_yields_placeholder_bags_flagged_as_missing(genomics_only):
    site = SiteData.load(genomics_only, require_features=True)
    assert site.modalities == ("genomics",) and not site.require_features and site.excluded == {}
    ds = site.dataset("train")
    batch = collate_patients([ds[i] for i in range(3)])
    assert batch.has_patches is not None and not bool(batch.has_patches.any())
    assert batch.has_genes is None  # every patient has genomics
    assert batch.genes_tumour.shape == (3, 3) and len(ds) == len(site.patients("train"))


def test_a_full_site_batch_carries_no_flags(good):
    ds = SiteData.load(good).dataset("train")
    batch = collate_patients([ds[i] for i in range(2)])
    assert batch.has_patches is None and batch.has_genes is None


def test_slides_missing_without_a_declaration_stay_an_error(good, tmp_path):
    site = shutil.copytree(good, tmp_path / "site")
    (site / "slides.csv").unlink()
    shutil.rmtree(site / "features")
    res = check_site(site, ExperimentConfig())
    assert not res["ok"]
    assert any("slides.csv: slide table not found" in e and "smm site modalities" in e for e in res["errors"])


def test_a_declaration_that_contradicts_the_folder_is_an_error(good, tmp_path):
    site = shutil.copytree(good, tmp_path / "site")
    assert main(["modalities", str(site), "genomics"]) == 0  # slides.csv still lists every slide
    res = check_site(site, ExperimentConfig())
    assert not res["ok"]
    assert any("lists 36 slide(s)" in e and "declares the site's modalities as ['genomics']" in e for e in res["errors"])
    with pytest.raises(SiteDataError, match="no histology"):
        SiteData.load(site)


def test_a_bad_declaration_names_the_file_and_field(genomics_only):
    path = SiteLayout(genomics_only).manifest
    data = json.loads(path.read_text())
    for bad in (["slides"], [], "genomics", ["genomics", "genomics"]):
        data["modalities"] = bad
        path.write_text(json.dumps(data))
        res = check_site(genomics_only, ExperimentConfig())
        assert not res["ok"] and any("manifest.json: field 'modalities'" in e for e in res["errors"]), bad


def test_declaring_both_modalities_removes_the_declaration(good, tmp_path):
    site = shutil.copytree(good, tmp_path / "site")
    assert main(["modalities", str(site), "histology", "genomics"]) == 0
    assert "modalities" not in json.loads((site / "manifest.json").read_text())
    assert Manifest.load(site / "manifest.json").modalities == ("histology", "genomics")


def test_an_empty_slide_table_is_a_site_without_slides_when_declared(good, tmp_path):
    site = shutil.copytree(good, tmp_path / "site")
    drop_slides(site)
    pd.DataFrame(columns=["slide_id", "patient_id"]).to_csv(site / "slides.csv", index=False)
    assert check_site(site, ExperimentConfig())["ok"]


def test_a_declared_histology_only_site_passes_and_yields_flagged_gene_vectors(good, tmp_path):
    from client.cohorts.synth import drop_modality

    site = shutil.copytree(good, tmp_path / "site")
    drop_modality(site, "genomics")
    res = check_site(site, ExperimentConfig())
    assert res["ok"], res["errors"]
    assert res["summary"]["schema"]["modalities"] == ["histology"] and "genomics_stats" not in res["summary"]
    data = SiteData.load(site)
    assert data.genomics is None and data.modalities == ("histology",)
    batch = collate_patients([data.dataset("train")[i] for i in range(2)])
    assert batch.has_patches is None and not bool(batch.has_genes.any())
    assert batch.genes_tumour.shape == (2, 3) and not bool(batch.genes_tumour.any())
    # a genomic table put back contradicts the declaration
    pd.read_csv(good / "genomics.csv").to_csv(site / "genomics.csv", index=False)
    res = check_site(site, ExperimentConfig())
    assert not res["ok"] and any("a genomic table, but manifest.json declares" in e for e in res["errors"])


def test_genomics_missing_without_a_declaration_stays_an_error(good, tmp_path):
    site = shutil.copytree(good, tmp_path / "site")
    (site / "genomics.csv").unlink()
    res = check_site(site, ExperimentConfig())
    assert not res["ok"] and any("no genomic table" in e for e in res["errors"])


def test_smm_synth_writes_sites_without_slides(tmp_path, capsys):
    from client.cohorts.synth import main as synth_main

    out = tmp_path / "cohort"
    assert synth_main(["--out", str(out), "--sites", "2", "--patients-per-site", "8", "--features-only",
                       "--feature-dim", "8", "--without-slides", "2"]) == 0
    assert Manifest.load(out / "site_2" / "manifest.json").modalities == ("genomics",)
    assert not (out / "site_2" / "slides.csv").exists() and not (out / "site_2" / "features").exists()
    assert Manifest.load(out / "site_1" / "manifest.json").modalities == ("histology", "genomics")
    assert check_site(out / "site_2", ExperimentConfig())["ok"]
    assert synth_main(["--out", str(tmp_path / "bad"), "--sites", "2", "--without-slides", "3"]) == 2
    assert "site numbers run from 1 to --sites 2" in capsys.readouterr().err
