"""A site folder as a PyTorch dataset: one item per PATIENT.

``SiteData`` loads and validates a site folder once (clinical labels, slides -> patients, the
manifest and every feature file's attributes, gene set and genomics, splits) and records every
patient or slide it leaves out, with the reason. ``SiteDataset`` then yields items in the dict
format of ``client.site.collate.collate_patients``; feature files are read lazily, per item.

Why one item per patient (not per slide, as the reference code): labels and genomics are
per patient, and metrics must be per patient too; several slides of one patient are one bag.

Bag assembly, per patient:

* every usable slide's patches are concatenated in slides.csv order;
* for the spatial layout, slides are placed side by side: each slide's coordinates are taken
  relative to its own top-left patch, expressed in units of its patch step, and shifted right of
  the previous slide's bounding box plus a gap of empty cells. With the model's grid size known,
  the gap is wide enough that the layout's cell merging never puts two slides in one token;
* ``data.max_patches`` caps the bag by sampling without replacement, seeded by
  (``data.split_seed``, the patient's row in clinical.csv, the epoch): the same patient gets the
  same sample in every run and in every worker, and a different one per epoch if the trainer calls
  ``set_epoch``. The kept patches stay in bag order.

Patch step (level-0 pixels between neighbouring patches), per slide, first that applies:

1. attribute ``patch_step`` (an explicit level-0 stride);
2. ``step * target_downsample`` (what ``smm extract`` writes: the grid stride in target pixels
   times level-0 pixels per target pixel; right with overlapping patches too);
3. ``patch_size_level0`` (TRIDENT's name; the stride when patches do not overlap);
4. the lattice stride of the slide's own coordinates (smallest positive gap between distinct x or
   y values), for CLAM-style files that only carry ``patch_size``/``level``. The attribute
   ``downsample`` is deliberately not used: writers disagree on whether it is the pyramid level's
   or the patch's;
5. ``patch_size`` (a one-patch slide: nothing to infer; assumes the patch was read at level 0).

The item carries the first slide's step; later slides are rescaled to it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch.utils.data

from client.site.genomics import GeneSet, GenomicsData, GenomicsStats, load_genomics, read_geneset
from client.site.labels import DIAGNOSES, GRADES, SPLITS, ClinicalLabels, assign_bins, read_clinical, survival_bin_edges
from client.site.folder import FeatureFileError, Manifest, SiteLayout, read_features
from smm_model.contract.atomic import sha256_file
from client.site.splits import Splits, make_splits
from client.site.validation import Report, SiteDataError, preview
from smm_model.config import DataConfig
from smm_model.contract.sites import MODALITIES

__all__ = ["GENOMICS_NAMES", "find_genomics_file", "SlideStatus", "read_slides", "check_slides",
           "slide_patch_step", "concat_slide_coords", "sample_indices", "SiteData", "SiteDataset",
           "inspect_site"]

#: Names the site's genomic table may have, in the order they are looked for.
GENOMICS_NAMES = ("genomics.csv", "genomics.csv.zip", "genomics.csv.gz", "genomics.tsv", "genomics.txt",
                  "genomics.parquet")
#: Empty cells between two slides of one bag when the model's grid size is unknown.
MIN_SLIDE_GAP = 1


def find_genomics_file(layout: SiteLayout) -> Path:
    """The site's genomic table; exactly one of GENOMICS_NAMES must exist (two is ambiguous)."""
    found = [layout.root / n for n in GENOMICS_NAMES if (layout.root / n).is_file()]
    if not found:
        raise SiteDataError(f"{layout.root}: no genomic table (expected one of {', '.join(GENOMICS_NAMES)})")
    if len(found) > 1:
        raise SiteDataError(f"{layout.root}: several genomic tables ({preview(p.name for p in found)}); "
                            "keep exactly one")
    return found[0]


# --------------------------------------------------------------------------------------------- #
# slides and feature files
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SlideStatus:
    """One slide of slides.csv: usable or not, and why not.

    ``recorded`` is True when the manifest itself records the failure (for example no tissue):
    an expected exclusion, a warning. Any other problem means the folder is inconsistent (an error
    for ``smm site check``; training still excludes the slide and says so).
    """

    slide_id: str
    patient_id: str
    ok: bool
    reason: str | None = None  # the full message (file, field, expectation), for errors
    recorded: bool = False
    kind: str | None = None  # a short category without ids or paths, for counted warnings


def read_slides(path: Path, patients: Sequence[str] | None) -> tuple[list[tuple[str, str]], Report]:
    """``slides.csv`` rows as (slide_id, patient_id), in file order, for patients of the clinical
    table (all rows when ``patients`` is None); rows of unknown patients are left out with a
    warning (counted)."""
    report = Report()
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise SiteDataError(f"{path}: slide table not found (expected columns slide_id, patient_id; a site without "
                            "slides declares it: smm site modalities SITE_DIR genomics)") from None
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise SiteDataError(f"{path}: not a readable CSV file ({e})") from None
    missing = [c for c in ("slide_id", "patient_id") if c not in df.columns]
    if missing:
        raise SiteDataError(f"{path}: column(s) {missing} missing; expected slide_id, patient_id [, path]")
    sid, pid = df["slide_id"].str.strip(), df["patient_id"].str.strip()
    problems = []
    for col, s in (("slide_id", sid), ("patient_id", pid)):
        empty = np.flatnonzero((s == "").to_numpy())
        if len(empty):
            problems.append(f"{path}: column {col!r}: empty value on line(s) {preview([int(i) + 2 for i in empty])}")
    dup = sid[sid.duplicated() & (sid != "")].unique()
    if len(dup):
        problems.append(f"{path}: column 'slide_id': slide(s) {preview(dup)} listed more than once (a slide "
                        "belongs to exactly one patient)")
    bad_name = [s for s in sid if s and (Path(s).name != s or s.startswith("."))]
    if bad_name:
        problems.append(f"{path}: column 'slide_id': {preview(bad_name)} is not a plain file name (features are "
                        "stored as features/<slide_id>.h5)")
    if problems:
        raise SiteDataError(problems)
    known = set(pid) if patients is None else set(patients)
    unknown = sorted(set(pid) - known)
    if unknown:
        report.warn(f"{path}: {int((~pid.isin(known)).sum())} slide(s) of {len(unknown)} patient(s) not in the "
                    "clinical table are left out")
    rows = [(s, p) for s, p in zip(sid, pid) if p in known]
    return rows, report


def check_slides(layout: SiteLayout, rows: Sequence[tuple[str, str]], manifest: Manifest, *,
                 feature_dim: int | None = None, encoder: str | None = None,
                 checksums: bool = False) -> tuple[list[SlideStatus], dict[str, Any], Report]:
    """Check every slide against the manifest and its feature file (attributes only, cheap).

    The reference schema (encoder, feature_dim) is the manifest's when it declares one, else the
    most common one among readable files. ``feature_dim``/``encoder`` (from the run's config), when
    given, must match it: a site whose features come from another encoder is refused as a whole.
    ``checksums`` also compares each file's sha256 with the manifest (reads
    every byte, so it is for ``smm site check``, not for every training start).
    """
    report = Report()
    mslides = manifest.slides
    attrs: dict[str, dict] = {}
    status: dict[str, SlideStatus] = {}
    for sid, pid in rows:
        rec = mslides.get(sid)
        path = layout.feature_file(sid)
        if rec is not None and rec.get("status") == "failed":
            why = f"extraction failed ({rec.get('reason') or 'no reason recorded'})"
            status[sid] = SlideStatus(sid, pid, False, f"{layout.manifest.name}: {why}", recorded=True, kind=why)
            continue
        if rec is None:
            why = "no manifest entry" + ("" if path.is_file() else " and no feature file")
            status[sid] = SlideStatus(sid, pid, False, f"{layout.manifest.name}: {why} (not extracted?)",
                                      kind="no manifest entry")
            continue
        if rec.get("status") != "done":
            status[sid] = SlideStatus(sid, pid, False, f"{layout.manifest.name}: status {rec.get('status')!r} "
                                      "(extraction unfinished; expected 'done')", kind="extraction unfinished")
            continue
        try:
            _, _, a = read_features(path, load=False)
        except FeatureFileError as e:
            kind = "feature file missing" if not path.is_file() else "unreadable feature file"
            status[sid] = SlideStatus(sid, pid, False, str(e), kind=kind)
            continue
        if checksums and rec.get("checksum") and sha256_file(path) != rec["checksum"]:
            status[sid] = SlideStatus(sid, pid, False, f"{path}: sha256 differs from {layout.manifest.name} "
                                      "(file changed or truncated since extraction)", kind="checksum mismatch")
            continue
        attrs[sid] = a
        status[sid] = SlideStatus(sid, pid, True)

    schema = manifest.schema
    ref: dict[str, Any] = {}
    if schema.get("feature_dim") is not None:
        ref["feature_dim"] = int(schema["feature_dim"])
    if schema.get("encoder"):
        ref["encoder"] = str(schema["encoder"])
    if schema.get("weights_sha256"):
        ref["encoder_weights"] = str(schema["weights_sha256"])
    if attrs and ("feature_dim" not in ref or "encoder" not in ref):
        common = Counter((int(a["feature_dim"]), str(a["encoder"])) for a in attrs.values())
        (fd, enc), _ = sorted(common.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        ref.setdefault("feature_dim", fd)
        ref.setdefault("encoder", enc)
        report.note(f"{layout.manifest}: no feature schema declared; using the most common one among the "
                    f"feature files (encoder {enc!r}, feature_dim {fd})")
    for sid, a in attrs.items():
        why, kinds = [], []
        if "feature_dim" in ref and int(a["feature_dim"]) != ref["feature_dim"]:
            why.append(f"attribute feature_dim {int(a['feature_dim'])}, but the site's is {ref['feature_dim']}")
            kinds.append("feature_dim mismatch")
        if "encoder" in ref and str(a["encoder"]) != ref["encoder"]:
            why.append(f"attribute encoder {str(a['encoder'])!r}, but the site's is {ref['encoder']!r}")
            kinds.append("encoder mismatch")
        ws = schema.get("weights_sha256")
        if ws and a.get("weights_sha256") and str(a["weights_sha256"]) != str(ws):
            why.append("attribute weights_sha256 differs from the manifest schema (other encoder weights)")
            kinds.append("encoder weights mismatch")
        if why:
            status[sid] = SlideStatus(sid, status[sid].patient_id, False,
                                      f"{layout.feature_file(sid)}: " + "; ".join(why), kind=", ".join(kinds))
    if feature_dim is not None and "feature_dim" in ref and ref["feature_dim"] != feature_dim:
        report.error(f"{layout.root}: the site's features have feature_dim {ref['feature_dim']}, but "
                     f"model.feature_dim is {feature_dim} (features from another encoder?)")
    if encoder is not None and "encoder" in ref and ref["encoder"] != encoder:
        report.error(f"{layout.root}: the site's features come from encoder {ref['encoder']!r}, expected {encoder!r}")

    listed = {s for s, _ in rows}
    if layout.features_dir.is_dir():
        orphans = sorted(p.stem for p in layout.features_dir.glob("*.h5") if p.stem not in listed)
        if orphans:
            report.warn(f"{layout.features_dir}: {len(orphans)} feature file(s) belong to no slide of slides.csv "
                        "(orphans; ignored)")
    stale = sorted(s for s in mslides if s not in listed)
    if stale:
        report.warn(f"{layout.manifest}: {len(stale)} entr(y/ies) for slides not in slides.csv (ignored)")
    return [status[s] for s, _ in rows], ref, report


def _positive(attrs: Mapping[str, Any], key: str) -> float | None:
    """A finite, positive numeric attribute, or None (absent, empty, non-numeric)."""
    try:
        v = float(attrs[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def slide_patch_step(coords: np.ndarray, attrs: Mapping[str, Any]) -> float:
    """Level-0 pixels between neighbouring patches of one slide (rules in the module docstring)."""
    explicit = _positive(attrs, "patch_step")
    if explicit is not None:
        return explicit
    step, per_px = _positive(attrs, "step"), _positive(attrs, "target_downsample")
    if step is not None and per_px is not None:
        return step * per_px
    side = _positive(attrs, "patch_size_level0")
    if side is not None:
        return side
    c = np.asarray(coords, dtype=np.float64)
    gaps = [np.diff(np.unique(c[:, a])) for a in (0, 1)]
    gaps = np.concatenate([g[g > 0] for g in gaps])
    if gaps.size:
        return float(gaps.min())
    return float(attrs["patch_size"])


def concat_slide_coords(coords: Sequence[np.ndarray], steps: Sequence[float],
                        grid_size: int | None = None) -> tuple[np.ndarray, float]:
    """Place several slides side by side in one coordinate frame; returns (coords (N, 2), step).

    Each slide is expressed in cells of its own step, shifted to start at cell (x0, 0), and
    scaled by the first slide's step. Slides are separated by ``gap`` empty cell columns. The
    spatial layout merges ``f = ceil(extent / grid_size)`` cells per token, and two cells can only
    share a token when they are less than ``f`` apart; so with ``grid_size`` given, ``gap`` is
    raised until ``gap >= f - 1`` and patches of different slides never mix in one token.
    """
    if len(coords) != len(steps) or not coords:
        raise ValueError("concat_slide_coords: one step per slide, at least one slide")
    ref = float(steps[0])
    cells = [(np.asarray(c, dtype=np.float64) - np.asarray(c, dtype=np.float64).min(0)) / float(s)
             for c, s in zip(coords, steps)]
    widths = [int(math.floor(c[:, 0].max() + 1e-6)) + 1 for c in cells]
    height = max(int(math.floor(c[:, 1].max() + 1e-6)) + 1 for c in cells)
    gap = MIN_SLIDE_GAP
    if grid_size and len(cells) > 1:
        for _ in range(64):  # converges in a few steps; bounded to be safe
            extent = max(sum(widths) + (len(cells) - 1) * gap, height)
            f = -(-extent // grid_size)
            if gap >= f - 1:
                break
            gap = f - 1
    out, x0 = [], 0
    for c, w in zip(cells, widths):
        out.append((c + np.array([x0, 0.0])) * ref)
        x0 += w + gap
    return np.concatenate(out, axis=0), ref


def sample_indices(n: int, cap: int, seed: int, patient_index: int, epoch: int = 0) -> np.ndarray:
    """Sorted indices of at most ``cap`` of ``n`` patches (all when ``cap`` is 0 or >= n), seeded."""
    if cap <= 0 or n <= cap:
        return np.arange(n)
    rng = np.random.default_rng([int(seed), int(patient_index), int(epoch)])
    return np.sort(rng.choice(n, size=cap, replace=False))


# --------------------------------------------------------------------------------------------- #
# the site
# --------------------------------------------------------------------------------------------- #
@dataclass
class SiteData:
    """A validated site folder (see ``inspect_site`` for what is checked).

    ``excluded`` maps a patient to the reason it cannot be used (histology runs: no usable
    feature file); splits are drawn over ALL clinical patients, so they are the same for a
    genomics-only and a histology run, and excluded patients simply drop out of their split.
    ``modalities``: what the site holds (its manifest's declaration); ``require_features``: whether
    feature files were read (False for a genomics-only model, or a site without slides).
    """

    layout: SiteLayout
    config: DataConfig
    clinical: ClinicalLabels
    geneset: GeneSet
    genomics: GenomicsData | None  # None: a site without genomics (its gene set sizes placeholder vectors)
    splits: Splits
    slides: dict[str, tuple[str, ...]]
    slide_status: list[SlideStatus]
    feature_schema: dict[str, Any]
    excluded: dict[str, str]
    require_features: bool
    report: Report = field(default_factory=Report)
    modalities: tuple[str, ...] = MODALITIES

    @classmethod
    def load(cls, root: Path | str, config: DataConfig | None = None, *, require_features: bool = True,
             feature_dim: int | None = None, encoder: str | None = None, patient_column: str = "patient_id",
             checksums: bool = False, fold: int | None = None, k: int | None = None) -> "SiteData":
        """Load and validate; raise SiteDataError listing every problem (slides that cannot be used are
        excluded with a warning here, so one bad file does not stop a site from training)."""
        site, report = inspect_site(root, config, require_features=require_features, feature_dim=feature_dim,
                                    encoder=encoder, patient_column=patient_column, checksums=checksums,
                                    fold=fold, k=k, slide_problems="warn")
        report.raise_if_errors()
        assert site is not None
        return site

    @property
    def root(self) -> Path:
        return self.layout.root

    def patients(self, split: str | None = None) -> tuple[str, ...]:
        """Usable patients of a split (all splits when None), in clinical.csv order."""
        pool = self.clinical.patients if split is None else self.splits[split]
        return tuple(p for p in pool if p not in self.excluded)

    def genomics_stats(self, split: str = "train") -> GenomicsStats:
        """Genomic statistics over a split's usable patients (training: the standardisation)."""
        if self.genomics is None:
            raise SiteDataError(f"{self.layout.root}: the site declares no genomics, so it has no genomic statistics")
        return self.genomics.stats(self.patients(split))

    @property
    def genomics_policy(self) -> str:
        """How missing genomic values are handled: the table's, else the run's setting."""
        return self.genomics.policy if self.genomics is not None else self.config.genomics_policy

    def survival_bin_edges(self, n_bins: int, split: str = "train") -> np.ndarray:
        """Inner survival bin edges from a split's survival-labelled patients (client.cohorts.synthetic)."""
        pos = self.clinical.positions(self.patients(split))
        known = self.clinical.survival_known[pos]
        if not known.any():
            raise SiteDataError(f"{self.layout.clinical}: no {split} patient has a survival label, so survival "
                                "bin edges cannot be fitted here; hand in edges (federated) or disable survival")
        return survival_bin_edges(self.clinical.survival_time[pos][known], self.clinical.event[pos][known], n_bins)

    def dataset(self, split: str, *, stats: GenomicsStats | None = None, bin_edges: np.ndarray | None = None,
                n_bins: int = 4, grid_size: int | None = None, epoch: int = 0,
                patch_norm: tuple[np.ndarray, np.ndarray] | None = None,
                placeholder_dim: int | None = None) -> "SiteDataset":
        """Items of one split. ``stats``/``bin_edges`` default to this site's training split (a local
        run); a federation hands in shared ones. Pass ``grid_size=model.grid_size`` for the spatial
        layout, so that slides of one patient never share a token (``concat_slide_coords``).
        ``patch_norm``: (mean, std) per feature dimension applied to every patch (None: raw).
        ``placeholder_dim``: the width of the placeholder bags of a site without slides (the
        model's feature width, so they stack with other sites' bags in a pooled batch)."""
        stats = stats if stats is not None or self.genomics is None else self.genomics_stats("train")
        if bin_edges is None:
            bin_edges = self.survival_bin_edges(n_bins) if self.clinical.survival_known.any() else \
                np.zeros(n_bins - 1)
        return SiteDataset(self, self.patients(split), stats=stats, bin_edges=bin_edges, grid_size=grid_size,
                           epoch=epoch, patch_norm=patch_norm, placeholder_dim=placeholder_dim)

    def patch_sums(self, split: str = "train") -> dict[str, Any]:
        """{"n", "sum", "sum_sq"} (float64 sums per feature dimension) over every patch of every usable
        slide of a split's patients: the additive statistics of the shared patch standardisation."""
        n, s, sq = 0, None, None
        for pid in self.patients(split):
            for sid in self.slides.get(pid, ()):
                x = read_features(self.layout.feature_file(sid))[0].astype(np.float64)  # (N, D)
                s = x.sum(axis=0) if s is None else s + x.sum(axis=0)
                sq = (x * x).sum(axis=0) if sq is None else sq + (x * x).sum(axis=0)
                n += len(x)
        return {"n": n, "sum": [] if s is None else s.tolist(), "sum_sq": [] if sq is None else sq.tolist()}

    def aggregate_stats(self) -> dict[str, Any]:
        """Aggregate numbers for a federated preflight: counts per split, class and event counts,
        exclusions by reason, schema, and GenomicsStats of the training patients. No per-patient
        value, id or label is in it."""
        out: dict[str, Any] = {
            "patients": len(self.clinical),
            "excluded": dict(Counter(self.excluded.values())),
            "split_source": self.splits.source,
            "schema": {**self.feature_schema, "gene_set": self.geneset.digest,
                       "genes_tumour": self.geneset.input_dims(self.genomics_policy)[0],
                       "genes_micro": self.geneset.input_dims(self.genomics_policy)[1],
                       "genomics_policy": self.genomics_policy, "modalities": list(self.modalities)},
            "splits": {},
        }
        for s in SPLITS:
            pos = self.clinical.positions(self.patients(s))
            d, g = self.clinical.diagnosis[pos], self.clinical.grade[pos]
            known = self.clinical.survival_known[pos]
            out["splits"][s] = {
                "patients": int(len(pos)),
                "diagnosis": [int((d == c).sum()) for c in range(len(DIAGNOSES))],
                "diagnosis_unknown": int((d < 0).sum()),
                "grade": [int((g == c).sum()) for c in range(len(GRADES))],
                "grade_unknown": int((g < 0).sum()),
                "survival_labelled": int(known.sum()),
                "events": int(np.nansum(self.clinical.event[pos][known])),
            }
        if self.patients("train") and self.genomics is not None:
            out["genomics_stats"] = self.genomics_stats("train").to_dict()
        return out


def _check_no_slides(layout: SiteLayout, modalities: Sequence[str], report: Report) -> None:
    """A site that declares it has no slides must hold none: slides.csv absent or without rows (an
    error otherwise, since the declaration and the folder disagree); feature files are ignored
    (a warning)."""
    if layout.slides.is_file():
        try:
            rows, _ = read_slides(layout.slides, None)
        except SiteDataError as e:
            report.absorb(e)
            return
        if rows:
            report.error(f"{layout.slides}: lists {len(rows)} slide(s), but {layout.manifest.name} declares the "
                         f"site's modalities as {list(modalities)} (no histology); remove the slides or add "
                         "'histology' to the declaration")
    n_files = len(list(layout.features_dir.glob("*.h5"))) if layout.features_dir.is_dir() else 0
    if n_files:
        report.warn(f"{layout.features_dir}: {n_files} feature file(s) ignored: the site declares no histology")


def inspect_site(root: Path | str, config: DataConfig | None = None, *, require_features: bool = True,
                 feature_dim: int | None = None, encoder: str | None = None, patient_column: str = "patient_id",
                 checksums: bool = False, fold: int | None = None, k: int | None = None,
                 slide_problems: str = "error") -> tuple[SiteData | None, Report]:
    """Validate a site folder end to end, collecting every problem instead of stopping at the first.

    Stages: the manifest's modality declaration -> clinical labels -> gene set -> genomics (aligned
    to the clinical patients) -> slides.csv, manifest and feature files (when ``require_features``
    and the site declares histology; a site declaring none must list no slide) -> splits. A stage whose input failed is
    skipped, the others still run. Returns the SiteData (None when an error prevents building it)
    and the report. ``slide_problems``: "error" (site check: an unusable slide that the manifest does
    not explain is an error) or "warn" (training: exclude it and say so).
    """
    if slide_problems not in ("error", "warn"):
        raise ValueError(f"slide_problems {slide_problems!r}: expected 'error' or 'warn'")
    cfg = config or DataConfig()
    layout = SiteLayout(Path(root))
    report = Report()
    if not layout.root.is_dir():
        report.error(f"{layout.root}: site folder not found")
        return None, report

    clinical = geneset = genomics = splits = None
    try:
        modalities = Manifest.load(layout.manifest).modalities
    except ValueError as e:  # not JSON, another manifest version, or a bad declaration
        report.error(str(e))
        modalities = MODALITIES
    has_slides, has_genomics = "histology" in modalities, "genomics" in modalities
    if not has_slides:
        require_features = False  # a site without slides opens no feature file, whatever the model
    try:
        clinical = read_clinical(layout.clinical, patient_column=patient_column)
        report.extend(clinical.report)
    except SiteDataError as e:
        report.absorb(e)
    try:
        geneset = read_geneset(layout.geneset)
    except SiteDataError as e:
        report.absorb(e)
    if not has_genomics:
        # The gene set (the federation's, not patient data) still sizes the placeholder gene vectors.
        tables = [n for n in GENOMICS_NAMES if (layout.root / n).is_file()]
        if tables:
            report.error(f"{layout.root / tables[0]}: a genomic table, but {layout.manifest.name} declares the site's "
                         f"modalities as {list(modalities)} (no genomics); remove it or add 'genomics' to the "
                         "declaration")
    elif geneset is not None:
        try:
            path = find_genomics_file(layout)
            genomics = load_genomics(path, geneset, clinical.patients if clinical is not None else None,
                                     policy=cfg.genomics_policy, log1p_suffixes=cfg.log1p_features,
                                     patient_column=patient_column, clinical_name=layout.clinical.name)
            report.extend(genomics.report)
        except SiteDataError as e:
            report.absorb(e)

    slides: dict[str, list[str]] = {}
    statuses: list[SlideStatus] = []
    schema: dict[str, Any] = {}
    excluded: dict[str, str] = {}
    if not has_slides:
        _check_no_slides(layout, modalities, report)
    elif require_features or layout.slides.is_file():
        try:  # runs even when clinical.csv failed, so one run reports the feature files too
            rows, r = read_slides(layout.slides, clinical.patients if clinical is not None else None)
            report.extend(r)
            try:
                manifest = Manifest.load(layout.manifest)
            except ValueError as e:  # not JSON, or another manifest version
                raise SiteDataError(str(e)) from None
            if require_features:
                statuses, schema, r = check_slides(layout, rows, manifest, feature_dim=feature_dim,
                                                   encoder=encoder, checksums=checksums)
                report.extend(r)
            else:  # genomics-only: no feature file is opened; the declared schema sizes the placeholder bag
                statuses = [SlideStatus(s, p, True) for s, p in rows]
                schema = {k: manifest.schema[k] for k in ("encoder", "feature_dim") if manifest.schema.get(k)}
                if manifest.schema.get("weights_sha256"):
                    schema["encoder_weights"] = str(manifest.schema["weights_sha256"])
            left_out: Counter[str] = Counter()
            for st in statuses:
                if st.ok:
                    slides.setdefault(st.patient_id, []).append(st.slide_id)
                elif st.recorded or slide_problems == "warn":
                    left_out[st.kind or "unusable"] += 1
                else:
                    report.error(f"slide {st.slide_id!r} (patient {st.patient_id!r}): {st.reason}")
            for kind, n in sorted(left_out.items()):
                report.warn(f"{n} slide(s) left out: {kind}")
        except SiteDataError as e:
            report.absorb(e)
        if require_features and clinical is not None:
            has_rows = {st.patient_id for st in statuses}
            for p in clinical.patients:
                if p not in slides:
                    excluded[p] = "no slide in slides.csv" if p not in has_rows else "no usable feature file"
            reasons = Counter(excluded.values())
            for reason, n in sorted(reasons.items()):
                report.warn(f"{n} patient(s) excluded from histology runs: {reason}")

    if clinical is not None:
        try:
            splits = make_splits(clinical, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                 seed=cfg.split_seed, fold=fold, k=k)
        except (SiteDataError, ValueError) as e:
            report.absorb(e if isinstance(e, SiteDataError) else SiteDataError(str(e)))
    if clinical is None or geneset is None or (genomics is None and has_genomics) or splits is None or report.errors:
        return None, report
    site = SiteData(layout=layout, config=cfg, clinical=clinical, geneset=geneset, genomics=genomics,
                    splits=splits, slides={p: tuple(v) for p, v in slides.items()}, slide_status=statuses,
                    feature_schema=schema, excluded=excluded, require_features=require_features, report=report,
                    modalities=modalities)
    if not site.patients("train"):
        report.error(f"{layout.clinical}: no usable training patient (after exclusions)")
        return None, report
    return site, report


# --------------------------------------------------------------------------------------------- #
# the dataset
# --------------------------------------------------------------------------------------------- #
class SiteDataset(torch.utils.data.Dataset):
    """One item per patient, in the dict format of ``client.site.collate.collate_patients``.

    Gene vectors and labels are computed once here (small); patch features are read from the
    feature files on each ``__getitem__`` (large), so a DataLoader's workers share no big arrays.
    Genomics-only runs and sites without slides (``require_features=False``) get a one-patch zero
    placeholder bag and ``has_patches`` False, so no model reads it; sites without genomics get zero
    gene vectors (sized by the gene set) and ``has_genes`` False.
    """

    def __init__(self, site: SiteData, patients: Sequence[str], *, stats: GenomicsStats, bin_edges: np.ndarray,
                 grid_size: int | None = None, epoch: int = 0,
                 patch_norm: tuple[np.ndarray, np.ndarray] | None = None, placeholder_dim: int | None = None) -> None:
        self.site = site
        self.patch_norm = patch_norm
        self.placeholder_dim = placeholder_dim
        self.patient_ids = tuple(patients)
        bad = [p for p in self.patient_ids if p in site.excluded]
        if bad:
            raise ValueError(f"SiteDataset: patient(s) {preview(bad)} are excluded from this site's histology "
                             f"data ({site.excluded[bad[0]]})")
        self.bin_edges = np.asarray(bin_edges, dtype=np.float64)
        self.grid_size = grid_size
        self.epoch = epoch
        cfg = site.config
        self.max_patches, self.seed = cfg.max_patches, cfg.split_seed
        self._pos = site.clinical.positions(self.patient_ids)
        if site.genomics is not None:
            self._tumour, self._micro = site.genomics.encode(self.patient_ids, stats, clip=cfg.clip)
        else:  # placeholder gene vectors (has_genes False: no model reads them)
            gt, ge = site.geneset.input_dims(site.genomics_policy)
            self._tumour = np.zeros((len(self.patient_ids), gt), np.float32)
            self._micro = np.zeros((len(self.patient_ids), ge), np.float32)
        c = site.clinical
        self._bins = assign_bins(np.nan_to_num(c.survival_time, nan=0.0), self.bin_edges)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def set_epoch(self, epoch: int) -> None:
        """Draw a different (still deterministic) patch sample for bags over the cap."""
        self.epoch = int(epoch)

    def labels(self, i: int) -> tuple[dict[str, Any], dict[str, bool]]:
        """(labels, label_mask) of item ``i``; unknown labels are None and masked False."""
        c, p = self.site.clinical, int(self._pos[i])
        d, g, surv = int(c.diagnosis[p]), int(c.grade[p]), bool(c.survival_known[p])
        labels = {"diagnosis": d if d >= 0 else None, "grade": g if g >= 0 else None,
                  "survival_bin": int(self._bins[p]) if surv else None,
                  "survival_time": float(c.survival_time[p]) if surv else None,
                  "event": float(c.event[p]) if surv else None}
        return labels, {"diagnosis": d >= 0, "grade": g >= 0, "survival": surv}

    def bag(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(patches (N, D) float32, coords (N, 2) float32, patch_step) of item ``i``."""
        site, pid = self.site, self.patient_ids[i]
        if not site.require_features:
            dim = self.placeholder_dim or int(site.feature_schema.get("feature_dim", 1))
            return np.zeros((1, dim), np.float32), np.zeros((1, 2), np.float32), 1.0
        feats, coords, steps = [], [], []
        for sid in site.slides[pid]:
            f, xy, attrs = read_features(site.layout.feature_file(sid))
            feats.append(f)
            coords.append(xy)
            steps.append(slide_patch_step(xy, attrs))
        xy, step = concat_slide_coords(coords, steps, self.grid_size)
        x = np.concatenate(feats, axis=0)
        keep = sample_indices(len(x), self.max_patches, self.seed, int(self._pos[i]), self.epoch)
        x = x[keep]
        if self.patch_norm is not None:
            mean, std = self.patch_norm  # (D,) each
            if mean.shape != (x.shape[1],):
                raise ValueError(f"patch standardisation has {mean.shape[0]} dimensions, the features of patient "
                                 f"{pid!r} have {x.shape[1]}")
            x = ((x - mean) / std).astype(np.float32)
        return x, xy[keep].astype(np.float32), step

    def __getitem__(self, i: int) -> dict[str, Any]:
        patches, coords, step = self.bag(i)
        labels, mask = self.labels(i)
        return {"patient_id": self.patient_ids[i], "patches": patches, "coords": coords, "patch_step": step,
                "genes_tumour": self._tumour[i], "genes_micro": self._micro[i], "labels": labels,
                "label_mask": mask, "has_patches": self.site.require_features,
                "has_genes": self.site.genomics is not None}
