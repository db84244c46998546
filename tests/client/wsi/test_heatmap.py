"""Tests for client.wsi.heatmap (``smm heatmap``): a synthetic pyramidal slide, a feature file whose
patches in one region differ, a model file whose attention finds them, and the error paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from client.cohorts.synth import write_tiff
from client.site.folder import SiteLayout, write_features
from client.wsi.heatmap import main
from client.wsi.slides import Slide
from smm_model.config import ExperimentConfig
from smm_model.contract.protocol import SharedStats
from smm_model.contract.runfolder import model_payload, write_model
from smm_model.metrics.faithfulness import attention_auc
from smm_model.nn.model import build_model
from site_builder import MICRO, TUMOUR, genomics_frame

W, H = 1024, 768  # level-0 slide size
STEP = 64  # patch side and stride, level-0 pixels
PLANTED = (640, 896, 128, 384)  # x0, x1, y0, y1 of the region whose patches differ
D = 8
SMALL = [f"model.feature_dim={D}", f"model.genes_tumour={len(TUMOUR)}", f"model.genes_micro={len(MICRO)}",
         "model.hidden_dim=8", "model.heads=2", "model.dim_head=4", "model.offset_groups=2", "model.layout=spatial",
         "model.grid_size=8", "model.key_grid=4", "model.bias_table_size=17", "model.snn_hidden=[4]",
         "model.abmil_hidden=4", "model.dropout=0.0", "model.attn_dropout=0.0"]


def _coords():
    xs, ys = np.meshgrid(np.arange(0, W, STEP), np.arange(0, H, STEP))
    return np.stack((xs.ravel(), ys.ravel()), 1)  # (192, 2)


def _planted(coords):
    x0, x1, y0, y1 = PLANTED
    return (coords[:, 0] >= x0) & (coords[:, 0] < x1) & (coords[:, 1] >= y0) & (coords[:, 1] < y1)


def _write_model(path: Path, *overrides: str, torch_seed: int = 0, hand_abmil: bool = False) -> Path:
    cfg = ExperimentConfig.from_yaml_text("", [*SMALL, *overrides])
    torch.manual_seed(torch_seed)
    net = build_model(cfg.model)
    if hand_abmil:  # gated attention that scores feature 0: 3 tanh(relu(x_0)), the gate fully open
        enc = net.encoder
        with torch.no_grad():
            enc.fc[0].weight.copy_(torch.eye(D)), enc.fc[0].bias.zero_()
            enc.pool.a[0].weight.zero_(), enc.pool.a[0].bias.zero_()
            enc.pool.a[0].weight[0, 0] = 1.0
            enc.pool.b[0].weight.zero_(), enc.pool.b[0].bias.fill_(10.0)
            enc.pool.score.weight.zero_(), enc.pool.score.bias.zero_()
            enc.pool.score.weight[0, 0] = 3.0
    feats = TUMOUR + MICRO
    shared = SharedStats(genomics_features=list(feats), genomics_mean=[4.0] * len(feats),
                         genomics_std=[2.0] * len(feats), survival_bin_edges=[], class_weights={}, km_grid=[],
                         n_sites=1)
    schema = {"encoder": "toy", "encoder_weights": "w0", "feature_dim": cfg.model.feature_dim}
    write_model(path, model_payload(net.state_dict(), cfg, schema, shared.to_json(), 1, None))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A slide (pink tissue on white), its site folder (features, slides.csv, genes) and model files."""
    root = tmp_path_factory.mktemp("heatmap")
    img = np.full((H, W, 3), 245, np.uint8)
    img[64:704, 64:960] = (200, 120, 170)
    slide = root / "S1.tiff"
    write_tiff(slide, img, mpp=0.5, levels=3)
    site = SiteLayout(root / "site")
    site.root.mkdir()
    coords = _coords()
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(coords), D))
    feats[_planted(coords), 0] += 4.0
    attrs = dict(encoder="toy", weights_sha256="w0", feature_dim=D, patch_size=STEP, mpp=0.5, level=0)
    write_features(site.feature_file("S1"), feats, coords, slide_id="S1", **attrs)
    far = coords + np.array([W, 0])  # every patch right of the slide
    write_features(root / "far.h5", feats, far, slide_id="S1", **attrs)
    pd.DataFrame({"slide_id": ["S1", "S2"], "patient_id": ["P000", "P001"]}).to_csv(site.slides, index=False)
    pd.DataFrame({"feature": TUMOUR + MICRO, "subspace": ["tumour"] * len(TUMOUR) + ["micro"] * len(MICRO)}) \
        .to_csv(site.geneset, index=False)
    genomics_frame(["P000", "P001"]).to_csv(site.genomics, index=False)
    return {"root": root, "slide": slide, "site": site.root, "features": site.feature_file("S1"),
            "far": root / "far.h5", "planted": _planted(coords), "coords": coords,
            "abmil": _write_model(root / "abmil.pt", "model.arch=abmil", hand_abmil=True),
            "smm": _write_model(root / "smm.pt", "model.arch=smm"),
            "snn": _write_model(root / "snn.pt", "model.arch=snn"),
            "wide": _write_model(root / "wide.pt", "model.arch=abmil", "model.feature_dim=16")}


def _thumb_size(slide: Path, size: int) -> tuple[int, int]:
    with Slide(slide) as s:
        return s.thumbnail(size).size


def test_abmil_heatmap_finds_the_planted_region(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([str(world["abmil"]), str(world["slide"]), "--features", str(world["features"]), "--out", str(out),
               "--size", "256"])
    assert rc == 0, capsys.readouterr().err
    png = out / "S1_abmil.png"
    assert sorted(p.name for p in out.iterdir()) == ["S1_abmil.png", "S1_attention.csv"]
    img = np.asarray(Image.open(png).convert("RGB")).astype(float)
    assert img.shape[1::-1] == _thumb_size(world["slide"], 256) == (256, 192)
    table = pd.read_csv(out / "S1_attention.csv")
    assert list(table.columns) == ["x", "y", "abmil"]
    assert (table[["x", "y"]].to_numpy() == world["coords"]).all()
    assert table["abmil"].sum() == pytest.approx(1.0, rel=1e-5)
    assert attention_auc(table["abmil"].to_numpy(), world["planted"]) > 0.8
    # jet: the planted region is drawn red, the rest mostly blue-green (thumbnail scale 1/4)
    x0, x1, y0, y1 = (v // 4 for v in PLANTED)
    inside = img[y0:y1, x0:x1]
    outside = np.concatenate([img[16:y0, 16:x0].reshape(-1, 3), img[y1:176, 16:x0].reshape(-1, 3)])
    assert inside[..., 0].mean() - inside[..., 2].mean() > outside[..., 0].mean() - outside[..., 2].mean() + 40


def test_smm_heatmap_writes_one_map_per_subspace(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([str(world["smm"]), str(world["slide"]), "--site", str(world["site"]), "--out", str(out),
               "--size", "512"])
    assert rc == 0, capsys.readouterr().err
    for name in ("tumour", "micro"):
        assert Image.open(out / f"S1_{name}.png").size == _thumb_size(world["slide"], 512) == (512, 384)
    table = pd.read_csv(out / "S1_attention.csv")
    assert list(table.columns) == ["x", "y", "tumour", "micro"]
    for name in ("tumour", "micro"):
        # K x K = 16 sampled keys: cells between the keys' bilinear footprints read no attention
        assert table[name].sum() == pytest.approx(1.0, rel=1e-5) and (table[name] >= 0).all()
        assert (table[name] > 0).sum() >= 16
    assert not np.allclose(table["tumour"], table["micro"])
    assert "written to --out only and never sent anywhere" in _help(capsys)


def _help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("case, args, message", [
    ("missing features", ["abmil", "--features", "{root}/nope.h5"], "{root}/nope.h5: feature file not found"),
    ("other slide", ["abmil", "--features", "{root}/site/features/S1.h5", "--slide-id", "S9"],
     "{root}/site/features/S1.h5: features of slide 'S1', not of 'S9'"),
    ("outside the slide", ["abmil", "--features", "{root}/far.h5"], "{root}/far.h5: patch at level-0 (1024, 0) lies "
                                                                     "outside slide 'S1'"),
    ("feature_dim", ["wide", "--features", "{root}/site/features/S1.h5"],
     "{root}/site/features/S1.h5: features have 8 dimensions, but model file {root}/wide.pt expects "
     "model.feature_dim=16"),
    ("genomics only", ["snn", "--site", "{root}/site"], "{root}/snn.pt: model.arch 'snn' has no attention over patches"),
    ("smm without site", ["smm", "--features", "{root}/site/features/S1.h5"], "give the site folder with --site"),
    ("control, all given", ["smm", "--site", "{root}/site", "--features", "{root}/site/features/S1.h5", "--slide-id",
                          "S1", "--cmap", "viridis"], None),
    ("no features at all", ["abmil"], "give the slide's features with --features FILE or its site folder"),
    ("bad model file", ["slide", "--features", "{root}/site/features/S1.h5"], "{root}/S1.tiff: not a readable model"),
])
def test_bad_input_names_the_file(world, tmp_path, capsys, case, args, message):
    root = str(world["root"])
    model = str(world["slide"]) if args[0] == "slide" else str(world[args[0]])
    argv = [model, str(world["slide"]), "--out", str(tmp_path / "o"), *[a.format(root=root) for a in args[1:]]]
    rc = main(argv)
    if message is None:  # the control: the same call with a listed slide succeeds
        assert rc == 0
        return
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and message.format(root=root) in err, err
    assert not (tmp_path / "o").exists()  # nothing written


def test_slide_missing_from_slides_csv_is_named(world, tmp_path, capsys):
    site = SiteLayout(tmp_path / "site")
    site.root.mkdir()
    for name in ("geneset.csv", "genomics.csv"):
        (site.root / name).write_bytes((world["site"] / name).read_bytes())
    pd.DataFrame({"slide_id": ["S2"], "patient_id": ["P001"]}).to_csv(site.slides, index=False)
    rc = main([str(world["smm"]), str(world["slide"]), "--site", str(site.root), "--features", str(world["features"]),
               "--out", str(tmp_path / "o")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and f"{site.slides}: slide 'S1' is not listed" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused_before_anything_is_read(world, tmp_path, capsys):
    rc = main([str(world["abmil"]), str(world["slide"]), "--features", str(world["features"]), "--device", "cuda:0",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--device: train.device is 'cuda:0' but no CUDA device is available" in err
