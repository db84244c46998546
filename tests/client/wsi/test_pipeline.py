"""The site pipeline end to end at a tiny size: synthetic cohort with real TIFF slides -> smm extract
-> smm site check -> site dataset -> a training step of the model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from client.site.collate import collate_patients
from client.site.dataset import SiteData
from client.wsi.extract import main as extract_main
from client.site.check import main as site_check_main
from client.cohorts.synth import main as synth_main
from client.local.train import train_epochs
from smm_model.config import ExperimentConfig
from smm_model.nn.model import build_model


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "cohort"
    assert synth_main(["--out", str(out), "--sites", "2", "--patients-per-site", "6", "--slide-size", "1024",
                       "--seed", "3"]) == 0
    for site in ("site_1", "site_2"):
        rc = extract_main([str(out / site / "slides"), "--out", str(out / site), "--encoder", "null",
                           "--workers", "1", "--no-progress"])
        assert rc == 0
    return out


def test_extracted_sites_pass_the_site_check(cohort, capsys):
    for site in ("site_1", "site_2"):
        assert site_check_main(["check", str(cohort / site)]) == 0
    assert "OK" in capsys.readouterr().out


def test_rerun_of_extraction_skips_finished_slides(cohort):
    feats = sorted((cohort / "site_1" / "features").glob("*.h5"))
    before = {p.name: p.stat().st_mtime_ns for p in feats}
    assert extract_main([str(cohort / "site_1" / "slides"), "--out", str(cohort / "site_1"), "--encoder", "null",
                         "--workers", "1", "--no-progress"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in sorted((cohort / "site_1" / "features").glob("*.h5"))}
    assert before == after and len(before) == len(pd.read_csv(cohort / "site_1" / "slides.csv"))


@pytest.mark.parametrize("layout", ["seed", "spatial"])
def test_site_dataset_feeds_the_model(cohort, layout):
    site = SiteData.load(cohort / "site_1")
    dim = site.feature_schema["feature_dim"]
    gt, ge = site.geneset.input_dims(site.genomics.policy)
    cfg = ExperimentConfig.from_yaml_text("", [
        f"model.feature_dim={dim}", f"model.genes_tumour={gt}", f"model.genes_micro={ge}", f"model.layout={layout}",
        "model.hidden_dim=16", "model.heads=4", "model.dim_head=8", "model.offset_groups=4", "model.grid_size=8",
        "model.n_patches=64", "model.key_grid=4", "model.bias_table_size=33", "model.snn_hidden=[8]",
        "train.epochs=1", "train.batch_size=2", "train.drop_last=false"])
    ds = site.dataset("train", grid_size=cfg.model.grid_size)
    assert len(ds) == len(site.patients("train")) > 0
    item = ds[0]
    assert item["patches"].shape[1] == dim and np.isfinite(item["genes_tumour"]).all()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_patients)
    logs = train_epochs(model, loader, cfg)
    assert np.isfinite(logs[0].loss) and logs[0].examples == len(ds)
