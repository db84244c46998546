"""Multimodal quality with known ground truth: the proposed model against its baselines.

``smm synth --features-only`` writes a cohort per seed (6 sites x 100 patients by default, 300 for
the gene-conditioned family; 64-dim patch features, 20 + 30 genes, a 60/15/25 train/val/test split;
federated runs take one pass over a site's training split a round, ``local_steps``): the sites differ in case mix
(Dirichlet class priors: non-IID) and in per-site batch effects on genes and patch features, and
each patient's diagnosis, grade and survival are planted in both modalities with independent noise,
so neither modality alone recovers them fully (``client/cohorts/synth.py``, ``client/cohorts/synthetic.py``).

On every cohort, with ``configs/bench_synthetic.yaml``, each model variant is trained

* ``centralized`` (``smm centralized``: all training patients pooled) and
* ``federated`` (``smm simulate`` over the 6 sites with the config's protocol: FedAvgM with server
  momentum, the same number of optimizer steps at every site, the same learning-rate schedule),
* ``iid`` (the same federation over the cohort's IID control: the same patients, each with its
  split, its site's batch effects and its feature files, dealt at random into 6 sites of the same
  sizes, ``client.cohorts.cohort.deal_site_folders``) and ``centralized-iid`` (pooled training evaluated on
  those sites: the C-index counts within-site pairs, so the IID control is compared with this run).
  What the federation loses on the real sites but not on the IID ones is the sites' heterogeneity;
  what it loses on both is the protocol,
* ``one-site`` (not run by default): a "federation" of one site holding every patient
  (``deal_site_folders(..., one_site=True)``): the rounds, the schedule and the optimizer restarts
  of federated training without the averaging,

selected by the config's ``federation.selection_metric`` on validation patients and tested once on
the pooled test patients. Variants: the proposed
``smm`` model with gradient coordination ``pcgrad`` (the paper's), ``seed`` and ``off``; the
genomics-only ``snn``, the histology-only ``abmil`` and the late-fusion ``concat`` (ABMIL + SNN).

Cohort families (``--family``, ``smm synth --family``): ``additive`` (the cohort above, the default),
``gene-conditioned`` (which slide region carries the label depends on the patient's genomic
programme: a model must use the genes to know where to look), and the controls ``histology-only``
and ``genomics-only``. Ablations of the proposed model, run when named in ``--variants``:
``smm-no-offsets`` (``model.offset_scale=0``: keys on the fixed reference grid),
``smm-no-consistency`` (``loss.consistency_weight=0``) and ``smm-no-gene-queries``
(``model.gene_queries=false``: queries and offsets from the patches only, genes joined after
pooling). On families that record their planted patches, every attention model's selected model
is scored on the test slides: ROC AUC of its patch attention against the planted patches
(``attention_faithfulness.py``), per map (SMM: tumour, micro, combined; ABMIL/Concat: abmil).

Every run is scored on the pooled test patients: a centralized run by its own test evaluation, a
federated one by ``smm evaluate`` of its selected model on every site's test patients (exact, no
cell rules: the benchmark holds the data), so both are the same metric; what the federated run
itself reports from what the sites sent under disclosure control is kept beside it as ``reported``.

Reported: mean and sample standard deviation over cohort seeds per variant and mode; per seed, the
proposed model's (``smm-pcgrad``) difference to each baseline on the same cohort (paired), and each
variant's federated-minus-centralized gap (and iid-minus-centralized-iid where both ran).

    python benchmarks/synthetic_quality.py           # 3 seeds x 6 variants x 4 modes (see README for the time)
    python benchmarks/synthetic_quality.py --variants smm-pcgrad --modes iid,centralized-iid   # the IID control
    python benchmarks/synthetic_quality.py --work DIR --seeds 0,1,2,3   # reuses DIR's finished runs
    python benchmarks/synthetic_quality.py --quick   # seed 0, 6 x 40 patients, smm-pcgrad and concat, 5 rounds

    python benchmarks/synthetic_quality.py --family gene-conditioned --modes centralized,federated \
        --variants smm-pcgrad,snn,abmil,concat
    python benchmarks/synthetic_quality.py --family gene-conditioned --modes centralized --label ablations \
        --variants smm-pcgrad,smm-seed,smm-off,smm-no-offsets,smm-no-consistency,smm-no-gene-queries

A protocol setting tried with ``--set ... --tag`` is chosen per model on validation, never on test,
by ``synthetic_choice.py`` (which reads these result files).

Results: ``benchmarks/results/synthetic_quality[_<family>][_p<patches>][_<tag>][_<label>]_<device>.json``
(``..._quick_...`` for --quick).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402
from attention_faithfulness import faithfulness  # noqa: E402
from client.cohorts.cohort import deal_site_folders  # noqa: E402
from client.cohorts.families import TRUTH_PATCHES  # noqa: E402
from client.cohorts.synth import log_hazard  # noqa: E402
from smm_model.metrics.federated import c_index_counts, c_index_from_counts  # noqa: E402
from smm_model.config import DataConfig  # noqa: E402
from smm_model.contract.runfolder import MODEL_FILE  # noqa: E402
from smm_model.contract.sites import simulation_site_dirs  # noqa: E402

CONFIG = quality.ROOT / "configs" / "bench_synthetic.yaml"
#: a federated run's exact pooled test metrics (``_exact_test``), beside its model file
EXACT_FILE = "exact_test.json"
SITES, SPLIT = 6, "0.6,0.15,0.25"
#: family -> patients a site by default. The gene-conditioned family's signal is an interaction
#: (genes x where in the slide), which needs more patients than an additive one: at 6 x 100 patients
#: (60 training patients a site) every model is weak on it (seed 0: smm 67.9, concat 65.7
#: diagnosis AUC), at 6 x 300 the interaction is learnable (smm 89.0, concat 74.0); results in
#: benchmarks/README.md. The controls keep the additive family's size.
PATIENTS_PER_SITE = {"additive": 100, "gene-conditioned": 300, "histology-only": 100, "genomics-only": 100}
#: variant -> config overrides
VARIANTS = {
    "smm-pcgrad": ["model.arch=smm", "train.coordination=pcgrad"],
    "smm-seed": ["model.arch=smm", "train.coordination=seed"],
    "smm-off": ["model.arch=smm", "train.coordination=off"],
    "snn": ["model.arch=snn", "train.coordination=off"],
    "abmil": ["model.arch=abmil", "train.coordination=off"],
    "concat": ["model.arch=concat", "train.coordination=off"],
    # Ablations of the method's parts (smm with pcgrad, one part removed each):
    "smm-no-offsets": ["model.arch=smm", "train.coordination=pcgrad", "model.offset_scale=0"],
    "smm-no-consistency": ["model.arch=smm", "train.coordination=pcgrad", "loss.consistency_weight=0"],
    "smm-no-gene-queries": ["model.arch=smm", "train.coordination=pcgrad", "model.gene_queries=false"],
}
#: the variants run when --variants is not given (the ablations are asked for by name)
DEFAULT_VARIANTS = ("smm-pcgrad", "smm-seed", "smm-off", "snn", "abmil", "concat")
#: cohort family (``smm synth --family``) -> its extra ``smm synth`` arguments; the additive family
#: is the original cohort, written without the flag so its cached cohorts stay valid
FAMILIES = {"additive": [], "gene-conditioned": ["--family", "gene-conditioned"],
            "histology-only": ["--family", "histology-only"], "genomics-only": ["--family", "genomics-only"]}
PROPOSED = "smm-pcgrad"
BASELINES = ("snn", "abmil", "concat")
#: mode -> (kind of run, which site folders)
MODES = {"centralized": ("centralized", "real"), "federated": ("federated", "real"),
         "iid": ("federated", "iid"), "centralized-iid": ("centralized", "iid"),
         "one-site": ("federated", "one_site")}
DEFAULT_MODES = ("centralized", "federated", "iid", "centralized-iid")
#: the seed of the IID control's random deal
IID_SEED = 0
#: (mode, its reference) pairs whose paired differences are reported
GAPS = (("federated", "centralized"), ("iid", "centralized-iid"))


def run_seed(seed: int, work: Path, variants: tuple[str, ...], modes: tuple[str, ...], sites: int,
             patients: int, rounds: int, extra: tuple[str, ...] = (), tag: str = "",
             family: str = "additive", patches_per_slide: int | None = None) -> dict:
    """Write cohort ``seed`` of ``family`` and train every variant in every mode on it (``extra``:
    overrides on top of each variant's, for a diagnostic run named ``tag``; ``patches_per_slide``:
    slide-size bags, a cohort of its own). Each attention model's row gets ``attention_auc`` where
    the cohort records its planted patches."""
    base = seed_folder(work, seed, family, patches_per_slide)
    cohort = base / "sites"
    synth_args = ["synth", "--out", cohort, "--sites", sites, "--patients-per-site", patients, "--features-only",
                  "--split", SPLIT, "--seed", seed, *FAMILIES[family]]
    if patches_per_slide:
        synth_args += ["--patches-per-slide", patches_per_slide]
    if _cached(base / "synth.json", synth_args) is None:
        if cohort.exists():
            shutil.rmtree(cohort)
        quality.smm(synth_args, base / "synth.log")
        _store(base / "synth.json", synth_args, {})
    roots = {"real": cohort}
    for which in sorted({MODES[m][1] for m in modes} - {"real"}):
        roots[which] = base / f"sites_{which}"
        if _cached(base / f"{which}.json", [cohort, IID_SEED]) is None:
            deal_site_folders(cohort, roots[which], IID_SEED, force=True, one_site=which == "one_site")
            _store(base / f"{which}.json", [cohort, IID_SEED], {})
    out: dict = {}
    for variant in variants:
        out[variant] = {}
        for mode in modes:
            kind, which = MODES[mode]
            name = f"{variant}-{mode}" + (f"-{tag}" if tag else "")
            nodes = 1 if which == "one_site" else sites
            sets = [f"data.sites_root={roots[which]}", f"federation.rounds={rounds}", f"federation.min_nodes={nodes}",
                    *VARIANTS[variant], *extra]
            if kind == "federated":  # one-site too: the federation's sequential steps, without the averaging
                sets.insert(3, f"federation.local_steps={local_steps(patients, extra)}")
            row = quality.run_or_reuse(kind, CONFIG, base / name, sets, base / f"{name}.log")
            if kind == "federated":
                row["reported"], row["values"] = row["values"], _exact_test(base / name, roots[which])
            if has_planted(cohort):
                row["attention_auc"] = _faithfulness(base / name, roots[which], cohort)
            out[variant][mode] = row
            quality.print_row(f"[synthetic seed {seed}] {name:<22}", row)
    return out


def seed_folder(work: Path, seed: int, family: str, patches_per_slide: int | None) -> Path:
    """Where cohort ``seed`` (its ``sites/``) and its run folders live under ``work``."""
    return work / ((f"seed{seed}" if family == "additive" else f"{family}-seed{seed}")
                   + (f"-p{patches_per_slide}" if patches_per_slide else ""))


def local_steps(patients: int, overrides: tuple[str, ...] = ()) -> int:
    """``federation.local_steps`` for sites of ``patients`` each: a ``federation.local_steps=N`` in
    ``overrides`` (a diagnostic protocol's), else the config's steps, or one pass over a site's
    training split at the config's batch size where that is more. The config's 8 steps are that pass
    at the default 100 patients (60 training patients / 8); at 300 patients a site 8 steps would be a
    third of a pass a round, and the federated runs would see a third of the passes over each patient
    that the centralized runs (one epoch a round) see."""
    key = "federation.local_steps="
    given = [s[len(key):] for s in overrides if s.startswith(key)]
    if given:
        return int(given[-1])  # the last override wins, as in resolve_config
    cfg = _config()
    train = patients * float(SPLIT.split(",")[0])
    return max(int(cfg["federation"]["local_steps"]), math.ceil(train / int(cfg["train"]["batch_size"])))


@functools.cache
def _config() -> dict:
    """The benchmark's config file, read once a process."""
    return yaml.safe_load(CONFIG.read_text())


def true_risk_c_index(cohort: Path) -> float:
    """The C-index of the true log-hazard (truth.csv, ``client.cohorts.synth.log_hazard``) on the
    cohort's test patients, within-site pairs as the benchmark counts them: the ceiling the
    survival sampling leaves, against which a model's C-index and a difference between two models
    read (a 3-point margin needs room below it)."""
    truth = pd.read_csv(cohort / "truth.csv").set_index("patient_id")
    counts = np.zeros(4, dtype=np.int64)
    for site in sorted(truth["site"].unique()):
        clinical = pd.read_csv(cohort / site / "clinical.csv")
        test = clinical[(clinical["split"] == "test") & clinical["survival_days"].notna() & clinical["event"].notna()]
        t = truth.loc[test["patient_id"]]
        risk = log_hazard(t["grade_true"].to_numpy(), t["diagnosis"].to_numpy(), t["proliferation"].to_numpy(),
                          t["immune"].to_numpy())
        counts += c_index_counts(test["survival_days"].to_numpy(), test["event"].to_numpy(), risk)
    return c_index_from_counts(counts)[0]


def has_planted(cohort: Path) -> bool:
    """Whether ``cohort`` records its planted patches (the families written with ``--family``)."""
    return (cohort / TRUTH_PATCHES).is_file()


def _exact_test(run_dir: Path, sites: Path) -> dict[str, float]:
    """The pooled test metrics of a federated run's selected model, computed by ``smm evaluate`` on
    every site's test patients without the cell rules (the benchmark holds the data; a server does
    not), so federated and centralized runs are scored by the same pooled metric. What the run
    reports from what the sites sent (a patient-weighted mean of site AUCs where disclosure control
    coarsens the pooled histograms, n/a accuracy and F1) is kept as ``reported``."""
    def evaluate() -> dict[str, float]:
        out = run_dir / "exact_test"
        if out.exists():
            shutil.rmtree(out)
        # the simulation's own rule for its site folders (the IID control's are iid_site_k)
        folders = simulation_site_dirs(DataConfig(sites_root=str(sites)))
        quality.smm(["evaluate", run_dir / MODEL_FILE, *folders, "--out", out,
                     "--device", "cpu"], run_dir / "exact_test.log")
        return quality.test_values(out)

    return _beside_model(run_dir, EXACT_FILE, evaluate)


def _faithfulness(run_dir: Path, sites: Path, truth: Path) -> dict:
    """``attention_faithfulness.faithfulness`` of a finished run."""
    return _beside_model(run_dir, "attention_faithfulness.json", lambda: faithfulness(run_dir, sites, truth=truth))


def _beside_model(run_dir: Path, name: str, compute: Callable[[], dict]) -> dict:
    """``compute()`` of a finished run, cached in ``run_dir / name`` keyed by the model file's
    modification time (a run trained again is measured again)."""
    path = run_dir / name
    stamp = (run_dir / MODEL_FILE).stat().st_mtime_ns
    try:
        rec = json.loads(path.read_text())
        if rec["model_mtime_ns"] == stamp:
            return rec["result"]
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    result = compute()
    path.write_text(json.dumps({"model_mtime_ns": stamp, "result": result}, indent=1))
    return result


def _cached(path: Path, key: list) -> dict | None:
    """A finished cohort-writing step's record from an earlier invocation with the same ``--work``
    and arguments (so a long benchmark can be stopped and continued, or extended by seeds), else
    None. Training runs are reused only when their saved config is the one this run would resolve
    (``quality.finished``), so a changed config file is never answered from an older run."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec["result"] if rec.get("key") == [str(k) for k in key] else None


def _store(path: Path, key: list, result: dict) -> None:
    path.write_text(json.dumps({"key": [str(k) for k in key], "result": result}, indent=1))


def paired(per_seed: list[dict], a: str, b: str, mode: str) -> dict:
    """Per metric: (a - b) on the same cohorts, per seed and mean ± sd."""
    return quality.differences([s[a][mode]["values"] for s in per_seed], [s[b][mode]["values"] for s in per_seed],
                               per="per_seed")


def attention_summary(per_seed: list[dict], variants: tuple[str, ...], modes: tuple[str, ...]) -> dict:
    """Per mode, variant and attention map: mean ± sd over seeds of the mean attention AUC against
    the planted patches (only the runs that have it)."""
    out: dict = {}
    for mode in modes:
        for v in variants:
            maps: dict[str, list[float]] = {}
            for s in per_seed:
                for name, rep in s[v][mode].get("attention_auc", {}).items():
                    maps.setdefault(name, []).append(rep["mean"])
            if maps:
                out.setdefault(mode, {})[v] = {name: quality.mean_sd(xs) for name, xs in maps.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated cohort seeds (default 0,1,2)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated subset of {tuple(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--family", default="additive", choices=tuple(FAMILIES),
                    help="cohort family (smm synth --family; default additive, the original cohort)")
    ap.add_argument("--sites", type=int, default=SITES)
    ap.add_argument("--patients-per-site", type=int, default=None,
                    help=f"patients a site (default per family: {PATIENTS_PER_SITE})")
    ap.add_argument("--patches-per-slide", type=int, default=None,
                    help="slide-size bags (smm synth --patches-per-slide; default: the cohort's ~33 patches)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"comma-separated subset of {tuple(MODES)} (default {','.join(DEFAULT_MODES)})")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override on top of every variant's (repeatable); needs --tag")
    ap.add_argument("--tag", default="", help="name of a diagnostic run with --set: its run folders get the "
                    "suffix, its results go to results/synthetic_quality_<tag>_<device>.json")
    ap.add_argument("--label", default="", help="name of a subset of variants or modes run on the same "
                    "cohorts and run folders (the ablations, say): its results go to "
                    "results/synthetic_quality[_<family>]_<label>_<device>.json, the full result stays")
    ap.add_argument("--rounds", type=int, default=None, help="federation.rounds (default: the config's)")
    ap.add_argument("--quick", action="store_true", help="seed 0, 6 x 40 patients, smm-pcgrad and concat, 5 rounds")
    ap.add_argument("--work", type=Path, default=None, help="keep the cohorts and run folders here")
    args = ap.parse_args(argv)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    variants = (PROPOSED, "concat") if args.quick else tuple(args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; expected {tuple(VARIANTS)}")
    if bool(args.sets) != bool(args.tag):
        ap.error("--set and --tag go together")
    if not all(c.isalnum() or c in "-_" for c in args.tag + args.label):
        ap.error("--tag and --label take letters, digits, - and _")
    modes = ("centralized", "federated") if args.quick else tuple(args.modes.split(","))
    if set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(set(modes) - set(MODES))}; expected {tuple(MODES)}")
    patients = 40 if args.quick else (args.patients_per_site or PATIENTS_PER_SITE[args.family])
    rounds = 5 if args.quick else (args.rounds or yaml.safe_load(CONFIG.read_text())["federation"]["rounds"])
    t0 = time.perf_counter()
    with quality.work_folder(args.work, "synthetic_quality_") as work:
        per_seed = [run_seed(s, work, variants, modes, args.sites, patients, rounds, tuple(args.sets), args.tag,
                             args.family, args.patches_per_slide) for s in seeds]
        ceiling = [true_risk_c_index(seed_folder(work, s, args.family, args.patches_per_slide) / "sites")
                   for s in seeds]
    summary = {mode: quality.summarise({v: [s[v][mode]["values"] for s in per_seed] for v in variants},
                                       quality.PAPER_METRICS) for mode in modes}
    comparisons = {mode: {b: paired(per_seed, PROPOSED, b, mode) for b in variants if b != PROPOSED}
                   for mode in modes} if PROPOSED in variants else {}
    gaps = {f"{a} - {b}": {v: quality.differences([s[v][a]["values"] for s in per_seed],
                                                  [s[v][b]["values"] for s in per_seed], per="per_seed")
                           for v in variants}
            for a, b in GAPS if a in modes and b in modes}
    parts = ("" if args.family == "additive" else args.family,
             f"p{args.patches_per_slide}" if args.patches_per_slide else "", args.tag, args.label)
    payload = {
        **quality.result_header("synthetic_quality" + "".join(f"_{n}" for n in parts if n), __file__, argv, t0),
        # wall_s: runs cached in --work take none
        "runs_wall_s": round(sum(r[m]["wall_s"] for s in per_seed for r in s.values() for m in r), 1),
        "setting": {"config": str(CONFIG.relative_to(quality.ROOT)), "family": args.family, "seeds": seeds, "sites": args.sites,
                    "patients_per_site": patients, "patches_per_slide": args.patches_per_slide, "split": SPLIT, "rounds": rounds,
                    "modes": {m: MODES[m] for m in modes}, "iid_seed": IID_SEED, "overrides": args.sets,
                    "protocol": "the config's federation section (strategy, selection_metric); federation.local_steps "
                                "= max(the config's, one pass over a site's training split) unless overridden",
                    "local_steps": local_steps(patients, tuple(args.sets)),
                    "variants": {v: VARIANTS[v] for v in variants},
                    "selection": "the config's federation.selection_metric on validation patients",
                    "c_index": "within-site pairs", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "summary": summary, "proposed_minus_baseline": comparisons, "gaps": gaps,
        "attention_auc": attention_summary(per_seed, variants, modes),
        "true_risk_c_index": {"per_seed": ceiling, **quality.mean_sd(ceiling),
                              "note": "C-index of the true log-hazard on the test patients: the ceiling"},
        "seeds": {str(s): r for s, r in zip(seeds, per_seed)},
    }
    path = quality.write_result(payload, args.quick)
    for mode in modes:
        print(f"\n{mode}:")
        print(quality.markdown_table(summary[mode], quality.PAPER_METRICS, label="model"))
        print(f"  C-index of the true risk (ceiling): {quality.fmt(payload['true_risk_c_index'])}")
        for v, maps in payload["attention_auc"].get(mode, {}).items():
            print(f"  attention AUC {v}: " + ", ".join(f"{n} {quality.fmt(c)}" for n, c in maps.items()))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
