"""``smm synth``: a synthetic multi-site glioma cohort with known ground truth, as site folders.

Why: every stage after the site folder (site check, extraction, federated training, evaluation) needs
data whose answer is known, at several sites that differ the way hospitals do, without patient data.
The cohort is written in the same site-folder format as real data (client/site/folder.py), so nothing
downstream knows it is synthetic.

Generative model (all draws seeded; ``cohort.json`` records the parameters):

* **Sites** differ in case mix (class priors drawn from a Dirichlet around the base prior
  ``client.cohorts.synthetic.CLASS_PRIOR``: non-IID), in a per-gene batch effect, in a patch-feature shift
  (features-only mode) and in staining (the H and E optical-density vectors and their strengths are
  perturbed per site, which shifts hue and saturation).
* **Patients** have a latent WHO 2021 class (GBM IDH-wildtype, astrocytoma G4, lower-grade
  astrocytoma, oligodendroglioma), a proliferation state (class-dependent mean) and an immune
  (microenvironment) state. The clinical columns follow from them so that the WHO rule recovers the
  class: GBM -> idh 0, grade 4; astro G4 -> idh 1, codel 0, and CDKN2A/B deleted (histological grade
  3 or 4 by proliferation) or not deleted and grade 4; lower-grade astro -> idh 1, codel 0, cdkn2ab
  0, grade 2/3 by proliferation; oligo -> idh 1, codel 1, grade 2/3 by proliferation.
  Survival is Weibull with a log-hazard from grade, class, proliferation and immune state, censored
  by administrative end of follow-up and loss to follow-up. A few labels are blanked on purpose
  (``missing_*`` rates; at least one per site when the rate is positive) so masking is exercised.
* **Genomics** (``GENE001_rnaseq`` ...): tumour genes = class prototype + proliferation program;
  microenvironment genes = immune program + weak class signal (client.cohorts.synthetic.Prototypes), plus
  noise and the site's batch effect. ``geneset.csv`` assigns them to ``tumour`` / ``micro``.
* **Slides** (default): real tiled pyramidal TIFFs (JPEG tiles, 3 levels, 0.5 um/px at level 0,
  resolution unit cm so OpenSlide reports the mpp) rendered in optical-density space: an irregular
  tissue shape on white glass, a tumour region whose nuclei density, size, shape and darkness encode
  class and proliferation (oligodendroglioma nuclei get clear "fried-egg" halos, GBM gets a
  necrotic core with debris and large pleomorphic nuclei, mitoses follow proliferation), and pink
  stroma whose lymphocyte-like small dark dots (scattered and in clusters) follow the immune state.
  ``features/`` stays empty for ``smm extract DIR/site_k/slides --out DIR/site_k`` to fill.
* **Features only** (``--features-only``): no images; ``features/<slide>.h5`` is written directly
  from the same tissue layout (patches on a grid with step patch_size x level-0 scale over the
  tissue, tumour patches from the class/proliferation prototype, stroma patches from the immune
  prototype, per-patient deviation and per-patch noise). Necrosis is not modelled there.

In the default family, ``additive``, signal is planted in BOTH modalities with independent noise, so
each alone recovers the labels imperfectly and fusion can do better. ``--family`` picks where else it
can sit (client/cohorts/families.py: ``gene-conditioned``, where the genes say which slide area
carries the class, and the controls ``histology-only`` and ``genomics-only``); every family has the
same patients, clinical tables, splits and site effects for a seed, and the non-additive ones need
``--features-only`` (slides are rendered for ``additive`` only; refused with a clear error otherwise).
``--patches-per-slide N`` (features-only) sizes the slides for about N tissue patches each
(slide-size bags; see ``with_patches_per_slide`` for the cost).

Ground truth, outside the site folders so no site sees it: ``DIR/truth.csv`` holds each patient's
latent class and states (and, for the non-additive families, ``family``; for ``gene-conditioned``
also the programme ``z`` and the ``decoy`` class); ``DIR/truth_patches.h5`` (features-only mode) the
region and planted flag of every patch (format: client/cohorts/families.py, ``read_planted``);
``DIR/cohort.json`` the site summaries and the family's model.
Same seed -> byte-identical CSVs, identical feature arrays and identical TIFF pixels; the additive
family is byte-identical to the cohorts written before the families existed.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.cohorts.cohort import (CLASS_NAMES, LABEL_ENCODING, CohortError, class_counts, prepare_out,
                     stratified_pick, who2021, write_csv, write_json, write_site_tables)
from client.site.folder import Manifest, SiteLayout, write_features
from smm_model.contract.atomic import atomic_path
from client.cohorts.families import (BACKGROUND, DEFAULT_FAMILY, FAMILIES, GENE_FAMILIES, MICRO, MICRO_AREAS,
                                     PROGRAMME_P, REGION_FAMILIES, REGION_FRACTION, TRUTH_PATCHES, TUMOUR,
                                     FamilyError, FamilyPrototypes, PlantedWriter, check_family, family_genes,
                                     family_model, planted_mask, planted_writer, region_means)
from client.cohorts.synthetic import CLASS_PRIOR, Prototypes, SynthSpec

__all__ = ["CohortSpec", "Layout", "Stain", "PatientState", "draw_layout", "micro_areas", "render_slide",
           "tissue_patches", "patch_regions", "with_patches_per_slide", "log_hazard", "write_tiff", "write_cohort", "main"]

# --- the generative model's constants (recorded in cohort.json) -----------------------------------
#: Mean proliferation and immune state per class (GBM, astro G4, lower-grade astro, oligo).
PROLIF_MEAN = (0.8, 0.5, -0.4, -0.2)
IMMUNE_MEAN = (0.4, 0.1, -0.1, -0.2)
PROLIF_SD, IMMUNE_SD = 0.8, 1.0
#: P(CDKN2A/B deletion) per class; for astro G4 a deletion is what makes a grade 2/3 histology G4.
CDKN_DELETION_P = (0.55, 0.6, 0.0, 0.03)
#: Weibull survival: log-hazard coefficients, shape, scale (days); censoring window (days).
HAZARD = {"grade4": 1.4, "grade3": 0.6, "oligo": -0.5, "proliferation": 0.3, "immune": 0.35}
WEIBULL_SHAPE, WEIBULL_SCALE_DAYS = 1.3, 3000.0
FOLLOW_UP_DAYS, LOSS_TO_FOLLOW_UP_MEAN_DAYS = (365.0, 3650.0), 6000.0
#: Ruifrok & Johnston optical-density vectors of haematoxylin and eosin.
H_OD = np.array([0.650, 0.704, 0.286])
E_OD = np.array([0.072, 0.990, 0.105])
#: Tumour nuclei per 10^4 px^2 at level 0, mean semi-axis (px), its sd, aspect range; per class.
NUCLEI_DENSITY = (9.0, 8.0, 5.0, 7.0)
NUCLEUS_RADIUS = (8.5, 7.5, 6.5, 6.0)
NUCLEUS_RADIUS_SD = (2.2, 1.5, 0.8, 0.5)
NUCLEUS_ASPECT = ((1.0, 1.8), (1.1, 1.8), (1.3, 2.2), (1.0, 1.15))
LYMPHOCYTE_DENSITY = 2.0  # per 10^4 px^2 of stroma at immune state 0; x exp(0.8 * immune)
#: Mean share of a synthetic slide covered by tissue patches (draw_layout's blob; measured) and the
#: tissue-mask resolution --patches-per-slide uses (cells per patch side).
TISSUE_SHARE = 0.37
MASK_CELLS_PER_PATCH = 8


@dataclass(frozen=True)
class CohortSpec:
    """Everything that defines a synthetic cohort (with ``seed``, it fixes every byte written)."""

    sites: int = 3
    patients_per_site: int = 40
    seed: int = 0
    features_only: bool = False
    slide_size: int = 2048  # level-0 pixels per side
    levels: int = 3
    mpp: float = 0.5  # level 0
    patch_size: int = 224  # features-only grid (at the target mpp, = level 0 here)
    target_mpp: float = 0.5
    jpeg_quality: int = 85
    # Feature-level biology (client.cohorts.synthetic): noise levels set how hard each modality is alone.
    features: SynthSpec = field(default_factory=lambda: SynthSpec(
        feature_dim=64, genes_tumour=20, genes_micro=30, gene_noise=2.5, patch_noise=1.0,
        patient_noise=2.5))  # with these, genes alone and patches alone are ~76 % on diagnosis, both ~87 %
    class_concentration: float = 10.0  # Dirichlet concentration of site priors (lower = more non-IID)
    second_slide_p: float = 0.3
    site_gene_shift: float = 0.4
    site_patch_shift: float = 0.4
    stain_shift: float = 0.08  # sd of the per-site perturbation of the unit OD vectors
    stain_strength_sd: float = 0.12
    missing_grade: float = 0.03
    missing_cdkn2ab: float = 0.02
    missing_survival: float = 0.01
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, val, test
    family: str = DEFAULT_FAMILY  # where the signal sits (client/cohorts/families.py)
    patches_per_slide: int | None = None  # set through with_patches_per_slide (features-only)
    layout_scale: int = 4  # level-0 px per tissue-mask cell (slides are rendered at this mask grid)

    def validate(self) -> None:
        if self.sites < 1 or self.patients_per_site < 2:
            raise CohortError("need --sites >= 1 and --patients-per-site >= 2")
        if self.slide_size < 512 or self.slide_size % 64:
            raise CohortError(f"--slide-size {self.slide_size}: must be a multiple of 64, at least 512")
        if not 1 <= self.levels <= 6 or self.slide_size % (2 ** (self.levels - 1)):
            raise CohortError(f"levels {self.levels} do not divide slide size {self.slide_size}")
        if self.patch_size < 16 or self.patch_size * self.target_mpp / self.mpp > self.slide_size:
            raise CohortError(f"--patch-size {self.patch_size} does not fit a {self.slide_size} px slide")
        if self.features.feature_dim < 1:
            raise CohortError("--feature-dim must be positive")
        if abs(sum(self.split) - 1.0) > 1e-9:
            raise CohortError(f"split fractions {self.split} must sum to 1")
        try:
            check_family(self.family)
        except FamilyError as e:
            raise CohortError(str(e)) from None
        if self.family != DEFAULT_FAMILY and not self.features_only:
            raise CohortError(f"--family {self.family} needs --features-only (slides are rendered for the "
                              f"{DEFAULT_FAMILY} family only)")
        if self.patches_per_slide is not None and not self.features_only:
            raise CohortError("--patches-per-slide needs --features-only (slide-size TIFFs would be gigapixel)")
        if not 1 <= self.layout_scale <= self.patch_step or (not self.features_only and self.layout_scale != 4):
            raise CohortError(f"layout_scale {self.layout_scale}: must be 1..{self.patch_step} px (the patch "
                              "step), and 4 when slides are rendered")

    @property
    def patch_step(self) -> int:
        """Level-0 px between neighbouring patches of the features-only grid."""
        return int(round(self.patch_size * self.target_mpp / self.mpp))


def with_patches_per_slide(spec: CohortSpec, n: int) -> CohortSpec:
    """``spec`` with a slide geometry that gives about ``n`` tissue patches per slide (features-only).

    The slide side follows from the mean tissue share of a synth.draw_layout section
    (``TISSUE_SHARE``); the tissue mask is coarsened to ``MASK_CELLS_PER_PATCH`` cells per patch side,
    so the cost per slide grows with ``n``, not with the slide's pixel area. Measured: 3 sites x 20
    patients (79 slides) at 2,000 patches per slide: 165,000 patches in 14 s wall (6 s CPU, one
    thread, a shared 2-core machine), 150 MB peak memory, 47 MB on disk.
    """
    if n < 1:
        raise CohortError(f"--patches-per-slide {n}: must be positive")
    step = spec.patch_step
    side = step * math.sqrt(n / TISSUE_SHARE)
    size = max(512, int(math.ceil(side / 64.0)) * 64)
    return replace(spec, patches_per_slide=n, slide_size=size,
                   layout_scale=max(4, step // MASK_CELLS_PER_PATCH))


@dataclass(frozen=True)
class Stain:
    """A site's (or slide's) staining: unit OD vectors, strengths and the glass background."""

    h: np.ndarray
    e: np.ndarray
    h_strength: float = 1.0
    e_strength: float = 1.0
    background_od: float = 0.03

    @classmethod
    def draw(cls, rng: np.random.Generator, shift: float, strength_sd: float) -> "Stain":
        return cls(h=_unit(H_OD / np.linalg.norm(H_OD) + rng.normal(0, shift, 3)),
                   e=_unit(E_OD / np.linalg.norm(E_OD) + rng.normal(0, shift, 3)),
                   h_strength=float(np.clip(1 + rng.normal(0, strength_sd), 0.7, 1.3)),
                   e_strength=float(np.clip(1 + rng.normal(0, strength_sd), 0.7, 1.3)),
                   background_od=float(rng.uniform(0.02, 0.05)))

    def jitter(self, rng: np.random.Generator, sd: float = 0.01) -> "Stain":
        """A slide's own small deviation from its site's stain."""
        return replace(self, h=_unit(self.h + rng.normal(0, sd, 3)), e=_unit(self.e + rng.normal(0, sd, 3)))

    def summary(self) -> dict[str, Any]:
        return {"h_od": np.round(self.h, 4).tolist(), "e_od": np.round(self.e, 4).tolist(),
                "h_strength": round(self.h_strength, 4), "e_strength": round(self.e_strength, 4),
                "background_od": round(self.background_od, 4)}


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.abs(v)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class PatientState:
    """The latent states that drive a patient's slides."""

    diagnosis: int  # index into CLASS_NAMES
    proliferation: float
    immune: float


@dataclass(frozen=True)
class Layout:
    """Where tissue, tumour and necrosis are, on a mask grid ``scale`` times coarser than level 0."""

    size: int  # level-0 side in px
    scale: int
    tissue: np.ndarray  # (m, m) bool
    tumour: np.ndarray  # (m, m) bool, within tissue
    necrosis: np.ndarray  # (m, m) bool, within tumour


# --- geometry -------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, m: int, cells: int) -> np.ndarray:
    """Unit-variance smooth random field (m, m) from a cells x cells lattice (bilinear, separable)."""
    coarse = rng.normal(0, 1, (cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, m, dtype=np.float32)
    i0 = np.minimum(t.astype(int), cells - 1)
    w = (t - i0)[:, None]
    # Separable bilinear interpolation by gathers (no BLAS: its threads oversubscribe small cores).
    rows = coarse[i0] * (1 - w) + coarse[i0 + 1] * w  # (m, cells + 1)
    field_ = rows[:, i0] * (1 - w.T) + rows[:, i0 + 1] * w.T
    return (field_ - field_.mean()) / (field_.std() + 1e-9)


def draw_layout(rng: np.random.Generator, size: int, tumour_fraction: float,
                necrosis_fraction: float = 0.0, scale: int = 4) -> Layout:
    """An irregular tissue section with a contiguous tumour region (and optionally a necrotic core).

    Tissue: a blob whose radius varies with angle (low harmonics) and a smooth noise field, with a
    few small holes. Tumour: the ``tumour_fraction`` of tissue closest to a random tissue point
    (noisy distance). Necrosis: the innermost ``necrosis_fraction`` of the tumour.
    """
    m = size // scale
    ax = (np.arange(m, dtype=np.float32) + 0.5) / m
    cx, cy = 0.5 + rng.normal(0, 0.03, 2)
    dx, dy = (ax - np.float32(cx))[None, :], (ax - np.float32(cy))[:, None]
    theta, dist = np.arctan2(dy, dx), np.sqrt(dx * dx + dy * dy)
    radius = np.sqrt(rng.uniform(0.32, 0.44) / np.pi)
    # Radius as a function of angle (low harmonics), through a lookup table over 1024 angles.
    angles = np.linspace(-np.pi, np.pi, 1025)
    r_of = radius * (1 + sum(rng.uniform(0, 0.08) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
                             for k in range(2, 6)))
    r_px = r_of.astype(np.float32)[np.rint((theta + np.pi) * (1024 / (2 * np.pi))).astype(np.int32)]
    tissue = dist / r_px + 0.12 * _smooth_noise(rng, m, 6) < 1
    tissue &= _smooth_noise(rng, m, 24) < 2.3  # small holes (tears, vessels, fat)
    tissue[:2], tissue[-2:], tissue[:, :2], tissue[:, -2:] = False, False, False, False
    ys, xs = np.nonzero(tissue)
    if len(ys) == 0:  # cannot happen with the ranges above; keep the function total anyway
        tissue[m // 4: 3 * m // 4, m // 4: 3 * m // 4] = True
        ys, xs = np.nonzero(tissue)
    k = rng.integers(len(ys))
    ty, tx = (ax - np.float32((ys[k] + 0.5) / m))[:, None], (ax - np.float32((xs[k] + 0.5) / m))[None, :]
    d_t = np.sqrt(ty * ty + tx * tx) + 0.05 * _smooth_noise(rng, m, 8)
    inside = d_t[tissue]
    tumour = tissue & (d_t <= np.quantile(inside, float(np.clip(tumour_fraction, 0.05, 0.95))))
    necrosis = np.zeros_like(tumour)
    if necrosis_fraction > 0:
        necrosis = tumour & (d_t <= np.quantile(inside, tumour_fraction * necrosis_fraction))
    return Layout(size=size, scale=scale, tissue=tissue, tumour=tumour, necrosis=necrosis)


def _patch_grid(layout: Layout, step: int, masks: tuple[np.ndarray, ...],
                min_tissue: float = 0.5) -> tuple[np.ndarray, list[np.ndarray]]:
    """The grid patches (side ``step``) that are mostly tissue, and each mask's share of their tissue.

    Returns ``(coords (N, 2) int64 level-0 (x, y) top-left corners, [share (N,) per mask])``.
    """
    if step < layout.scale:
        raise ValueError(f"patch step {step} px is finer than the layout grid ({layout.scale} px)")
    n = layout.size // step
    edges = np.minimum((np.arange(n + 1) * step) // layout.scale, layout.tissue.shape[0])

    def box_sums(mask: np.ndarray) -> np.ndarray:  # (rows, cols) mask cells per grid patch
        m = mask[: edges[-1], : edges[-1]].astype(np.int32)
        return np.add.reduceat(np.add.reduceat(m, edges[:-1], axis=0), edges[:-1], axis=1)

    area = np.outer(np.diff(edges), np.diff(edges)).astype(float)
    tissue_f = box_sums(layout.tissue) / area
    keep = tissue_f >= min_tissue
    if not keep.any():  # a tiny slide: keep the most tissue-covered patch rather than none
        keep = tissue_f == tissue_f.max()
    rows, cols = np.nonzero(keep)
    coords = np.stack([cols * step, rows * step], axis=1).astype(np.int64)
    shares = [(box_sums(m) / area)[rows, cols] / np.maximum(tissue_f[rows, cols], 1e-9) for m in masks]
    return coords, shares


def tissue_patches(layout: Layout, step: int, min_tissue: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 (x, y) top-left corners of the grid patches (side ``step``) that are mostly tissue.

    Returns ``(coords (N, 2) int64, tumour_fraction (N,))``; mirrors what a tissue-masked patch grid
    over the rendered slide would keep.
    """
    coords, (frac,) = _patch_grid(layout, step, (layout.tumour & ~layout.necrosis,), min_tissue)
    return coords, frac


def micro_areas(rng: np.random.Generator, layout: Layout, areas: int, cells: int) -> np.ndarray:
    """(m, m) bool: ``areas`` clustered microenvironment areas in the tissue outside the tumour.

    Each area grows from a random non-tumour tissue cell by (noisy) distance; together they cover
    about ``cells`` mask cells (all the free tissue if it has fewer).
    """
    free = layout.tissue & ~layout.tumour
    ys, xs = np.nonzero(free)
    if len(ys) == 0:
        return free
    m = free.shape[0]
    ax = (np.arange(m, dtype=np.float32) + 0.5) / m
    dist = np.full((m, m), np.inf, dtype=np.float32)
    for k in rng.choice(len(ys), size=min(areas, len(ys)), replace=False):
        dy, dx = (ax - np.float32(ax[ys[k]]))[:, None], (ax - np.float32(ax[xs[k]]))[None, :]
        np.minimum(dist, np.sqrt(dy * dy + dx * dx), out=dist)
    dist += 0.02 * _smooth_noise(rng, m, 8)
    share = min(1.0, cells / len(ys))
    return free & (dist <= np.quantile(dist[free], share))


def patch_regions(layout: Layout, micro: np.ndarray, step: int, min_tissue: float = 0.5
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Tissue grid patches and the region each mostly lies in.

    Returns ``(coords (N, 2) int64, region (N,) uint8)``, region = TUMOUR / MICRO / BACKGROUND
    (client.cohorts.families) by the largest share of the patch's tissue.
    """
    tumour = layout.tumour & ~layout.necrosis
    coords, (t, mi) = _patch_grid(layout, step, (tumour, micro & ~tumour), min_tissue)
    shares = np.empty((len(coords), 3))  # (N, 3): columns indexed by region code
    shares[:, TUMOUR], shares[:, MICRO], shares[:, BACKGROUND] = t, mi, 1.0 - t - mi
    return coords, np.argmax(shares, axis=1).astype(np.uint8)


# --- rendering ------------------------------------------------------------------------------------

def _ellipses(size: int, cx: np.ndarray, cy: np.ndarray, a: np.ndarray, b: np.ndarray,
              angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat level-0 pixel indices covered by each ellipse, and the ellipse index of each pixel.

    Vectorised over ellipses: one (n, k, k) window per ellipse, no per-pixel Python loop.
    """
    if len(cx) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    r = int(np.ceil(max(a.max(), b.max())))
    off = np.arange(-r, r + 1, dtype=np.int64)
    ix, iy = np.rint(cx).astype(np.int64), np.rint(cy).astype(np.int64)
    px = ix[:, None, None] + off[None, None, :]
    py = iy[:, None, None] + off[None, :, None]
    dx = (px - cx[:, None, None]).astype(np.float32)
    dy = (py - cy[:, None, None]).astype(np.float32)
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (dx * c + dy * s) / a[:, None, None]
    v = (dy * c - dx * s) / b[:, None, None]
    inside = (u * u + v * v <= 1) & (px >= 0) & (px < size) & (py >= 0) & (py < size)
    owner = np.broadcast_to(np.arange(len(cx))[:, None, None], inside.shape)[inside]
    return (py * size + px)[inside], owner


def _points_in(rng: np.random.Generator, mask: np.ndarray, scale: int, per_1e4_px: float,
               clusters: int = 0, cluster_sd: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Poisson points (level-0 x, y) at ``per_1e4_px`` per 10^4 px^2 of ``mask``.

    With ``clusters`` > 0, the same expected number is spread around that many cluster centres
    instead (lymphoid aggregates); points falling off the mask are dropped.
    """
    size = mask.shape[0] * scale
    area = float(mask.sum()) * scale * scale
    if area == 0:
        return np.zeros(0), np.zeros(0)
    if clusters > 0:
        n = rng.poisson(max(per_1e4_px, 0.0) * area / 1e4)
        ys, xs = np.nonzero(mask)
        k = rng.integers(len(ys), size=clusters)
        which = rng.integers(clusters, size=n)
        x = (xs[k][which] + 0.5) * scale + rng.normal(0, cluster_sd, n)
        y = (ys[k][which] + 0.5) * scale + rng.normal(0, cluster_sd, n)
    else:  # uniform candidates over the whole slide, kept where the mask is: a Poisson process
        total = int(rng.poisson(max(per_1e4_px, 0.0) * size * size / 1e4))
        x, y = rng.uniform(0, size, total), rng.uniform(0, size, total)
    ok = (x >= 0) & (x < size) & (y >= 0) & (y < size)
    x, y = x[ok], y[ok]
    keep = mask[(y // scale).astype(int), (x // scale).astype(int)]
    return x[keep], y[keep]


def render_slide(rng: np.random.Generator, layout: Layout, state: PatientState, stain: Stain) -> np.ndarray:
    """Level-0 RGB image (size, size, 3) uint8 of one H&E-like section.

    Works in optical density: haematoxylin (H) and eosin (E) concentration fields are painted, then
    RGB = 255 * exp(-(H * h_vec * h_strength + E * e_vec * e_strength + background)).
    """
    S, sc, y = layout.size, layout.scale, state.diagnosis
    up = lambda m: np.repeat(np.repeat(m, sc, axis=0), sc, axis=1)  # noqa: E731
    tissue, tumour, necrosis = up(layout.tissue), up(layout.tumour), up(layout.necrosis)
    viable = tumour & ~necrosis
    stroma_mask = layout.tissue & ~layout.tumour

    # Background textures: wavy fibres in stroma, fibrillary neuropil in tumour.
    t = np.arange(S, dtype=np.float32)
    phase_y = 6.0 * np.cumsum(rng.normal(0, 0.05, S)).astype(np.float32)
    phase_x = 6.0 * np.cumsum(rng.normal(0, 0.05, S)).astype(np.float32)
    lam = rng.uniform(10, 18)
    fib = np.sin(2 * np.pi / lam * t[None, :] + phase_y[:, None]) * 0.5 + \
        np.sin(2 * np.pi / (lam * 1.7) * t[:, None] + phase_x[None, :]) * 0.5
    # Pixel grain: a random 256 px noise tile repeated (a full-size normal draw costs ~4x more).
    tile = rng.standard_normal((256, 256), dtype=np.float32)
    grain = np.tile(tile, (-(-S // 256), -(-S // 256)))[:S, :S]
    E = np.where(tissue, np.float32(0.30) + 0.07 * fib + 0.03 * grain, 0).astype(np.float32)
    H = np.where(tissue, np.float32(0.04) + 0.01 * grain, 0).astype(np.float32)
    E[viable] = 0.20 + 0.03 * fib[viable]
    H[viable] = 0.10 + 0.03 * grain[viable]
    E[necrosis] = 0.38 + 0.04 * grain[necrosis]
    H[necrosis] = 0.07
    Hf, Ef = H.reshape(-1), E.reshape(-1)

    def paint(x: np.ndarray, yv: np.ndarray, a: np.ndarray, b: np.ndarray, h_val: np.ndarray,
              e_val: float, texture: float = 0.12) -> None:
        idx, owner = _ellipses(S, x, yv, a, b, rng.uniform(0, np.pi, len(x)))
        Hf[idx] = h_val[owner] * (1 + texture * rng.standard_normal(len(idx), dtype=np.float32))
        Ef[idx] = e_val

    p, im = state.proliferation, state.immune
    # Tumour nuclei: density, size, shape and darkness encode class and proliferation.
    x, yv = _points_in(rng, layout.tumour & ~layout.necrosis, sc, NUCLEI_DENSITY[y] * math.exp(0.3 * p))
    n = len(x)
    a = np.clip(rng.normal(NUCLEUS_RADIUS[y] * (1 + 0.06 * p), NUCLEUS_RADIUS_SD[y], n), 3.5, 13)
    b = a / rng.uniform(*NUCLEUS_ASPECT[y], n)
    if y == 3:  # oligodendroglioma: clear perinuclear halo ("fried egg")
        idx, _ = _ellipses(S, x, yv, a * 1.9, a * 1.9, np.zeros(n))
        Hf[idx], Ef[idx] = 0.02, 0.04
    paint(x, yv, a, b, np.clip(rng.normal(0.85 + 0.12 * p, 0.1, n), 0.5, 1.5), 0.06)
    # Mitoses: very dark, irregular, rate ~ exp(proliferation).
    area = float((layout.tumour & ~layout.necrosis).sum()) * sc * sc
    k = rng.poisson(area / 1e5 * 0.6 * math.exp(p))
    if k:
        ys_, xs_ = np.nonzero(layout.tumour & ~layout.necrosis)
        pick = rng.integers(len(ys_), size=k)
        mx, my = (xs_[pick] + rng.random(k)) * sc, (ys_[pick] + rng.random(k)) * sc
        ma = rng.uniform(4, 6, k)
        paint(mx, my, ma, ma / 1.8, np.full(k, 1.8), 0.05, texture=0.25)
    # Necrotic debris (karyorrhexis).
    if layout.necrosis.any():
        x, yv = _points_in(rng, layout.necrosis, sc, 6.0)
        r = rng.uniform(1.5, 2.8, len(x))
        paint(x, yv, r, r, np.full(len(x), 1.3), 0.2, texture=0.3)
    # Stromal fibroblasts: sparse, elongated.
    x, yv = _points_in(rng, stroma_mask, sc, 1.5)
    a = rng.uniform(6, 9, len(x))
    paint(x, yv, a, a / rng.uniform(2.5, 4, len(x)), np.full(len(x), 0.9), 0.1)
    # Lymphocytes: small, round, very dark; density follows the immune state, half in aggregates.
    dens = LYMPHOCYTE_DENSITY * math.exp(0.8 * im)
    for mask, d in ((stroma_mask, dens), (layout.tumour & ~layout.necrosis, 0.35 * dens)):
        if not mask.any():
            continue
        x1, y1 = _points_in(rng, mask, sc, d / 2)
        x2, y2 = _points_in(rng, mask, sc, d / 2, clusters=max(1, int(round(3 + 2 * im))), cluster_sd=60)
        x, yv = np.concatenate([x1, x2]), np.concatenate([y1, y2])
        r = rng.normal(4.3, 0.4, len(x))
        paint(x, yv, r, r * rng.uniform(0.85, 1.0, len(x)), np.clip(rng.normal(1.8, 0.12, len(x)), 1.4, 2.2),
              0.05, texture=0.08)

    rgb = np.empty((S, S, 3), dtype=np.uint8)
    od = np.empty((S, S), dtype=np.float32)
    for c in range(3):  # per channel: ~4x faster than broadcasting a trailing axis of 3
        np.multiply(H, np.float32(stain.h[c] * stain.h_strength), out=od)
        od += E * np.float32(stain.e[c] * stain.e_strength)
        od += np.float32(stain.background_od)
        np.maximum(od, 0, out=od)
        np.exp(-od, out=od)
        od *= np.float32(255.0)
        od += np.float32(0.5)
        rgb[..., c] = np.minimum(od, 255.0)
    return rgb


def write_tiff(path: Path, img: np.ndarray, mpp: float, levels: int, quality: int = 85, tile: int = 256) -> None:
    """Tiled pyramidal TIFF that OpenSlide opens as generic-tiff, with mpp (environment.md section 2).

    One top-level IFD per level (OpenSlide ignores SubIFDs), JPEG tiles, resolution in pixels per cm
    with ResolutionUnit CENTIMETER (a bare resolution would be read as inches and give a wrong mpp).
    Written to a temporary file and renamed.
    """
    import tifffile

    res = 1e4 / mpp
    kw = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": quality},
              resolutionunit="CENTIMETER", metadata=None)
    with atomic_path(path, suffix=".tiff") as tmp:
        with tifffile.TiffWriter(tmp) as tw:
            level = img
            for i in range(levels):
                if i:  # 2x2 box filter via strided adds (much faster than a reshaped sum)
                    acc = level[0::2, 0::2].astype(np.uint16)
                    acc += level[1::2, 0::2]
                    acc += level[0::2, 1::2]
                    acc += level[1::2, 1::2]
                    level = ((acc + 2) >> 2).astype(np.uint8)
                tw.write(level, subfiletype=1 if i else 0, resolution=(res / 2 ** i, res / 2 ** i), **kw)


# --- the cohort -----------------------------------------------------------------------------------

def log_hazard(grade: np.ndarray, diagnosis: np.ndarray, proliferation: np.ndarray, immune: np.ndarray
               ) -> np.ndarray:
    """Each patient's true Weibull log-hazard (``HAZARD``): WHO grade (2-4), diagnosis index (3 =
    oligodendroglioma), proliferation and immune state, as truth.csv records them. The generator's
    one formula, so a benchmark can score the true risk (the C-index no model can beat)."""
    return (HAZARD["grade4"] * (grade == 4) + HAZARD["grade3"] * (grade == 3) + HAZARD["oligo"] * (diagnosis == 3)
            + HAZARD["proliferation"] * proliferation + HAZARD["immune"] * immune)


def _rng(spec: CohortSpec, *key: int) -> np.random.Generator:
    """Independent stream per purpose/site/patient/slide: output does not depend on work order."""
    return np.random.default_rng([spec.seed, *key])


def _tumour_fraction(state: PatientState) -> float:
    return float(np.clip(0.35 + 0.08 * state.proliferation + (0.05 if state.diagnosis <= 1 else 0), 0.15, 0.65))


def _slide_layout(spec: CohortSpec, rng: np.random.Generator, state: PatientState) -> Layout:
    necrosis = 0.25 if (state.diagnosis == 0 and rng.random() < 0.7) else 0.0
    return draw_layout(rng, spec.slide_size, _tumour_fraction(state), necrosis, scale=spec.layout_scale)


def _region_layout(spec: CohortSpec, rng: np.random.Generator) -> tuple[Layout, np.ndarray]:
    """A region-family slide: tissue with a tumour area of class-free size and micro areas as large.

    No necrosis (its presence would tell GBM apart whatever the areas carry).
    """
    tumour_share = float(rng.uniform(*REGION_FRACTION))
    layout = draw_layout(rng, spec.slide_size, tumour_share, 0.0, scale=spec.layout_scale)
    return layout, micro_areas(rng, layout, MICRO_AREAS, int(layout.tumour.sum()))


def _render_task(task: tuple) -> tuple[str, float]:
    """Worker: lay out, render and write one slide (top-level so a process pool can run it)."""
    spec, key, state, stain, path, slide_id = task
    t0 = time.perf_counter()
    rng = _rng(spec, 3, *key)
    layout = _slide_layout(spec, rng, state)
    img = render_slide(rng, layout, state, stain.jitter(rng))
    write_tiff(Path(path), img, spec.mpp, spec.levels, spec.jpeg_quality)
    return slide_id, time.perf_counter() - t0


def _site_tables(spec: CohortSpec, k: int, proto: Prototypes, fproto: FamilyPrototypes) -> dict[str, Any]:
    """Draw one site's patients: clinical/genomics/slides tables, latent truth, site parameters."""
    fs = spec.features
    site_rng = _rng(spec, 1, k)
    prior = site_rng.dirichlet(spec.class_concentration * CLASS_PRIOR)
    gene_shift = site_rng.normal(0, spec.site_gene_shift, fs.genes_tumour + fs.genes_micro)
    patch_shift = site_rng.normal(0, spec.site_patch_shift, fs.feature_dim)
    stain = Stain.draw(site_rng, spec.stain_shift, spec.stain_strength_sd)

    rng = _rng(spec, 2, k)
    n = spec.patients_per_site
    y = rng.choice(4, size=n, p=prior)
    prolif = rng.normal(np.take(PROLIF_MEAN, y), PROLIF_SD)
    immune = rng.normal(np.take(IMMUNE_MEAN, y), IMMUNE_SD)
    idh = (y != 0).astype(int)
    codel = (y == 3).astype(int)
    cdkn = (rng.random(n) < np.take(CDKN_DELETION_P, y)).astype(int)
    hist_high = prolif + rng.normal(0, 0.5, n) > 0.5  # astro G4 with deletion: histology 3 or 4
    low_g3 = prolif + 0.3 * immune + rng.normal(0, 0.3, n) > -0.1
    grade = np.select([y == 0, (y == 1) & (cdkn == 1), y == 1], [4, np.where(hist_high, 4, 3), 4],
                      np.where(low_g3, 3, 2))
    lp = log_hazard(grade, y, prolif, immune)
    t_event = WEIBULL_SCALE_DAYS * (rng.exponential(1.0, n) * np.exp(-lp)) ** (1 / WEIBULL_SHAPE)
    t_censor = np.minimum(rng.uniform(*FOLLOW_UP_DAYS, n), rng.exponential(LOSS_TO_FOLLOW_UP_MEAN_DAYS, n))
    days = np.maximum(np.round(np.minimum(t_event, t_censor), 1), 1.0)  # no zero-day follow-up
    event = (t_event <= t_censor).astype(int)

    name = f"site_{k}"
    pids = [f"SYN{k}-{i + 1:04d}" for i in range(n)]
    clinical = pd.DataFrame({"patient_id": pids, "idh": idh, "codel_1p19q": codel, "cdkn2ab": cdkn,
                             "grade": grade, "survival_days": days, "event": event})
    clinical = clinical.astype({"idh": "Int64", "codel_1p19q": "Int64", "cdkn2ab": "Int64",
                                "grade": "Int64", "event": "Int64", "survival_days": "Float64"})
    for col, rate in (("grade", spec.missing_grade), ("cdkn2ab", spec.missing_cdkn2ab),
                      ("survival", spec.missing_survival)):
        if rate > 0:
            rows = rng.choice(n, size=max(1, math.ceil(rate * n)), replace=False)
            cols = ["survival_days", "event"] if col == "survival" else [col]
            clinical.loc[rows, cols] = pd.NA
    # Splits: test, then validation from the rest, each stratified by class; drawn from their own
    # stream so that other split fractions leave every other draw (genes, slides) as it is.
    split_rng = _rng(spec, 3, k)
    test = stratified_pick(y, spec.split[2], split_rng)
    val = np.zeros(n, dtype=bool)
    val[~test] = stratified_pick(y[~test], spec.split[1] / max(1e-9, 1 - spec.split[2]), split_rng)
    clinical["split"] = np.where(test, "test", np.where(val, "val", "train"))

    # Genomics: planted programs + noise + the site's batch effect.
    gt, ge = fs.genes_tumour, fs.genes_micro
    genes = np.empty((n, gt + ge))
    for i in range(n):
        mu_t, mu_e = proto.gene_means(int(y[i]), float(prolif[i]), float(immune[i]), fs.signal)
        genes[i] = np.concatenate([mu_t, mu_e]) + gene_shift + rng.normal(0, fs.gene_noise, gt + ge)
    # Families with their own genes draw them from their own stream (the additive draws above stay as
    # they are, so every family shares the patients, tables and slides of a seed; genomics-only keeps
    # these very genes).
    fam_rng = _rng(spec, 5, k)
    z = (fam_rng.random(n) < PROGRAMME_P).astype(int)
    decoy = (y + fam_rng.integers(1, 4, n)) % 4  # another class, uniform over the three others
    # The decoy's own proliferation, as for a patient of the decoy class, from a stream of its own (the
    # other families' draws stay as they were).
    decoy_prolif = _rng(spec, 6, k).normal(np.take(PROLIF_MEAN, decoy), PROLIF_SD)
    if spec.family in GENE_FAMILIES:
        for i in range(n):
            mu = family_genes(spec.family, proto, fproto, int(y[i]), float(immune[i]), int(z[i]), fs.signal)
            genes[i] = mu + gene_shift + fam_rng.normal(0, fs.gene_noise, gt + ge)
    names = [f"GENE{j + 1:03d}_rnaseq" for j in range(gt + ge)]
    genomics = pd.DataFrame(np.round(genes, 4), columns=names)
    genomics.insert(0, "patient_id", pids)
    geneset = pd.DataFrame({"feature": names, "subspace": ["tumour"] * gt + ["micro"] * ge})

    # Per-patient deviation of patch means (features-only), drawn for every patient either way so
    # that both modes share every other draw.
    dev = rng.normal(0, fs.patient_noise, (n, 2, fs.feature_dim)) if fs.patient_noise > 0 else \
        np.zeros((n, 2, fs.feature_dim))
    n_slides = 1 + (rng.random(n) < spec.second_slide_p)
    slides = pd.DataFrame([(f"{pids[i]}-S{j + 1}", pids[i]) for i in range(n) for j in range(n_slides[i])],
                          columns=["slide_id", "patient_id"])
    truth = pd.DataFrame({"patient_id": pids, "site": name, "diagnosis": y,
                          "diagnosis_name": np.take(CLASS_NAMES, y), "proliferation": np.round(prolif, 4),
                          "immune": np.round(immune, 4), "grade_true": grade, "cdkn2ab_true": cdkn,
                          "survival_days_true": days, "event_true": event})
    if spec.family != DEFAULT_FAMILY:
        truth["family"] = spec.family
        if spec.family == "gene-conditioned":
            truth["z"], truth["decoy"] = z, decoy
            truth["decoy_proliferation"] = np.round(decoy_prolif, 4)
    # The region layouts' background stroma has its own per-patient deviation (additive's two are
    # for tumour and stroma), so no area shares another's.
    bg_dev = fam_rng.normal(0, fs.patient_noise, (n, fs.feature_dim)) if fs.patient_noise > 0 else \
        np.zeros((n, fs.feature_dim))
    return {"name": name, "prior": prior, "gene_shift": gene_shift, "patch_shift": patch_shift,
            "stain": stain, "clinical": clinical, "genomics": genomics, "geneset": geneset,
            "slides": slides, "truth": truth, "patch_dev": dev, "n_slides": n_slides, "z": z, "decoy": decoy,
            "decoy_prolif": decoy_prolif,
            "background_dev": bg_dev,
            "states": [PatientState(int(y[i]), float(prolif[i]), float(immune[i])) for i in range(n)]}


def _write_features(spec: CohortSpec, k: int, site: dict[str, Any], proto: Prototypes, fproto: FamilyPrototypes,
                    layout_: SiteLayout, manifest: Manifest, planted: PlantedWriter) -> int:
    """Features-only mode: one h5 per slide from the latent states; returns the number of patches.

    Also records each slide's per-patch ground truth (region, planted) in ``planted``.
    """
    fs = spec.features
    step = spec.patch_step
    attrs = dict(encoder="synthetic", weights_sha256="synthetic", feature_dim=fs.feature_dim,
                 patch_size=spec.patch_size, mpp=spec.target_mpp, level=0)
    manifest.schema.update(encoder="synthetic", weights_sha256="synthetic", feature_dim=fs.feature_dim)
    total = 0
    for i, state in enumerate(site["states"]):
        z, decoy = int(site["z"][i]), int(site["decoy"][i])
        if spec.family in REGION_FAMILIES:
            # (3, D): tumour area, micro areas, background; each with its own patient deviation.
            dev = np.stack([site["patch_dev"][i, 0], site["patch_dev"][i, 1], site["background_dev"][i]])
            means = region_means(spec.family, proto, fproto, state.diagnosis, state.proliferation, state.immune,
                                 z, decoy, fs.signal, float(site["decoy_prolif"][i])) + dev + site["patch_shift"]
        else:
            t_mu, s_mu = proto.patch_means(state.diagnosis, state.proliferation, state.immune, fs.signal)
            t_mu = t_mu + site["patch_dev"][i, 0] + site["patch_shift"]
            s_mu = s_mu + site["patch_dev"][i, 1] + site["patch_shift"]
        for j in range(int(site["n_slides"][i])):
            slide_id = f"{site['clinical']['patient_id'].iloc[i]}-S{j + 1}"
            frng = _rng(spec, 4, k, i, j)
            if spec.family in REGION_FAMILIES:
                coords, region = patch_regions(*_region_layout(spec, _rng(spec, 3, k, i, j)), step)
                is_planted = planted_mask(spec.family, region, z)
                feats = means[region]  # (N, D)
            else:
                coords, tum_frac = tissue_patches(_slide_layout(spec, _rng(spec, 3, k, i, j), state), step)
                is_tumour = frng.random(len(coords)) < tum_frac  # mixed patches: tumour with that chance
                feats = np.where(is_tumour[:, None], t_mu, s_mu)  # (N, D)
                region = np.where(is_tumour, TUMOUR, BACKGROUND).astype(np.uint8)
                is_planted = is_tumour
            feats = feats + frng.normal(0, fs.patch_noise, (len(coords), fs.feature_dim))
            sha = write_features(layout_.feature_file(slide_id), feats, coords, **attrs)
            manifest.record(slide_id, "done", checksum=sha, n_patches=int(len(coords)))
            planted.add(slide_id, coords, region, is_planted)
            total += len(coords)
    manifest.save()
    return total


def write_cohort(out: Path, spec: CohortSpec, force: bool = False, workers: int = 1,
                 log: Any = print) -> dict[str, Any]:
    """Write ``spec.sites`` site folders, ``truth.csv`` and ``cohort.json`` under ``out``.

    Returns the cohort summary (what cohort.json holds). ``workers`` > 1 renders slides in that many
    processes; the output is the same either way (every slide has its own seeded stream).
    """
    spec.validate()
    out = Path(out)
    names = [f"site_{k}" for k in range(1, spec.sites + 1)]
    prepare_out(out, force, owned=[*names, "cohort.json", "truth.csv", TRUTH_PATCHES])
    proto = Prototypes.draw(spec.features, int(np.random.SeedSequence([spec.seed, 0]).generate_state(1)[0]))
    fproto = FamilyPrototypes.draw(spec.features, np.random.SeedSequence([spec.seed, 5]))
    summaries, truths = [], []
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and not spec.features_only else None
    with ExitStack() as stack:
        if pool:
            stack.callback(pool.shutdown)
        planted = stack.enter_context(planted_writer(out, spec.family)) if spec.features_only else None
        for k, name in enumerate(names, start=1):
            t0 = time.perf_counter()
            site = _site_tables(spec, k, proto, fproto)
            layout = SiteLayout(out / name)
            slides = site["slides"]
            if not spec.features_only:
                slides = slides.assign(path=[f"slides/{s}.tiff" for s in slides["slide_id"]])
            manifest = write_site_tables(layout, site["clinical"], slides, site["genomics"], site["geneset"],
                                         source={"generator": "smm synth", "synthetic": True, "seed": spec.seed})
            n_patches = None
            if spec.features_only:
                n_patches = _write_features(spec, k, site, proto, fproto, layout, manifest, planted)
            else:
                tasks = []
                for i, state in enumerate(site["states"]):
                    for j in range(int(site["n_slides"][i])):
                        sid = f"{site['clinical']['patient_id'].iloc[i]}-S{j + 1}"
                        path = layout.root / "slides" / f"{sid}.tiff"
                        tasks.append((spec, (k, i, j), state, site["stain"], str(path), sid))
                (layout.root / "slides").mkdir(parents=True, exist_ok=True)
                for _ in (pool.map(_render_task, tasks) if pool else map(_render_task, tasks)):
                    pass
            truths.append(site["truth"])
            summaries.append(_site_summary(site, n_patches))
            what = f"{len(slides)} feature files, {n_patches} patches" if spec.features_only else \
                f"{len(slides)} slides"
            log(f"{name}: {spec.patients_per_site} patients, {what} in {time.perf_counter() - t0:.1f} s")
    write_csv(out / "truth.csv", pd.concat(truths, ignore_index=True))
    summary = _cohort_summary(spec, summaries)
    write_json(out / "cohort.json", summary)
    return summary


def drop_modality(site_dir: Path, modality: str) -> None:
    """Take one modality away from a written site, leaving its patients, labels and splits as they
    were, and declare what is left in its manifest (``client.site.folder``).

    ``histology`` (a genomics-only hospital): slides.csv, every feature file and slide image, and the
    manifest's slide records and feature schema are removed. ``genomics`` (a hospital with slides
    only): the genomic table is removed; the federation's gene set file stays.
    """
    layout = SiteLayout(Path(site_dir))
    if not layout.clinical.is_file():
        raise CohortError(f"{layout.root}: not a site folder ({layout.clinical.name} missing)")
    manifest = Manifest.load(layout.manifest)
    keep = [m for m in manifest.modalities if m != modality]
    if modality == "histology":
        layout.slides.unlink(missing_ok=True)
        for folder in (layout.features_dir, layout.root / "slides"):
            if folder.is_dir():
                shutil.rmtree(folder)
        manifest.slides.clear()
        for key in ("encoder", "weights_sha256", "feature_dim"):
            manifest.schema.pop(key, None)
    elif modality == "genomics":
        layout.genomics.unlink(missing_ok=True)
    else:
        raise CohortError(f"modality {modality!r}: expected 'histology' or 'genomics'")
    manifest.declare_modalities(keep)
    manifest.save()


def drop_slides(site_dir: Path) -> None:
    """``drop_modality(site_dir, "histology")``: a genomics-only site."""
    drop_modality(site_dir, "histology")


def _site_summary(site: dict[str, Any], n_patches: int | None) -> dict[str, Any]:
    clin, truth = site["clinical"], site["truth"]
    latent = pd.Series(truth["diagnosis"].to_numpy(), dtype="Int64")
    s = {"name": site["name"], "n_patients": len(clin), "n_slides": len(site["slides"]),
         "class_prior": np.round(site["prior"], 4).tolist(),
         "latent_class_counts": class_counts(latent),
         "who2021_counts": class_counts(who2021(clin)),
         "grade_counts": {str(g): int((clin["grade"] == g).sum()) for g in (2, 3, 4)},
         "events": int(clin["event"].sum()),
         "missing": {c: int(clin[c].isna().sum()) for c in ("idh", "codel_1p19q", "cdkn2ab", "grade",
                                                              "survival_days", "event")},
         "split_counts": {s_: int((clin["split"] == s_).sum()) for s_ in ("train", "val", "test")},
         "gene_batch_sd": round(float(np.std(site["gene_shift"])), 4),
         "stain": site["stain"].summary()}
    if n_patches is not None:
        s["n_patches"] = n_patches
    return s


def _cohort_summary(spec: CohortSpec, sites: list[dict[str, Any]]) -> dict[str, Any]:
    spec_d = asdict(spec)
    return {
        "kind": "synthetic", "generator": "smm synth", "seed": spec.seed,
        "mode": "features" if spec.features_only else "slides",
        "classes": list(CLASS_NAMES), "encoding": LABEL_ENCODING,
        "truth_file": "truth.csv (per patient: latent class, proliferation, immune; not part of any site)",
        "next_step": None if spec.features_only else
        "for each site: smm extract DIR/site_k/slides --out DIR/site_k  (fills features/ and manifest.json)",
        "model": {
            "class_prior_base": CLASS_PRIOR.tolist(), "site_prior": f"Dirichlet({spec.class_concentration} x base)",
            "proliferation_mean": PROLIF_MEAN, "proliferation_sd": PROLIF_SD,
            "immune_mean": IMMUNE_MEAN, "immune_sd": IMMUNE_SD, "cdkn2ab_deletion_p": CDKN_DELETION_P,
            "grade": "GBM 4; astro G4: 4, or 3/4 by proliferation if CDKN2A/B deleted; others 2/3 by "
                     "proliferation (+0.3 immune)",
            "survival": {"weibull_shape": WEIBULL_SHAPE, "weibull_scale_days": WEIBULL_SCALE_DAYS,
                         "log_hazard": HAZARD, "follow_up_days": FOLLOW_UP_DAYS,
                         "loss_to_follow_up_mean_days": LOSS_TO_FOLLOW_UP_MEAN_DAYS},
            "genomics": "tumour genes: class prototype + 0.8 x proliferation program; micro genes: immune "
                        "program x immune + weak class prototype; + N(0, gene_noise) + site batch shift",
            "slides": {"nuclei_density_per_1e4_px": NUCLEI_DENSITY, "nucleus_radius_px": NUCLEUS_RADIUS,
                       "nucleus_radius_sd_px": NUCLEUS_RADIUS_SD, "nucleus_aspect": NUCLEUS_ASPECT,
                       "lymphocyte_density_per_1e4_px": f"{LYMPHOCYTE_DENSITY} x exp(0.8 immune)",
                       "stain": "H/E optical-density vectors perturbed per site (hue/saturation shift)"},
        },
        "spec": spec_d, "sites": sites,
        # Added with the cohort families (after everything the additive cohort always had):
        "family": spec.family, "family_model": family_model(spec.family),
        "truth_patches_file": TRUTH_PATCHES if spec.features_only else None,
    }


def _split_arg(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6 or parts[0] <= 0:
        raise argparse.ArgumentTypeError(f"--split {text!r}: expected three fractions TRAIN,VAL,TEST summing to 1, "
                                         "e.g. 0.6,0.15,0.25")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """``smm synth``: write a synthetic multi-site cohort with known ground truth."""
    ap = argparse.ArgumentParser(prog="smm synth", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Slide mode leaves features/ empty: run, for each site, "
                                        "`smm extract DIR/site_k/slides --out DIR/site_k`.")
    d = CohortSpec()
    ap.add_argument("--out", type=Path, required=True,
                    help="output folder (gets site_1..site_K, cohort.json, truth.csv)")
    ap.add_argument("--sites", type=int, default=d.sites, help=f"number of sites (default {d.sites})")
    ap.add_argument("--patients-per-site", type=int, default=d.patients_per_site,
                    help=f"patients per site (default {d.patients_per_site})")
    ap.add_argument("--features-only", action="store_true",
                    help="write features/<slide>.h5 directly instead of TIFF slides")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    ap.add_argument("--feature-dim", type=int, default=d.features.feature_dim,
                    help=f"patch feature width in --features-only mode (default {d.features.feature_dim})")
    ap.add_argument("--slide-size", type=int, default=d.slide_size,
                    help=f"level-0 slide side in px, multiple of 64 (default {d.slide_size})")
    ap.add_argument("--patch-size", type=int, default=d.patch_size,
                    help=f"patch side at {d.target_mpp} um/px for the --features-only grid (default {d.patch_size})")
    ap.add_argument("--split", type=_split_arg, default=d.split, metavar="TRAIN,VAL,TEST",
                    help="patient fractions of the split column, stratified by class (default "
                         f"{','.join(map(str, d.split))})")
    ap.add_argument("--family", default=d.family, metavar="NAME",
                    help=f"where the label signal sits: {', '.join(FAMILIES)} (default {d.family}; the others "
                         "need --features-only; see client/cohorts/families.py)")
    ap.add_argument("--patches-per-slide", type=int, default=None, metavar="N",
                    help="about N tissue patches per slide (slide-size bags, e.g. 2000; --features-only): sets "
                         "the slide side, overriding --slide-size (3 sites x 20 patients at 2000: ~15 s, 150 MB)")
    ap.add_argument("--workers", type=int, default=1, help="processes rendering slides (default 1)")
    ap.add_argument("--force", action="store_true", help="overwrite a cohort in a non-empty --out")
    ap.add_argument("--without-slides", type=int, nargs="+", default=[], metavar="K",
                    help="site numbers (1-based) written without slides: genomics-only sites (drop_slides)")
    args = ap.parse_args(argv)
    bad = [k for k in args.without_slides if not 1 <= k <= args.sites]
    if bad:
        print(f"smm synth: --without-slides {bad}: site numbers run from 1 to --sites {args.sites}", file=sys.stderr)
        return 2
    spec = replace(d, sites=args.sites, patients_per_site=args.patients_per_site, seed=args.seed,
                   features_only=args.features_only, slide_size=args.slide_size, patch_size=args.patch_size,
                   split=args.split, family=args.family,
                   features=replace(d.features, feature_dim=args.feature_dim))
    t0 = time.perf_counter()
    try:
        if args.patches_per_slide is not None:
            spec = with_patches_per_slide(spec, args.patches_per_slide)
        summary = write_cohort(args.out, spec, force=args.force, workers=max(1, args.workers))
    except CohortError as e:
        print(f"smm synth: {e}", file=sys.stderr)
        return 2
    for k in args.without_slides:
        drop_slides(args.out / f"site_{k}")
        print(f"site_{k}: slides removed, declared genomics-only")
    n_sl = sum(s["n_slides"] for s in summary["sites"])
    print(f"wrote {len(summary['sites'])} sites, {spec.sites * spec.patients_per_site} patients, {n_sl} "
          f"{'feature files' if spec.features_only else 'slides'} to {args.out} in {time.perf_counter() - t0:.1f} s")
    if not spec.features_only:
        print(f"next: for k in 1..{spec.sites}: smm extract {args.out}/site_k/slides --out {args.out}/site_k")
    return 0
