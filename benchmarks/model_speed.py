"""Model speed and memory at the reference setting, side by side with the reference code.

Times a forward pass (eval, no grad) and a full training step (forward, multi-task loss with the
consistency terms, backward, gradient coordination, Adam step) of the SMM model at 2,500 patches x
1,024 dims, hidden 128, 59 + 361 genes, batch 1, 4 and 8, for both position-bias modes. Each
setting runs in its own process so its peak memory (ru_maxrss, whole process, as the reference was
measured) is its own. Results go to ``benchmarks/results/model_speed_<device>.json``.

    python benchmarks/model_speed.py              # full (about 5 minutes on 2 CPU cores)
    python benchmarks/model_speed.py --quick      # batch 1 only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import git_commit, machine  # noqa: E402
RESULTS = HERE / "results"

# The reference code (helenypzhang/Subspace-Multimodal-Learning, DeformPathomicNet) measured on
# this project's 2-core machine with 2 threads at this setting (issue 2): seconds per train step
# and peak memory in GB.
REFERENCE = {1: (3.7, 3.5), 4: (21.0, 10.8), 8: (41.5, 20.5)}
REFERENCE_PATCHES = 2500  # patches per slide at the reference setting (a 50 x 50 token map)
# Parameters of the reference model that take part in the forward pass (method.md Part B 3.1-3.5):
# 2 x MaxNet layers (12,752 + 32,080), 2 x branch (deformable attention 93,921, patch fc 131,200,
# fusion 32,896, the layer's LayerNorm 256 and the pre-pooler LayerNorm 256, pooler 16,512,
# projection 16,512) and the 4-class fused head 1,028. The notes do not say whether the pre-pooler
# LayerNorm is the layer's (then 512 fewer); the branch total they give (556,679 with ~264k unused)
# fits either reading.
REFERENCE_USED_PARAMS = (12_752 + 32_080 + 2 * (93_921 + 131_200 + 32_896 + 256 + 256 + 16_512 + 16_512)
                         + 1_028)


def run_one(mode: str, batch: int, reps: int, device: str, threads: int,
            n_patches: int = REFERENCE_PATCHES) -> dict:
    """One setting, in this process: returns timings and peak memory.

    ``n_patches`` real patches per slide (``benchmarks/scale.py`` varies it); the seed layout views
    them on the smallest square token map that holds them, ceil(sqrt(n))**2 tokens (a bag smaller
    than the map is tiled over it, as ``seed_tokens`` does for any short bag). At the default the
    model, data and output are the reference setting's, as before this argument existed.
    """
    import torch

    from smm_model.nn.batch import Batch
    from smm_model.config import LossConfig, ModelConfig
    from smm_model.objectives.coordination import coordinate_gradients
    from smm_model.objectives.losses import multitask_loss
    from smm_model.nn.model import build_model, count_parameters

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    grid = math.isqrt(n_patches - 1) + 1  # ceil(sqrt(n_patches)) for n_patches >= 1
    cfg = ModelConfig(position_bias=mode, tasks=("diagnosis",), n_patches=grid * grid, grid_size=grid)
    model = build_model(cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.1)
    b = Batch(patches=torch.randn(batch, n_patches, cfg.feature_dim),
              patch_mask=torch.ones(batch, n_patches, dtype=torch.bool),
              genes_tumour=torch.randn(batch, cfg.genes_tumour), genes_micro=torch.randn(batch, cfg.genes_micro),
              labels={"diagnosis": torch.randint(0, 4, (batch,))}).to(dev)
    loss_cfg = LossConfig()
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # GB (Linux: KiB)

    def train_step():
        model.train()
        out = model(b)
        loss, _ = multitask_loss(out, b, loss_cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        coordinate_gradients(model.split_heads(), out.subspaces, b, "pcgrad")
        opt.step()

    @torch.no_grad()
    def forward():
        model.eval()
        model(b)

    def timed(fn, n):
        fn()  # warm-up
        sync()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return ts

    fwd = timed(forward, reps)
    step = timed(train_step, reps)
    res = {
        "mode": mode, "batch": batch, "device": device, "threads": threads,
        "forward_s_median": statistics.median(fwd), "forward_s_all": fwd,
        "train_step_s_median": statistics.median(step), "train_step_s_all": step,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "rss_after_setup_gb": rss_before,
        "params": count_parameters(model),
    }
    if dev.type == "cuda":
        res["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1 only, 2 repetitions")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--modes", nargs="+", default=["table", "exact"], choices=["table", "exact"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one setting, JSON on stdout
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.reps, args.device, args.threads)))
        return 0
    batches, reps = ([1], 2) if args.quick else (args.batches, args.reps)
    rows = []
    for mode in args.modes:
        for b in batches:
            cmd = [sys.executable, __file__, "--one", mode, str(b), "--reps", str(reps),
                   "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                 env={**os.environ, "PYTHONPATH": str(HERE.parent)})
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if args.device == "cpu" and b in REFERENCE and args.threads == 2:
                ref_s, ref_gb = REFERENCE[b]
                r["reference_train_step_s"], r["reference_peak_gb"] = ref_s, ref_gb
                r["speedup_vs_reference"] = ref_s / r["train_step_s_median"]
                r["memory_fraction_of_reference"] = r["peak_rss_gb"] / ref_gb
            rows.append(r)
            print(f"{mode:5s} batch {b}: forward {r['forward_s_median']:.3f} s, train step "
                  f"{r['train_step_s_median']:.3f} s, peak {r['peak_rss_gb']:.2f} GB"
                  + (f"  (reference {r['reference_train_step_s']} s, {r['reference_peak_gb']} GB: "
                     f"{r['speedup_vs_reference']:.1f}x faster)" if "speedup_vs_reference" in r else ""),
                  flush=True)
    params = rows[0]["params"]
    result = {
        "benchmark": "model_speed",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/model_speed.py " + " ".join(sys.argv[1:]),
        "git_commit": git_commit(),
        "machine": machine(),
        "setting": {"patches": 2500, "feature_dim": 1024, "hidden": 128, "genes": [59, 361],
                    "task": "diagnosis", "loss": "CE + 0.5 consistency x 2", "coordination": "pcgrad",
                    "optimizer": "Adam"},
        "params": {"ours": params, "reference_used": REFERENCE_USED_PARAMS,
                   "note": "reference_used counts two LayerNorms per branch (layer + pre-pooler); "
                           "512 fewer if the pre-pooler norm is the layer's"},
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "model_speed_quick" if args.quick else "model_speed"
    path = RESULTS / f"{name}_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"params: ours {params:,}, reference (used) {REFERENCE_USED_PARAMS:,}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
