"""client/cohorts/cohort.py: the IID control of a cohort of site folders (``deal_site_folders``)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from client.cohorts.cohort import ONE_SITE, CohortError, deal_iid, deal_site_folders
from client.site.check import check_site
from client.site.folder import Manifest, SiteLayout
from smm_model.contract.atomic import sha256_file
from client.cohorts.synth import CohortSpec, write_cohort

SPEC = replace(CohortSpec(), sites=3, patients_per_site=10, seed=5, features_only=True, slide_size=1024)


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "real"
    write_cohort(out, SPEC, log=quiet)
    return out


def tables(root: Path) -> dict[str, dict[str, pd.DataFrame]]:
    """Every site's clinical, slides and genomics tables, as the text written."""
    return {p.name: {n: pd.read_csv(getattr(SiteLayout(p), n), dtype=str, keep_default_na=False)
                     for n in ("clinical", "slides", "genomics")}
            for p in sorted(root.iterdir()) if SiteLayout(p).clinical.is_file()}


def rows_by_patient(sites: dict, name: str) -> dict[str, list]:
    """Every row of table ``name`` over all sites, keyed by its first column."""
    return {tuple(r)[0]: list(r) for t in sites.values() for r in t[name].itertuples(index=False)}


def test_every_patient_moves_with_all_its_rows_and_files(cohort, tmp_path):
    out = tmp_path / "iid"
    record = deal_site_folders(cohort, out, seed=0)
    real, iid = tables(cohort), tables(out)
    assert sorted(iid) == [f"iid_{n}" for n in sorted(real)]
    for name in real:  # each IID site holds as many patients as its real site
        assert len(iid[f"iid_{name}"]["clinical"]) == len(real[name]["clinical"])
    for name in ("clinical", "genomics"):  # the same rows, splits and values, byte for byte as text
        assert rows_by_patient(iid, name) == rows_by_patient(real, name)
    real_slides = {r.slide_id: r.patient_id for t in real.values() for r in t["slides"].itertuples()}
    for site, t in iid.items():
        assert set(t["slides"]["patient_id"]) <= set(t["clinical"]["patient_id"])
        manifest = Manifest.load(SiteLayout(out / site).manifest)
        for sid, pid in zip(t["slides"]["slide_id"], t["slides"]["patient_id"]):
            assert real_slides[sid] == pid
            src = next(SiteLayout(p).feature_file(sid) for p in cohort.iterdir() if SiteLayout(p).feature_file(sid).is_file())
            assert sha256_file(SiteLayout(out / site).feature_file(sid)) == sha256_file(src)
            assert manifest.slides[sid]["checksum"] == sha256_file(src)
    assert sum(len(t["slides"]) for t in iid.values()) == len(real_slides)
    # dealt at random: every IID site mixes patients of several real sites
    assert all(len(s["from_sites"]) > 1 for s in record["sites"])
    assert json.loads((out / "cohort.json").read_text())["iid_control_seed"] == 0
    for p in sorted(out.iterdir()):  # and each is a valid site folder
        if p.is_dir():
            res = check_site(p)
            assert res["ok"], res["errors"]


def test_the_deal_is_seeded(cohort, tmp_path):
    a, b, c = (deal_site_folders(cohort, tmp_path / n, seed=s) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert a["sites"] == b["sites"]
    ta, tb = tables(tmp_path / "a"), tables(tmp_path / "b")
    assert all(ta[k][n].equals(tb[k][n]) for k in ta for n in ("clinical", "slides", "genomics"))
    assert a["sites"] != c["sites"]


def test_deal_iid_keeps_sizes_and_names():
    site = pd.Series(["x"] * 5 + ["y"] * 3 + ["z"] * 2)
    dealt, real_of = deal_iid(site, seed=3)
    assert real_of == {"iid_x": "x", "iid_y": "y", "iid_z": "z"}
    assert dealt.value_counts().to_dict() == {"iid_x": 5, "iid_y": 3, "iid_z": 2}
    assert not (dealt.map(real_of) == site).all()


def test_slide_paths_still_point_at_the_slides(tmp_path):
    real = tmp_path / "slides"
    write_cohort(real, replace(SPEC, features_only=False, patients_per_site=2, sites=2), log=quiet)
    out = tmp_path / "iid"
    deal_site_folders(real, out, seed=0)
    for site in tables(out).values():
        for path in site["slides"]["path"]:
            assert Path(path).is_absolute() and Path(path).is_file()


def test_sites_that_could_not_federate_are_refused(cohort, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cohort, other)
    geneset = SiteLayout(other / "site_2").geneset
    geneset.write_text(geneset.read_text().replace("tumour", "micro", 1))
    with pytest.raises(CohortError, match="site_2.*gene set or feature schema differs"):
        deal_site_folders(other, tmp_path / "iid", seed=0)


def test_a_folder_without_sites_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CohortError, match="no site folders"):
        deal_site_folders(tmp_path / "empty", tmp_path / "iid", seed=0)
    with pytest.raises(CohortError, match="no site folders"):
        deal_site_folders(tmp_path / "missing", tmp_path / "iid", seed=0)


def test_a_non_empty_output_is_refused_unless_forced(cohort, tmp_path):
    out = tmp_path / "iid"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CohortError, match="not empty"):
        deal_site_folders(cohort, out, seed=0)
    deal_site_folders(cohort, out, seed=0, force=True)
    assert (out / "keep.txt").is_file() and (out / "iid_site_1").is_dir()


def test_the_one_site_control_pools_every_patient_into_one_valid_site(cohort, tmp_path):
    out = tmp_path / "one"
    record = deal_site_folders(cohort, out, seed=0, one_site=True)
    real, one = tables(cohort), tables(out)
    assert list(one) == [ONE_SITE] and record["kind"] == "one_site_control"
    for name in ("clinical", "genomics", "slides"):  # slides: keyed by slide_id, the first column
        assert rows_by_patient(one, name) == rows_by_patient(real, name)
    res = check_site(out / ONE_SITE)
    assert res["ok"], res["errors"]


def test_a_slide_of_no_known_patient_is_refused_naming_the_file(cohort, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cohort, other)
    slides = SiteLayout(other / "site_3").slides
    slides.write_text(slides.read_text() + "GHOST-S1,GHOST\n")
    with pytest.raises(CohortError, match="site_3/slides.csv: slide GHOST-S1 belongs to patient GHOST"):
        deal_site_folders(other, tmp_path / "iid", seed=0)
