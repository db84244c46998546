"""The site dataset: one item per patient, bags from all its slides, seeded caps, masks, and a batch
that the model runs on."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from client.site.collate import collate_patients
from client.site.dataset import SiteData, concat_slide_coords, sample_indices, slide_patch_step
from client.site.folder import SiteLayout, read_features
from client.site.validation import SiteDataError
from site_builder import STEP, build_site
from smm_model.config import DataConfig, ExperimentConfig
from smm_model.nn.layout import spatial_tokens
from smm_model.nn.model import build_model

SMALL = ["model.feature_dim=8", "model.genes_tumour=3", "model.genes_micro=4", "model.hidden_dim=16",
         "model.heads=4", "model.dim_head=8", "model.offset_groups=4", "model.grid_size=8", "model.n_patches=64",
         "model.key_grid=4", "model.bias_table_size=33", "model.snn_hidden=[8]"]


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("site"), n=18)


def load(root, **data) -> SiteData:
    return SiteData.load(root, DataConfig(**{"max_patches": 0, **data}))


def test_item_bag_is_the_concatenation_of_the_patients_slides(site_dir):
    site = load(site_dir)
    pid = "P002"  # 1 + 2 % 3 = 3 slides
    assert site.slides[pid] == ("P002-S0", "P002-S1", "P002-S2")
    split = site.splits.of(pid)
    ds = site.dataset(split)
    item = ds[ds.patient_ids.index(pid)]
    parts = [read_features(SiteLayout(site_dir).feature_file(s)) for s in site.slides[pid]]
    np.testing.assert_array_equal(item["patches"], np.concatenate([f for f, _, _ in parts]))
    assert item["patch_step"] == STEP and item["coords"].shape == (len(item["patches"]), 2)
    # slides side by side: x ranges do not overlap, and each slide keeps its own geometry
    edges, start = [], 0
    for f, c, _ in parts:
        xy = item["coords"][start:start + len(f)]
        np.testing.assert_allclose(xy - xy.min(0), c - c.min(0))
        edges.append((xy[:, 0].min(), xy[:, 0].max()))
        start += len(f)
    assert all(a[1] + STEP < b[0] for a, b in zip(edges, edges[1:]))
    assert item["genes_tumour"].shape == (3,) and item["genes_micro"].shape == (4,)


def test_a_patient_with_three_slides_never_straddles_splits(site_dir):
    site = load(site_dir)
    owner = {s: p for p, slides in site.slides.items() for s in slides}
    for name, patients in site.splits.as_dict().items():
        for p in patients:
            assert all(site.splits.of(owner[s]) == name for s in site.slides[p])
    used = [s for sp in ("train", "val", "test") for p in site.patients(sp) for s in site.slides[p]]
    assert len(used) == len(set(used)) == len(owner)


def test_cap_is_seeded_deterministic_and_respected(site_dir):
    full = load(site_dir).dataset("train")
    capped_site = load(site_dir, max_patches=10)
    a, b = capped_site.dataset("train"), capped_site.dataset("train")
    for i in range(len(a)):
        x, y = a[i]["patches"], b[i]["patches"]
        assert len(x) == min(10, len(full[i]["patches"]))
        np.testing.assert_array_equal(x, y)  # same seed, same sample
        rows = {r.tobytes() for r in full[i]["patches"]}
        assert all(r.tobytes() in rows for r in x)  # a subset of the patient's own patches
    big = max(range(len(a)), key=lambda i: len(full[i]["patches"]))
    a.set_epoch(1)
    assert not np.array_equal(a[big]["patches"], b[big]["patches"])  # another epoch, another sample
    assert sample_indices(5, 10, 0, 0).tolist() == list(range(5))
    assert sample_indices(100, 7, 1, 2, 3).tolist() == sample_indices(100, 7, 1, 2, 3).tolist()


def test_masks_for_missing_labels(tmp_path):
    root = build_site(tmp_path / "s", n=8)
    clin = pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)
    clin.loc[0, "grade"] = ""
    clin.loc[0, "cdkn2ab"] = ""
    clin.loc[1, "survival_days"] = ""  # missing (0 days would be an error, not a mask)
    clin.loc[2, "idh"] = "NA"
    clin.to_csv(root / "clinical.csv", index=False)
    clin["split"] = "train"
    clin.to_csv(root / "clinical.csv", index=False)
    ds = load(root).dataset("train")
    items = {it["patient_id"]: it for it in (ds[i] for i in range(len(ds)))}
    assert items["P000"]["labels"]["grade"] is None and not items["P000"]["label_mask"]["grade"]
    assert items["P000"]["label_mask"]["diagnosis"]  # IDH-wildtype: decided without grade or CDKN
    assert items["P001"]["labels"]["survival_time"] is None and not items["P001"]["label_mask"]["survival"]
    assert items["P001"]["label_mask"]["grade"]
    assert items["P002"]["labels"]["diagnosis"] is None and not items["P002"]["label_mask"]["diagnosis"]
    ok = items["P003"]
    assert all(ok["label_mask"].values()) and isinstance(ok["labels"]["survival_bin"], int)
    batch = collate_patients(list(items.values()))
    assert batch.label_mask["grade"].tolist()[0] is False


@pytest.mark.parametrize("layout", ["seed", "spatial"])
def test_collate_and_model_forward(site_dir, layout):
    torch.manual_seed(0)
    cfg = ExperimentConfig.from_yaml_text("", [*SMALL, f"model.layout={layout}"])
    site = load(site_dir, max_patches=32)
    ds = site.dataset("train", grid_size=cfg.model.grid_size, n_bins=cfg.model.survival_bins)
    batch = collate_patients([ds[i] for i in range(4)])
    assert batch.patches.shape[0] == 4 and batch.patches.shape[2] == 8 and batch.patch_mask.sum(1).max() <= 32
    out = build_model(cfg.model).eval()(batch)
    for task, n in cfg.model.n_classes.items():
        assert out.logits[task].shape == (4, n) and torch.isfinite(out.logits[task]).all()


def test_slides_never_share_a_spatial_token():
    """Two slides far larger than the grid: after cell merging, no token mixes them."""
    rng = np.random.default_rng(0)
    a = np.stack(np.meshgrid(np.arange(30), np.arange(20)), -1).reshape(-1, 2) * 512
    b = rng.choice(40, size=(50, 2)) * 256 + 10_000
    xy, step = concat_slide_coords([a, b], [512.0, 256.0], grid_size=8)
    feats = np.concatenate([np.tile([1.0, 0.0], (len(a), 1)), np.tile([0.0, 1.0], (len(b), 1))])
    tokens, mask = spatial_tokens(torch.tensor(feats)[None].float(), torch.ones(1, len(feats), dtype=torch.bool),
                                  torch.tensor(xy)[None], 8, step)
    t = tokens[0][mask[0]]
    assert torch.all((t[:, 0] == 0) | (t[:, 1] == 0))  # every token from one slide only
    assert step == 512.0


def test_patch_step_rules():
    c = np.array([[0, 0], [448, 0], [896, 224]])
    assert slide_patch_step(c, {"patch_size": 224}) == 224.0  # lattice stride from the coordinates
    assert slide_patch_step(c, {"patch_size": 224, "patch_size_level0": 448}) == 448.0  # TRIDENT
    # smm extract: stride 112 target px (overlap) at 2 level-0 px per target px
    assert slide_patch_step(c, {"patch_size": 224, "patch_size_level0": 448, "step": 112,
                                "target_downsample": 2.0, "downsample": 4.0}) == 224.0
    assert slide_patch_step(c, {"patch_size": 224, "patch_step": 300, "step": 112}) == 300.0
    assert slide_patch_step(c, {"patch_size": 224, "downsample": 4.0}) == 224.0  # ambiguous: ignored
    assert slide_patch_step(np.array([[5, 5]]), {"patch_size": 256}) == 256.0


def test_failed_slides_exclude_patients_with_a_reason(tmp_path):
    root = build_site(tmp_path / "s", n=6, slides_per_patient=[1, 2, 1, 1, 1, 1])
    m = json.loads((root / "manifest.json").read_text())
    m["slides"]["P000-S0"].update(status="failed", reason="no_tissue")
    m["slides"]["P001-S0"].update(status="failed", reason="read_error")
    (root / "manifest.json").write_text(json.dumps(m))
    site = load(root, val_fraction=0.0, test_fraction=0.0)
    assert site.excluded == {"P000": "no usable feature file"}
    assert site.slides["P001"] == ("P001-S1",)  # one bad slide of two: the patient keeps the other
    assert any("1 slide(s) left out: extraction failed (no_tissue)" == w for w in site.report.warnings)
    assert any("excluded from histology runs: no usable feature file" in w for w in site.report.warnings)
    assert "P000" not in site.patients("train") and site.aggregate_stats()["excluded"] == {"no usable feature file": 1}
    # genomics-only: nobody is excluded and no feature file is read
    snn = SiteData.load(root, DataConfig(val_fraction=0.0, test_fraction=0.0), require_features=False)
    assert snn.excluded == {} and "P000" in snn.patients("train")
    item = snn.dataset("train")[0]
    assert item["patches"].shape == (1, 8) and not item["patches"].any()


def test_genomics_only_site_needs_no_features(tmp_path):
    root = build_site(tmp_path / "s", n=6)
    for p in (root / "features").iterdir():
        p.unlink()
    (root / "slides.csv").unlink()
    (root / "manifest.json").unlink()
    site = SiteData.load(root, DataConfig(), require_features=False)
    assert len(site.patients()) == 6
    with pytest.raises(SiteDataError, match="slides.csv: slide table not found"):
        SiteData.load(root, DataConfig())


def test_standardisation_uses_training_patients_and_handed_in_stats(site_dir):
    site = load(site_dir)
    stats = site.genomics_stats("train")
    assert stats.count.tolist() == [len(site.patients("train"))] * 7
    ds = site.dataset("train")
    t = np.stack([ds[i]["genes_tumour"] for i in range(len(ds))])
    np.testing.assert_allclose(t.mean(0), 0, atol=1e-5)
    shifted = replace(stats, sum=stats.sum + stats.count * 1.0)  # mean + 1: a federation's shared stats
    t2 = np.stack([it["genes_tumour"] for it in site.dataset("train", stats=shifted)])
    assert np.all(t2.mean(0) < -0.1)


def test_aggregate_stats_are_aggregate_only(site_dir):
    site = load(site_dir)
    agg = site.aggregate_stats()
    text = json.dumps(agg)
    assert "P0" not in text  # no patient id anywhere
    assert sum(agg["splits"][s]["patients"] for s in ("train", "val", "test")) == 18
    assert sum(agg["splits"]["train"]["diagnosis"]) + agg["splits"]["train"]["diagnosis_unknown"] == \
        agg["splits"]["train"]["patients"]
    assert agg["schema"]["feature_dim"] == 8 and len(agg["schema"]["gene_set"]) == 64
    assert agg["genomics_stats"]["count"][0] == agg["splits"]["train"]["patients"]
