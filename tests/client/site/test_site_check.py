"""``smm site check``: exit 0 on a good folder, 1 with the file/field named on each kind of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from client.site.check import main
from client.site.folder import SiteLayout
from site_builder import build_site, write_slide
from smm_model import cli


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("good") / "site", n=18)


@pytest.fixture
def site(good, tmp_path):
    """A fresh copy of the good folder to break."""
    return shutil.copytree(good, tmp_path / "site")


def run(capsys, *argv):
    rc = main(["check", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_good_folder_passes_and_prints_only_aggregates(good, capsys):
    rc, out, _ = run(capsys, good)
    assert rc == 0 and out.rstrip().endswith("OK (0 warning(s))")
    assert "train" in out and "events" in out and "36 of 36 usable" in out
    assert "P0" not in out  # no patient id in a passing report
    genomics = pd.read_csv(good / "genomics.csv")
    assert f"{genomics.iloc[0, 1]:.4f}"[:6] not in out  # no genomic value


def test_json_and_dispatcher(good, capsys):
    rc, out, _ = run(capsys, good, "--json", "--no-checksums")
    res = json.loads(out)
    assert rc == 0 and res["ok"] and res["summary"]["patients"] == 18
    assert sum(res["summary"]["splits"][s]["patients"] for s in ("train", "val", "test")) == 18
    assert cli.main(["site", "check", str(good), "--no-checksums"]) == 0


def test_missing_feature_file(site, capsys):
    (site / "features" / "P001-S0.h5").unlink()
    rc, out, err = run(capsys, site)
    assert rc == 1 and "FAILED" in out and "1 error(s)" in err
    assert "slide 'P001-S0' (patient 'P001')" in out and "features/P001-S0.h5: feature file not found" in out


def test_feature_dim_mismatch(site, capsys):
    write_slide(SiteLayout(site), "P002-S1", 5, 6, np.random.default_rng(0))
    rc, out, _ = run(capsys, site, "--no-checksums")
    assert rc == 1 and "P002-S1.h5: attribute feature_dim 6, but the site's is 8" in out


def test_config_dimensions_must_match(site, capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  feature_dim: 16\n  genes_tumour: 3\n  genes_micro: 4\n")
    rc, out, _ = run(capsys, site, "--config", cfg, "--no-checksums")
    assert rc == 1 and "feature_dim 8, but model.feature_dim is 16" in out
    cfg.write_text("model:\n  feature_dim: 8\n  genes_tumour: 3\n  genes_micro: 4\n")
    assert run(capsys, site, "--config", cfg, "--no-checksums")[0] == 0
    # an impute policy adds one missingness column per subspace, so the same config no longer fits
    rc, out, _ = run(capsys, site, "--config", cfg, "--set", "data.genomics_policy=impute_mean")
    assert rc == 1 and "vectors of 4 (tumour) and 5 (micro)" in out
    rc, _, err = run(capsys, site, "--set", "data.nope=1")
    assert rc == 2 and "unknown key" in err


def test_changed_feature_file_fails_the_checksum(site, capsys):
    write_slide(SiteLayout(site), "P003-S0", 5, 8, np.random.default_rng(1))  # valid file, not the extracted one
    rc, out, _ = run(capsys, site)
    assert rc == 1 and "P003-S0.h5: sha256 differs from manifest.json" in out
    assert run(capsys, site, "--no-checksums")[0] == 0


def test_bad_genomics(site, capsys):
    g = pd.read_csv(site / "genomics.csv").astype({"M2_rnaseq": object})
    g.loc[4, "M2_rnaseq"] = "n.d."
    g.loc[7, "T1_rnaseq"] = np.nan
    g.to_csv(site / "genomics.csv", index=False)
    rc, out, _ = run(capsys, site, "--no-checksums")
    assert rc == 1
    assert "genomics.csv: column 'M2_rnaseq', row patient 'P004': not a number" in out
    assert "genomics.csv: column 'T1_rnaseq', row patient 'P007': missing or NaN" in out
    assert "n.d." not in out
    rc, out, _ = run(capsys, site, "--no-checksums", "--set", "data.genomics_policy=impute_zero")
    assert rc == 1 and "T1_rnaseq" not in out  # imputed now; the non-numeric cell is still an error


def test_bad_clinical_value(site, capsys):
    c = pd.read_csv(site / "clinical.csv", dtype=str, keep_default_na=False)
    c.loc[5, "idh"] = "positive"
    c.loc[6, "event"] = "2"
    c.to_csv(site / "clinical.csv", index=False)
    rc, out, _ = run(capsys, site, "--no-checksums")
    assert rc == 1
    assert "clinical.csv: column 'idh', row patient 'P005': unrecognised value; expected mutant/wildtype" in out
    assert "column 'event', row patient 'P006'" in out


def test_warnings_do_not_fail(site, capsys):
    shutil.copy(site / "features" / "P000-S0.h5", site / "features" / "stray.h5")
    m = json.loads((site / "manifest.json").read_text())
    m["slides"]["P004-S0"].update(status="failed", reason="no_tissue")
    (site / "manifest.json").write_text(json.dumps(m))
    g = pd.read_csv(site / "genomics.csv")
    c = pd.read_csv(site / "clinical.csv")
    g["M3_rnaseq"] = c["survival_days"].to_numpy() * 0.01  # a label copied into the genomic table
    g.to_csv(site / "genomics.csv", index=False)
    rc, out, _ = run(capsys, site, "--no-checksums")
    assert rc == 0, out
    assert "1 feature file(s) belong to no slide" in out and "1 slide(s) left out: extraction failed (no_tissue)" in out
    assert "'M3_rnaseq'" in out and "rank correlation" in out
    assert "P004" not in out  # warnings carry counts, not patient ids


def test_missing_folder_and_files(tmp_path, capsys):
    rc, out, _ = run(capsys, tmp_path / "nowhere")
    assert rc == 1 and "site folder not found" in out
    (tmp_path / "empty").mkdir()
    rc, out, _ = run(capsys, tmp_path / "empty")
    assert rc == 1 and "clinical.csv: clinical table not found" in out and "geneset.csv" in out


def test_unreadable_manifest(site, capsys):
    (site / "manifest.json").write_text("{not json")
    rc, out, _ = run(capsys, site, "--no-checksums")
    assert rc == 1 and "manifest.json: not valid JSON" in out


def test_a_gene_set_holding_a_label_fact_is_refused_unless_the_config_opts_in(site, capsys):
    g = pd.read_csv(site / "genomics.csv")
    g["IDH1_mut"] = (np.arange(len(g)) % 2).astype(float)
    g["CDKN2C_cnv"] = 0.0  # a neighbouring gene: not a label fact
    g.to_csv(site / "genomics.csv", index=False)
    gs = pd.read_csv(site / "geneset.csv")
    pd.concat([gs, pd.DataFrame({"feature": ["IDH1_mut", "CDKN2C_cnv"], "subspace": ["tumour", "tumour"]})]) \
        .to_csv(site / "geneset.csv", index=False)
    rc, out, _ = run(capsys, site, "--no-checksums")
    assert rc == 1 and "FAILED: 1 error(s)" in out
    line = next(ln for ln in out.splitlines() if "IDH1_mut" in ln)
    assert f"{site / 'geneset.csv'}: feature(s) 'IDH1_mut' (IDH mutation) measure a fact the label rules read" in line
    assert str(site / "genomics.csv") in line and "data.allow_label_features" in line
    assert "CDKN2C_cnv" not in out
    rc, out, _ = run(capsys, site, "--no-checksums", "--set", "data.allow_label_features=true")
    assert rc == 0, out
    assert "'IDH1_mut' (IDH mutation)" in out and "accepted because data.allow_label_features is true" in out


def test_a_label_column_the_gene_set_does_not_list_is_only_warned_about(site, capsys):
    g = pd.read_csv(site / "genomics.csv")
    g["CDKN2A_cnv"] = -1.0  # in the table, not an input
    g.to_csv(site / "genomics.csv", index=False)
    rc, out, _ = run(capsys, site, "--no-checksums")
    assert rc == 0, out
    assert f"{site / 'genomics.csv'}: column(s) 'CDKN2A_cnv' (CDKN2A/B homozygous deletion)" in out
    assert "not model inputs" in out
