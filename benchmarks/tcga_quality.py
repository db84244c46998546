"""Real data: the genomics-only ``snn`` on TCGA GBM/LGG, federated against pooled, local and IID runs.

For each of the five shared folds (``splits_5foldcv``), ``smm tcga`` builds the site folders (sites =
tissue-source-site regions; that fold's test patients; a seeded validation carve-out of its training
patients; RNA-only inputs) and, with ``--iid``, the IID control (the same patients, each keeping its
split, dealt at random into sites of the real sizes). The committed config
(``configs/tcga_gbmlgg.yaml``: its federated protocol was chosen on fold 0's validation patients)
runs in these modes:

* ``centralized``: ``smm centralized`` (all training patients pooled, the federation's
  preprocessing and learning-rate schedule, ``federation.local_epochs`` passes per round);
* ``federated``: ``smm simulate`` over the 7 regions;
* ``iid``: ``smm simulate`` over the IID control's sites, and ``centralized-iid``: pooled training
  evaluated on those sites (the C-index counts within-site pairs, so the IID control's C-index is
  compared with this run, not with ``centralized``);
* ``local-only``: ``smm centralized --local-only`` (each site alone, its own preprocessing, selected
  on its own validation patients): every site's model on its own test patients, statistics pooled,
  and the largest site's model on every site's test patients ("largest site alone");
* ``fedavg-epochs`` (not run by default): the protocol before issue 11 (2 local epochs, a fresh
  AdamW every round, selection on the validation loss).

Every mode selects its round by the config's ``federation.selection_metric`` on validation patients
and is tested once, on the fold's test patients, pooled over sites. Reported per mode: mean and
sample standard deviation over folds of AUC, accuracy, balanced accuracy and macro F1 for diagnosis
and grade and the within-site C-index, beside the published genomics-only row (SNN in the TMI
extension's table: 3-fold CV on TCGA GBM/LGG + IvyGAP, 431 genes; ``method.md`` section 6); the
paired per-fold differences (federated - centralized, iid - centralized-iid, federated - largest
site alone); the passes over the training data each run made; per run the validation learning
curves per task and the per-site test metrics.

    python benchmarks/tcga_quality.py --work DIR   # 5 folds x 5 modes (about 45 minutes alone on 2 CPU cores)
    python benchmarks/tcga_quality.py --quick      # fold 0, centralized and federated, 5 rounds (make bench)

Results: ``benchmarks/results/tcga_quality_<device>.json`` (``tcga_quality_quick_...`` for --quick);
the run folders (with their reports) stay under ``--work`` when it is given, else in a temporary
folder that is removed.
"""

from __future__ import annotations

import argparse
import json
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
#: what the targets are stated in: the paper's metrics plus balanced accuracy
METRICS = (*quality.PAPER_METRICS[:3], "diagnosis.balanced_accuracy", *quality.PAPER_METRICS[3:6],
           "grade.balanced_accuracy", "survival.c_index")
#: the seed of the IID control's random deal (smm tcga --iid)
IID_SEED = 0
#: mode -> (kind of run, which site folders, extra settings). Every mode runs the committed config;
#: ``fedavg-epochs`` is the protocol before issue 11 (2 local epochs, a fresh AdamW per round,
#: selection on validation loss), kept as the reference the new protocol is measured against.
OLD_PROTOCOL = ["federation.strategy=fedavg", "federation.local_steps=0", "federation.local_epochs=2",
                "federation.site_optimizer=fresh",
                "train.optimizer=adamw", "train.lr=0.0005", "train.logit_adjustment=0", "federation.selection_metric=loss",
                "federation.eval_every=1"]
MODES = {
    "centralized": ("centralized", "real", []),
    "federated": ("federated", "real", []),
    "iid": ("federated", "iid", []),
    "centralized-iid": ("centralized", "iid", []),
    "local-only": ("local-only", "real", []),
    "fedavg-epochs": ("federated", "real", OLD_PROTOCOL),
}
DEFAULT_MODES = ("centralized", "federated", "iid", "centralized-iid", "local-only")


def build_sites(fold: int, work: Path, kind: str) -> Path:
    """``smm tcga`` for one fold: the real regions, or the IID control (the same patients dealt at
    random into sites of the real sizes)."""
    sites = work / f"fold{fold}" / ("sites" if kind == "real" else "sites_iid")
    if (sites / "cohort.json").is_file():  # written last by smm tcga, which is deterministic
        return sites
    if sites.exists():
        shutil.rmtree(sites)
    args = ["tcga", "--tables", TABLES, "--out", sites, "--fold", fold] + (["--iid", IID_SEED] if kind == "iid" else [])
    quality.smm(args, work / f"fold{fold}" / f"tcga_{kind}.log")
    return sites


def passes(run_dir: Path, kind: str) -> float | None:
    """Passes over the training data a run made: examples processed / training patients (a
    federated round processes steps x batch at each site)."""
    if kind == "local-only":
        return None
    final = quality.load_final(run_dir)
    if kind == "centralized":
        return float(final["epochs"])
    import yaml
    batch = int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"])
    rounds = quality.training_rounds(run_dir)
    n_train = sum(int(m["num-examples"]) for m in rounds[0]["train"]["per_site"].values())
    seen = sum(int(m.get("steps", 0)) * batch for r in rounds for m in r["train"]["per_site"].values())
    return seen / n_train


def curves(run_dir: Path) -> dict[str, list]:
    """Validation learning curves per task (pooled), from ``rounds.jsonl``."""
    out: dict[str, list] = {"round": []}
    for rec in quality.round_records(run_dir):
        if not rec.get("val"):
            continue
        out["round"].append(rec["round"])
        for m in ("loss", *METRICS):
            out.setdefault(m, []).append(rec["val"]["global"]["values"].get(m))
    return out


def per_site_test(run_dir: Path) -> dict[str, dict]:
    """The selected model's test metrics per site (sites below the minimum are absent)."""
    final = quality.load_final(run_dir)
    labels = {n: (i or {}).get("label") or n for n, i in final.get("site_info", {}).items()}
    return {labels.get(n, n): {"patients": r["patients"], **{m: r["values"].get(m) for m in METRICS}}
            for n, r in final["test"]["per_site"].items()}


def run_fold(fold: int, work: Path, modes: tuple[str, ...], sets: list[str], config: Path = CONFIG) -> dict:
    """Build fold ``fold``'s sites, run every mode with ``config``, return ``{mode: {"values",
    "wall_s", ...}}``."""
    roots = {k: build_sites(fold, work, k) for k in sorted({MODES[m][1] for m in modes})}
    out: dict = {}
    for mode in modes:
        kind, which, extra = MODES[mode]
        run_dir = work / f"fold{fold}" / mode
        run_sets = [f"data.sites_root={roots[which]}", *sets, *extra]
        res = quality.run_or_reuse(kind, config, run_dir, run_sets, work / f"fold{fold}" / f"{mode}.log")
        if kind == "local-only":
            largest = max(res["per_site"], key=lambda n: res["per_site"][n]["patients"])
            table = json.loads((run_dir / "local_only.json").read_text())["sites"][largest]["all_sites_test"]
            res["largest_site"] = {"site": largest, "values": {k: float(v) for k, v in table["values"].items()
                                                               if v is not None}}
        else:
            res.update(passes=passes(run_dir, kind), curves=curves(run_dir), per_site_test=per_site_test(run_dir))
        out[mode] = res
        quality.print_row(f"[tcga fold {fold}] {mode:<15}", res)
    return out


def gaps(folds: list[dict], modes: tuple[str, ...]) -> dict:
    """(mode - its centralized reference) per fold and its mean: the IID control against
    centralized training on the same IID sites (the C-index counts within-site pairs), the others
    against centralized on the real regions; also the best federated run against the largest site
    alone."""
    res = {}
    for mode in modes:
        ref = "centralized-iid" if MODES[mode][1] == "iid" else "centralized"
        if mode.startswith("centralized") or mode == "local-only" or ref not in modes:
            continue
        res[f"{mode} - {ref}"] = quality.differences([f[mode]["values"] for f in folds],
                                                     [f[ref]["values"] for f in folds], metrics=METRICS)
    if "federated" in modes and "local-only" in modes:
        res["federated - largest site alone"] = quality.differences(
            [f["federated"]["values"] for f in folds], [f["local-only"]["largest_site"]["values"] for f in folds],
            metrics=METRICS)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", default="0,1,2,3,4", help="comma-separated folds (default all five)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated subset of {tuple(MODES)}")
    ap.add_argument("--rounds", type=int, default=None, help="federation.rounds (default: the config's)")
    ap.add_argument("--quick", action="store_true", help="fold 0, centralized and federated, 5 rounds")
    ap.add_argument("--config", type=Path, default=CONFIG,
                    help="a candidate config instead of the committed one (its results go to "
                         "results/tcga_quality_<config name>_<device>.json)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the site and run folders here; finished runs found there are reused (use a new "
                         "folder after changing the config)")
    args = ap.parse_args(argv)
    config = args.config.resolve()
    if not config.is_file():
        ap.error(f"--config {args.config}: no such file")
    if not (TABLES / "splits_5foldcv").is_dir():
        print(f"tcga_quality: the TCGA tables are not at {TABLES} (../shared/data/tcga_gbmlgg)", file=sys.stderr)
        return 2
    folds = [0] if args.quick else [int(f) for f in args.folds.split(",")]
    modes = ("centralized", "federated") if args.quick else tuple(args.modes.split(","))
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; expected {tuple(MODES)}")
    rounds = 5 if args.quick else args.rounds
    sets = [f"federation.rounds={rounds}"] if rounds else []
    t0 = time.perf_counter()
    with quality.work_folder(args.work, "tcga_quality_") as work:
        per_fold = [run_fold(f, work, modes, sets, config) for f in folds]
    values = {m: [f[m]["values"] for f in per_fold] for m in modes}
    if "local-only" in modes:
        values["largest site alone"] = [f["local-only"]["largest_site"]["values"] for f in per_fold]
    summary = quality.summarise(values, METRICS)
    payload = {
        **quality.result_header("tcga_quality" + ("" if config == CONFIG else f"_{config.stem}"), __file__, argv, t0),
        "setting": {"config": str(config.relative_to(quality.ROOT) if config.is_relative_to(quality.ROOT) else config),
                    "folds": folds, "modes": list(modes),
                    "mode_settings": {m: MODES[m] for m in modes}, "overrides": sets, "iid_seed": IID_SEED,
                    "selection": "the config's federation.selection_metric on validation, per mode",
                    "c_index": "within-site pairs", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "published_snn_percent": PUBLISHED_SNN,
        "summary": summary, "gap_to_centralized": gaps(per_fold, modes),
        "passes_over_training_data": {m: [f[m].get("passes") for f in per_fold] for m in modes},
        "folds": {str(f): r for f, r in zip(folds, per_fold)},
    }
    path = quality.write_result(payload, args.quick)
    print(quality.markdown_table(summary, METRICS, {"published SNN (TMI table)": PUBLISHED_SNN}))
    for name, d in payload["gap_to_centralized"].items():
        print(f"{name}: " + ", ".join(f"{m} {100 * v['mean']:+.1f}" for m, v in d.items()
                                      if v.get("mean") is not None))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
