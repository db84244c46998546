"""The attention-faithfulness benchmark step (benchmarks/attention_faithfulness.py) on a real run
folder: a tiny gene-conditioned cohort, one centralized round, every test slide scored."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from attention_faithfulness import faithfulness  # noqa: E402
from attention_faithfulness import test_slides as split_slides  # noqa: E402  (not a test: pytest collects test_*)

from client.cohorts.families import TRUTH_PATCHES, read_planted  # noqa: E402
from client.cohorts.synth import CohortSpec, write_cohort  # noqa: E402
from smm_model.metrics.faithfulness import attention_auc  # noqa: E402
from sim_cohort import train_bench_run  # noqa: E402

SPEC = replace(CohortSpec(), sites=2, patients_per_site=12, seed=5, features_only=True, layout_scale=28,
               family="gene-conditioned", split=(0.5, 0.2, 0.3))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faith") / "sites"
    write_cohort(out, SPEC, log=lambda *_: None)
    return out


def test_every_test_slide_is_scored_per_map_and_matches_a_direct_computation(cohort: Path, tmp_path: Path) -> None:
    run = train_bench_run(cohort, tmp_path / "smm", "smm")
    res = faithfulness(run, cohort)
    slides = split_slides(cohort)
    mixed = sum(0 < read_planted(cohort, s)[2].mean() < 1 for _, s in slides)
    assert set(res) == {"tumour", "micro", "combined"}
    for rep in res.values():
        assert rep["n_scored"] == mixed > 0 and rep["n_scored"] + rep["skipped"] == len(slides)
        assert 0.0 <= rep["mean"] <= 1.0
    # Against a direct computation, slide by slide, with the heatmap command's own functions.
    from client.baselines.evaluate import load_model_file
    from client.site.dataset import slide_patch_step
    from client.site.folder import read_features
    from client.wsi.heatmap import SlideBag, slide_attention, slide_genes
    from smm_model.nn.model import build_model
    import torch
    model = load_model_file(run / "model.pt")
    net = build_model(model.cfg.model)
    net.load_state_dict(dict(model.weights))
    mean, std = model.shared.patch_norm()
    aucs: dict[str, list[float]] = {"tumour": [], "micro": [], "combined": []}
    for site, slide in slides:
        feats, coords, attrs = read_features(site / "features" / f"{slide}.h5")
        bag = SlideBag(((feats - mean) / std).astype(np.float32), coords, slide_patch_step(coords, attrs), 0.0)
        with torch.no_grad():
            maps = slide_attention(net.eval(), bag, slide_genes(site, slide, model), torch.device("cpu"))
        maps["combined"] = (maps["tumour"] + maps["micro"]) / 2
        planted = read_planted(cohort, slide)[2]
        for name in aucs:
            aucs[name].append(attention_auc(maps[name], planted))
    for name, values in aucs.items():
        assert res[name]["mean"] == pytest.approx(np.nanmean(values), abs=1e-12)


def test_a_model_without_attention_has_no_maps_and_a_truth_file_of_other_patches_is_refused(
        cohort: Path, tmp_path: Path) -> None:
    run = train_bench_run(cohort, tmp_path / "snn", "snn")
    assert faithfulness(run, cohort) == {}
    abmil = train_bench_run(cohort, tmp_path / "abmil", "abmil")
    assert set(faithfulness(abmil, cohort)) == {"abmil"}
    bad = tmp_path / "truth"
    bad.mkdir()
    (bad / TRUTH_PATCHES).write_bytes((cohort / TRUTH_PATCHES).read_bytes())
    _, slide = split_slides(cohort)[0]
    with h5py.File(bad / TRUTH_PATCHES, "a") as f:
        c = f[slide]["coords"][...]
        c[0] += 1
        f[slide]["coords"][...] = c
    with pytest.raises(ValueError, match=slide):
        faithfulness(abmil, cohort, truth=bad)
