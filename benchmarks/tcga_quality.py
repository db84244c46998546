"""Real data: the genomics-only ``snn`` on TCGA GBM/LGG, centralized vs federated vs local-only.

For each of the five shared folds (``splits_5foldcv``), ``smm tcga`` builds the site folders (sites =
tissue-source-site regions; that fold's test patients; a seeded validation carve-out of its training
patients), and the same config (``configs/tcga_gbmlgg.yaml`` plus the settings below) is run:

* ``centralized``: ``smm centralized`` (all sites' training patients pooled, the federation's
  preprocessing, the same epochs and learning-rate schedule);
* ``fedavg``, ``fedprox``, ``fedadam``: ``smm simulate`` with that strategy (FedProx adds the
  proximal term ``train.proximal_mu`` at every site, FedAdam the server optimiser
  ``federation.server_lr``);
* ``local-only``: ``smm centralized --local-only`` (each site alone, its own preprocessing, selected
  on its own validation patients), every site's model on its own test patients, statistics pooled.

Every mode selects its round on validation loss and is tested once, on the fold's test patients,
pooled over sites. Reported per mode: mean and sample standard deviation over folds of the metrics
of the paper's tables (AUC, accuracy, macro F1 for diagnosis and grade; C-index for survival: here
the within-site C-index), beside the published genomics-only row (SNN in the TMI extension's table:
3-fold CV on TCGA GBM/LGG + IvyGAP, 431 genes; ``method.md`` section 6), and the federated modes'
gap to centralized per fold.

    python benchmarks/tcga_quality.py            # 5 folds x 5 modes (about 75 minutes on 2 CPU cores)
    python benchmarks/tcga_quality.py --quick    # fold 0, centralized and fedavg, 5 rounds (make bench)

Results: ``benchmarks/results/tcga_quality_<device>.json`` (``tcga_quality_quick_...`` for --quick);
the run folders (with their reports) stay under ``--work`` when it is given, else in a temporary
folder that is removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402

CONFIG = quality.ROOT / "configs" / "tcga_gbmlgg.yaml"
TABLES = quality.ROOT.parent / "shared" / "data" / "tcga_gbmlgg"

#: published genomics-only row (SNN), TMI extension table, percent (method.md section 6)
PUBLISHED_SNN = {"diagnosis.auc": 88.24, "diagnosis.accuracy": 73.54, "diagnosis.macro_f1": 61.11,
                 "grade.auc": 86.79, "grade.accuracy": 69.41, "grade.macro_f1": 65.66, "survival.c_index": 75.99}

#: the federation's length: rounds x local epochs, the same number of epochs for centralized
ROUNDS, LOCAL_EPOCHS = 20, 2
#: strategy -> its settings (FedProx's mu and FedAdam's server learning rate: common defaults, not tuned)
STRATEGIES = {"fedavg": [], "fedprox": ["train.proximal_mu=0.01"], "fedadam": ["federation.server_lr=0.01"]}
MODES = ("centralized", *STRATEGIES, "local-only")


def run_fold(fold: int, work: Path, modes: tuple[str, ...], rounds: int, local_epochs: int) -> dict:
    """Build fold ``fold``'s sites, run every mode, return ``{mode: {"values", "wall_s", ...}}``."""
    sites = work / f"fold{fold}" / "sites"
    if sites.exists():
        shutil.rmtree(sites)
    quality.smm(["tcga", "--tables", TABLES, "--out", sites, "--fold", fold], work / f"fold{fold}" / "tcga.log")
    common = [f"data.sites_root={sites}", f"federation.rounds={rounds}", f"federation.local_epochs={local_epochs}"]
    out: dict = {}
    for mode in modes:
        sets = common + STRATEGIES.get(mode, []) + ([f"federation.strategy={mode}"] if mode in STRATEGIES else [])
        kind = "federated" if mode in STRATEGIES else mode
        out[mode] = quality.run_mode(kind, CONFIG, work / f"fold{fold}" / mode, sets,
                                     work / f"fold{fold}" / f"{mode}.log")
        quality.print_row(f"[tcga fold {fold}] {mode:<11}", out[mode])
    return out


def gaps(folds: list[dict], modes: tuple[str, ...]) -> dict:
    """Per federated mode and metric: (federated - centralized) per fold, and its mean."""
    res = {}
    for mode in modes:
        if mode not in STRATEGIES or "centralized" not in modes:
            continue
        res[mode] = quality.differences([f[mode]["values"] for f in folds],
                                        [f["centralized"]["values"] for f in folds])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", default="0,1,2,3,4", help="comma-separated folds (default all five)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--local-epochs", type=int, default=LOCAL_EPOCHS)
    ap.add_argument("--quick", action="store_true", help="fold 0, centralized and fedavg, 5 rounds of 1 epoch")
    ap.add_argument("--work", type=Path, default=None, help="keep the site and run folders here")
    args = ap.parse_args(argv)
    if not (TABLES / "splits_5foldcv").is_dir():
        print(f"tcga_quality: the TCGA tables are not at {TABLES} (../shared/data/tcga_gbmlgg)", file=sys.stderr)
        return 2
    folds = [0] if args.quick else [int(f) for f in args.folds.split(",")]
    modes = ("centralized", "fedavg") if args.quick else tuple(args.modes.split(","))
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; expected {MODES}")
    rounds, local_epochs = (5, 1) if args.quick else (args.rounds, args.local_epochs)
    t0 = time.perf_counter()
    with quality.work_folder(args.work, "tcga_quality_") as work:
        per_fold = [run_fold(f, work, modes, rounds, local_epochs) for f in folds]
    summary = quality.summarise({m: [f[m]["values"] for f in per_fold] for m in modes}, quality.PAPER_METRICS)
    payload = {
        **quality.result_header("tcga_quality", __file__, argv, t0),
        "setting": {"config": str(CONFIG.relative_to(quality.ROOT)), "folds": folds, "modes": list(modes),
                    "rounds": rounds, "local_epochs": local_epochs, "strategies": STRATEGIES,
                    "selection": "validation loss, per mode", "c_index": "within-site pairs",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "published_snn_percent": PUBLISHED_SNN,
        "summary": summary, "gap_to_centralized": gaps(per_fold, modes),
        "folds": {str(f): r for f, r in zip(folds, per_fold)},
    }
    path = quality.write_result(payload, args.quick)
    print(quality.markdown_table(summary, quality.PAPER_METRICS, {"published SNN (TMI table)": PUBLISHED_SNN}))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
