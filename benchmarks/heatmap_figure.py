"""Where a trained model looked, beside where the signal was planted: one row per test slide.

For a run folder of ``synthetic_quality.py`` on a cohort that records its planted patches
(``smm synth --family ...``), each chosen test slide gets a row of panels on its patch grid: the
planted truth (tumour area, microenvironment areas, background; the patches that carry the label
outlined) and the model's per-patch attention maps (SMM: tumour and micro subspaces; ABMIL/Concat:
abmil), each with its attention AUC against the planted patches. The slides are read exactly as
``attention_faithfulness.py`` and ``smm heatmap`` read them. For a gene-conditioned cohort the rows
pair patients whose genomic programme puts the label in the tumour area (z = 0) with patients
whose programme puts it in the microenvironment areas (z = 1).

    python benchmarks/heatmap_figure.py RUN_DIR COHORT_DIR --out benchmarks/results/heatmap_gene_conditioned.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from attention_faithfulness import AttentionReader, test_slides
from client.cohorts.families import MICRO, TUMOUR, read_planted
from client.site.folder import SiteLayout
from smm_model.metrics.faithfulness import attention_auc

#: slides per genomic programme (rows of the figure)
DEFAULT_PER_Z = 2
REGION_COLOURS = {TUMOUR: (0.85, 0.45, 0.55), MICRO: (0.35, 0.55, 0.85)}  # background: light grey


def _grid(coords: np.ndarray, values: np.ndarray, step: float) -> np.ndarray:
    """(N,) values at level-0 patch coords -> (rows, cols) image, NaN where there is no patch."""
    cells = np.rint((coords - coords.min(axis=0)) / step).astype(int)  # (N, 2) as (col, row)
    img = np.full((cells[:, 1].max() + 1, cells[:, 0].max() + 1), np.nan)
    img[cells[:, 1], cells[:, 0]] = values
    return img


def pick_slides(cohort: Path, slides: list[tuple[Path, str]], per_z: int) -> list[tuple[Path, str, str]]:
    """``per_z`` test slides per genomic programme (gene-conditioned), else the first ``2 per_z``;
    each with its row label."""
    truth = pd.read_csv(cohort / "truth.csv", dtype={"patient_id": str})
    z = dict(zip(truth["patient_id"], truth["z"])) if "z" in truth else {}
    by_slide: dict[str, str] = {}  # slide id -> patient id, one read of each site's slides.csv
    for site in sorted({site for site, _ in slides}):
        table = pd.read_csv(SiteLayout(site).slides, dtype={"slide_id": str, "patient_id": str})
        by_slide.update(zip(table["slide_id"], table["patient_id"]))
    if not z:
        return [(site, s, s) for site, s in slides[: 2 * per_z]]
    out = []
    for want in (0, 1):
        chosen = [(site, s) for site, s in slides if int(z[by_slide[s]]) == want
                  and 0 < read_planted(cohort, s)[2].mean() < 1][:per_z]
        out += [(site, s, f"{s} (z = {want}: label in the {'tumour' if want == 0 else 'micro'} area)")
                for site, s in chosen]
    return out


def draw(run_dir: Path, cohort: Path, out: Path, per_z: int = DEFAULT_PER_Z) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pick_slides(cohort, test_slides(cohort), per_z)
    if not rows:
        raise ValueError(f"{cohort}: no test slide with both planted and unplanted patches")
    reader = AttentionReader(run_dir)
    if not reader.names:
        raise ValueError(f"{run_dir}: model.arch {reader.model.cfg.model.arch!r} has no attention over patches")
    names = list(reader.names)
    fig, axes = plt.subplots(len(rows), 1 + len(names), figsize=(3.0 * (1 + len(names)), 3.0 * len(rows)),
                             squeeze=False)
    for r, (site, slide, label) in enumerate(rows):
        sm = reader.read(site, slide)
        coords, region, planted = read_planted(cohort, slide)
        rgb = np.full((len(region), 3), 0.88)
        for name, colour in REGION_COLOURS.items():
            rgb[region == name] = colour
        img = np.stack([_grid(coords, rgb[:, c], sm.step) for c in range(3)], axis=-1)
        img = np.where(np.isnan(img), 1.0, img)
        ax = axes[r, 0]
        ax.imshow(img, interpolation="nearest")
        mask = _grid(coords, planted.astype(float), sm.step)
        ax.contour(np.nan_to_num(mask), levels=[0.5], colors="k", linewidths=1.2)
        ax.set_title("planted: tumour / micro areas,\nlabel-carrying patches outlined", fontsize=8)
        ax.set_ylabel(label, fontsize=7)
        for c, name in enumerate(names, start=1):
            ax = axes[r, c]
            ax.imshow(_grid(coords, sm.maps[name], sm.step), cmap="jet", interpolation="nearest")
            ax.contour(np.nan_to_num(mask), levels=[0.5], colors="w", linewidths=1.0)
            ax.set_title(f"{name} attention (AUC {attention_auc(sm.maps[name], planted):.2f})", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{run_dir.name}: attention on test slides against the planted patches", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished run folder (holds model.pt)")
    ap.add_argument("cohort", type=Path, help="the smm synth --out folder the run trained on")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--per-z", type=int, default=DEFAULT_PER_Z, help="slides per genomic programme")
    args = ap.parse_args(argv)
    print(draw(args.run_dir, args.cohort, args.out, args.per_z))
    return 0


if __name__ == "__main__":
    sys.exit(main())
