"""What disclosure control costs: the same federation with the cell rules at k = 5 and switched off (k = 1).

Two questions, kept apart:

* **training**: does a model trained under the rules (class weights from suppressed counts,
  survival bins from merged histograms, selection on what the sites may send) test as well? Each
  run's ``model.pt`` is evaluated exactly with ``smm evaluate`` (pooled test patients of every
  site, no disclosure control: the benchmark holds the data, a server would not);
* **measurement**: what the federated run itself reports on its test split from what the sites
  sent (``final_metrics.json``); a metric the rules make uncomputable is reported n/a with its
  reason, never a number computed from a partial table.

The cohort and runs are ``synthetic_quality.py``'s (``configs/bench_synthetic.yaml``, 6 sites x 100
features-only patients, 60/15/25 split: 15 validation and 25 test patients a site), seed 0,
federated mode, ``--set privacy.min_cell=K`` with ``--tag kK``; runs already finished under
``--work`` with the same resolved config are reused.

    python benchmarks/disclosure_cost.py --work DIR                     # smm-pcgrad and concat, k = 5 and 1
    python benchmarks/disclosure_cost.py --work DIR --variants concat   # one model

Results: ``benchmarks/results/disclosure_cost_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402
import synthetic_quality as sq  # noqa: E402

KS = (5, 1)
METRICS = quality.PAPER_METRICS


def _values(d: dict) -> dict[str, float | None]:
    """Percent, None for n/a."""
    return {m: (None if d.get(m) is None or not math.isfinite(float(d[m])) else round(100 * float(d[m]), 1))
            for m in METRICS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="keep the cohort and run folders here")
    ap.add_argument("--variants", default="smm-pcgrad,concat", help=f"comma-separated subset of {tuple(sq.VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    variants = tuple(args.variants.split(","))
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    with quality.work_folder(args.work, "disclosure_cost_") as work:
        rounds = yaml.safe_load(sq.CONFIG.read_text())["federation"]["rounds"]
        for k in KS:
            sq.run_seed(args.seed, work, variants, ("federated",), sq.SITES, sq.PATIENTS_PER_SITE["additive"], rounds,
                        (f"privacy.min_cell={k}",), f"k{k}")
        base = work / f"seed{args.seed}"
        sites = sorted((base / "sites").glob("site_*"))
        for v in variants:
            rows[v] = {}
            for k in KS:
                run = base / f"{v}-federated-k{k}"
                final = quality.load_final(run)
                out = work / f"eval-{v}-k{k}"
                quality.smm(["evaluate", run / "model.pt", *sites, "--out", out, "--device", "cpu"], work / f"eval-{v}-k{k}.log")
                exact = json.loads((out / "final_metrics.json").read_text())["test"]["global"]["values"]
                reported = final["test"]["global"]
                rows[v][f"k{k}"] = {
                    "best_round": final["best_round"], "selection_note": final.get("selection_note"),
                    "reported": _values(reported["values"]),
                    "reported_reasons": {m: r for m, r in (reported.get("reasons") or {}).items() if m in METRICS},
                    "exact": _values(exact)}
                print(f"{v:<11} k={k}: round {final['best_round']:>2}  reported {rows[v][f'k{k}']['reported']}\n"
                      f"{'':<17}exact    {rows[v][f'k{k}']['exact']}")
    payload = {**quality.result_header("disclosure_cost", __file__, argv, t0),
               "setting": {"config": str(sq.CONFIG.relative_to(quality.ROOT)), "seed": args.seed, "sites": sq.SITES,
                           "patients_per_site": sq.PATIENTS_PER_SITE["additive"], "split": sq.SPLIT, "rounds": rounds,
                           "mode": "federated", "ks": list(KS),
                           "reported": "the federated run's test metrics from what the sites sent (final_metrics.json)",
                           "exact": "smm evaluate of the run's model.pt on every site's test patients, pooled, no cell rules"},
               "variants": rows}
    path = quality.write_result(payload, quick=False)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
