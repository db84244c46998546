"""``smm heatmap MODEL SLIDE --out DIR``: where a trained model looked on one slide, drawn at the site.

A pathologist checks a model by seeing which tissue it attended to. This command runs at the site
that holds the slide, on this machine, and writes only into ``DIR``; nothing is sent anywhere (the
per-patch weights and the pictures are patient data and stay with the site's other files):

1. the model file (a run's ``model.pt`` or a server checkpoint) is read as ``smm evaluate`` reads it
   (``client.baselines.evaluate.load_model_file``: no code is unpickled) and rebuilt from its stored
   config, weights fitted strictly;
2. the slide's features are ``--features FILE`` or ``SITE/features/<slide_id>.h5`` (``--site``), with
   ``slide_id`` the slide's file name without its suffix (as ``smm extract`` names them) or
   ``--slide-id``. They are checked against the slide (the file's ``slide_id`` attribute, patch
   coordinates inside the slide) and against the model (``feature_dim``, encoder); all of the
   slide's patches are used (no ``data.max_patches`` sampling), standardised with the model's
   shared patch statistics;
3. SMM reads the slide's patient's genes: ``slides.csv`` names the patient, the site's genomic
   table and gene set give the values, standardised with the model's shared statistics (so
   ``--site`` is needed). ABMIL and Concat attention reads no genes;
4. ``smm_model.nn.attention_maps.patch_attention`` gives the per-patch attention (SMM: one map per
   subspace, tumour and micro; ABMIL and Concat: the gated attention, ``abmil``);
5. per map, CLAM-style: the thumbnail (OpenSlide ``get_thumbnail``, longer side ``--size``) with a
   coloured square per patch at its level-0 position scaled to the thumbnail, coloured by the
   patch's percentile among the slide's weights (so a slide's whole colour range is used whatever
   the weights' scale) and alpha-blended; ``DIR/<slide_id>_<map>.png``, plus the raw weights
   ``DIR/<slide_id>_attention.csv`` (x, y level-0 and one column per map, summing to 1).

Bad input (missing or unreadable features, features of another slide or encoder, a model file for
another feature_dim, a genomics-only model) stops with a message naming the file (exit status 2).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client.baselines.evaluate import LoadedModel, ModelFileError, load_model_file
from client.local.round import SharedGenomicsStats
from client.local.train import resolve_device
from client.site.dataset import find_genomics_file, read_slides, slide_patch_step
from client.site.folder import FeatureFileError, SiteLayout, read_features
from client.site.genomics import load_genomics, read_geneset
from client.site.validation import SiteDataError
from client.wsi.slides import Slide, SlideError
from smm_model.contract.atomic import atomic_write_bytes, atomic_write_text
from smm_model.nn.attention_maps import map_names, patch_attention
from smm_model.nn.batch import Batch
from smm_model.nn.model import build_model

__all__ = ["HeatmapError", "SlideBag", "read_slide_bag", "slide_genes", "slide_attention", "draw_heatmap",
           "heatmap", "main"]

#: Longer side of the thumbnail the maps are drawn over, in pixels.
DEFAULT_SIZE = 1024
#: Weight of the colour over the thumbnail where a patch lies (0: thumbnail only, 1: colour only).
DEFAULT_ALPHA = 0.5
#: matplotlib colormap from low to high attention (CLAM's).
DEFAULT_CMAP = "jet"


class HeatmapError(ValueError):
    """The heatmap cannot be drawn; the message names the file and what is wrong."""


@dataclass
class SlideBag:
    """One slide's patches: features (N, D) float32 (standardised as the model was trained), level-0
    top-left coords (N, 2) int64, patch step and patch side in level-0 pixels."""

    features: np.ndarray
    coords: np.ndarray
    step: float
    side: float


def _load_model(model: LoadedModel) -> torch.nn.Module:
    net = build_model(model.cfg.model)
    try:
        net.load_state_dict(dict(model.weights), strict=True)
    except RuntimeError as e:
        raise HeatmapError(f"{model.path}: the weights do not fit the stored model config ({e})") from None
    return net.eval()


def read_slide_bag(features_path: Path, slide_id: str, model: LoadedModel,
                   level0_size: tuple[int, int], level_downsamples: Sequence[float]) -> SlideBag:
    """Read and check ``features_path`` for slide ``slide_id`` of level-0 size ``level0_size`` (w, h)
    against ``model`` (HeatmapError naming the file)."""
    try:
        feats, coords, attrs = read_features(features_path)
    except FeatureFileError as e:
        raise HeatmapError(str(e)) from None
    assert feats is not None and coords is not None
    stored = attrs.get("slide_id")
    if stored not in (None, "") and str(stored) != slide_id:
        raise HeatmapError(f"{features_path}: features of slide {stored!r}, not of {slide_id!r}")
    cfg = model.cfg.model
    if feats.shape[1] != cfg.feature_dim:
        raise HeatmapError(f"{features_path}: features have {feats.shape[1]} dimensions, but model file {model.path} "
                           f"expects model.feature_dim={cfg.feature_dim} (features from another encoder?)")
    for key, attr in (("encoder", "encoder"), ("encoder_weights", "weights_sha256")):
        want = model.schema.get(key)
        if want is not None and str(attrs.get(attr)) != str(want):
            raise HeatmapError(f"{features_path}: {attr} is {attrs.get(attr)!r}, model file {model.path} was trained "
                               f"on {key} {want!r}")
    w, h = level0_size
    beyond = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= w) | (coords[:, 1] >= h)
    if beyond.any():
        x, y = coords[int(np.flatnonzero(beyond)[0])]
        raise HeatmapError(f"{features_path}: patch at level-0 ({x}, {y}) lies outside slide {slide_id!r} "
                           f"({w} x {h} pixels); are these the features of another slide?")
    norm = model.shared.patch_norm()
    if norm is not None:
        mean, std = norm
        if mean.shape != (feats.shape[1],):
            raise HeatmapError(f"{model.path}: shared patch statistics have {mean.shape[0]} dimensions, the "
                               f"features {feats.shape[1]}")
        feats = ((feats - mean) / std).astype(np.float32)
    step = slide_patch_step(coords, attrs)
    side = attrs.get("patch_size_level0")
    if not side:
        level = int(attrs["level"])
        down = level_downsamples[level] if 0 <= level < len(level_downsamples) else 1.0
        side = float(attrs["patch_size"]) * down
    return SlideBag(feats, np.asarray(coords, dtype=np.int64), float(step), float(side))


def slide_genes(site_dir: Path, slide_id: str, model: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
    """The tumour (Gt,) and micro (Ge,) gene vectors of the patient of ``slide_id``, standardised with
    the model's shared statistics (HeatmapError naming the site file)."""
    layout = SiteLayout(site_dir)
    data = model.cfg.data
    try:
        rows, _ = read_slides(layout.slides, None)
        patient = dict(rows).get(slide_id)
        if patient is None:
            raise HeatmapError(f"{layout.slides}: slide {slide_id!r} is not listed, so its patient's genes are unknown")
        geneset = read_geneset(layout.geneset)
        stats = SharedGenomicsStats(model.shared)
        if stats.features != geneset.features:
            raise HeatmapError(f"{layout.geneset}: {len(geneset.features)} genomic features, model file {model.path} "
                               f"was trained on {len(stats.features)} (or another order)")
        genomics = load_genomics(find_genomics_file(layout), geneset, [patient], policy=data.genomics_policy,
                                 log1p_suffixes=data.log1p_features, clinical_name=layout.slides.name)
        tumour, micro = genomics.encode([patient], stats, clip=data.clip)  # (1, Gt), (1, Ge)
    except SiteDataError as e:
        raise HeatmapError(str(e)) from None
    cfg = model.cfg.model
    if (tumour.shape[1], micro.shape[1]) != (cfg.genes_tumour, cfg.genes_micro):
        raise HeatmapError(f"{layout.geneset}: gene vectors of {tumour.shape[1]} + {micro.shape[1]} values, model file "
                           f"{model.path} expects {cfg.genes_tumour} + {cfg.genes_micro}")
    return tumour[0], micro[0]


def slide_attention(net: torch.nn.Module, bag: SlideBag, genes: tuple[np.ndarray, np.ndarray],
                    device: torch.device) -> dict[str, np.ndarray]:
    """Per-patch attention of ``net`` on one slide: map name -> (N,) float64 summing to 1."""
    n = len(bag.features)
    batch = Batch(patches=torch.from_numpy(bag.features)[None], patch_mask=torch.ones(1, n, dtype=torch.bool),
                  genes_tumour=torch.as_tensor(genes[0], dtype=torch.float32)[None],
                  genes_micro=torch.as_tensor(genes[1], dtype=torch.float32)[None],
                  coords=torch.from_numpy(bag.coords.astype(np.float32))[None],
                  patch_step=torch.tensor([bag.step], dtype=torch.float32)).to(device)
    maps = patch_attention(net.to(device), batch)
    return {k: v[0].double().cpu().numpy() for k, v in maps.items()}


def draw_heatmap(thumb: np.ndarray, coords: np.ndarray, side: float, level0_size: tuple[int, int],
                 weights: np.ndarray, cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """(h, w, 3) uint8 thumbnail with one coloured square per patch -> (h, w, 3) uint8 heatmap.

    Patch ``i`` covers level-0 ``[x, x + side) x [y, y + side)``, scaled to the thumbnail; its colour
    is ``cmap`` at its weight's percentile in the slide (ties share one), blended with ``alpha``.
    Overlapping squares average their percentiles; pixels no patch covers keep the thumbnail.
    """
    import matplotlib
    from scipy.stats import rankdata

    h, w = thumb.shape[:2]
    sx, sy = w / level0_size[0], h / level0_size[1]
    score = (rankdata(weights, method="average") - 0.5) / len(weights)  # (N,) in (0, 1)
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.float64)
    x0 = np.floor(coords[:, 0] * sx).astype(int)
    y0 = np.floor(coords[:, 1] * sy).astype(int)
    x1 = np.maximum(x0 + 1, np.ceil((coords[:, 0] + side) * sx).astype(int))  # at least one pixel
    y1 = np.maximum(y0 + 1, np.ceil((coords[:, 1] + side) * sy).astype(int))
    for i in range(len(weights)):
        total[y0[i]:y1[i], x0[i]:x1[i]] += score[i]
        count[y0[i]:y1[i], x0[i]:x1[i]] += 1
    covered = count > 0
    colour = matplotlib.colormaps[cmap](total[covered] / count[covered])[:, :3] * 255.0  # (M, 3)
    out = thumb.astype(np.float64)
    out[covered] = (1.0 - alpha) * out[covered] + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def heatmap(model_path: Path, slide_path: Path, out_dir: Path, *, features: Path | None = None,
            site: Path | None = None, slide_id: str | None = None, size: int = DEFAULT_SIZE,
            cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA, device: str = "cpu") -> dict[str, Path]:
    """Draw every attention map of the model on the slide; returns name -> written file."""
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise HeatmapError(f"--cmap {cmap!r} is not a matplotlib colormap")
    if not 0.0 <= alpha <= 1.0:
        raise HeatmapError(f"--alpha must be in [0, 1], got {alpha}")
    if features is None and site is None:
        raise HeatmapError("give the slide's features with --features FILE or its site folder with --site DIR")
    try:
        dev = resolve_device(device)
    except (RuntimeError, ValueError) as e:
        raise HeatmapError(f"--device: {e}") from None
    try:
        model = load_model_file(model_path)
    except ModelFileError as e:
        raise HeatmapError(str(e)) from None
    try:
        names = map_names(model.cfg.model.arch)
    except ValueError as e:
        raise HeatmapError(f"{model_path}: {e}") from None
    slide_id = slide_id or Path(slide_path).stem
    features = features or SiteLayout(site).feature_file(slide_id)  # type: ignore[arg-type]
    try:
        with Slide(slide_path) as slide:
            dims, downs = slide.dimensions, slide.level_downsamples
            thumb = np.asarray(slide.thumbnail(size))
    except SlideError as e:
        raise HeatmapError(str(e)) from None
    bag = read_slide_bag(Path(features), slide_id, model, dims, downs)
    cfg = model.cfg.model
    if cfg.arch == "smm":
        if site is None:
            raise HeatmapError(f"{model_path}: an SMM model reads the patient's genes; give the site folder with --site")
        genes = slide_genes(Path(site), slide_id, model)
    else:  # ABMIL / Concat attention reads no genes
        genes = (np.zeros(cfg.genes_tumour, np.float32), np.zeros(cfg.genes_micro, np.float32))
    maps = slide_attention(_load_model(model), bag, genes, dev)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for name in names:
        path = out_dir / f"{slide_id}_{name}.png"
        atomic_write_bytes(path, _png_bytes(draw_heatmap(thumb, bag.coords, bag.side, dims, maps[name], cmap, alpha)))
        written[name] = path
    table = pd.DataFrame({"x": bag.coords[:, 0], "y": bag.coords[:, 1], **{n: maps[n] for n in names}})
    written["weights"] = out_dir / f"{slide_id}_attention.csv"
    atomic_write_text(written["weights"], table.to_csv(index=False))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="smm heatmap",
        description="Draw where a trained model looked on one slide (per-patch attention over the slide's "
                    "thumbnail; SMM: one map per subspace). Runs at the site, on this machine: the pictures "
                    "and weights are written to --out only and never sent anywhere.")
    ap.add_argument("model", type=Path, help="a run's model.pt, or a server checkpoint (checkpoints/round_NNNN.pt)")
    ap.add_argument("slide", type=Path, help="the whole-slide image (any format OpenSlide reads)")
    ap.add_argument("--out", type=Path, default=Path("heatmaps"), metavar="DIR",
                    help="where the PNGs and the weights CSV go (default ./heatmaps)")
    ap.add_argument("--site", type=Path, metavar="DIR",
                    help="the site folder: features/<slide_id>.h5, and (SMM) the patient's genes")
    ap.add_argument("--features", type=Path, metavar="FILE", help="the slide's feature file (default: from --site)")
    ap.add_argument("--slide-id", help="the slide's id (default: the slide's file name without its suffix)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"thumbnail's longer side in pixels (default {DEFAULT_SIZE})")
    ap.add_argument("--cmap", default=DEFAULT_CMAP, help=f"matplotlib colormap (default {DEFAULT_CMAP})")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"colour opacity (default {DEFAULT_ALPHA})")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    args = ap.parse_args(list(argv) if argv is not None else None)
    prog = "smm heatmap"
    try:
        written = heatmap(args.model, args.slide, args.out, features=args.features, site=args.site,
                          slide_id=args.slide_id, size=args.size, cmap=args.cmap, alpha=args.alpha, device=args.device)
    except HeatmapError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{prog}: {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
