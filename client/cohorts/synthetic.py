"""Synthetic patients with known ground truth, at the feature level.

Used by tests, the quick benchmarks and the cohort writer ``smm synth`` (client/cohorts/synth.py), which
reuses ``Prototypes`` so that its slide-free ``--features-only`` cohorts plant the same biology.
Each patient has a latent tumour state (WHO 2021 class, proliferation) and an immune
(microenvironment) state; both are planted, with independent noise, in BOTH modalities, so a
single modality recovers the labels imperfectly and fusion can do better:

* genes, tumour subspace: class prototype + proliferation program + noise
* genes, microenvironment subspace: immune program x immune state + weak class prototype + noise
* patches: a contiguous tumour region (class prototype + proliferation) surrounded by stroma whose
  immune infiltration follows the immune state, each patch with noise
* grade from class and proliferation; survival from grade, class and immune state
  (exponential hazard, uniform censoring).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from client.site.labels import assign_bins, survival_bin_edges

__all__ = ["SynthSpec", "Prototypes", "CLASS_PRIOR", "synthetic_patients", "survival_bin_edges",
           "assign_bins"]  # the survival bins are the labels module's, re-exported for the cohort writer

# Class priors: GBM, astrocytoma G4, lower-grade astrocytoma, oligodendroglioma.
CLASS_PRIOR = np.array([0.4, 0.12, 0.28, 0.2])


@dataclass(frozen=True)
class SynthSpec:
    feature_dim: int = 64
    genes_tumour: int = 20
    genes_micro: int = 30
    min_patches: int = 40
    max_patches: int = 160
    patch_step: int = 256  # level-0 pixels between neighbouring patches
    gene_noise: float = 1.0
    patch_noise: float = 1.0
    signal: float = 1.0  # scales every planted effect
    survival_bins: int = 4
    # Per-patient deviation of the tumour and stroma patch means, shared by all of that patient's
    # patches (inter-patient heterogeneity): unlike ``patch_noise`` it does not average away over
    # a bag, so it sets how well the slide modality alone can do. 0 = none (and no random draw).
    patient_noise: float = 0.0


@dataclass(frozen=True)
class Prototypes:
    """The shared biology: class prototypes and programs that every site and patient draws from.

    Fixed by one seed (``draw``), so different sites (and the features-only cohort writer) plant
    the same biology while drawing different patients. Means are scaled by ``SynthSpec.signal``.
    """

    gene_class: np.ndarray  # (4, genes_tumour): tumour-gene class prototypes
    gene_prolif: np.ndarray  # (genes_tumour,): proliferation program
    gene_immune: np.ndarray  # (genes_micro,): immune program
    gene_micro_class: np.ndarray  # (4, genes_micro): weak class signal in the microenvironment
    patch_class: np.ndarray  # (4, feature_dim): tumour-patch class prototypes
    patch_prolif: np.ndarray  # (feature_dim,)
    patch_stroma: np.ndarray  # (feature_dim,)
    patch_immune: np.ndarray  # (feature_dim,)

    @classmethod
    def draw(cls, spec: SynthSpec, seed: int = 1234) -> "Prototypes":
        proto = np.random.default_rng(seed)
        D, Gt, Ge = spec.feature_dim, spec.genes_tumour, spec.genes_micro
        # Draw order is part of the contract: it fixes synthetic_patients' output for a seed.
        return cls(gene_class=proto.normal(0, 1, (4, Gt)), gene_prolif=proto.normal(0, 1, Gt),
                   gene_immune=proto.normal(0, 1, Ge), gene_micro_class=proto.normal(0, 0.5, (4, Ge)),
                   patch_class=proto.normal(0, 1, (4, D)), patch_prolif=proto.normal(0, 1, D),
                   patch_stroma=proto.normal(0, 1, D), patch_immune=proto.normal(0, 1, D))

    def gene_means(self, y: int, prolif: float, immune: float, signal: float = 1.0
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free (tumour, microenvironment) gene vectors of one patient."""
        g_t = signal * (self.gene_class[y] + 0.8 * prolif * self.gene_prolif)
        g_e = signal * (immune * self.gene_immune + self.gene_micro_class[y])
        return g_t, g_e

    def patch_means(self, y: int, prolif: float, immune: float, signal: float = 1.0
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free (tumour-patch, stroma-patch) feature means of one patient."""
        tumour_mu = signal * (self.patch_class[y] + 0.8 * prolif * self.patch_prolif)
        stroma_mu = signal * (self.patch_stroma + immune * self.patch_immune)
        return tumour_mu, stroma_mu


def _tissue_cells(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct integer (col, row) cells forming a roughly round tissue region."""
    r = int(np.ceil(np.sqrt(n / np.pi))) + 1
    while True:
        ax = np.arange(-r, r + 1)
        xx, yy = np.meshgrid(ax, ax)
        inside = np.stack((xx.ravel(), yy.ravel()), 1)[(xx.ravel() ** 2 + yy.ravel() ** 2) <= r * r]
        if len(inside) >= n:
            break
        r += 1
    pick = inside[np.argsort(np.linalg.norm(inside + rng.normal(0, 1.5, inside.shape), axis=1))[:n]]
    return pick - pick.min(axis=0)


def synthetic_patients(n: int, spec: SynthSpec = SynthSpec(), seed: int = 0,
                       bin_edges: np.ndarray | None = None, site_shift: float = 0.0,
                       prototypes_seed: int = 1234) -> list[dict]:
    """``n`` patient items (the dict form ``client.site.collate.collate_patients`` takes).

    ``prototypes_seed`` fixes the biology (class prototypes, gene programs) shared by every site;
    ``seed`` draws the patients; ``site_shift`` adds a site-specific batch effect to both
    modalities. ``bin_edges`` default to this sample's own event-time quartiles (fine for a toy
    task; real pipelines fit them on training data only).
    """
    proto = Prototypes.draw(spec, prototypes_seed)
    D, Gt, Ge, s = spec.feature_dim, spec.genes_tumour, spec.genes_micro, spec.signal

    rng = np.random.default_rng(seed)
    batch_gene_t = rng.normal(0, site_shift, Gt)
    batch_gene_e = rng.normal(0, site_shift, Ge)
    batch_patch = rng.normal(0, site_shift, D)

    y = rng.choice(4, size=n, p=CLASS_PRIOR)
    prolif = rng.normal(0, 1, n)
    immune = rng.normal(0, 1, n)
    # Grade: GBM and astrocytoma G4 are grade 4 (index 2); the others 2 or 3 by proliferation.
    grade = np.where(y <= 1, 2, (prolif + 0.3 * immune > 0).astype(int))
    log_h = 1.3 * (grade == 2) + 0.6 * (grade == 1) - 0.5 * (y == 3) + 0.5 * immune
    t_event = rng.exponential(1500.0 * np.exp(-s * log_h))
    t_censor = rng.uniform(150, 4000, n)
    time = np.minimum(t_event, t_censor)
    event = (t_event <= t_censor).astype(float)
    edges = survival_bin_edges(time, event, spec.survival_bins) if bin_edges is None else bin_edges
    bins = assign_bins(time, edges)

    items = []
    for i in range(n):
        mu_t, mu_e = proto.gene_means(y[i], prolif[i], immune[i], s)
        g_t = mu_t + batch_gene_t
        g_e = mu_e + batch_gene_e
        g_t = g_t + rng.normal(0, spec.gene_noise, Gt)
        g_e = g_e + rng.normal(0, spec.gene_noise, Ge)

        m = int(rng.integers(spec.min_patches, spec.max_patches + 1))
        cells = _tissue_cells(rng, m)  # (m, 2)
        centre = cells[rng.integers(m)]
        frac = float(np.clip(0.35 + 0.1 * prolif[i], 0.15, 0.6))
        order = np.argsort(np.linalg.norm(cells - centre, axis=1))
        is_tumour = np.zeros(m, dtype=bool)
        is_tumour[order[: max(1, int(frac * m))]] = True
        tumour_mu, stroma_mu = proto.patch_means(y[i], prolif[i], immune[i], s)
        if spec.patient_noise > 0:
            tumour_mu = tumour_mu + rng.normal(0, spec.patient_noise, D)
            stroma_mu = stroma_mu + rng.normal(0, spec.patient_noise, D)
        feats = np.where(is_tumour[:, None], tumour_mu, stroma_mu) + batch_patch
        feats = feats + rng.normal(0, spec.patch_noise, (m, D))

        items.append({
            "patient_id": f"SYN-{seed}-{i:05d}",
            "patches": feats.astype(np.float32),
            "coords": (cells * spec.patch_step).astype(np.float32),
            "patch_step": float(spec.patch_step),
            "genes_tumour": g_t.astype(np.float32),
            "genes_micro": g_e.astype(np.float32),
            "labels": {"diagnosis": int(y[i]), "grade": int(grade[i]), "survival_bin": int(bins[i]),
                       "survival_time": float(time[i]), "event": float(event[i])},
            "label_mask": {"diagnosis": True, "grade": True, "survival": True},
        })
    return items
