"""What patient-level DP-SGD costs in model quality: federated runs at epsilon 1, 3 and 8 against
the same federation without DP.

Two cohorts, one seed each:

* ``tcga``: TCGA GBM/LGG, RNA only, fold 0 (``smm tcga --fold 0``: the 7 tissue-source-site
  regions, as ``tcga_quality.py`` builds them) with ``configs/tcga_gbmlgg.yaml``. The committed
  protocol's SCAFFOLD is refused under DP (its control variate is the mean of a site's un-noised
  gradients), so every run here, the no-DP baseline included, uses ``federation.strategy=fedavg``
  with the config's other settings (plain SGD 0.1, 12 steps per site and round, fresh optimizer);
* ``synthetic``: cohort seed 0 of ``synthetic_quality.py`` (6 sites x 100 patients, features only)
  with ``configs/bench_synthetic.yaml`` and the proposed ``smm`` model (FedAvgM). DP runs gradient
  coordination off and drops the consistency terms (constant on one patient), so every run here,
  the baseline included, has ``train.coordination=off`` and ``loss.consistency_weight=0``.

Per cohort the runs are ``smm simulate`` with the cohort's settings (``none``: no DP) and with
``privacy.dp=true``, ``privacy.dp_target_epsilon=E`` (sigma calibrated by each site from the target
over the planned rounds, ``client/local/dp.py``), ``privacy.dp_delta=1e-5``, the default clip
(``privacy.dp_max_grad_norm``) and accountant; the disclosure-control policy stays at its default
(``privacy.min_cell=5``). Every run starts from its own copy of the site folders, so each site's
privacy ledger (``<site>/privacy/ledger.json``) is fresh and a run never spends another's budget.
Every run, the baselines included, selects its round on the validation mean of diagnosis AUC,
grade AUC and C-index (``federation.selection_metric``): the configs' mean of five also holds the
two macro F1s, which the default disclosure control makes uncomputable at these site sizes (9 to
25 validation patients a site; a site's own F1 would give back its suppressed cells), so that
selection would always keep the last round; the validation loss is no better a choice here (without
DP the TCGA run's is lowest at round 1 and rises while its AUCs improve). Where a site's score
histograms are coarsened the AUCs are the patient-weighted mean of the sites' own AUCs.

The selected ``model.pt`` is then evaluated **exactly** with ``smm evaluate`` on the pooled test
patients of every site (no cell rules: the benchmark holds the data, a server would not); the
federated run's own test report (what the sites sent, n/a where disclosure control hides a cell)
is kept beside it.

Reported per cohort and epsilon: the exact test metrics (diagnosis and grade AUC and macro F1,
within-site C-index), the federated run's reported ones, the selected round, the epsilon each site actually spent as the run recorded
it (``dp-epsilon`` of the last round in ``rounds.jsonl``, cross-checked against the site's ledger),
each site's sigma and sample rate, the wall time, the command and the overrides.

    OMP_NUM_THREADS=1 python benchmarks/dp_quality.py --work DIR     # 8 runs (see README for the time)
    OMP_NUM_THREADS=1 python benchmarks/dp_quality.py --work DIR --cohorts synthetic --synthetic-rounds 5
    OMP_NUM_THREADS=1 python benchmarks/dp_quality.py --quick        # 2 rounds per run (a smoke test)

Results: ``benchmarks/results/dp_quality_<device>.json`` (``dp_quality_quick_...`` for --quick);
the run folders stay under ``--work`` when it is given, else in a temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402
import synthetic_quality  # noqa: E402
import tcga_quality  # noqa: E402

from smm_model.contract import wire  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
#: per-site budget every DP run's ledger allows (>= the largest target)
BUDGET = 10.0
METRICS = ("diagnosis.auc", "diagnosis.macro_f1", "grade.auc", "grade.macro_f1", "survival.c_index")
SYNTH_SEED = 0
#: cohort -> (config, settings of every run of the cohort, DP or not)
COHORTS: dict[str, tuple[Path, list[str]]] = {
    "tcga": (tcga_quality.CONFIG, ["federation.strategy=fedavg"]),
    "synthetic": (synthetic_quality.CONFIG, [*synthetic_quality.VARIANTS["smm-off"], "loss.consistency_weight=0",
                                             f"federation.min_nodes={synthetic_quality.SITES}"]),
}
#: every run's selection, the baselines' included (see the module docstring)
SELECTION = "federation.selection_metric=diagnosis.auc+grade.auc+survival.c_index"


def dp_sets(eps: float | None) -> list[str]:
    if eps is None:
        return []
    return ["privacy.dp=true", f"privacy.dp_target_epsilon={eps:g}", f"privacy.dp_delta={DELTA:g}",
            f"privacy.dp_epsilon_budget={BUDGET:g}"]


def build_cohort(cohort: str, work: Path, patients: int) -> Path:
    """The cohort's site folders (built once per work folder; each run gets its own copy)."""
    if cohort == "tcga":
        return tcga_quality.build_sites(0, work / "tcga", "real")
    base = work / "synthetic"
    sites = base / "sites"
    args = ["synth", "--out", sites, "--sites", synthetic_quality.SITES, "--patients-per-site", patients,
            "--features-only", "--split", synthetic_quality.SPLIT, "--seed", SYNTH_SEED]
    if synthetic_quality._cached(base / "synth.json", args) is None:
        if sites.exists():
            shutil.rmtree(sites)
        quality.smm(args, base / "synth.log")
        synthetic_quality._store(base / "synth.json", args, {})
    return sites


def dp_spent(run_dir: Path, sites_root: Path, delta: float) -> dict[str, Any]:
    """Per site: the cumulative epsilon of its last training round as the run recorded it
    (``dp-epsilon`` in ``rounds.jsonl``), its sigma, clip and sample rate, the rounds it trained,
    and the epsilon its own ledger holds (the run's copy of the site folder)."""
    from client.local.ledger import PrivacyLedger

    final = quality.load_final(run_dir)
    labels = {n: (i or {}).get("label") or n for n, i in final.get("site_info", {}).items()}
    per: dict[str, dict[str, Any]] = {}
    for rec in quality.training_rounds(run_dir):
        for node, m in rec["train"]["per_site"].items():
            if wire.DP_EPSILON not in m:
                continue
            row = per.setdefault(labels.get(node, node), {"rounds": 0})
            row.update(epsilon=float(m[wire.DP_EPSILON]), delta=float(m[wire.DP_DELTA]), sigma=float(m[wire.DP_SIGMA]),
                       clip=float(m[wire.DP_CLIP]), sample_rate=float(m[wire.DP_SAMPLE_RATE]),
                       train_patients=int(m["num-examples"]), steps_per_round=int(m.get("steps", 0)))
            row["rounds"] += 1
    for site, row in per.items():
        ledger = sites_root / site / "privacy" / "ledger.json"
        row["ledger_epsilon"] = PrivacyLedger.open(ledger).epsilon(delta) if ledger.is_file() else None
    final_dp = {k: v for k, v in final.items() if "dp" in k.lower() or "privacy" in k.lower()}
    return {"per_site": per, "max_epsilon": max((r["epsilon"] for r in per.values()), default=None),
            "sigma_range": [min((r["sigma"] for r in per.values()), default=None),
                            max((r["sigma"] for r in per.values()), default=None)],
            "final_metrics_privacy_keys": final_dp}


def _pct(values: dict) -> dict[str, float | None]:
    """Percent, None for n/a."""
    return {m: (None if values.get(m) is None or not math.isfinite(float(values[m])) else round(100 * float(values[m]), 1))
            for m in METRICS}


def exact_test(run_dir: Path, sites: Path, work: Path, name: str) -> dict[str, float | None]:
    """The run's selected ``model.pt`` on every site's test patients, pooled, no cell rules
    (``smm evaluate``, as ``disclosure_cost.py``)."""
    out = work / f"eval-{name}"
    site_dirs = sorted(p for p in sites.iterdir() if (p / "clinical.csv").is_file())  # a site folder holds clinical.csv
    if not site_dirs:
        raise RuntimeError(f"dp_quality: no site folder under {sites}")
    if not (out / "final_metrics.json").is_file():
        quality.smm(["evaluate", run_dir / "model.pt", *site_dirs, "--out", out, "--device", "cpu"], work / f"eval-{name}.log")
    return _pct(json.loads((out / "final_metrics.json").read_text())["test"]["global"]["values"])


def run_cohort(cohort: str, work: Path, rounds: int, epsilons: tuple[float | None, ...], patients: int,
               out: dict[str, Any], done: Any = None) -> dict:
    """Every epsilon's run of ``cohort`` into ``out`` (``done()`` after each run)."""
    config, common = COHORTS[cohort]
    base_sites = build_cohort(cohort, work, patients)
    base = work / cohort
    for eps in epsilons:
        name = "none" if eps is None else f"eps{eps:g}"
        sites = base / f"sites_{name}"  # this run's own copy: a fresh privacy ledger at every site
        run_dir = base / name
        sets = [f"data.sites_root={sites}", f"federation.rounds={rounds}", *common, SELECTION, *dp_sets(eps)]
        if not quality.finished("federated", run_dir, config, sets):
            if sites.exists():
                shutil.rmtree(sites)
            shutil.copytree(base_sites, sites, ignore=shutil.ignore_patterns("privacy"))
        row = quality.run_or_reuse("federated", config, run_dir, sets, base / f"{name}.log")
        cmd = ["smm", "simulate", str(config.relative_to(quality.ROOT)), "--run-dir", str(run_dir),
               *[a for s in sets for a in ("--set", s)]]
        reported = quality.load_final(run_dir)["test"]["global"]
        row.update(epsilon_target=eps, command=" ".join(cmd), overrides=sets,
                   dp=dp_spent(run_dir, sites, DELTA) if eps is not None else None,
                   exact=exact_test(run_dir, sites, base, name), reported=_pct(reported["values"]),
                   reported_reasons={m: r for m, r in (reported.get("reasons") or {}).items() if m in METRICS})
        out[name] = row
        extra = "" if eps is None else (f"; spent eps max {row['dp']['max_epsilon']:.3f}, sigma "
                                        f"{row['dp']['sigma_range'][0]:.3g}-{row['dp']['sigma_range'][1]:.3g}")
        print(f"[dp {cohort}] {name:<6} exact {row['exact']}\n    reported {row['reported']}\n"
              f"    selected round {row['best_round']}{extra}; wall {row['wall_s']} s", flush=True)
        if done is not None:
            done()
    return out


def table(results: dict[str, dict]) -> str:
    """The README table: exact test metrics in percent."""
    head = "| cohort | epsilon | " + " | ".join(METRICS) + " | round | spent eps (max site) | sigma | wall s |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 6)]
    for cohort, runs in results.items():
        for name, r in sorted(runs.items(), key=lambda kv: kv[1]["epsilon_target"] or float("inf"), reverse=True):
            v = r["exact"]
            dp = r.get("dp")
            sig = "–" if not dp else f"{dp['sigma_range'][0]:.2f}–{dp['sigma_range'][1]:.2f}"
            spent = "–" if not dp else f"{dp['max_epsilon']:.2f}"
            lines.append(f"| {cohort} | {'no DP' if name == 'none' else name[3:]} | "
                         + " | ".join("n/a" if v[m] is None else f"{v[m]:.1f}" for m in METRICS)
                         + f" | {r['best_round']} | {spent} | {sig} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohorts", default="tcga,synthetic",
                    help=f"comma-separated subset of {tuple(COHORTS)}")
    ap.add_argument("--epsilons", default="none,1,3,8", help="comma-separated targets; none = without DP")
    ap.add_argument("--tcga-rounds", type=int, default=None, help="federation.rounds for TCGA (default: the config's)")
    ap.add_argument("--synthetic-rounds", type=int, default=None,
                    help="federation.rounds for the synthetic cohort (default: the config's)")
    ap.add_argument("--patients-per-site", type=int, default=synthetic_quality.PATIENTS_PER_SITE["additive"],
                    help="synthetic cohort size per site")
    ap.add_argument("--quick", action="store_true", help="2 rounds per run, 6 x 40 synthetic patients (smoke test)")
    ap.add_argument("--work", type=Path, default=None, help="keep the site and run folders here; finished runs "
                    "found there are reused")
    args = ap.parse_args(argv)
    cohorts = tuple(args.cohorts.split(","))
    if set(cohorts) - set(COHORTS):
        ap.error(f"unknown cohorts {sorted(set(cohorts) - set(COHORTS))}; expected {tuple(COHORTS)}")
    epsilons = tuple(None if e == "none" else float(e) for e in args.epsilons.split(","))
    if any(e is not None and not 0 < e <= BUDGET for e in epsilons):
        ap.error(f"--epsilons: each target must be in (0, {BUDGET:g}] or none")
    if any(c == "tcga" for c in cohorts) and not (tcga_quality.TABLES / "splits_5foldcv").is_dir():
        print(f"dp_quality: the TCGA tables are not at {tcga_quality.TABLES}", file=sys.stderr)
        return 2
    import yaml

    rounds = {c: 2 if args.quick else (getattr(args, f"{c}_rounds")
                                        or yaml.safe_load(COHORTS[c][0].read_text())["federation"]["rounds"])
              for c in cohorts}
    patients = 40 if args.quick else args.patients_per_site
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    with quality.work_folder(args.work, "dp_quality_") as work:
        def write() -> Path:  # after every run: a stopped benchmark keeps what it measured
            return quality.write_result(payload(argv, t0, results, rounds, epsilons, patients), args.quick)

        for c in cohorts:
            run_cohort(c, work, rounds[c], epsilons, patients, results.setdefault(c, {}), write)
        path = write()
    print(table(results))
    print(f"results: {path}")
    return 0


def payload(argv: list[str] | None, t0: float, results: dict[str, dict], rounds: dict[str, int],
            epsilons: tuple[float | None, ...], patients: int) -> dict[str, Any]:
    return {
        **quality.result_header("dp_quality", __file__, argv, t0),  # wall_s: runs reused from --work take none
        "runs_wall_s": round(sum(r["wall_s"] or 0 for runs in results.values() for r in runs.values()), 1),
        "setting": {
            "cohorts": {c: {"config": str(COHORTS[c][0].relative_to(quality.ROOT)), "rounds": rounds[c],
                            "common_overrides": COHORTS[c][1]} for c in results},
            "tcga": "fold 0, 7 regions, RNA only (smm tcga --fold 0)",
            "synthetic": f"smm synth --features-only seed {SYNTH_SEED}, {synthetic_quality.SITES} sites x "
                         f"{patients} patients, split {synthetic_quality.SPLIT}",
            "epsilons": list(epsilons), "delta": DELTA, "epsilon_budget": BUDGET,
            "dp": "privacy.dp_target_epsilon with dp_noise_multiplier null: each site calibrates sigma for its own "
                  "sample rate over the planned rounds; default clip (privacy.dp_max_grad_norm) and accountant",
            "ledger": "every run on its own copy of the site folders (a fresh <site>/privacy/ledger.json)",
            "min_cell": "default (privacy.min_cell=5)",
            "exact": "smm evaluate of the run's model.pt on every site's test patients, pooled, no cell rules",
            "seeds": "one (the config's train.seed; synthetic cohort seed 0)",
            "selection": f"{SELECTION} (validation) for every run",
            "c_index": "within-site pairs", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "results": results,
    }


if __name__ == "__main__":
    sys.exit(main())
