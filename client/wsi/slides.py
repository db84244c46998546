"""Whole-slide images through OpenSlide: open, resolve the resolution, mask tissue, lay the patch grid.

This is the first half of ``smm extract`` (slides -> coordinates); the encoder and the feature files
live in :mod:`client.wsi.encoders` and :mod:`client.wsi.extract`. Everything here works in two pixel spaces:

* **level 0**: the slide's full-resolution pixels. Every coordinate that leaves this module is a
  level-0 ``(x, y)`` of a patch's top-left corner (the CLAM/TRIDENT convention), so a feature file
  can be mapped back onto the slide whatever level was read.
* **target**: pixels at the requested microns per pixel (``target_mpp``, 0.5 µm/px ~ 20x by
  default). Patch size and step are given here, because an encoder is trained at a magnification,
  not at a pyramid level.

Failures are :class:`SlideError` with a machine-readable ``reason`` (one of :data:`REASONS`) so a
batch job can record them per slide and carry on. OpenSlide's errors are *sticky*: after one failed
read every later call on that handle fails too, so :class:`Slide` closes the handle at the first
error and refuses to be used again.

Example
-------
>>> with Slide("slide.svs") as slide:                                    # doctest: +SKIP
...     plan = plan_patches(slide, target_mpp=0.5, patch_size=224)
...     patches = read_patches(slide, plan.coords[:8], plan.resolution)  # (8, 224, 224, 3) uint8
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "REASONS", "SLIDE_SUFFIXES", "DEFAULT_TARGET_MPP", "DEFAULT_PATCH_SIZE", "DEFAULT_MIN_TISSUE",
    "SlideError", "Slide", "Resolution", "TissueMask", "PatchPlan", "PatchReader",
    "slide_mpp_from_properties", "choose_level", "resolve_resolution", "otsu_threshold",
    "segment_tissue", "compute_tissue_mask", "patch_grid", "plan_patches", "read_patches",
    "rgba_to_rgb", "write_pyramidal_tiff", "aperio_description", "synthetic_tissue_image",
]

# ----------------------------------------------------------------------------------------------
# Constants (named here so that nothing deep in the code carries a magic number)
# ----------------------------------------------------------------------------------------------

#: Failure reasons recorded per slide. ``too_small``: no whole patch fits in the slide.
REASONS = ("unsupported_format", "open_error", "read_error", "no_tissue", "no_resolution", "too_small")
Reason = Literal["unsupported_format", "open_error", "read_error", "no_tissue", "no_resolution", "too_small"]

#: File suffixes OpenSlide reads (lower case); used when a folder is given as input.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".dcm", ".bif", ".vms", ".svslide")

DEFAULT_TARGET_MPP = 0.5       # µm/px, "20x": the resolution most public patch encoders were trained at
DEFAULT_PATCH_SIZE = 224       # px at the target resolution (CLAM/UNI/CONCH input size)
DEFAULT_MIN_TISSUE = 0.25      # keep a patch when at least this fraction of it is tissue

#: Scanner mpp outside this range is not a microscope resolution. It is a bogus TIFF resolution
#: (OpenSlide's boxes.tiff reports 352.78) or a unit mix-up, and trusting it would pick a wrong level.
MPP_PLAUSIBLE_RANGE = (0.05, 20.0)
#: mpp ~ 10 / objective power (20x -> 0.5 µm/px, 40x -> 0.25): the convention of Aperio scanners
#: and of CLAM/TRIDENT when a slide carries a magnification but no mpp.
MPP_TIMES_OBJECTIVE = 10.0
#: A level counts as "not coarser than the target" up to this relative slack, because scanners
#: store downsamples such as 2.0005 or 4.016 for what is meant to be 2 and 4.
LEVEL_DOWNSAMPLE_RTOL = 0.01

#: Tissue masks are computed at about this resolution (µm per mask pixel): coarse enough to read a
#: whole slide in well under a second, fine enough for 100 µm patches ...
MASK_MPP = 8.0
#: ... but never coarser than this many mask pixels across one patch, so small patches still get a
#: meaningful tissue fraction.
MIN_MASK_PX_PER_PATCH = 8
#: The mask level is read in square tiles of at most this many level pixels (16 MiB of RGBA), so
#: memory stays bounded even for a single-level (non-pyramidal) slide of 100k x 100k pixels.
MASK_READ_TILE_PX = 2048

TissueMethod = Literal["otsu", "saturation"]
TISSUE_METHODS = ("otsu", "saturation")
#: Median filter on the saturation channel before thresholding (mask pixels): removes JPEG noise
#: and isolated dust specks, as CLAM does.
SATURATION_MEDIAN_PX = 5
#: Fixed saturation threshold (0-255) of the "saturation" method; glass is below ~15, eosin above ~40.
SATURATION_THRESHOLD = 20
#: The Otsu threshold on saturation is clipped to this range: below it, an almost empty slide would
#: call glass noise "tissue"; above it, a slide that is all tissue would be split into pale and dark
#: tissue and lose the pale eosin half.
OTSU_THRESHOLD_RANGE = (15, 40)
#: Pixels darker than this value (HSV V, 0-255) are not tissue: black scanner borders, pen, folds.
MIN_TISSUE_VALUE = 30
#: Morphological clean-up radii (µm): closing joins fragmented tissue, opening drops specks.
CLOSING_RADIUS_UM = 24.0
OPENING_RADIUS_UM = 8.0
#: Tissue pieces smaller than this area are removed (µm^2; 10,000 µm^2 = 0.01 mm^2, less than one
#: 224 px patch at 0.5 µm/px, so no piece that could fill a patch is lost).
MIN_TISSUE_AREA_UM2 = 10_000.0
#: Holes inside tissue smaller than this are filled (µm^2): nuclei-free gaps and small lumens are
#: part of the tissue; large holes (fat, big vessels, tears) stay background.
MAX_HOLE_AREA_UM2 = 50_000.0

#: Colour that transparent pixels (outside the scanned area) are composited onto.
BACKGROUND_RGB = (255, 255, 255)
#: Resampling filter when the read size differs from the patch size (Pillow's resize is
#: anti-aliased when shrinking).
RESAMPLE = Image.Resampling.BILINEAR

#: Parallel reading: chunks in flight per worker (bounds memory while keeping workers busy) and
#: the longest wait for one chunk before the slide is declared unreadable (a hung decoder).
PREFETCH_CHUNKS_PER_WORKER = 2
READ_TIMEOUT_S = 300.0
#: How reader workers start. ``forkserver``: each worker forks from a small server process that
#: never imported torch (forking the main process after torch has started its thread pools is what
#: Python 3.14 stopped doing by default). Like ``spawn``, it re-imports the caller's ``__main__``
#: module in every worker, so scripts should keep heavy imports inside functions.
READER_START_METHOD = "forkserver"


# ----------------------------------------------------------------------------------------------
# Errors and the slide handle
# ----------------------------------------------------------------------------------------------

class SlideError(Exception):
    """A slide that cannot be processed; ``reason`` is one of :data:`REASONS`.

    The message names the file by its name only (never the full path), because a site's folder
    names may carry patient information and these messages end up in logs and manifests.
    """

    def __init__(self, reason: str, message: str, path: str | os.PathLike | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown slide failure reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.message = message
        self.path = None if path is None else str(path)
        name = Path(path).name if path is not None else None
        super().__init__(f"{name}: {message}" if name else message)

    def __reduce__(self) -> tuple:  # picklable across worker processes despite the custom __init__
        return (SlideError, (self.reason, self.message, self.path))


class Slide:
    """One OpenSlide handle, closed at the first error and never reused afterwards.

    Opening raises :class:`SlideError` with reason ``unsupported_format`` (OpenSlide does not know
    the file: not a slide, or a plain non-tiled image) or ``open_error`` (a slide format with a
    broken header, a missing file). Reads raise ``read_error``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import openslide

        self.path = Path(path)
        self.name = self.path.name
        self._error: SlideError | None = None
        if not self.path.exists():
            raise SlideError("open_error", "file not found", self.path)
        try:
            self._osr: Any = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as e:  # subclass of OpenSlideError: first
            raise SlideError("unsupported_format",
                             f"not a whole-slide image OpenSlide can read ({e}); expected one of "
                             f"{', '.join(SLIDE_SUFFIXES)} as a tiled, pyramidal file", self.path) from None
        except (openslide.OpenSlideError, OSError) as e:
            raise SlideError("open_error", f"OpenSlide could not open it: {e}", self.path) from None

    # -- metadata ---------------------------------------------------------------------------
    def _handle(self) -> Any:
        if self._error is not None:
            raise SlideError("read_error", f"handle closed after an earlier error ({self._error.message})",
                             self.path)
        if self._osr is None:
            raise SlideError("read_error", "slide handle is closed", self.path)
        return self._osr

    @property
    def properties(self) -> Mapping[str, str]:
        return self._handle().properties

    @property
    def level_count(self) -> int:
        return int(self._handle().level_count)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return tuple(self._handle().dimensions)  # type: ignore[return-value]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._handle().level_dimensions)  # type: ignore[misc]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._handle().level_downsamples)

    # -- pixels -----------------------------------------------------------------------------
    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` (w, h) pixels at ``level`` from level-0 ``location`` as (h, w, 3) uint8 RGB.

        OpenSlide returns an all-zero image with no error for a level that does not exist, so the
        level is checked here. Transparent pixels (outside the scanned area) become white.
        """
        return np.asarray(self.read_rgb_image(location, level, size))

    def read_rgb_image(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """:meth:`read_rgb` as a PIL image (saves a copy when it is resized next)."""
        import openslide

        osr = self._handle()
        if not 0 <= level < osr.level_count:
            raise ValueError(f"{self.name}: level {level} does not exist (the slide has "
                             f"{osr.level_count} level(s))")
        try:
            region = osr.read_region((int(location[0]), int(location[1])), level,
                                     (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as e:
            self._error = SlideError("read_error", f"OpenSlide read failed: {e}", self.path)
            self.close()
            raise self._error from None
        # Fast path in C for the usual fully opaque patch; composite over white only at the edges.
        if region.getchannel("A").getextrema()[0] == 255:
            return region.convert("RGB")
        return Image.fromarray(rgba_to_rgb(np.asarray(region)))

    def thumbnail(self, max_side: int) -> Image.Image:
        """The whole slide as an RGB image whose longer side is at most ``max_side`` pixels
        (OpenSlide's ``get_thumbnail``: read from the best pyramid level, aspect ratio kept)."""
        import openslide

        if max_side < 1:
            raise ValueError(f"{self.name}: thumbnail size must be >= 1 pixel, got {max_side}")
        osr = self._handle()
        try:
            thumb = osr.get_thumbnail((int(max_side), int(max_side)))
        except openslide.OpenSlideError as e:
            self._error = SlideError("read_error", f"OpenSlide thumbnail failed: {e}", self.path)
            self.close()
            raise self._error from None
        return thumb.convert("RGB")

    def close(self) -> None:
        """Close the handle (idempotent). A handle is never reopened: make a new :class:`Slide`."""
        osr, self._osr = getattr(self, "_osr", None), None
        if osr is not None:
            try:
                osr.close()
            except Exception:  # closing a handle in error state may itself complain; it is gone anyway
                pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.name!r})"


def rgba_to_rgb(rgba: np.ndarray, background: tuple[int, int, int] = BACKGROUND_RGB) -> np.ndarray:
    """Composite OpenSlide's (non-premultiplied) RGBA over ``background``; returns uint8 RGB."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    return ((rgb.astype(np.uint16) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Resolution: which level to read, and how many pixels, for a target mpp
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resolution:
    """How one patch at the target resolution is read from the pyramid.

    ``target_downsample`` is level-0 pixels per target pixel (target_mpp / slide_mpp); the patch
    covers ``patch_size * target_downsample`` level-0 pixels and is read as ``read_size`` pixels
    at ``level`` (whose downsample is the largest not exceeding the target's), then resized to
    ``patch_size``.
    """

    slide_mpp: float
    mpp_source: Literal["metadata", "objective", "override"]
    target_mpp: float
    patch_size: int
    level: int
    level_downsample: float
    target_downsample: float
    read_size: int

    @property
    def patch_size_level0(self) -> int:
        """Side of one patch in level-0 pixels (TRIDENT's ``patch_size_level0``)."""
        return int(round(self.patch_size * self.target_downsample))


def _as_float(value: str | None) -> float | None:
    try:
        x = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return x if x is not None and math.isfinite(x) else None


def slide_mpp_from_properties(properties: Mapping[str, str], mpp_override: float | None = None
                              ) -> tuple[float, Literal["metadata", "objective", "override"]]:
    """The slide's level-0 µm/px and where it came from.

    Order: ``openslide.mpp-x`` (mean with ``mpp-y`` when both are plausible) if inside
    :data:`MPP_PLAUSIBLE_RANGE`; else ``openslide.objective-power`` (mpp = 10 / power); else
    ``mpp_override``, which is the site's statement for slides whose files carry no usable
    resolution. Raises ``SlideError('no_resolution')`` when none applies.
    """
    lo, hi = MPP_PLAUSIBLE_RANGE
    mx = _as_float(properties.get("openslide.mpp-x"))
    my = _as_float(properties.get("openslide.mpp-y"))
    plausible = [m for m in (mx, my) if m is not None and lo <= m <= hi]
    if mx is not None and mx in plausible:
        return (float(np.mean(plausible)), "metadata")
    power = _as_float(properties.get("openslide.objective-power"))
    if power is not None and power > 0 and lo <= MPP_TIMES_OBJECTIVE / power <= hi:
        return (MPP_TIMES_OBJECTIVE / power, "objective")
    if mpp_override is not None:
        if not lo <= mpp_override <= hi:
            raise ValueError(f"mpp override {mpp_override} µm/px is outside the plausible range "
                             f"[{lo}, {hi}]")
        return (float(mpp_override), "override")
    found = f"mpp-x={properties.get('openslide.mpp-x')!r}" if mx is not None else "no mpp"
    raise SlideError("no_resolution",
                     f"no usable resolution: {found} (plausible range {lo}-{hi} µm/px), no objective "
                     "power; pass --mpp-override with the scanner's µm per pixel")


def choose_level(level_downsamples: Sequence[float], target_downsample: float,
                 rtol: float = LEVEL_DOWNSAMPLE_RTOL) -> int:
    """Index of the level with the largest downsample not exceeding ``target_downsample``.

    Reading a finer level and shrinking keeps every detail; reading a coarser one and enlarging
    would invent pixels. ``rtol`` absorbs scanners' 2.0005-style downsamples. Level 0 when the
    target is finer than the slide (upsampling cannot be avoided then).
    """
    best = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= target_downsample * (1.0 + rtol) and ds >= level_downsamples[best]:
            best = i
    return best


def resolve_resolution(slide: Slide, target_mpp: float = DEFAULT_TARGET_MPP,
                       patch_size: int = DEFAULT_PATCH_SIZE, mpp_override: float | None = None
                       ) -> Resolution:
    """Pick the pyramid level and read size that give ``patch_size`` pixels at ``target_mpp``."""
    if target_mpp <= 0 or patch_size <= 0:
        raise ValueError(f"target_mpp and patch_size must be positive; got {target_mpp}, {patch_size}")
    try:
        slide_mpp, source = slide_mpp_from_properties(slide.properties, mpp_override)
    except SlideError as e:
        raise SlideError(e.reason, e.message, slide.path) from None
    target_ds = target_mpp / slide_mpp
    downsamples = slide.level_downsamples
    level = choose_level(downsamples, target_ds)
    read_size = max(1, int(round(patch_size * target_ds / downsamples[level])))
    return Resolution(slide_mpp=slide_mpp, mpp_source=source, target_mpp=float(target_mpp),
                      patch_size=int(patch_size), level=level, level_downsample=downsamples[level],
                      target_downsample=target_ds, read_size=read_size)


# ----------------------------------------------------------------------------------------------
# Tissue mask
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask on a coarse grid; ``scale`` is level-0 pixels per mask pixel (x, y)."""

    mask: np.ndarray
    scale: tuple[float, float]
    mpp: float
    method: str
    threshold: float
    _integral: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Summed-area table: the tissue count of any box in O(1), for every patch at once.
        sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
        sat[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1)
        object.__setattr__(self, "_integral", sat)

    @property
    def fraction(self) -> float:
        """Share of the mask that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tissue_fraction(self, coords: np.ndarray, size_level0: float) -> np.ndarray:
        """Tissue fraction of square level-0 boxes with top-left ``coords`` (N, 2) and side ``size_level0``."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        h, w = self.mask.shape
        sx, sy = self.scale
        x0 = np.clip(np.round(coords[:, 0] / sx), 0, w).astype(np.int64)
        y0 = np.clip(np.round(coords[:, 1] / sy), 0, h).astype(np.int64)
        x1 = np.clip(np.round((coords[:, 0] + size_level0) / sx), 0, w).astype(np.int64)
        y1 = np.clip(np.round((coords[:, 1] + size_level0) / sy), 0, h).astype(np.int64)
        x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))
        s = self._integral
        count = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        area = (x1 - x0) * (y1 - y0)
        return np.where(area > 0, count / np.maximum(area, 1), 0.0)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the ``t`` maximising between-class variance of ``<= t`` vs ``> t``."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    p = hist / total
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(denom > 0, (mu[-1] * omega - mu) ** 2 / denom, 0.0)
    return int(np.argmax(between))


def _disk(radius_px: int) -> np.ndarray:
    r = max(0, int(radius_px))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= r * r


def _binary_op(op: Any, mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Closing/opening with a disk, padded by edge values so tissue touching the border survives."""
    if radius_px < 1:
        return mask
    pad = radius_px + 1
    padded = np.pad(mask, pad, mode="edge")
    return op(padded, structure=_disk(radius_px))[pad:-pad, pad:-pad]


def segment_tissue(rgb: np.ndarray, mpp: float, method: TissueMethod = "otsu",
                   min_area_um2: float = MIN_TISSUE_AREA_UM2,
                   max_hole_area_um2: float = MAX_HOLE_AREA_UM2) -> tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution RGB image at ``mpp`` µm/px; returns (mask, threshold).

    H&E tissue is coloured and glass is grey-white, so the HSV saturation separates them; the
    threshold is Otsu's (clipped to :data:`OTSU_THRESHOLD_RANGE`) or the fixed
    :data:`SATURATION_THRESHOLD`. Then: drop dark pixels, close and open with disks given in µm,
    remove pieces under ``min_area_um2`` and fill holes under ``max_hole_area_um2``.
    """
    if method not in TISSUE_METHODS:
        raise ValueError(f"tissue method {method!r}; expected one of {TISSUE_METHODS}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image; got {rgb.shape} {rgb.dtype}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], dtype=bool), float(SATURATION_THRESHOLD)
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    sat = ndimage.median_filter(hsv[..., 1], size=SATURATION_MEDIAN_PX, mode="nearest")
    value = hsv[..., 2]
    if method == "otsu":
        lo, hi = OTSU_THRESHOLD_RANGE
        threshold = float(np.clip(otsu_threshold(sat), lo, hi))
    else:
        threshold = float(SATURATION_THRESHOLD)
    mask = (sat > threshold) & (value >= MIN_TISSUE_VALUE)
    mask = _binary_op(ndimage.binary_closing, mask, int(round(CLOSING_RADIUS_UM / mpp)))
    mask = _binary_op(ndimage.binary_opening, mask, int(round(OPENING_RADIUS_UM / mpp)))
    px_area = mpp * mpp
    labels, n = ndimage.label(mask)
    if n:
        areas = np.bincount(labels.ravel()) * px_area
        keep = areas >= min_area_um2
        keep[0] = False
        mask = keep[labels]
    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, n = ndimage.label(holes)
    if n:
        areas = np.bincount(labels.ravel()) * px_area
        small = areas < max_hole_area_um2
        small[0] = False
        mask = mask | small[labels]
    return mask, threshold


def _read_downsampled(slide: Slide, level: int, reduce: int) -> np.ndarray:
    """Level ``level`` shrunk by the integer ``reduce`` (box average), read tile by tile."""
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    out_w, out_h = max(1, lw // reduce), max(1, lh // reduce)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    tile = max(reduce, MASK_READ_TILE_PX // reduce * reduce)  # a multiple of ``reduce``: no seams
    for ty in range(0, out_h * reduce, tile):
        for tx in range(0, out_w * reduce, tile):
            w = min(tile, out_w * reduce - tx)
            h = min(tile, out_h * reduce - ty)
            rgb = slide.read_rgb((int(round(tx * ds)), int(round(ty * ds))), level, (w, h))
            if reduce > 1:
                rgb = np.asarray(Image.fromarray(rgb).reduce(reduce))
            out[ty // reduce: ty // reduce + rgb.shape[0], tx // reduce: tx // reduce + rgb.shape[1]] = rgb
    return out


def compute_tissue_mask(slide: Slide, slide_mpp: float, method: TissueMethod = "otsu",
                        patch_size_um: float | None = None, mask_mpp: float = MASK_MPP) -> TissueMask:
    """Tissue mask of the whole slide at about ``mask_mpp`` µm per mask pixel.

    Reads the finest level not finer than needed, shrunk by an integer factor, so a pyramid is
    read at its thumbnail-like level and a single-level slide is read in bounded tiles. With
    ``patch_size_um`` the mask is made fine enough for :data:`MIN_MASK_PX_PER_PATCH` pixels per patch.
    """
    if patch_size_um is not None:
        mask_mpp = min(mask_mpp, patch_size_um / MIN_MASK_PX_PER_PATCH)
    want_ds = max(1.0, mask_mpp / slide_mpp)
    level = choose_level(slide.level_downsamples, want_ds)
    level_ds = slide.level_downsamples[level]
    reduce = max(1, int(math.floor(want_ds / level_ds * (1.0 + LEVEL_DOWNSAMPLE_RTOL))))
    rgb = _read_downsampled(slide, level, reduce)
    w0, h0 = slide.dimensions
    scale = (w0 / rgb.shape[1], h0 / rgb.shape[0])
    mpp = slide_mpp * float(np.mean(scale))
    mask, threshold = segment_tissue(rgb, mpp, method)
    return TissueMask(mask=mask, scale=scale, mpp=mpp, method=method, threshold=threshold)


# ----------------------------------------------------------------------------------------------
# Patch grid
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchPlan:
    """Everything needed to read a slide's patches: where (``coords``) and how (``resolution``)."""

    resolution: Resolution
    mask: TissueMask
    coords: np.ndarray            # (N, 2) int64 level-0 (x, y) of top-left corners
    tissue_fraction: np.ndarray   # (N,) fraction of each kept patch that is tissue
    step: int                     # px at the target resolution
    n_candidates: int             # whole patches that fit in the slide before the tissue filter
    min_tissue: float

    @property
    def n_patches(self) -> int:
        return int(self.coords.shape[0])


def patch_grid(dimensions: tuple[int, int], resolution: Resolution, mask: TissueMask | None,
               step: int | None = None, min_tissue: float = DEFAULT_MIN_TISSUE
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Row-major grid of whole patches inside the slide; returns (coords, tissue_fraction, n_candidates).

    ``step`` is in target pixels (``patch_size`` = no overlap). Patches whose tissue fraction is
    below ``min_tissue`` are dropped (``mask=None`` keeps all, with fraction 1).
    """
    step = resolution.patch_size if step is None else int(step)
    if step <= 0:
        raise ValueError(f"step must be positive; got {step}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1]; got {min_tissue}")
    extent = resolution.patch_size * resolution.target_downsample  # level-0 px
    step0 = step * resolution.target_downsample
    w0, h0 = dimensions
    nx = int(math.floor((w0 - extent) / step0 + 1e-9)) + 1 if w0 >= extent else 0
    ny = int(math.floor((h0 - extent) / step0 + 1e-9)) + 1 if h0 >= extent else 0
    if nx == 0 or ny == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0), 0
    xs = np.round(np.arange(nx) * step0).astype(np.int64)
    ys = np.round(np.arange(ny) * step0).astype(np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([xx.ravel(), yy.ravel()], axis=1)
    if mask is None:
        return coords, np.ones(len(coords)), len(coords)
    frac = mask.tissue_fraction(coords, extent)
    keep = frac >= min_tissue if min_tissue > 0 else np.ones(len(coords), bool)
    return coords[keep], frac[keep], len(coords)


def plan_patches(slide: Slide, target_mpp: float = DEFAULT_TARGET_MPP,
                 patch_size: int = DEFAULT_PATCH_SIZE, step: int | None = None,
                 min_tissue: float = DEFAULT_MIN_TISSUE, mpp_override: float | None = None,
                 tissue_method: TissueMethod = "otsu") -> PatchPlan:
    """Resolution, tissue mask and tissue patches of one slide.

    Raises :class:`SlideError` with ``no_resolution``, ``read_error`` (while reading the mask
    level), ``too_small`` (not one whole patch fits) or ``no_tissue``.
    """
    res = resolve_resolution(slide, target_mpp, patch_size, mpp_override)
    mask = compute_tissue_mask(slide, res.slide_mpp, tissue_method,
                               patch_size_um=patch_size * target_mpp)
    coords, frac, n_candidates = patch_grid(slide.dimensions, res, mask, step, min_tissue)
    step_px = res.patch_size if step is None else int(step)
    if n_candidates == 0:
        w, h = slide.dimensions
        raise SlideError("too_small", f"{w}x{h} px at level 0 holds no whole patch of "
                         f"{res.patch_size_level0} level-0 px ({patch_size} px at {target_mpp} µm/px)",
                         slide.path)
    if len(coords) == 0:
        raise SlideError("no_tissue", f"no patch with tissue fraction >= {min_tissue} among "
                         f"{n_candidates} (tissue mask covers {mask.fraction:.1%}, method "
                         f"{mask.method}, threshold {mask.threshold:g})", slide.path)
    return PatchPlan(resolution=res, mask=mask, coords=coords, tissue_fraction=frac, step=step_px,
                     n_candidates=n_candidates, min_tissue=float(min_tissue))


# ----------------------------------------------------------------------------------------------
# Reading patches: in this process, or in worker processes with one handle each
# ----------------------------------------------------------------------------------------------

def read_patches(slide: Slide, coords: np.ndarray, resolution: Resolution) -> np.ndarray:
    """(N, patch_size, patch_size, 3) uint8 patches at the target resolution."""
    p, r, level = resolution.patch_size, resolution.read_size, resolution.level
    coords = np.asarray(coords).reshape(-1, 2)
    out = np.empty((len(coords), p, p, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(coords):
        img = slide.read_rgb_image((int(x), int(y)), level, (r, r))
        out[i] = img if r == p else img.resize((p, p), RESAMPLE)
    return out


# Per-process state of a reader worker: its one Slide handle, or the error that kept it from opening.
_WORKER_STATE: dict[str, Any] = {}


def _worker_init(path: str) -> None:
    """Worker initializer: open this process's one handle (kept for the worker's life)."""
    try:
        _WORKER_STATE["slide"] = Slide(path)
        _WORKER_STATE["error"] = None
    except SlideError as e:
        _WORKER_STATE["slide"], _WORKER_STATE["error"] = None, e


def _worker_read(coords: np.ndarray, resolution: Resolution) -> np.ndarray:
    """Read one chunk of patches with this worker's handle; errors are sticky per handle."""
    if _WORKER_STATE.get("error") is not None:
        raise _WORKER_STATE["error"]
    slide: Slide = _WORKER_STATE["slide"]
    try:
        return read_patches(slide, coords, resolution)
    except SlideError as e:
        _WORKER_STATE["error"] = e  # the handle is closed by Slide; never reuse it
        raise


def _mp_context(start_method: str | None = None) -> mp.context.BaseContext:
    """The multiprocessing context of the reader workers (see :data:`READER_START_METHOD`)."""
    method = start_method or READER_START_METHOD
    if method not in mp.get_all_start_methods():
        method = "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([__name__])
    return ctx


class PatchReader:
    """Iterate over a slide's patches in chunks, read ahead by worker processes.

    With ``workers=0`` the chunks are read in this process, one after the other. With ``workers>=1``
    each worker process opens its own handle in its initializer and reads whole chunks, while the
    caller (typically encoding the previous chunk) consumes them in order (workers start as set by
    :data:`READER_START_METHOD`); at most
    ``PREFETCH_CHUNKS_PER_WORKER * workers`` chunks are in flight, so memory stays bounded on
    slides with 100,000 patches. A read error, a dead worker or a chunk that takes longer than
    ``timeout_s`` raises ``SlideError('read_error')``.

    >>> with PatchReader(path, plan.coords, plan.resolution, chunk_size=32, workers=2) as reader:  # doctest: +SKIP
    ...     for start, patches in reader:   # patches: (<=32, P, P, 3) uint8
    ...         ...
    """

    def __init__(self, path: str | os.PathLike, coords: np.ndarray, resolution: Resolution,
                 chunk_size: int = 32, workers: int = 0, timeout_s: float = READ_TIMEOUT_S,
                 start_method: str | None = None) -> None:
        if chunk_size < 1 or workers < 0:
            raise ValueError(f"chunk_size must be >= 1 and workers >= 0; got {chunk_size}, {workers}")
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.resolution = resolution
        self.chunk_size = int(chunk_size)
        self.workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.start_method = start_method
        self.wait_s = 0.0  # time the consumer spent waiting for patches (0 = reading fully hidden)
        self._executor: ProcessPoolExecutor | None = None
        self._slide: Slide | None = None

    def __enter__(self) -> "PatchReader":
        if self.workers == 0:
            self._slide = Slide(self.path)
        else:
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=_mp_context(self.start_method),
                                                 initializer=_worker_init, initargs=(str(self.path),))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(abort=exc[0] is not None)

    def close(self, abort: bool = False) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None
        if self._executor is not None:
            ex, self._executor = self._executor, None
            if abort:
                # A worker may be stuck in a decoder: terminate rather than wait for it.
                for proc in list(getattr(ex, "_processes", {}).values()):
                    proc.terminate()
            ex.shutdown(wait=True, cancel_futures=True)

    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self.coords), self.chunk_size):
            yield start, self.coords[start:start + self.chunk_size]

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        import time

        if self._slide is not None:
            for start, chunk in self._chunks():
                t0 = time.perf_counter()
                patches = read_patches(self._slide, chunk, self.resolution)
                self.wait_s += time.perf_counter() - t0
                yield start, patches
            return
        if self._executor is None:
            raise RuntimeError("PatchReader used outside its `with` block")
        pending: deque[tuple[int, Future]] = deque()
        chunks = self._chunks()
        max_inflight = PREFETCH_CHUNKS_PER_WORKER * self.workers

        def submit() -> None:
            nxt = next(chunks, None)
            if nxt is not None:
                assert self._executor is not None
                pending.append((nxt[0], self._executor.submit(_worker_read, nxt[1], self.resolution)))

        for _ in range(max_inflight):
            submit()
        while pending:
            start, fut = pending.popleft()
            t0 = time.perf_counter()
            try:
                patches = fut.result(timeout=self.timeout_s)
            except FutureTimeoutError:
                raise SlideError("read_error", f"reading {self.chunk_size} patches took longer than "
                                 f"{self.timeout_s:g} s (hung decoder?)", self.path) from None
            except BrokenProcessPool:
                raise SlideError("read_error", "a reader process died while decoding this slide "
                                 "(crash in the slide library?)", self.path) from None
            self.wait_s += time.perf_counter() - t0
            submit()
            yield start, patches


# ----------------------------------------------------------------------------------------------
# Synthetic slides: for tests, benchmarks and demos (no real slide needed)
# ----------------------------------------------------------------------------------------------

def aperio_description(width: int, height: int, app_mag: float | None = 20.0,
                       mpp: float | None = None) -> str:
    """An ImageDescription that makes OpenSlide read a TIFF as an Aperio slide (vendor ``aperio``)."""
    fields = [f"AppMag = {app_mag:g}"] if app_mag is not None else []
    if mpp is not None:
        fields.append(f"MPP = {mpp:g}")
    head = f"Aperio Image Library v12.0.15\n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=80"
    return "|".join([head] + fields)


def write_pyramidal_tiff(path: str | os.PathLike, image: np.ndarray, mpp: float | None = 0.25,
                         downsamples: Sequence[int] = (1, 2, 4), tile: int = 256,
                         compression: str = "deflate", description: str | None = None) -> Path:
    """Write ``image`` (H, W, 3) uint8 as a tiled pyramid OpenSlide opens (environment.md section 2).

    Each level is a separate top-level IFD (OpenSlide ignores SubIFDs), reduced levels are marked
    ``subfiletype=1`` and the resolution is written in pixels per centimetre with an explicit unit
    (without it tifffile writes inches and the mpp reads back wrong). ``mpp=None`` writes no
    resolution; ``description`` (e.g. :func:`aperio_description`) goes on the first level.
    ``compression='jpeg'`` needs ``imagecodecs``.
    """
    import tifffile

    path = Path(path)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image; got {image.shape} {image.dtype}")
    if list(downsamples) != sorted(set(downsamples)) or downsamples[0] != 1:
        raise ValueError(f"downsamples must start at 1 and increase; got {list(downsamples)}")
    kw: dict[str, Any] = dict(tile=(tile, tile), photometric="rgb", compression=compression, metadata=None)
    pil = Image.fromarray(image)
    with tifffile.TiffWriter(path) as tw:
        for i, f in enumerate(downsamples):
            level = image if f == 1 else np.asarray(pil.reduce(int(f)))
            extra: dict[str, Any] = {}
            if mpp is not None:
                res = 1e4 / (mpp * f)  # pixels per centimetre
                extra.update(resolution=(res, res), resolutionunit="CENTIMETER")
            if i == 0 and description is not None:
                extra["description"] = description
            if i > 0:
                extra["subfiletype"] = 1
            tw.write(level, **kw, **extra)
    return path


def synthetic_tissue_image(height: int, width: int, coverage: float = 0.5, seed: int = 0,
                           blob_px: int = 256) -> np.ndarray:
    """A white slide with H&E-coloured, textured "tissue" over about ``coverage`` of its area.

    The tissue outline is a smooth random field (blobs about ``blob_px`` wide) thresholded at the
    ``1 - coverage`` quantile; inside it, pink stroma carries purple "nuclei" speckle so patches
    have texture (and JPEG tiles compress like real ones).
    """
    rng = np.random.default_rng(seed)
    gh, gw = max(2, height // blob_px + 2), max(2, width // blob_px + 2)
    coarse = ndimage.gaussian_filter(rng.standard_normal((gh, gw)), 1.0)
    field_ = np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize(
        (gw * blob_px, gh * blob_px), Image.Resampling.BICUBIC))[:height, :width]
    tissue = field_ > np.quantile(field_, 1.0 - coverage)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[...] = (242, 242, 240)
    stroma = np.array([214, 140, 190], dtype=np.int16)
    nuclei = np.array([110, 70, 160], dtype=np.int16)
    noise = rng.integers(-18, 19, size=(height, width, 1), dtype=np.int16)
    is_nucleus = rng.random((height, width)) < 0.08
    colour = np.where(is_nucleus[..., None], nuclei, stroma) + noise
    img[tissue] = np.clip(colour[tissue], 0, 255).astype(np.uint8)
    return img
