"""Cohort families of ``smm synth``: where the label signal sits, and its ground truth per patch.

Why: in the ``additive`` cohort (client/cohorts/synth.py) both modalities carry the class with
independent noise, so pooling each modality and concatenating is already the right model. The
other families are built so that a benchmark can show when a gene-conditioned look at the slide pays
and when it does not. Every family shares the patients, clinical tables, splits and site effects of
``additive`` for a seed (the WHO 2021 rule, grade and survival come from the same latent class,
proliferation and immune state); only where the signal is planted differs:

* ``additive`` (default, unchanged): genes = class + proliferation programmes (tumour subspace) and
  immune programme + weak class (microenvironment); tumour patches = class prototype +
  proliferation, stroma patches = stroma + immune programme.
* ``gene-conditioned``: every patient has a binary genomic programme z (P = ``PROGRAMME_P``),
  written strongly into both gene subspaces (``+/- PROGRAMME_GENE_AMPLITUDE`` x a programme vector);
  the genes carry only a weak class signal (``WEAK_GENE_CLASS`` x the class prototype, and the
  immune programme, whose mean differs a little by class). The slide has a contiguous tumour area
  and ``MICRO_AREAS`` clustered microenvironment areas of the same total size (real level-0
  coordinates, on the tissue layout of synth.draw_layout), the rest is background stroma. Each
  area type has its own marker appearance, so the two are distinguishable, plus a class pattern:
  z = 0: the tumour area carries the patient's class prototype + proliferation programme and the
  micro areas a DECOY (the prototype of another class, uniform over the three others, drawn per
  patient, with a proliferation of its own drawn as for a patient of that class, so that the two
  areas carry the same kinds of pattern and only the genes tell which is true); z = 1: the roles
  swap. Background carries stroma + immune programme and no class.
  Pooling all patches sees {true, decoy} symmetrically (the two areas are about equally large), and
  a late-fusion linear head cannot form the z x area interaction; an attention over the patches
  conditioned on the genes can (it reads z and looks at the right area).
  The area sizes do not depend on the class (tumour share of the tissue uniform in
  ``REGION_FRACTION``), so the number of patches of each kind leaks no label.
* ``histology-only`` (control): patches as in ``additive``; genes are noise + the site's batch
  effect only (no class, proliferation or immune information).
* ``genomics-only`` (control): additive's genes, draw for draw; patches on the ``gene-conditioned``
  layout with the area markers and plain stroma only (no class, proliferation or immune pattern).

Every patch gets the patient's per-area deviation (``SynthSpec.patient_noise``, one draw per area
type and patient), the site's patch shift and per-patch noise, as in ``additive``.

Ground truth per patch, outside the site folders: ``DIR/truth_patches.h5`` (features-only mode),
one group per slide id with

* ``coords`` (N, 2) int64: level-0 (x, y), the same rows in the same order as features/<slide>.h5;
* ``region`` (N,) uint8: 0 tumour area, 1 microenvironment area, 2 background (``REGIONS``);
  ``additive`` / ``histology-only`` have no separate micro areas: their stroma is background;
* ``planted`` (N,) bool: the patches that carry the label signal (the label-carrying area for
  ``gene-conditioned``, the tumour patches with the class prototype for ``additive`` /
  ``histology-only``, none for ``genomics-only``).

``read_planted(cohort_dir, slide_id)`` reads one slide back.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from client.cohorts.synthetic import Prototypes, SynthSpec
from smm_model.contract.atomic import atomic_path

__all__ = ["FAMILIES", "DEFAULT_FAMILY", "REGION_FAMILIES", "GENE_FAMILIES", "REGIONS", "TUMOUR", "MICRO",
           "BACKGROUND", "TRUTH_PATCHES", "FamilyError", "FamilyPrototypes", "check_family", "family_genes",
           "region_means", "planted_mask", "PlantedWriter", "planted_writer", "read_planted", "family_model"]

FAMILIES = ("additive", "gene-conditioned", "histology-only", "genomics-only")
DEFAULT_FAMILY = "additive"
#: Families whose slides use the tumour / micro-area / background layout (the others: additive's).
REGION_FAMILIES = ("gene-conditioned", "genomics-only")
#: Families whose genes differ from additive's (the others keep additive's genes, noise and all).
GENE_FAMILIES = ("gene-conditioned", "histology-only")
REGIONS = ("tumour", "micro", "background")
TUMOUR, MICRO, BACKGROUND = 0, 1, 2
TRUTH_PATCHES = "truth_patches.h5"

# --- the gene-conditioned model's constants (recorded in cohort.json) -------------------------------
PROGRAMME_P = 0.5  # P(z = 1)
PROGRAMME_GENE_AMPLITUDE = 1.0  # genes get +/- this x the programme vector (N(0, 1) per gene)
WEAK_GENE_CLASS = 0.25  # weight of the class prototype in the genes
REGION_FRACTION = (0.2, 0.3)  # tumour-area share of the tissue; the micro areas match its size
MICRO_AREAS = 3  # clustered microenvironment areas per slide
MARKER_SCALE = 1.0  # sd per feature of the two area markers


class FamilyError(ValueError):
    """An unknown family, or a family asked for what it cannot do."""


def check_family(name: str) -> str:
    if name not in FAMILIES:
        raise FamilyError(f"--family {name!r}: unknown cohort family; expected one of {', '.join(FAMILIES)}")
    return name


@dataclass(frozen=True)
class FamilyPrototypes:
    """What the non-additive families add to ``Prototypes``: a gene programme and two area markers.

    Drawn from their own seed, so ``Prototypes`` (and with it the additive cohort) stays as it was.
    """

    gene_programme: np.ndarray  # (genes_tumour + genes_micro,): z's programme vector
    marker_tumour: np.ndarray  # (feature_dim,): tumour-area appearance
    marker_micro: np.ndarray  # (feature_dim,): microenvironment-area appearance

    @classmethod
    def draw(cls, spec: SynthSpec, seed: Any) -> "FamilyPrototypes":
        rng = np.random.default_rng(seed)
        return cls(gene_programme=rng.normal(0, 1, spec.genes_tumour + spec.genes_micro),
                   marker_tumour=rng.normal(0, MARKER_SCALE, spec.feature_dim),
                   marker_micro=rng.normal(0, MARKER_SCALE, spec.feature_dim))


def family_genes(family: str, proto: Prototypes, fp: FamilyPrototypes, y: int, immune: float, z: int,
                 signal: float = 1.0) -> np.ndarray:
    """Noise-free gene vector (genes_tumour + genes_micro,) of one patient, for ``GENE_FAMILIES``.

    ``histology-only``: zeros (the caller adds the site's batch effect and noise);
    ``gene-conditioned``: programme (sign from z), weak class, immune programme. The other families
    keep additive's genes (``Prototypes.gene_means``).
    """
    if family not in GENE_FAMILIES:
        raise FamilyError(f"family_genes: family {family!r} keeps the additive genes")
    if family == "histology-only":
        return np.zeros(len(fp.gene_programme))
    sign = 1.0 if z else -1.0
    g_t = WEAK_GENE_CLASS * proto.gene_class[y]  # (genes_tumour,)
    g_e = immune * proto.gene_immune  # (genes_micro,)
    return signal * (sign * PROGRAMME_GENE_AMPLITUDE * fp.gene_programme + np.concatenate([g_t, g_e]))


def region_means(family: str, proto: Prototypes, fp: FamilyPrototypes, y: int, prolif: float,
                 immune: float, z: int, decoy: int, signal: float = 1.0, decoy_prolif: float = 0.0) -> np.ndarray:
    """Noise-free patch means (3, feature_dim) of one patient's tumour area, micro areas and background.

    For the region-layout families only (``REGION_FAMILIES``); the caller adds the per-area patient
    deviation, the site shift and per-patch noise. ``decoy_prolif`` is the decoy pattern's own
    proliferation (without it the true area alone would carry the proliferation programme and the
    histology alone would tell the areas apart).
    """
    if family not in REGION_FAMILIES:
        raise FamilyError(f"region_means: family {family!r} has no region layout")
    if family == "genomics-only":
        return np.stack([fp.marker_tumour, fp.marker_micro, signal * proto.patch_stroma])
    true_mu, stroma_mu = proto.patch_means(y, prolif, immune, signal)  # class + proliferation; stroma
    decoy_mu, _ = proto.patch_means(decoy, decoy_prolif, immune, signal)  # another class, its own proliferation
    tumour_mu, micro_mu = (true_mu, decoy_mu) if z == 0 else (decoy_mu, true_mu)
    return np.stack([fp.marker_tumour + tumour_mu, fp.marker_micro + micro_mu, stroma_mu])


def planted_mask(family: str, region: np.ndarray, z: int) -> np.ndarray:
    """(N,) bool: the patches of a region-layout slide that carry the label signal."""
    if family == "gene-conditioned":
        return region == (MICRO if z else TUMOUR)
    return np.zeros(len(region), dtype=bool)


class PlantedWriter:
    """Adds slides to an open ``truth_patches.h5`` (made by ``planted_writer``)."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def add(self, slide_id: str, coords: np.ndarray, region: np.ndarray, planted: np.ndarray) -> None:
        n = len(coords)
        if np.shape(coords) != (n, 2) or np.shape(region) != (n,) or np.shape(planted) != (n,):
            raise ValueError(f"{slide_id}: coords (N, 2), region (N,), planted (N,) expected; got "
                             f"{np.shape(coords)}, {np.shape(region)}, {np.shape(planted)}")
        g = self._file.create_group(slide_id)
        g.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        g.create_dataset("region", data=np.asarray(region, dtype=np.uint8))
        g.create_dataset("planted", data=np.asarray(planted, dtype=bool))


@contextmanager
def planted_writer(out: Path, family: str) -> Iterator[PlantedWriter]:
    """``DIR/truth_patches.h5``, written slide by slide; it appears (atomically) only if the block succeeds."""
    import h5py

    with atomic_path(Path(out) / TRUTH_PATCHES, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["family"] = family
        f.attrs["regions"] = ",".join(REGIONS)
        yield PlantedWriter(f)


def read_planted(cohort_dir: Path | str, slide_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(coords (N, 2) int64, region (N,) uint8, planted (N,) bool)`` of one slide of a cohort.

    Rows are in the order of ``site_k/features/<slide_id>.h5``; ``region`` indexes ``REGIONS``.
    """
    import h5py

    path = Path(cohort_dir) / TRUTH_PATCHES
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-patch ground truth (smm synth writes it in --features-only "
                                "mode only)")
    with h5py.File(path, "r") as f:
        if slide_id not in f:
            raise KeyError(f"{path}: no slide {slide_id!r}")
        g = f[slide_id]
        return g["coords"][()], g["region"][()], g["planted"][()]


def family_model(family: str) -> dict[str, Any]:
    """The family's generative model in words and numbers, for cohort.json."""
    common = {"name": family, "note": "cohort.json's 'model' is the clinical and label model every family shares; "
              "its 'genomics' and 'slides' entries describe the additive family's signal", "truth_patches_file": (
        f"{TRUTH_PATCHES} (features-only mode): one group per slide id with coords (N, 2) int64 level-0 "
        "(x, y) in the row order of features/<slide>.h5, region (N,) uint8 indexing "
        f"{list(REGIONS)}, planted (N,) bool = the patches carrying the label signal; read with "
        "client.cohorts.families.read_planted")}
    if family == "additive":
        return {**common, "signal": "both modalities (class, proliferation, immune), independent noise",
                "planted": "tumour patches (class prototype + proliferation); stroma is region background"}
    if family == "histology-only":
        return {**common, "signal": "patches only, as in additive; genes = N(0, gene_noise) + site batch shift",
                "planted": "tumour patches (class prototype + proliferation); stroma is region background"}
    layout = {"tumour_area_fraction_of_tissue": REGION_FRACTION, "micro_areas": MICRO_AREAS,
              "micro_area_total": "the tumour area's size", "marker_sd": MARKER_SCALE}
    if family == "genomics-only":
        return {**common, "signal": "genes only, as in additive; patches = area markers / plain stroma",
                "layout": layout, "planted": "none"}
    return {**common, "layout": layout, "programme_p": PROGRAMME_P,
            "genes": f"+/-{PROGRAMME_GENE_AMPLITUDE} x programme vector (z = 1: +) in both subspaces; tumour "
                     f"genes + {WEAK_GENE_CLASS} x class prototype; micro genes + immune programme x immune; "
                     "+ N(0, gene_noise) + site batch shift",
            "patches": "tumour area: tumour marker + (z = 0: class prototype + 0.8 x proliferation programme; "
                       "z = 1: decoy class prototype + 0.8 x the decoy's own proliferation); micro areas: micro marker + "
                       "the other one; background: stroma + immune programme x immune; decoy uniform over the 3 "
                       "other classes, its proliferation drawn as for a patient of the decoy class",
            "planted": "the label-carrying area (tumour if z = 0, micro if z = 1)",
            "truth_csv_columns": {"family": "this family", "z": "genomic programme (0/1)",
                                  "decoy": "the decoy class index",
                                  "decoy_proliferation": "the decoy pattern's proliferation"}}
