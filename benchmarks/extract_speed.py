"""Extraction speed: patches per second of ``smm extract`` on a synthetic 20x slide.

Writes a synthetic pyramid (default 8192 x 8192 px at 0.5 µm/px, levels 1/4/16, JPEG tiles,
H&E-like texture over most of it) into a temporary folder, plans its patches (224 px at 0.5 µm/px)
and measures:

(a) reading and tiling alone, through the ``null`` encoder, with the reader in this process
    (workers 0) and in 1 and 2 worker processes, against a plain single-process OpenSlide
    ``read_region`` loop over the same patches (the floor any pipeline has to beat); plus one whole
    ``extract_slide`` call (mask, grid, read, encode, atomic HDF5 write) with 2 workers;
(b) ``resnet50_trunc`` with random weights on the CPU: the bare encoder rate (same batch size,
    channels-last, patches already in memory) against the pipeline with 1 and 2 reader workers,
    and whether reading is hidden behind encoding (the time the encoder waited for patches).

Results go to ``benchmarks/results/extract_speed_<device>.json``.

    python benchmarks/extract_speed.py            # about 4 minutes on 2 CPU cores
    python benchmarks/extract_speed.py --quick    # 4096 px slide, fewer encoder patches
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402

# Reader workers start like `spawn` and re-import this module, so everything heavy (torch, the
# encoders) is imported inside functions: at module level it would cost each worker seconds.

TARGET_MPP = 0.5
SLIDE_MPP = 0.5          # a 20x scan: level 0 is read directly, as for most real extractions at 20x
PATCH_SIZE = 224
DOWNSAMPLES = (1, 4, 16)  # an Aperio-like pyramid
TISSUE_COVERAGE = 0.8


def machine() -> dict:
    info = provenance.machine("torchvision", "timm", "numpy", "PIL", "tifffile", "openslide")
    import openslide

    info["libopenslide"] = openslide.__library_version__
    return info


def _busy(n: int) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t0


def cpu_parallel_speedup(n: int = 5_000_000) -> float:
    """How much faster two busy processes finish than one after the other (2.0 = two real cores).

    Shared or throttled virtual CPUs report 2 cores but give less; this number says how much
    any multi-process reading could gain on this machine.
    """
    from concurrent.futures import ProcessPoolExecutor

    one = min(_busy(n) for _ in range(2))
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(_busy, [1000, 1000]))  # start the processes first
        pairs = []
        for _ in range(2):
            t0 = time.perf_counter()
            list(ex.map(_busy, [n, n]))
            pairs.append(time.perf_counter() - t0)
    two = min(pairs)
    return 2 * one / two


def plain_openslide_loop(path: Path, coords: np.ndarray, level: int, size: int) -> float:
    """Seconds for the simplest possible reader: one handle, read_region + convert, one after another."""
    import openslide

    osr = openslide.OpenSlide(str(path))
    t0 = time.perf_counter()
    for x, y in coords:
        np.asarray(osr.read_region((int(x), int(y)), level, (size, size)).convert("RGB"))
    dt = time.perf_counter() - t0
    osr.close()
    return dt


def pipeline(path: Path, coords: np.ndarray, res, encoder, workers: int, batch: int) -> dict:
    """Read (in ``workers`` processes, or here for 0) and encode; the reader's start-up is included."""
    from client.wsi.slides import PatchReader

    t0 = time.perf_counter()
    encode_s = 0.0
    n = 0
    with PatchReader(path, coords, res, chunk_size=batch, workers=workers) as reader:
        for _, patches in reader:
            te = time.perf_counter()
            encoder.encode(patches)
            encode_s += time.perf_counter() - te
            n += len(patches)
        wait = reader.wait_s
    wall = time.perf_counter() - t0
    return {"workers": workers, "patches": n, "wall_s": wall, "patches_per_s": n / wall,
            "encode_s": encode_s, "read_wait_s": wait, "read_wait_fraction": wait / wall}


def best_of(reps: int, fn, *args) -> dict:
    """Run ``fn`` ``reps`` times and keep the fastest run (shared CPUs are noisy; the fastest run
    is the one least disturbed by other tenants), with every rate for reference."""
    runs = [fn(*args) for _ in range(reps)]
    best = max(runs, key=lambda r: r["patches_per_s"])
    return {**best, "reps": reps, "patches_per_s_all": [r["patches_per_s"] for r in runs]}


def bare_encoder_rate(encoder, patches: np.ndarray, batch: int, reps: int) -> dict:
    """Encoder alone on patches already in memory (same batch size, its own memory format)."""
    encoder.encode(patches[:batch])  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(reps):  # median for the bare rate: it is the yardstick, not a best case
        t0 = time.perf_counter()
        for i in range(0, len(patches), batch):
            encoder.encode(patches[i:i + batch])
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"patches": len(patches), "batch": batch, "reps": reps, "wall_s_median": med,
            "patches_per_s": len(patches) / med, "channels_last": encoder.channels_last}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096 px slide, 64 encoder patches")
    ap.add_argument("--size", type=int, default=8192, help="slide side in level-0 pixels (default 8192)")
    ap.add_argument("--encoder-patches", type=int, default=128,
                    help="patches pushed through resnet50_trunc per measurement (default 128)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per measurement (default 2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compression", default="jpeg", choices=["jpeg", "deflate"])
    args = ap.parse_args()
    from client.wsi.encoders import build_encoder
    from client.wsi.extract import ExtractConfig, SlideInput, extract_slide
    from client.site.folder import SiteLayout
    from client.wsi.slides import Slide, plan_patches, read_patches, synthetic_tissue_image, write_pyramidal_tiff

    size, n_enc = (4096, 64) if args.quick else (args.size, args.encoder_patches)
    reps = 1 if args.quick else args.reps
    batch = args.batch_size
    results: dict = {}
    speedup = cpu_parallel_speedup()
    print(f"CPU: {os.cpu_count()} cores reported; two busy processes run {speedup:.2f}x as fast as one "
          "(2.0 = two real cores)", flush=True)
    results["cpu_parallel_speedup"] = speedup

    with tempfile.TemporaryDirectory(prefix="extract_speed_") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        img = synthetic_tissue_image(size, size, coverage=TISSUE_COVERAGE, seed=0)
        slide_path = write_pyramidal_tiff(tmp_path / "synthetic_20x.tiff", img, mpp=SLIDE_MPP,
                                          downsamples=DOWNSAMPLES, compression=args.compression)
        del img
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with Slide(slide_path) as s:
            plan = plan_patches(s, TARGET_MPP, PATCH_SIZE)
        plan_s = time.perf_counter() - t0
        res, coords = plan.resolution, plan.coords
        print(f"slide {size}x{size} px ({args.compression}, {slide_path.stat().st_size / 2**20:.0f} MiB, "
              f"written in {write_s:.1f} s); {plan.n_patches} tissue patches of {plan.n_candidates} "
              f"(mask + grid {plan_s:.2f} s), level {res.level}, read {res.read_size} px", flush=True)
        results["slide"] = {"size_px": size, "mpp": SLIDE_MPP, "downsamples": list(DOWNSAMPLES),
                            "compression": args.compression, "bytes": slide_path.stat().st_size,
                            "write_s": write_s, "tissue_patches": plan.n_patches,
                            "candidates": plan.n_candidates, "mask_and_grid_s": plan_s,
                            "level": res.level, "read_size": res.read_size}

        # (a) reading and tiling: null encoder vs a plain OpenSlide loop
        null = build_encoder("null", device=args.device)
        plain_all = [plain_openslide_loop(slide_path, coords, res.level, res.read_size) for _ in range(reps)]
        plain_s = min(plain_all)
        plain = {"patches": len(coords), "wall_s": plain_s, "patches_per_s": len(coords) / plain_s,
                 "reps": reps, "patches_per_s_all": [len(coords) / t for t in plain_all]}
        print(f"(a) plain OpenSlide read_region loop, 1 process: {plain['patches_per_s']:.0f} patches/s", flush=True)
        null_rows = []
        for workers in (0, 1, 2):
            r = best_of(reps, pipeline, slide_path, coords, res, null, workers, batch)
            r["vs_plain_loop"] = r["patches_per_s"] / plain["patches_per_s"]
            null_rows.append(r)
            print(f"    null encoder, workers {workers}: {r['patches_per_s']:.0f} patches/s "
                  f"({r['vs_plain_loop']:.2f}x the plain loop)", flush=True)
        layout = SiteLayout(tmp_path / "site")
        cfg = ExtractConfig(target_mpp=TARGET_MPP, patch_size=PATCH_SIZE, workers=2, batch_size=batch)
        _, _, outcome = extract_slide(SlideInput(slide_path, "synthetic_20x"), null, cfg, layout)
        whole = {"workers": 2, "patches": outcome.n_patches, "wall_s": outcome.seconds,
                 "patches_per_s": outcome.n_patches / outcome.seconds}
        print(f"    whole extract_slide (mask, grid, read, null encode, HDF5 write), workers 2: "
              f"{whole['patches_per_s']:.0f} patches/s in {outcome.seconds:.1f} s", flush=True)
        results["read"] = {"plain_openslide_loop": plain, "null_encoder": null_rows,
                           "extract_slide_null_workers2": whole}

        # (b) resnet50_trunc, random weights, CPU
        enc = build_encoder("resnet50_trunc", random_weights=True, device=args.device)
        sub = coords[:n_enc]
        with Slide(slide_path) as s:
            mem_patches = read_patches(s, sub, res)
        bare = bare_encoder_rate(enc, mem_patches, batch, reps=reps)
        print(f"(b) resnet50_trunc bare forward (batch {batch}, channels_last {enc.channels_last}, "
              f"{enc.device}): {bare['patches_per_s']:.1f} patches/s", flush=True)
        enc_rows = []
        read_rate = plain["patches_per_s"]
        for workers in (0, 1, 2):
            r = best_of(reps, pipeline, slide_path, sub, res, enc, workers, batch)
            # if reading were not overlapped at all, each patch would cost read + encode time
            serial_rate = 1.0 / (1.0 / read_rate + 1.0 / bare["patches_per_s"])
            r["vs_bare_encoder"] = r["patches_per_s"] / bare["patches_per_s"]
            r["serial_estimate_patches_per_s"] = serial_rate
            # share of the serial read time (plain loop) the encoder did not have to wait for
            serial_read_s = r["patches"] / read_rate
            r["read_hidden_fraction"] = max(0.0, 1.0 - r["read_wait_s"] / serial_read_s)
            r["reading_overlapped"] = bool(workers > 0 and r["read_hidden_fraction"] >= 0.5)
            enc_rows.append(r)
            print(f"    pipeline, workers {workers}: {r['patches_per_s']:.1f} patches/s "
                  f"({r['vs_bare_encoder']:.0%} of the bare encoder; serial estimate "
                  f"{serial_rate:.1f}); encoder waited {r['read_wait_s']:.2f} s for patches, "
                  f"{r['read_hidden_fraction']:.0%} of the read time hidden", flush=True)
        results["encode"] = {"encoder": enc.encoder_id, "weights": enc.weights_sha256,
                             "feature_dim": enc.feature_dim, "bare": bare, "pipeline": enc_rows}

    best_null = max(null_rows, key=lambda r: r["patches_per_s"])
    best_enc = max(enc_rows, key=lambda r: r["patches_per_s"])
    summary = {
        "plain_loop_patches_per_s": plain["patches_per_s"],
        "null_best_patches_per_s": best_null["patches_per_s"], "null_best_workers": best_null["workers"],
        "resnet50_bare_patches_per_s": bare["patches_per_s"],
        "resnet50_pipeline_best_patches_per_s": best_enc["patches_per_s"],
        "resnet50_pipeline_best_workers": best_enc["workers"],
        "reading_overlapped_with_encoding": any(r["reading_overlapped"] for r in enc_rows),
        "cpu_parallel_speedup": speedup,
        "note": "On a CPU-only machine the encoder, not reading, bounds the rate, and the reader "
                "processes share the cores with the encoder's threads: extra processes only pay off "
                "as far as the machine really runs processes in parallel (cpu_parallel_speedup).",
    }
    out = {
        "benchmark": "extract_speed",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/extract_speed.py " + " ".join(sys.argv[1:]),
        "git_commit": provenance.git_commit(),
        "machine": machine(),
        "setting": {"target_mpp": TARGET_MPP, "patch_size": PATCH_SIZE, "batch_size": batch,
                    "device": args.device, "encoder_patches": int(len(sub)), "reps": reps,
                    "rates": "best of reps for the pipelines and the plain loop, median for the bare encoder"},
        "results": results,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "extract_speed_quick" if args.quick else "extract_speed"
    path = RESULTS / f"{name}_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"summary: plain loop {summary['plain_loop_patches_per_s']:.0f} patches/s, null pipeline best "
          f"{summary['null_best_patches_per_s']:.0f} (workers {summary['null_best_workers']}); resnet50_trunc "
          f"bare {summary['resnet50_bare_patches_per_s']:.1f}, pipeline best "
          f"{summary['resnet50_pipeline_best_patches_per_s']:.1f} "
          f"(workers {summary['resnet50_pipeline_best_workers']}), "
          f"reading overlapped: {summary['reading_overlapped_with_encoding']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
