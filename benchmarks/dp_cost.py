"""What DP-SGD costs per training step: plain local steps against patient-level DP-SGD steps.

The DP step is ``client.local.dp.dp_train_steps`` (one forward/backward pass per sampled patient,
Opacus's clipping, noise and accounting), the plain step is ``client.local.train.train_epochs`` on
batches of the same expected size, both on the same synthetic patients at the model size of a
config (``configs/demo.yaml``: the demo; ``configs/reference.yaml``: the paper's 2,500 patches x
1,024 dimensions). Coordination is off in both (DP runs it off). Results:
``benchmarks/results/dp_step_<device>.json``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dp_cost.py --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from provenance import git_commit, machine  # noqa: E402

CONFIGS = {"demo": ROOT / "configs" / "demo.yaml", "reference": ROOT / "configs" / "reference.yaml"}
PATIENTS = 32  # a site's training split; the expected DP batch is train.batch_size of them


def measure(size: str, steps: int, threads: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from client.cohorts.synthetic import SynthSpec, synthetic_patients
    from client.local.dp import dp_train_steps
    from client.local.ledger import PrivacyLedger
    from client.local.train import make_optimizer, train_epochs
    from client.site.collate import collate_patients
    from smm_model.config import ExperimentConfig
    from smm_model.nn.model import build_model

    torch.set_num_threads(threads)
    base = ExperimentConfig.from_yaml_text(CONFIGS[size].read_text(), source=str(CONFIGS[size]))
    m = base.model
    n_patches = m.n_patches if m.layout == "seed" else m.grid_size * m.grid_size
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, coordination="off"),
                              federation=dataclasses.replace(base.federation, strategy="fedavg"),  # DP refuses SCAFFOLD
                              privacy=dataclasses.replace(base.privacy, dp=True, dp_noise_multiplier=1.0))
    spec = SynthSpec(feature_dim=m.feature_dim, genes_tumour=m.genes_tumour, genes_micro=m.genes_micro,
                     min_patches=n_patches, max_patches=n_patches)
    items = synthetic_patients(PATIENTS, spec, seed=0)
    bs = cfg.train.batch_size
    out: dict = {"size": size, "config": str(CONFIGS[size].relative_to(ROOT)), "patches": n_patches,
                 "feature_dim": m.feature_dim, "batch_size": bs, "patients": PATIENTS, "steps": steps}

    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(items, batch_size=bs, shuffle=True, collate_fn=collate_patients, generator=g, drop_last=True)
    batches = [b for _, b in zip(range(steps + 1), loader)]
    train_epochs(model, batches[:1], cfg, epochs=1, optimizer=opt, scheduler=_Hold())  # warm-up
    plain = []
    for b in batches[1:]:
        t = time.perf_counter()
        train_epochs(model, [b], cfg, epochs=1, optimizer=opt, scheduler=_Hold())
        plain.append(time.perf_counter() - t)

    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg.train)
    with tempfile.TemporaryDirectory() as d:
        ledger = PrivacyLedger.open(Path(d) / "ledger.json", accountant=cfg.privacy.dp_accountant)
        q = bs / PATIENTS
        dp_train_steps(model, items, cfg, steps=1, sample_rate=q, noise_multiplier=1.0,
                       generator=torch.Generator().manual_seed(1), optimizer=opt)  # warm-up
        t = time.perf_counter()
        logs, record = dp_train_steps(model, items, cfg, steps=steps, sample_rate=q, noise_multiplier=1.0,
                                      generator=torch.Generator().manual_seed(2), optimizer=opt, ledger=ledger,
                                      run="dp_cost")
        dp_total = time.perf_counter() - t
    out.update(plain_step_s=statistics.median(plain), dp_step_s=dp_total / steps,
               dp_patients_per_step=logs[0].examples / steps if logs else None,
               overhead=(dp_total / steps) / statistics.median(plain),
               epsilon_after=record.epsilon, delta=cfg.privacy.dp_delta)
    return out


class _Hold:
    """A scheduler that keeps the learning rate (train_epochs steps it once per call)."""

    def step(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode and size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="demo,reference")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "dp_step_cpu.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = [measure(s, args.steps, args.threads) for s in args.sizes.split(",")]
    for r in rows:
        print(f"{r['size']}: plain {r['plain_step_s']:.3f} s/step, DP {r['dp_step_s']:.3f} s/step "
              f"({r['overhead']:.1f}x; {r['dp_patients_per_step']:.1f} patients per DP step)")
    result = {"benchmark": "dp_cost", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "OMP_NUM_THREADS=%d .venv/bin/python benchmarks/dp_cost.py --steps %d --threads %d"
                         % (args.threads, args.steps, args.threads),
              "git_commit": git_commit(), "machine": machine(), "wall_s": time.perf_counter() - t0, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
