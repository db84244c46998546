"""Small, valid site folders for the site tests (features, genomics, labels, manifest).

Not a test module: the site tests import it (tests/conftest.py puts tests/support on sys.path). Each test then
breaks one thing in the folder and checks that it is caught and named.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from client.site.folder import Manifest, SiteLayout, write_features

TUMOUR = ("T1_rnaseq", "T2_rnaseq", "T3_cnv")
MICRO = ("M1_rnaseq", "M2_rnaseq", "M3_rnaseq", "M4_mut")
STEP = 256  # level-0 pixels between neighbouring patches in the toy feature files

# (idh, codel, cdkn2ab, grade) rows covering every diagnosis class: GBM, A4 (cdkn), A4 (grade), A2-3, oligo.
_MARKERS = [("wildtype", "non-codel", "0", "4"), ("mutant", "non-codel", "-2", "3"), ("mutant", "non-codel", "0", "4"),
            ("mutant", "non-codel", "0", "2"), ("mutant", "codel", "0", "3"), ("mutant", "non-codel", "1", "3")]


def clinical_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        idh, codel, cdkn, grade = _MARKERS[i % len(_MARKERS)]
        rows.append({"patient_id": f"P{i:03d}", "idh": idh, "codel_1p19q": codel, "cdkn2ab": cdkn, "grade": grade,
                     "survival_days": str(int(rng.integers(30, 3000))), "event": str(int(rng.random() < 0.6))})
    return pd.DataFrame(rows)


def genomics_frame(patients, seed: int = 0, columns=TUMOUR + MICRO) -> pd.DataFrame:
    rng = np.random.default_rng(seed + 1)
    df = pd.DataFrame(rng.gamma(2.0, 2.0, (len(patients), len(columns))), columns=list(columns))
    df.insert(0, "patient_id", list(patients))
    return df


def write_slide(layout: SiteLayout, slide_id: str, n: int, feature_dim: int, rng: np.random.Generator,
                encoder: str = "toy", fill: float | None = None) -> str:
    cells = rng.choice(100, size=n, replace=False)
    coords = np.stack([cells % 10, cells // 10], 1) * STEP + 1000
    feats = rng.normal(size=(n, feature_dim)) if fill is None else np.full((n, feature_dim), fill)
    return write_features(layout.feature_file(slide_id), feats, coords, encoder=encoder, weights_sha256="w0",
                          feature_dim=feature_dim, patch_size=STEP, mpp=0.5, level=0)


def build_site(root: Path, n: int = 18, *, feature_dim: int = 8, seed: int = 0, slides_per_patient=None,
               patches=(4, 30)) -> Path:
    """A valid site: ``n`` patients, 1-3 slides each (or ``slides_per_patient[i]``), all extracted."""
    rng = np.random.default_rng(seed)
    layout = SiteLayout(Path(root))
    layout.root.mkdir(parents=True, exist_ok=True)
    clin = clinical_frame(n, seed)
    clin.to_csv(layout.clinical, index=False)
    pd.DataFrame({"feature": TUMOUR + MICRO, "subspace": ["tumour"] * len(TUMOUR) + ["micro"] * len(MICRO)}) \
        .to_csv(layout.geneset, index=False)
    genomics_frame(clin["patient_id"], seed).to_csv(layout.genomics, index=False)
    manifest = Manifest(layout.manifest)
    manifest.schema.update(encoder="toy", feature_dim=feature_dim, weights_sha256="w0")
    rows = []
    for i, pid in enumerate(clin["patient_id"]):
        k = slides_per_patient[i] if slides_per_patient is not None else 1 + i % 3
        for j in range(k):
            sid = f"{pid}-S{j}"
            m = int(rng.integers(patches[0], patches[1] + 1))
            sha = write_slide(layout, sid, m, feature_dim, rng)
            manifest.record(sid, "done", checksum=sha, n_patches=m)
            rows.append({"slide_id": sid, "patient_id": pid})
    pd.DataFrame(rows).to_csv(layout.slides, index=False)
    manifest.save()
    return layout.root
