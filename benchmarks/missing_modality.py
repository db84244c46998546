"""Does a site without slides help a multimodal federation? smm with and without a genomics-only site.

``smm synth --features-only --without-slides K`` writes a cohort per seed (4 sites by default) and
takes the slides of site K (the last) away: its manifest declares ``"modalities": ["genomics"]``,
its patients, labels, splits and genomic profiles stay (``client.cohorts.synth.drop_slides``). On
each cohort, with ``configs/bench_synthetic.yaml`` (``model.arch=smm``, gradient coordination
``pcgrad``), two federations are trained with ``smm simulate``:

* ``with``: every site, the genomics-only one included (it trains the gene encoders, the fusion's
  gene path, the pooler, the projection and the heads; the server averages each weight over the
  sites that trained it, ``server.aggregation.strategy``);
* ``without``: the same config over the multimodal sites only (``data.sites``);
* ``all-slides`` (the control): every site with its slides, the same cohort written without
  ``--without-slides`` (same seed, so the same patients): what the site would add if it had slides,
  which separates "more patients" from "patients without slides".

``federation.min_nodes`` is the number of multimodal sites in both, so that the histology weights,
which only those sites train, are averaged every round (a weight trained by fewer than ``min_nodes``
sites keeps its value). Each run selects its round by the config's selection metric on its own
federation's validation patients (as a real federation would), then both selected models are tested
with ``smm evaluate`` on the SAME patients: the pooled test splits of the multimodal sites (the
comparison; within-site C-index). Also reported: both models on the genomics-only site's own test
split (what that hospital gets: the ``without`` model has never been trained from genomics alone),
and the paired ``with - without`` and ``all-slides - with`` differences per seed.

    python benchmarks/missing_modality.py            # seeds 0,1,2, 4 x 100 patients, the config's rounds
    python benchmarks/missing_modality.py --quick    # seed 0, 4 x 40 patients, 8 rounds (a few minutes)
    python benchmarks/missing_modality.py --work DIR # keep (and reuse) cohorts and run folders

Results: ``benchmarks/results/missing_modality_<device>.json`` (``..._quick_...`` for --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402

CONFIG = quality.ROOT / "configs" / "bench_synthetic.yaml"
SITES, PATIENTS_PER_SITE, SPLIT = 4, 100, "0.6,0.15,0.25"
QUICK = {"seeds": [0], "patients": 40, "rounds": 8}
#: The proposed model, as synthetic_quality.py's smm-pcgrad.
VARIANT = ["model.arch=smm", "train.coordination=pcgrad"]
RUNS = ("with", "without", "all-slides")


def _evaluate(model: Path, sites: list[Path], out: Path, log: Path) -> dict:
    """``smm evaluate`` of a selected model on ``sites``' test splits: pooled metrics and patients."""
    if not (out / quality.FINAL_FILE).is_file():
        quality.smm(["evaluate", model, *sites, "--out", out, "--split", "test"], log)
    final = json.loads((out / quality.FINAL_FILE).read_text())
    return {"values": {k: float(v) for k, v in final["test"]["global"]["values"].items() if v is not None},
            "patients": final["test"]["patients"]}


def _cohort(base: Path, name: str, synth: list) -> Path:
    """``smm synth`` into ``base/name`` unless an earlier invocation wrote it with the same arguments."""
    cohort = base / name
    args = ["synth", "--out", cohort, *synth]
    key = [str(a) for a in args]
    record = base / f"{name}.json"
    if not record.is_file() or json.loads(record.read_text()) != key:
        if cohort.exists():
            shutil.rmtree(cohort)
        base.mkdir(parents=True, exist_ok=True)
        quality.smm(args, base / f"{name}.log")
        record.write_text(json.dumps(key))
    return cohort


def run_seed(seed: int, work: Path, sites: int, patients: int, rounds: int) -> dict:
    base = work / f"seed{seed}"
    synth = ["--sites", sites, "--patients-per-site", patients, "--features-only", "--split", SPLIT, "--seed", seed]
    cohort = _cohort(base, "sites", [*synth, "--without-slides", sites])
    control = _cohort(base, "sites_all_slides", synth)  # the same cohort, every site with its slides
    multimodal = [f"site_{k}" for k in range(1, sites)]
    genomics_only = f"site_{sites}"
    common = [f"federation.rounds={rounds}", f"federation.min_nodes={len(multimodal)}", *VARIANT]
    every = f"data.sites=[{', '.join([*multimodal, genomics_only])}]"
    sets = {"with": [f"data.sites_root={cohort}", *common, every],
            "without": [f"data.sites_root={cohort}", *common, f"data.sites=[{', '.join(multimodal)}]"],
            "all-slides": [f"data.sites_root={control}", *common, every]}
    out: dict = {}
    for run in RUNS:
        run_dir = base / f"smm-{run}"
        row = quality.run_or_reuse("federated", CONFIG, run_dir, sets[run], base / f"smm-{run}.log")
        # The same test patients for every run; the genomics-only site is evaluated without its slides.
        row["test_multimodal"] = _evaluate(run_dir / "model.pt", [cohort / s for s in multimodal],
                                           base / f"eval-{run}-multimodal", base / f"eval-{run}-multimodal.log")
        row["test_genomics_only_site"] = _evaluate(run_dir / "model.pt", [cohort / genomics_only],
                                                   base / f"eval-{run}-genomics-only",
                                                   base / f"eval-{run}-genomics-only.log")
        row["val_curve"] = [{"round": r["round"], **{m: r["val"]["global"]["values"].get(m)
                                                    for m in ("loss", *quality.PAPER_METRICS)}}
                            for r in quality.round_records(run_dir) if r.get("val")]
        out[run] = row
        for where, what in (("test_multimodal", "the multimodal sites"), ("test_genomics_only_site", "the genomics-only site")):
            quality.print_row(f"[seed {seed}] smm-{run:<8} test on {what}", {**row[where], "wall_s": row["wall_s"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated cohort seeds (default 0,1,2)")
    ap.add_argument("--sites", type=int, default=SITES, help=f"sites, the last without slides (default {SITES})")
    ap.add_argument("--patients-per-site", type=int, default=PATIENTS_PER_SITE)
    ap.add_argument("--rounds", type=int, default=None, help="federation.rounds (default: the config's)")
    ap.add_argument("--quick", action="store_true",
                    help=f"seed 0, {SITES} x {QUICK['patients']} patients, {QUICK['rounds']} rounds")
    ap.add_argument("--work", type=Path, default=None, help="keep the cohorts and run folders here")
    args = ap.parse_args(argv)
    if args.sites < 3:
        ap.error("--sites: at least 3 (two multimodal sites to average, one without slides)")
    seeds = QUICK["seeds"] if args.quick else [int(s) for s in args.seeds.split(",")]
    patients = QUICK["patients"] if args.quick else args.patients_per_site
    rounds = QUICK["rounds"] if args.quick else (args.rounds or yaml.safe_load(CONFIG.read_text())["federation"]["rounds"])
    t0 = time.perf_counter()
    with quality.work_folder(args.work, "missing_modality_") as work:
        per_seed = [run_seed(s, work, args.sites, patients, rounds) for s in seeds]
    metrics = ("loss", *quality.PAPER_METRICS)
    summary = {where: quality.summarise({run: [s[run][where]["values"] for s in per_seed] for run in RUNS}, metrics)
               for where in ("test_multimodal", "test_genomics_only_site")}
    paired = {f"{a} - {b}": {where: quality.differences([s[a][where]["values"] for s in per_seed],
                                                       [s[b][where]["values"] for s in per_seed], per="per_seed",
                                                       metrics=metrics)
                             for where in ("test_multimodal", "test_genomics_only_site")}
              for a, b in (("with", "without"), ("all-slides", "with"))}
    payload = {
        **quality.result_header("missing_modality", __file__, argv, t0),
        "setting": {"config": str(CONFIG.relative_to(quality.ROOT)), "variant": VARIANT, "seeds": seeds,
                    "sites": args.sites, "genomics_only_site": f"site_{args.sites}", "patients_per_site": patients,
                    "split": SPLIT, "rounds": rounds, "min_nodes": args.sites - 1,
                    "selection": "each run: the config's federation.selection_metric on its own federation's "
                                 "validation patients",
                    "test": "smm evaluate of each selected model on the same patients: the pooled test splits of "
                            "the multimodal sites (test_multimodal); and on the genomics-only site's test split",
                    "c_index": "within-site pairs", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "summary": summary, "paired": paired,
        "seeds": {str(s): r for s, r in zip(seeds, per_seed)},
    }
    path = quality.write_result(payload, args.quick)
    for where in summary:
        print(f"\n{where}:")
        print(quality.markdown_table(summary[where], metrics, label="federation"))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
