"""How the federated protocol of ``configs/tcga_gbmlgg.yaml`` was chosen: fold 0, validation only.

Each row is one training run on TCGA fold 0 (the sites ``tcga_quality.py`` builds: the 7 regions,
or the IID control of the same patients) with the committed config plus the row's overrides, run
the way a user runs it (``smm centralized`` or ``smm simulate``). A row is read at the round its
own ``federation.selection_metric`` selected, on the **validation** patients: the choice never
looks at the test patients (``tcga_quality.py`` tests the chosen protocol once, on five folds).

Reported per row: the selected round, the mean of the five validation metrics the committed
selection uses (diagnosis AUC and macro F1, grade AUC and macro F1, C-index) and each of them.

    python benchmarks/protocol_choice.py --work DIR               # every row: 27 runs, 106 minutes of runs with other jobs on 2 cores
    python benchmarks/protocol_choice.py --work DIR --rows a,b   # a subset, by name

With the same ``--work`` as ``tcga_quality.py`` the site folders are shared, and the rows that are
the committed protocol reuse that benchmark's fold-0 runs. Results:
``benchmarks/results/protocol_choice_<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402
import tcga_quality  # noqa: E402

FOLD = 0
#: the committed selection metric's parts, in table order
SELECTION = ("diagnosis.auc", "diagnosis.macro_f1", "grade.auc", "grade.macro_f1", "survival.c_index")

ADAMW = ["train.optimizer=adamw", "train.lr=0.0005"]
FEDAVG = ["federation.strategy=fedavg"]
SGD_M9 = ["train.optimizer=sgd", "train.momentum=0.9"]
KEPT = ["federation.site_optimizer=persist"]
LA1 = ["train.logit_adjustment=1.0"]
LOSS = ["federation.selection_metric=loss"]


@dataclass(frozen=True)
class Row:
    """One run: ``name`` (its run folder), the sites, the training kind, a label for the table and
    the overrides on top of the committed config. ``reuse``: the ``tcga_quality.py`` mode whose
    fold-0 run this row is (the committed protocol), shared through ``--work``."""

    name: str
    sites: str  # "pooled" (centralized over the regions' patients), "iid" or "regions"
    label: str
    sets: list[str] = field(default_factory=list)
    reuse: str | None = None

    @property
    def kind(self) -> str:
        return "centralized" if self.sites == "pooled" else "federated"

    @property
    def site_kind(self) -> str:
        return "iid" if self.sites == "iid" else "real"


ROWS = (
    Row("pooled-adamw-loss", "pooled", "AdamW 5e-4, 2 epochs/round (before)", ADAMW + LOSS),
    Row("pooled-adamw", "pooled", "AdamW 5e-4, 2 epochs/round", ADAMW),
    Row("pooled-sgd", "pooled", "SGD 0.1, 2 epochs/round (committed)", reuse="centralized"),
    Row("iid-before", "iid", "FedAvg, AdamW, 2 local epochs, fresh optimizer (before)", tcga_quality.OLD_PROTOCOL),
    Row("iid-adamw-s4-kept", "iid", "FedAvg, AdamW, 4 steps, kept optimizer",
        FEDAVG + ADAMW + KEPT + ["federation.local_steps=4"]),
    Row("iid-adamw-s12-kept", "iid", "FedAvg, AdamW, 12 steps, kept optimizer",
        FEDAVG + ADAMW + KEPT + ["federation.local_steps=12"]),
    Row("iid-adamw-s24", "iid", "FedAvg, AdamW, 24 steps, fresh", FEDAVG + ADAMW),
    Row("iid-adamw-s24-kept", "iid", "FedAvg, AdamW, 24 steps, kept optimizer", FEDAVG + ADAMW + KEPT),
    Row("iid-sgd05m9-s24-la1", "iid", "FedAvg, SGD 0.05 m 0.9, 24 steps, logit adj. 1",
        FEDAVG + SGD_M9 + LA1 + ["train.lr=0.05"]),
    Row("iid-scaffold", "iid", "SCAFFOLD, SGD 0.1, 24 steps (committed)", reuse="iid"),
    Row("regions-before", "regions", "FedAvg, AdamW, 2 local epochs, fresh optimizer (before)",
        tcga_quality.OLD_PROTOCOL),
    Row("regions-adamw-s12-kept", "regions", "FedAvg, AdamW, 12 steps, kept optimizer",
        FEDAVG + ADAMW + KEPT + ["federation.local_steps=12"]),
    Row("regions-adamw-s12-kept-la1", "regions", "the same + logit adj. 1",
        FEDAVG + ADAMW + KEPT + LA1 + ["federation.local_steps=12"]),
    Row("regions-adamw-s12-kept-la1-prox", "regions", "the same + FedProx mu 0.1",
        ADAMW + KEPT + LA1 + ["federation.local_steps=12", "federation.strategy=fedprox", "train.proximal_mu=0.1"]),
    Row("regions-adamw-s4-la1", "regions", "FedAvg, AdamW, 4 steps, logit adj. 1",
        FEDAVG + ADAMW + LA1 + ["federation.local_steps=4"]),
    Row("regions-sgd05m9-s4-la1", "regions", "FedAvg, SGD 0.05 m 0.9, 4 steps, logit adj. 1",
        FEDAVG + SGD_M9 + LA1 + ["train.lr=0.05", "federation.local_steps=4"]),
    Row("regions-sgd05m9-s12-la1", "regions", "FedAvg, SGD 0.05 m 0.9, 12 steps, logit adj. 1",
        FEDAVG + SGD_M9 + LA1 + ["train.lr=0.05", "federation.local_steps=12"]),
    Row("regions-sgd02m9-s12-kept-la1", "regions", "FedAvg, SGD 0.02 m 0.9, 12 steps, kept optimizer, logit adj. 1",
        FEDAVG + SGD_M9 + KEPT + LA1 + ["train.lr=0.02", "federation.local_steps=12"]),
    Row("regions-sgd05m9-s24-la1", "regions", "FedAvg, SGD 0.05 m 0.9, 24 steps, logit adj. 1",
        FEDAVG + SGD_M9 + LA1 + ["train.lr=0.05"]),
    Row("regions-scaffold-m9-la1", "regions", "SCAFFOLD, SGD 0.05 m 0.9, 24 steps, logit adj. 1",
        SGD_M9 + LA1 + ["train.lr=0.05"]),
    Row("regions-scaffold-m9", "regions", "SCAFFOLD, SGD 0.05 m 0.9, 24 steps", SGD_M9 + ["train.lr=0.05"]),
    Row("regions-scaffold-m9-clip10", "regions", "SCAFFOLD, SGD 0.05 m 0.9, 24 steps, grad clip 10",
        SGD_M9 + ["train.lr=0.05", "train.grad_clip=10"]),
    Row("regions-scaffold", "regions", "SCAFFOLD, SGD 0.1, 24 steps (committed)", reuse="federated"),
    Row("regions-scaffold-la1", "regions", "SCAFFOLD, SGD 0.1, 24 steps, logit adj. 1", LA1),
    Row("regions-scaffold-r30", "regions", "SCAFFOLD, SGD 0.1, 24 steps, 30 rounds", ["federation.rounds=30"]),
    Row("regions-scaffold-s12-r40", "regions", "SCAFFOLD, SGD 0.1, 12 steps, 40 rounds (the same passes)",
        ["federation.local_steps=12", "federation.rounds=40"]),
    Row("regions-scaffold-lr05-r40", "regions", "SCAFFOLD, SGD 0.05, 24 steps, 40 rounds",
        ["train.lr=0.05", "federation.rounds=40"]),
)


def selected_validation(run_dir: Path) -> dict:
    """The selected round, its validation values and the mean of the committed selection's five."""
    sel = quality.selected_validation(run_dir)
    values = {m: sel["values"].get(m) for m in ("loss", *SELECTION)}
    parts = [values[m] for m in SELECTION]
    mean5 = statistics.fmean(parts) if all(v is not None for v in parts) else None
    return {"round": sel["round"], "mean_of_5": mean5, "values": values}


def lost_rounds(run_dir: Path) -> dict:
    """Rounds skipped and replies dropped (a diverging protocol's updates are refused as non-finite:
    part of what a row measures, so counted here rather than refused)."""
    skipped, dropped = 0, 0
    for rec in quality.round_records(run_dir):
        skipped += rec.get("status") == "skipped"
        dropped += len((rec.get("train") or {}).get("dropped", []))
    return {"skipped_rounds": skipped, "dropped_train_replies": dropped}


def run_row(row: Row, work: Path) -> dict:
    sites = tcga_quality.build_sites(FOLD, work, row.site_kind)
    run_dir = work / f"fold{FOLD}" / (row.reuse or f"choice/{row.name}")
    sets = [f"data.sites_root={sites}", *row.sets]
    quality.run_or_reuse(row.kind, tcga_quality.CONFIG, run_dir, sets, run_dir.with_suffix(".log"), clean=False)
    res = {"sites": row.sites, "label": row.label, "overrides": row.sets, "run": str(run_dir.relative_to(work)),
           "wall_s": quality.load_final(run_dir).get("wall_s"), **lost_rounds(run_dir), **selected_validation(run_dir)}
    v = res["values"]
    print(f"[choice] {row.name:<34} round {res['round']:>2}  mean {100 * (res['mean_of_5'] or float('nan')):5.1f}  "
          + "  ".join(f"{m} {100 * v[m]:5.1f}" for m in SELECTION if v[m] is not None), flush=True)
    return res


def markdown(rows: dict[str, dict]) -> str:
    """The table benchmarks/README.md shows: the selection each row used (the committed mean of
    five, or the summed loss of the protocol before), its round, and rounds lost to divergence."""
    head = ("| sites | protocol | selection | round | mean of 5 | diag AUC | diag F1 | grade AUC | grade F1 | C-index "
            "| rounds skipped |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows.values():
        cells = [f"{100 * r['values'][m]:.1f}" if r["values"][m] is not None else "n/a" for m in SELECTION]
        mean = f"{100 * r['mean_of_5']:.1f}" if r["mean_of_5"] is not None else "n/a"
        selection = "loss" if "federation.selection_metric=loss" in r["overrides"] else "mean"
        lines.append(f"| {r['sites']} | {r['label']} | {selection} | {r['round']} | {mean} | " + " | ".join(cells)
                     + f" | {r.get('skipped_rounds', 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the site and run folders here (share it with tcga_quality.py to reuse its runs)")
    args = ap.parse_args(argv)
    if not (tcga_quality.TABLES / "splits_5foldcv").is_dir():
        print(f"protocol_choice: the TCGA tables are not at {tcga_quality.TABLES}", file=sys.stderr)
        return 2
    by_name = {r.name: r for r in ROWS}
    names = list(by_name) if args.rows is None else args.rows.split(",")
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        ap.error(f"unknown rows {unknown}; expected some of {tuple(by_name)}")
    t0 = time.perf_counter()
    with quality.work_folder(args.work, "protocol_choice_") as work:
        rows = {n: run_row(by_name[n], work) for n in names}
    payload = {
        **quality.result_header("protocol_choice", __file__, argv, t0),
        "setting": {"config": str(tcga_quality.CONFIG.relative_to(quality.ROOT)), "fold": FOLD,
                    "read_on": "validation patients, at each run's selected round", "selection_parts": SELECTION,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "rows": rows,
    }
    path = quality.write_result(payload, quick=False)
    print(markdown(rows))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
