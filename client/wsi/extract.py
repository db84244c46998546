"""``smm extract``: whole-slide images -> ``features/<slide_id>.h5`` in a site folder, resumable.

For each slide: record ``running`` in the manifest (an attempt), open it, resolve the resolution,
mask the tissue, lay the patch grid (:mod:`client.wsi.slides`), read the patches in worker processes
while this process encodes the previous batch (:mod:`client.wsi.encoders`), write the feature file
atomically and record ``done`` with its checksum (:mod:`client.site.folder`).

Why it is built this way:

* **A batch never stops for one bad slide.** Unopenable files, corrupt tiles, slides without a
  usable resolution or without tissue are recorded as ``failed`` with a reason code and a short
  message, and the run carries on; the exit status is 1 when any slide failed.
* **A rerun is cheap and safe.** A slide is skipped when its record says ``done`` *and* its file
  still has the recorded checksum and was made with the same encoder and settings. Anything else
  (a ``running`` record left by a crash, a missing or altered file) is redone. Files are written
  under a temporary name and renamed, so a crash never leaves a plausible half-file; temporary
  files a killed run left behind are removed. Failed slides are retried with ``--retry-failed``.
* **One encoder per site.** The manifest's schema holds the encoder id, weights checksum and
  feature width; a run with another encoder is refused (``--force`` switches the site over).
* **No patient data in logs.** Output names slides by their id (the file stem unless a slide list
  gives one) and files by their name, never by their folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.site.folder import Manifest, SiteLayout, write_features
from smm_model.contract.atomic import sha256_file
from client.wsi.slides import (DEFAULT_MIN_TISSUE, DEFAULT_PATCH_SIZE, DEFAULT_TARGET_MPP, READ_TIMEOUT_S,
                     SLIDE_SUFFIXES, TISSUE_METHODS, PatchReader, Slide, SlideError, plan_patches)

if TYPE_CHECKING:  # the encoders pull in torch; the CLI imports them only once the arguments are valid
    from client.wsi.encoders import PatchEncoder

__all__ = ["ExtractConfig", "SlideInput", "SlideOutcome", "RunSummary", "SiteConflict", "RunLock",
           "collect_inputs", "find_slides", "read_slide_list", "dicom_series_warnings", "check_site",
           "skip_reason", "extract_slide", "run_extraction", "build_parser", "main",
           "DEFAULT_ENCODER", "DEFAULT_BATCH_SIZE", "DEFAULT_WORKERS", "INTERNAL_ERROR"]

PROG = "smm extract"
DEFAULT_ENCODER = "resnet50_trunc"
DEFAULT_BATCH_SIZE = 32
#: Reader processes: half the cores (the other half runs the encoder on a CPU-only machine), 1-4.
DEFAULT_WORKERS = max(1, min(4, (os.cpu_count() or 2) // 2))
#: Recorded when a slide fails in a way no slide reason covers (a bug, memory): the run carries on.
INTERNAL_ERROR = "internal_error"
#: Exit statuses: all done / some slide failed / bad usage or site conflict / interrupted (SIGINT).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: A lock file in the output folder keeps two runs from writing the same site at once.
LOCK_NAME = ".extract.lock"
#: Slide ids become file names: no path separators, not hidden, not empty.
_FORBIDDEN_ID_CHARS = set('/\\\0')


class SiteConflict(RuntimeError):
    """The output folder belongs to another encoder or settings, or another run holds its lock."""


# ----------------------------------------------------------------------------------------------
# Settings and inputs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractConfig:
    """Extraction settings. ``step=None`` means non-overlapping (step = patch size)."""

    target_mpp: float = DEFAULT_TARGET_MPP
    mpp_override: float | None = None
    patch_size: int = DEFAULT_PATCH_SIZE
    step: int | None = None
    min_tissue: float = DEFAULT_MIN_TISSUE
    tissue_method: str = "otsu"
    workers: int = DEFAULT_WORKERS
    batch_size: int = DEFAULT_BATCH_SIZE
    read_timeout_s: float = READ_TIMEOUT_S

    def __post_init__(self) -> None:
        checks = [(self.target_mpp > 0, f"--mpp must be > 0; got {self.target_mpp}"),
                  (self.mpp_override is None or self.mpp_override > 0,
                   f"--mpp-override must be > 0; got {self.mpp_override}"),
                  (self.patch_size > 0, f"--patch-size must be > 0; got {self.patch_size}"),
                  (self.step is None or self.step > 0, f"--step must be > 0; got {self.step}"),
                  (0.0 <= self.min_tissue <= 1.0, f"--min-tissue must be in [0, 1]; got {self.min_tissue}"),
                  (self.tissue_method in TISSUE_METHODS,
                   f"--tissue-method must be one of {TISSUE_METHODS}; got {self.tissue_method!r}"),
                  (self.workers >= 0, f"--workers must be >= 0; got {self.workers}"),
                  (self.batch_size > 0, f"--batch-size must be > 0; got {self.batch_size}"),
                  (self.read_timeout_s > 0, f"--read-timeout must be > 0; got {self.read_timeout_s}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def step_px(self) -> int:
        return self.patch_size if self.step is None else int(self.step)

    def params(self) -> dict[str, Any]:
        """Settings that change the features: a done slide made with others is redone.

        ``mpp_override`` is not among them: it only applies to slides without a usable resolution,
        so adding it to rescue those must not redo the others.
        """
        return {"mpp": float(self.target_mpp), "patch_size": int(self.patch_size), "step": self.step_px,
                "min_tissue": float(self.min_tissue), "tissue_method": self.tissue_method}


@dataclass(frozen=True)
class SlideInput:
    path: Path
    slide_id: str


def _check_slide_id(slide_id: str, where: str) -> str:
    if not slide_id or slide_id.startswith(".") or set(slide_id) & _FORBIDDEN_ID_CHARS:
        raise ValueError(f"{where}: slide id {slide_id!r} cannot be a file name (expected a non-empty "
                         "name without '/', '\\' or a leading '.')")
    return slide_id


def find_slides(folder: Path) -> list[Path]:
    """Slide files under ``folder`` (recursive), by suffix (:data:`client.wsi.slides.SLIDE_SUFFIXES`), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                  and not p.name.startswith("."))


def read_slide_list(csv_path: Path) -> list[SlideInput]:
    """A CSV with a ``path`` column (relative paths are relative to the CSV) and optional ``slide_id``."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in cols:
                raise ValueError(f"{csv_path}: expected a 'path' column (and optionally 'slide_id'); "
                                 f"found {cols or 'no header'}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as e:
        raise ValueError(f"{csv_path}: cannot read the slide list ({e.strerror})") from None
    out = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        if not row.get("path"):
            raise ValueError(f"{csv_path}, line {i}: empty 'path'")
        p = Path(row["path"])
        p = p if p.is_absolute() else (csv_path.parent / p)
        sid = row.get("slide_id") or p.stem
        out.append(SlideInput(p, _check_slide_id(sid, f"{csv_path}, line {i}")))
    return out


def collect_inputs(items: Sequence[str | os.PathLike]) -> list[SlideInput]:
    """Slide files, folders (searched recursively) and ``.csv`` slide lists -> unique slide ids.

    Raises ``ValueError`` for a path that does not exist, an empty folder or a duplicated slide id
    (two files with the same stem would overwrite each other's features).
    """
    found: list[SlideInput] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            slides = find_slides(p)
            if not slides:
                raise ValueError(f"{p}: no slide files found (looked for {', '.join(SLIDE_SUFFIXES)})")
            found += [SlideInput(s, _check_slide_id(s.stem, str(s))) for s in slides]
        elif p.suffix.lower() == ".csv":
            found += read_slide_list(p)
        elif p.exists():
            found.append(SlideInput(p, _check_slide_id(p.stem, str(p))))
        else:
            raise ValueError(f"{p}: no such file or folder")
    dup = [sid for sid, n in Counter(s.slide_id for s in found).items() if n > 1]
    if dup:
        raise ValueError(f"duplicate slide ids {sorted(dup)[:5]}: two inputs would write the same "
                         "features/<slide_id>.h5; give unique ids in a slide list (slide_id column)")
    return found


def dicom_series_warnings(inputs: Sequence[SlideInput]) -> list[str]:
    """Folders holding several ``.dcm`` inputs: OpenSlide opens a whole DICOM series from any one of
    its instance files, so one series listed file by file is extracted once per file."""
    per_dir = Counter(s.path.parent for s in inputs if s.path.suffix.lower() == ".dcm")
    return [f"{n} DICOM files in folder {d.name!r} are extracted as {n} slides; if they are instances of "
            "one series, list one file per series in a slide list (.csv)" for d, n in per_dir.items() if n > 1]


# ----------------------------------------------------------------------------------------------
# Site state: lock, schema, skip decisions
# ----------------------------------------------------------------------------------------------

class RunLock:
    """``<out>/.extract.lock`` holding pid and host; a lock left by a dead process on this host is taken over."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self._held = False

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and not _pid_alive(int(other.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise SiteConflict(f"{self.path}: another `smm extract` (pid {other.get('pid')} on "
                                   f"{other.get('host')}, since {other.get('started')}) is writing this "
                                   "folder; wait for it, or delete the lock file if that run is dead") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise SiteConflict(f"{self.path}: could not take the lock")

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_site(manifest: Manifest, schema: dict[str, Any], params: dict[str, Any], force: bool) -> list[str]:
    """Refuse to mix encoders or settings in one site folder; returns warnings (with ``force``).

    The schema (encoder id, weights checksum, feature width) is what the server compares across
    sites; settings (mpp, patch size, step, tissue filter) are compared with the slides already
    done, because bags of patches at different magnifications are not one dataset.
    """
    old = {k: manifest.schema.get(k) for k in schema if manifest.schema.get(k) is not None}
    warnings: list[str] = []
    diff = {k: (old[k], schema[k]) for k in old if old[k] != schema[k]}
    if diff:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        if not force:
            raise SiteConflict(f"{manifest.path}: this site's features were made with another encoder ({what}); "
                               "a site holds one encoder's features. Use another --out, or --force to switch "
                               "the site to this encoder (its slides are then re-extracted when listed)")
        warnings.append(f"switching the site schema ({what})")
    done = {sid: r for sid, r in manifest.slides.items() if r.get("status") == "done"}
    stale_params = sorted(sid for sid, r in done.items() if r.get("params") not in (None, params))
    if stale_params and not force:
        example = done[stale_params[0]].get("params")
        raise SiteConflict(f"{manifest.path}: {len(stale_params)} slide(s) were extracted with other settings "
                           f"({example}) than this run ({params}); use the same settings, another --out, or "
                           "--force to re-extract the listed slides with the new ones")
    stale_enc = sorted(sid for sid, r in done.items()
                       if diff and (r.get("encoder"), r.get("weights_sha256")) !=
                       (schema.get("encoder"), schema.get("weights_sha256")))
    stale = sorted(set(stale_params) | set(stale_enc))
    if stale:
        warnings.append(f"{len(stale)} done slide(s) were made with the previous encoder or settings; they "
                        "are redone when listed in this run, others stay stale until re-extracted")
    return warnings


def skip_reason(record: dict | None, feature_file: Path, schema: dict[str, Any], params: dict[str, Any],
                retry_failed: bool) -> tuple[bool, str]:
    """Whether a slide can be skipped, and why (or why it is (re)done)."""
    if record is None:
        return False, "new"
    status = record.get("status")
    if status == "failed":
        return (False, "retrying a failed slide") if retry_failed else (True, "failed earlier")
    if status != "done":
        return False, f"left {status!r} by an interrupted run"
    if not feature_file.is_file():
        return False, "feature file missing"
    if (record.get("encoder"), record.get("weights_sha256")) != (schema["encoder"], schema["weights_sha256"]):
        return False, "made with another encoder"
    if record.get("params") != params:
        return False, "made with other settings"
    if sha256_file(feature_file) != record.get("checksum"):
        return False, "feature file changed since it was written (checksum mismatch)"
    return True, "done"


def _remove_temp_files(layout: SiteLayout, slide_id: str | None = None) -> int:
    """Delete temporary files a killed run left (``atomic_path`` cleans up only when it can)."""
    pattern = f".{slide_id}.h5.*.tmp" if slide_id else ".*.h5.*.tmp"
    n = 0
    if layout.features_dir.is_dir():
        for p in layout.features_dir.glob(pattern):
            p.unlink(missing_ok=True)
            n += 1
    return n


# ----------------------------------------------------------------------------------------------
# One slide
# ----------------------------------------------------------------------------------------------

@dataclass
class SlideOutcome:
    slide_id: str
    status: str                      # done | failed | skipped | skipped_failed
    reason: str | None = None
    message: str | None = None
    n_patches: int = 0
    seconds: float = 0.0
    read_wait_s: float = 0.0         # time the encoder waited for patches (0: reading fully hidden)
    encode_s: float = 0.0


def extract_slide(inp: SlideInput, encoder: "PatchEncoder", cfg: ExtractConfig, layout: SiteLayout,
                  progress: Any = None) -> tuple[str, dict[str, Any], SlideOutcome]:
    """Extract one slide; returns (checksum, h5 attrs, outcome). Raises :class:`SlideError`.

    ``encoder`` is a :class:`client.wsi.encoders.PatchEncoder` (anything with ``encode``,
    ``encoder_id``, ``weights_sha256``, ``feature_dim``). ``progress`` (a tqdm bar) is advanced
    by patches.
    """
    t0 = time.perf_counter()
    with Slide(inp.path) as slide:
        plan = plan_patches(slide, cfg.target_mpp, cfg.patch_size, cfg.step, cfg.min_tissue,
                            cfg.mpp_override, cfg.tissue_method)  # type: ignore[arg-type]
        level_dims = slide.level_dimensions
    res = plan.resolution
    feats = np.empty((plan.n_patches, encoder.feature_dim), dtype=np.float32)
    encode_s = 0.0
    if progress is not None:
        progress.reset(total=plan.n_patches)
        progress.set_description(inp.slide_id[:24])
    with PatchReader(inp.path, plan.coords, res, chunk_size=cfg.batch_size, workers=cfg.workers,
                     timeout_s=cfg.read_timeout_s) as reader:
        for start, patches in reader:
            te = time.perf_counter()
            feats[start:start + len(patches)] = encoder.encode(patches)
            encode_s += time.perf_counter() - te
            if progress is not None:
                progress.update(len(patches))
        wait_s = reader.wait_s
    attrs: dict[str, Any] = {
        # the contract (sitefs.FEATURE_ATTRS, CLAM-compatible)
        "encoder": encoder.encoder_id, "weights_sha256": encoder.weights_sha256,
        "feature_dim": int(encoder.feature_dim), "patch_size": res.patch_size, "mpp": res.target_mpp,
        "level": res.level,
        # how the patches were read, to map them back onto the slide and audit the run
        "slide_id": inp.slide_id, "source_name": inp.path.name, "downsample": res.level_downsample,
        "target_downsample": res.target_downsample, "read_size": res.read_size,
        "patch_size_level0": res.patch_size_level0, "step": plan.step, "slide_mpp": res.slide_mpp,
        "mpp_source": res.mpp_source,
        "level_dimensions": json.dumps([list(d) for d in level_dims]),  # scalar attrs only (sitefs reads .item())
        "tissue_method": plan.mask.method, "tissue_threshold": plan.mask.threshold,
        "tissue_mask_mpp": plan.mask.mpp, "min_tissue": plan.min_tissue,
        "n_candidates": plan.n_candidates,
    }
    checksum = write_features(layout.feature_file(inp.slide_id), feats, plan.coords, **attrs)
    outcome = SlideOutcome(inp.slide_id, "done", n_patches=plan.n_patches,
                           seconds=time.perf_counter() - t0, read_wait_s=wait_s, encode_s=encode_s)
    return checksum, attrs, outcome


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

@dataclass
class RunSummary:
    outcomes: list[SlideOutcome] = field(default_factory=list)
    not_processed: int = 0           # beyond --limit
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)

    def count(self, *statuses: str) -> int:
        return sum(o.status in statuses for o in self.outcomes)

    @property
    def any_failed(self) -> bool:
        return self.count("failed", "skipped_failed") > 0

    def line(self, manifest_path: Path) -> str:
        n_patches = sum(o.n_patches for o in self.outcomes if o.status == "done")
        secs = sum(o.seconds for o in self.outcomes if o.status == "done")
        reasons = Counter(o.reason for o in self.outcomes if o.status in ("failed", "skipped_failed"))
        parts = [f"{len(self.outcomes)} slide(s): {self.count('done')} extracted, "
                 f"{self.count('skipped')} already done, {self.count('failed', 'skipped_failed')} failed"]
        if reasons:
            parts[-1] += " (" + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) + ")"
        if self.count("skipped_failed"):
            parts.append(f"{self.count('skipped_failed')} failed earlier, not retried (--retry-failed)")
        if self.not_processed:
            parts.append(f"{self.not_processed} not processed (--limit)")
        if n_patches:
            parts.append(f"{n_patches} patches in {secs:.1f} s ({n_patches / max(secs, 1e-9):.1f} patches/s)")
        if self.interrupted:
            parts.append("INTERRUPTED")
        return f"{PROG}: " + "; ".join(parts) + f" -> {manifest_path}"


def run_extraction(inputs: Sequence[SlideInput], out: Path, encoder: "PatchEncoder", cfg: ExtractConfig, *,
                   retry_failed: bool = False, force: bool = False, limit: int | None = None,
                   show_progress: bool | None = None) -> RunSummary:
    """Extract ``inputs`` into the site folder ``out``; see the module docstring for the rules.

    Raises :class:`SiteConflict` (another encoder/settings, or the folder is locked) and lets
    ``client.wsi.encoders.EncoderError`` through (not a slide's fault: the whole run is wrong).
    ``KeyboardInterrupt`` stops the run with the current slide left ``running`` (redone next time).
    """
    from tqdm import tqdm

    from client.wsi.encoders import EncoderError

    def say(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)  # keeps the progress bars intact

    layout = SiteLayout(Path(out))
    schema = {"encoder": encoder.encoder_id, "weights_sha256": encoder.weights_sha256,
              "feature_dim": int(encoder.feature_dim)}
    params = cfg.params()
    summary = RunSummary()
    with RunLock(layout.root):
        manifest = Manifest.load(layout.manifest)
        summary.warnings = check_site(manifest, schema, params, force)
        for w in summary.warnings:
            say(f"{PROG}: warning: {w}")
        manifest.schema.update(schema)
        manifest.save()
        _remove_temp_files(layout)
        todo: list[tuple[SlideInput, str]] = []
        for inp in inputs:
            rec = manifest.slides.get(inp.slide_id)
            skip, why = skip_reason(rec, layout.feature_file(inp.slide_id), schema, params, retry_failed)
            if skip and why == "done":
                summary.outcomes.append(SlideOutcome(inp.slide_id, "skipped", n_patches=int(rec.get("n_patches") or 0)))
            elif skip:
                summary.outcomes.append(SlideOutcome(inp.slide_id, "skipped_failed", reason=rec.get("reason"),
                                                     message=rec.get("message")))
            else:
                todo.append((inp, why))
        if limit is not None and len(todo) > limit:
            summary.not_processed = len(todo) - limit
            todo = todo[:limit]
        disable = (not show_progress) if show_progress is not None else None
        slide_bar = tqdm(total=len(todo), unit="slide", desc="slides", disable=disable, position=0)
        patch_bar = tqdm(total=0, unit="patch", disable=disable, position=1, leave=False)
        current: SlideInput | None = None
        try:
            for inp, why in todo:
                current = inp
                manifest.record(inp.slide_id, "running", source_name=inp.path.name, note=why)
                manifest.save()
                _remove_temp_files(layout, inp.slide_id)
                try:
                    checksum, attrs, outcome = extract_slide(inp, encoder, cfg, layout, patch_bar)
                except EncoderError:
                    raise  # not this slide's fault: the run stops, the slide stays 'running'
                except Exception as e:  # noqa: BLE001 - a batch records the failure and carries on
                    reason = e.reason if isinstance(e, SlideError) else INTERNAL_ERROR
                    message = (e.message if isinstance(e, SlideError) else
                               f"{type(e).__name__}: {e}".replace(str(inp.path.parent) + os.sep, ""))
                    manifest.record(inp.slide_id, "failed", reason=reason, message=message, checksum=None,
                                    n_patches=None, note=None, encoder=None, weights_sha256=None,
                                    params=None)
                    manifest.save()
                    layout.feature_file(inp.slide_id).unlink(missing_ok=True)  # no file without a done record
                    summary.outcomes.append(SlideOutcome(inp.slide_id, "failed", reason, message))
                    say(f"{PROG}: {inp.slide_id}: failed ({reason}): {message}")
                else:
                    manifest.record(inp.slide_id, "done", checksum=checksum, n_patches=outcome.n_patches,
                                    encoder=schema["encoder"], weights_sha256=schema["weights_sha256"],
                                    feature_dim=schema["feature_dim"], params=params, message=None, note=None,
                                    level=attrs["level"], slide_mpp=attrs["slide_mpp"],
                                    mpp_source=attrs["mpp_source"], seconds=round(outcome.seconds, 3))
                    manifest.save()
                    summary.outcomes.append(outcome)
                    slide_bar.set_postfix_str(f"{outcome.n_patches / max(outcome.seconds, 1e-9):.1f} patches/s")
                current = None
                slide_bar.update(1)
        except KeyboardInterrupt:
            summary.interrupted = True
            if current is not None:
                say(f"{PROG}: interrupted during {current.slide_id}; it stays 'running' and is redone next time")
        finally:
            patch_bar.close()
            slide_bar.close()
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Whole-slide images -> patch features in a site folder:\n"
                    "  OUT/features/<slide_id>.h5  datasets features (N, D) and coords (N, 2: level-0 x, y)\n"
                    "  OUT/manifest.json           per-slide status and checksums; the site's encoder schema\n"
                    "Resumable: a rerun skips slides already done and redoes partial ones.",
        epilog="examples:\n"
               f"  {PROG} /data/slides --out /data/site --weights resnet50.pth\n"
               f"  {PROG} slides.csv --out site --encoder timm:vit_large_patch16_224 --weights uni.bin\n"
               f"  {PROG} a.svs b.ndpi --out /tmp/t --random-weights --workers 2   # plumbing test\n\n"
               "inputs: slide files; folders, searched recursively for\n"
               f"  {' '.join(SLIDE_SUFFIXES)};\n"
               "  or a .csv with a 'path' column (relative to the CSV) and an optional 'slide_id' column\n"
               "  (default slide id: the file name without its suffix).\n\n"
               "failure reasons recorded per slide: unsupported_format, open_error, read_error,\n"
               f"  no_resolution, no_tissue, too_small ({INTERNAL_ERROR} for anything unexpected).\n"
               "exit status: 0 all slides done; 1 some slide failed (the others finished);\n"
               "  2 bad arguments, encoder or site conflict; 130 interrupted.")
    ap.add_argument("inputs", nargs="+", metavar="SLIDE_OR_DIR", help="slide files, folders or .csv slide lists")
    ap.add_argument("--out", required=True, type=Path, metavar="DIR", help="site folder to write into")
    enc = ap.add_argument_group("encoder")
    enc.add_argument("--encoder", default=DEFAULT_ENCODER, metavar="NAME",
                     help="resnet50_trunc (default; CLAM's ResNet-50 to layer3, 1024-d), timm:<architecture>, "
                          "torchscript:<file> (or a .pt/.ts/.torchscript path), or null (no network: read-throughput tests)")
    w = enc.add_mutually_exclusive_group()
    w.add_argument("--weights", type=Path, metavar="FILE",
                   help="state dict file of the encoder (nothing is downloaded); its sha256 is recorded")
    w.add_argument("--random-weights", action="store_true",
                   help="run with random weights on purpose (tests, benchmarks): meaningless features")
    enc.add_argument("--device", default="auto", metavar="D",
                     help="auto (GPU if present), cpu, cuda, cuda:N (default auto)")
    enc.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                     help=f"patches per encoder batch and per read chunk (default {DEFAULT_BATCH_SIZE})")
    pat = ap.add_argument_group("patches")
    pat.add_argument("--mpp", type=float, default=DEFAULT_TARGET_MPP, metavar="F",
                     help=f"target resolution in µm per pixel (default {DEFAULT_TARGET_MPP}, about 20x)")
    pat.add_argument("--mpp-override", type=float, metavar="F",
                     help="µm per pixel of slides whose files carry no usable mpp or objective power "
                          "(metadata wins when present)")
    pat.add_argument("--patch-size", type=int, default=DEFAULT_PATCH_SIZE, metavar="N",
                     help=f"patch side in pixels at the target resolution (default {DEFAULT_PATCH_SIZE})")
    pat.add_argument("--step", type=int, metavar="N",
                     help="grid step in target pixels (default: patch size, no overlap)")
    pat.add_argument("--min-tissue", type=float, default=DEFAULT_MIN_TISSUE, metavar="F",
                     help=f"keep patches at least this fraction tissue (default {DEFAULT_MIN_TISSUE})")
    pat.add_argument("--tissue-method", choices=TISSUE_METHODS, default="otsu",
                     help="tissue mask: Otsu on saturation (default) or a fixed saturation threshold")
    run = ap.add_argument_group("run")
    run.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                     help=f"reader processes, each with its own slide handle; 0 reads in the main process "
                          f"(default {DEFAULT_WORKERS})")
    run.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S, metavar="S",
                     help=f"give up on a slide when one read chunk takes longer (default {READ_TIMEOUT_S:g} s)")
    run.add_argument("--limit", type=int, metavar="N", help="process at most N slides (skipped ones do not count)")
    run.add_argument("--retry-failed", action="store_true", help="retry slides recorded as failed")
    run.add_argument("--force", action="store_true",
                     help="write into a site made with another encoder or settings (switches the site schema)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``smm extract``; returns the exit status."""
    args = build_parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"{PROG}: {msg}", file=sys.stderr)
        return EXIT_USAGE

    if args.limit is not None and args.limit < 0:
        return fail(f"--limit must be >= 0; got {args.limit}")
    try:
        cfg = ExtractConfig(target_mpp=args.mpp, mpp_override=args.mpp_override, patch_size=args.patch_size,
                            step=args.step, min_tissue=args.min_tissue, tissue_method=args.tissue_method,
                            workers=args.workers, batch_size=args.batch_size, read_timeout_s=args.read_timeout)
        inputs = collect_inputs(args.inputs)
    except ValueError as e:
        return fail(str(e))
    for w in dicom_series_warnings(inputs):
        print(f"{PROG}: warning: {w}", file=sys.stderr)

    from client.wsi.encoders import EncoderError, build_encoder

    try:
        encoder = build_encoder(args.encoder, weights=args.weights, random_weights=args.random_weights,
                                device=args.device)
    except EncoderError as e:
        return fail(str(e))
    if encoder.is_null:
        print(f"{PROG}: warning: the null encoder makes throughput-test features, not a site a server accepts",
              file=sys.stderr)
    try:
        summary = run_extraction(inputs, args.out, encoder, cfg, retry_failed=args.retry_failed,
                                 force=args.force, limit=args.limit,
                                 show_progress=False if args.no_progress else None)
    except SiteConflict as e:
        return fail(str(e))
    except EncoderError as e:
        return fail(f"encoder failed, run stopped (the current slide is redone next time): {e}")
    except ValueError as e:  # an unreadable manifest
        return fail(str(e))
    print(summary.line(SiteLayout(args.out).manifest), file=sys.stderr)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.any_failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
