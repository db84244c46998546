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
from dataclasses import dataclass
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

__all__ = ["test_slides", "SlideMaps", "AttentionReader", "faithfulness", "main"]

#: the architectures with attention over patches (``smm_model.nn.attention_maps.map_names``)
ATTENTION_ARCHS = ("smm", "abmil", "concat")


def _site_dirs(cohort: Path) -> list[Path]:
    return sorted(p for p in cohort.iterdir() if p.is_dir() and (p / "clinical.csv").is_file())


def test_slides(cohort: Path, split: str = "test") -> list[tuple[Path, str]]:
    """(site folder, slide id) of every ``split`` patient's slides, site by site in file order."""
    out = []
    for site in _site_dirs(cohort):
        layout = SiteLayout(site)
        clinical = pd.read_csv(layout.clinical, dtype={"patient_id": str})
        patients = set(clinical.loc[clinical["split"] == split, "patient_id"])
        slides = pd.read_csv(layout.slides, dtype={"slide_id": str, "patient_id": str})
        out += [(site, s) for s in slides.loc[slides["patient_id"].isin(patients), "slide_id"]]
    return out


@dataclass
class SlideMaps:
    """One slide's attention: map name -> (N,) weights summing to 1, in feature-file row order, with
    the patches' level-0 coords (N, 2) and the patch step."""

    maps: dict[str, np.ndarray]
    coords: np.ndarray
    step: float


class AttentionReader:
    """A run folder's model, ready to give any site slide's attention maps (``names`` is empty for a
    model without attention over patches); SMM's maps get ``combined``, the mean of the two."""

    def __init__(self, run_dir: Path) -> None:
        self.model = load_model_file(run_dir / MODEL_FILE)
        arch = self.model.cfg.model.arch
        self.names: tuple[str, ...] = map_names(arch) if arch in ATTENTION_ARCHS else ()
        self.net = build_model(self.model.cfg.model)
        self.net.load_state_dict(dict(self.model.weights), strict=True)
        self.net.eval()
        self.norm = self.model.shared.patch_norm()

    def read(self, site: Path, slide_id: str) -> SlideMaps:
        feats, coords, attrs = read_features(SiteLayout(site).feature_file(slide_id))
        if self.norm is not None:
            feats = ((feats - self.norm[0]) / self.norm[1]).astype(np.float32)
        step = float(slide_patch_step(coords, attrs))
        bag = SlideBag(feats, np.asarray(coords, dtype=np.int64), step, 0.0)
        with torch.no_grad():
            maps = slide_attention(self.net, bag, slide_genes(site, slide_id, self.model), torch.device("cpu"))
        if len(self.names) > 1:
            maps["combined"] = np.mean([maps[n] for n in self.names], axis=0)
        return SlideMaps(maps, np.asarray(coords, dtype=np.int64), step)


def faithfulness(run_dir: Path, cohort: Path, split: str = "test", truth: Path | None = None) -> dict[str, Any]:
    """Per attention map: the mean ROC AUC of the patch weights against the planted patches over the
    ``split`` patients' slides of every site in ``cohort`` (``{}`` for a model without attention).
    ``truth`` is the folder holding the planted-patch file (default ``cohort``; the IID control's
    re-dealt sites keep the slides, and so the truth, of the cohort they were dealt from)."""
    truth = cohort if truth is None else truth
    reader = AttentionReader(run_dir)
    if not reader.names:
        return {}
    weights: dict[str, list[np.ndarray]] = {}
    planted: list[np.ndarray] = []
    for site, slide_id in test_slides(cohort, split):
        sm = reader.read(site, slide_id)
        truth_coords, _, mask = read_planted(truth, slide_id)
        if not np.array_equal(truth_coords, sm.coords):
            raise ValueError(f"{truth}: planted-patch truth of slide {slide_id!r} lists other coordinates "
                             f"than {SiteLayout(site).feature_file(slide_id)}")
        for n, w in sm.maps.items():
            weights.setdefault(n, []).append(w)
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
