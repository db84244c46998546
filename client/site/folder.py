"""The site folder on disk: its paths, its manifest and its feature files, written atomically.

This is the contract between a hospital's data and everything that reads it (architecture.md,
"The site folder")::

    <site>/
      clinical.csv         patient_id, idh, codel_1p19q, cdkn2ab, grade, survival_days, event [, split]
      slides.csv           slide_id, patient_id [, path]
      genomics.csv         patient_id + one column per feature
      geneset.csv          feature, subspace (tumour | micro): which genomic feature feeds which subspace
      features/<slide>.h5  datasets features (N, D) float32 and coords (N, 2) int64 level-0 (x, y);
                           attrs encoder, weights_sha256, feature_dim, patch_size, mpp, level (CLAM-style)
      manifest.json        per-slide extraction state and checksums, the site schema, and the
                           modalities the site holds (absent: both)

A site that lacks a modality says so in its manifest, ``"modalities": ["genomics"]`` (no slides:
slides.csv absent or without rows, features/ empty) or ``["histology"]`` (no genomic table; the
federation's geneset.csv stays, it sizes the placeholder gene vectors), e.g.
with ``smm site modalities SITE_DIR genomics``. The declaration is what makes a missing modality
deliberate: a folder that declares both and lacks slides or feature files stays an error.

Every write goes to a temporary file in the same folder and is then renamed over the target, so a
crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from smm_model.contract.atomic import atomic_path, atomic_write_text, sha256_file
from smm_model.contract.sites import CLINICAL_FILE, MODALITIES

__all__ = ["SiteLayout", "write_features",
           "read_features", "FeatureFileError", "Manifest", "MANIFEST_VERSION", "SUBSPACES", "MODALITIES_KEY"]

MANIFEST_VERSION = 1
#: Names of the two genomic subspaces in geneset.csv.
SUBSPACES = ("tumour", "micro")
#: Manifest key of the modalities a site holds (``MODALITIES``; absent: all of them).
MODALITIES_KEY = "modalities"
#: Attributes every feature file carries.
FEATURE_ATTRS = ("encoder", "weights_sha256", "feature_dim", "patch_size", "mpp", "level")


@dataclass(frozen=True)
class SiteLayout:
    """Paths of one site folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def clinical(self) -> Path:
        return self.root / CLINICAL_FILE

    @property
    def slides(self) -> Path:
        return self.root / "slides.csv"

    @property
    def genomics(self) -> Path:
        return self.root / "genomics.csv"

    @property
    def geneset(self) -> Path:
        return self.root / "geneset.csv"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def feature_file(self, slide_id: str) -> Path:
        return self.features_dir / f"{slide_id}.h5"


class FeatureFileError(ValueError):
    """A feature file is missing, truncated, or does not match the contract."""


def write_features(path: Path | str, features: np.ndarray, coords: np.ndarray, **attrs: Any) -> str:
    """Write one slide's features atomically; returns the file's sha256.

    ``features`` (N, D) float, ``coords`` (N, 2) level-0 (x, y) of each patch's top-left corner.
    ``attrs`` must include every name in FEATURE_ATTRS.
    """
    import h5py

    features = np.asarray(features, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.int64)
    if features.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise FeatureFileError(f"{path}: features must be (N, D) and coords (N, 2); got "
                               f"{features.shape} and {coords.shape}")
    missing = [a for a in FEATURE_ATTRS if a not in attrs]
    if missing:
        raise FeatureFileError(f"{path}: missing attributes {missing}")
    if int(attrs["feature_dim"]) != features.shape[1]:
        raise FeatureFileError(f"{path}: feature_dim attr {attrs['feature_dim']} != features width "
                               f"{features.shape[1]}")
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("coords", data=coords)
            for k, v in attrs.items():
                f.attrs[k] = v if v is not None else ""
    return sha256_file(path)


def read_features(path: Path | str, load: bool = True) -> tuple[np.ndarray | None, np.ndarray | None, dict]:
    """Read one feature file; ``load=False`` only checks shapes and reads the attributes.

    Raises FeatureFileError naming the file and what is wrong (unreadable, truncated, missing
    dataset or attribute, shape mismatch, non-finite values).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found")
    try:
        with h5py.File(path, "r") as f:
            for name in ("features", "coords"):
                if name not in f:
                    raise FeatureFileError(f"{path}: dataset {name!r} missing")
            fshape, cshape = f["features"].shape, f["coords"].shape
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            if len(fshape) != 2 or cshape != (fshape[0], 2):
                raise FeatureFileError(f"{path}: features {fshape} and coords {cshape} do not match "
                                       "(expected (N, D) and (N, 2))")
            missing = [a for a in FEATURE_ATTRS if a not in attrs]
            if missing:
                raise FeatureFileError(f"{path}: attributes {missing} missing")
            if int(attrs["feature_dim"]) != fshape[1]:
                raise FeatureFileError(f"{path}: attribute feature_dim {attrs['feature_dim']} but "
                                       f"features have {fshape[1]} columns")
            if fshape[0] == 0:
                raise FeatureFileError(f"{path}: no patches")
            if not load:
                return None, None, attrs
            feats = f["features"][()].astype(np.float32, copy=False)
            coords = f["coords"][()]
    except FeatureFileError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise FeatureFileError(f"{path}: unreadable HDF5 file ({e})") from None
    if not np.isfinite(feats).all():
        raise FeatureFileError(f"{path}: features contain NaN or Inf")
    return feats, coords, attrs


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """``manifest.json``: the site schema and one record per slide.

    ``{"version": 1, "schema": {"encoder": ..., "weights_sha256": ..., "feature_dim": ...,
    "gene_set": ...}, "slides": {slide_id: {"status": "done" | "failed" | "running",
    "reason": str | None, "attempts": int, "checksum": sha256 | None, "n_patches": int | None,
    "updated": iso time}}}``. ``save`` is atomic.
    """

    def __init__(self, path: Path | str, data: dict | None = None) -> None:
        self.path = Path(path)
        self.data = data or {"version": MANIFEST_VERSION, "schema": {}, "slides": {}}

    @classmethod
    def load(cls, path: Path | str) -> "Manifest":
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: expected a manifest with version {MANIFEST_VERSION}")
        data.setdefault("schema", {})
        data.setdefault("slides", {})
        return cls(path, data)

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    @property
    def schema(self) -> dict:
        return self.data["schema"]

    @property
    def slides(self) -> dict[str, dict]:
        return self.data["slides"]

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the site declares it holds, in ``MODALITIES`` order (undeclared: all).

        Raises ValueError naming the file and the field when the declaration is not a non-empty
        list of known modalities."""
        raw = self.data.get(MODALITIES_KEY)
        if raw is None:
            return MODALITIES
        if not isinstance(raw, list) or not raw or not all(isinstance(m, str) for m in raw) \
                or not set(raw) <= set(MODALITIES) or len(set(raw)) != len(raw):
            raise ValueError(f"{self.path}: field {MODALITIES_KEY!r} is {raw!r}; expected a non-empty list of "
                             f"distinct modalities from {list(MODALITIES)}")
        return tuple(m for m in MODALITIES if m in raw)

    def declare_modalities(self, modalities: list[str] | tuple[str, ...]) -> None:
        """Record the modalities the site holds (all of them removes the declaration); ``save`` writes it."""
        self.data[MODALITIES_KEY] = list(modalities)
        self.modalities  # validates
        if set(modalities) == set(MODALITIES):
            del self.data[MODALITIES_KEY]

    def record(self, slide_id: str, status: str, reason: str | None = None, **extra: Any) -> dict:
        """Set a slide's state; ``running`` counts an attempt."""
        rec = self.slides.setdefault(slide_id, {"attempts": 0})
        if status == "running":
            rec["attempts"] = int(rec.get("attempts", 0)) + 1
        rec.update(status=status, reason=reason, updated=_now(), **extra)
        return rec
