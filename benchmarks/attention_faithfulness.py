"""How well a trained model's patch attention finds the patches that carry the signal.

A synthetic cohort (``smm synth``) records, outside the site folders, which patches of each slide
carry the planted label signal (``client.cohorts.families.read_planted``). For a finished run folder,
every test patient's slides are read as a site would read them (features standardised with the
model's shared statistics, the patient's genes for SMM, all of a slide's patches:
``client.wsi.heatmap``, the code ``smm heatmap`` draws with), the model's per-patch attention is
computed (``smm_model.nn.attention_maps``) and scored against the planted mask
(``smm_model.metrics.faithfulness``: ROC AUC per slide, mean over slides; a slide whose patches are
all planted or none is skipped and counted).

Maps: SMM gives one per subspace (``tumour``, ``micro``) and ``combined`` (their mean: where the
model as a whole read from); ABMIL and Concat give ``abmil``. SNN has no attention (no maps).

    python benchmarks/attention_faithfulness.py RUN_DIR COHORT_DIR [--split test]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from client.baselines.evaluate import load_model_file
from client.cohorts.families import read_planted
from client.site.dataset import slide_patch_step
from client.site.folder import SiteLayout, read_features
from client.wsi.heatmap import SlideBag, slide_attention, slide_genes
from smm_model.contract.runfolder import MODEL_FILE
from smm_model.metrics.faithfulness import mean_attention_auc
from smm_model.nn.attention_maps import map_names
from smm_model.nn.model import build_model

__all__ = ["faithfulness", "main"]

#: the architectures with attention over patches (``smm_model.nn.attention_maps.map_names``)
ATTENTION_ARCHS = ("smm", "abmil", "concat")


def _site_dirs(cohort: Path) -> list[Path]:
    return sorted(p for p in cohort.iterdir() if p.is_dir() and (p / "clinical.csv").is_file())


def faithfulness(run_dir: Path, cohort: Path, split: str = "test", truth: Path | None = None) -> dict[str, Any]:
    """Per attention map: the mean ROC AUC of the patch weights against the planted patches over the
    ``split`` patients' slides of every site in ``cohort`` (``{}`` for a model without attention).
    ``truth`` is the folder holding the planted-patch file (default ``cohort``; the IID control's
    re-dealt sites keep the slides, and so the truth, of the cohort they were dealt from)."""
    truth = cohort if truth is None else truth
    model = load_model_file(run_dir / MODEL_FILE)
    if model.cfg.model.arch not in ATTENTION_ARCHS:
        return {}
    names = map_names(model.cfg.model.arch)
    net = build_model(model.cfg.model)
    net.load_state_dict(dict(model.weights), strict=True)
    net.eval()
    norm = model.shared.patch_norm()
    scored = (*names, "combined") if len(names) > 1 else names
    weights: dict[str, list[np.ndarray]] = {n: [] for n in scored}
    planted: list[np.ndarray] = []
    for site in _site_dirs(cohort):
        layout = SiteLayout(site)
        clinical = pd.read_csv(layout.clinical, dtype={"patient_id": str})
        patients = set(clinical.loc[clinical["split"] == split, "patient_id"])
        slides = pd.read_csv(layout.slides, dtype={"slide_id": str, "patient_id": str})
        for slide_id in slides.loc[slides["patient_id"].isin(patients), "slide_id"]:
            feats, coords, attrs = read_features(layout.feature_file(slide_id))
            if norm is not None:
                feats = ((feats - norm[0]) / norm[1]).astype(np.float32)
            truth_coords, _, mask = read_planted(truth, slide_id)
            if not np.array_equal(truth_coords, coords):
                raise ValueError(f"{truth}: planted-patch truth of slide {slide_id!r} lists other coordinates "
                                 f"than {layout.feature_file(slide_id)}")
            bag = SlideBag(feats, np.asarray(coords, dtype=np.int64), float(slide_patch_step(coords, attrs)), 0.0)
            with torch.no_grad():
                maps = slide_attention(net, bag, slide_genes(site, slide_id, model), torch.device("cpu"))
            if len(names) > 1:
                maps["combined"] = np.mean([maps[n] for n in names], axis=0)
            for n in weights:
                weights[n].append(maps[n])
            planted.append(mask)
    out = {}
    for n, w in weights.items():
        rep = mean_attention_auc(w, planted)
        out[n] = {"mean": rep.mean, "n_scored": rep.n_scored, "skipped": rep.skipped, "reason": rep.reason}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished run folder (holds model.pt)")
    ap.add_argument("cohort", type=Path, help="the smm synth --out folder the run trained on")
    ap.add_argument("--split", default="test", help="whose slides are scored (default test)")
    ap.add_argument("--truth", type=Path, default=None,
                    help="folder with the planted-patch file when COHORT is a re-dealt copy (default COHORT)")
    args = ap.parse_args(argv)
    print(json.dumps(faithfulness(args.run_dir, args.cohort, args.split, args.truth), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
