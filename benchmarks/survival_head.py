"""Is the survival head what limits a model's C-index? Its risk against the model's own class predictions.

On the synthetic cohorts the true risk follows diagnosis and grade (plus proliferation and immune
state), so a model that classifies far better should also rank survival better. This diagnostic
takes trained run folders and compares, on each run's test patients, the within-site C-index (the
runs' own statistic: pair counts summed over sites) of

* ``head``: the model's survival output, risk = -sum of its survival function (the run's C-index);
* ``expected_grade``: the expected WHO grade under the model's grade probabilities (no fitting);
* ``cox_class_probabilities``: a Cox model on the model's diagnosis and grade probabilities, fitted
  on the run's **validation** patients (stratified by site), scored on test;
* ``cox_class_probabilities_and_head``: the same with the head's risk as one more covariate.

If a Cox model on the class probabilities ranks test patients better than the head does, the head
has not learned what the model already knows: the survival head, not the representation, limits the
C-index. Only validation patients are fitted on; test patients are only scored.

    python benchmarks/survival_head.py --label gene-conditioned \\
        /tmp/bench/syn/gene-conditioned-seed*/{smm-pcgrad,concat,abmil,snn}-centralized-lr3e-3

Result: ``results/survival_head_<label>_<device>.json``, per run and per run-folder name (mean over
the cohorts). The runs' sites are read from each run's stored config (``data.sites_root``); the
per-patient outputs never leave this machine, only C-indices are written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lifelines import CoxPHFitter
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402

from client.baselines.evaluate import LoadedModel, load_model_file  # noqa: E402
from client.local.round import load_site, split_dataset  # noqa: E402
from client.local.train import forward  # noqa: E402
from client.site.collate import collate_patients  # noqa: E402
from smm_model.config import TASK_CLASSES  # noqa: E402
from smm_model.contract.runfolder import MODEL_FILE  # noqa: E402
from smm_model.contract.sites import simulation_site_dirs  # noqa: E402
from smm_model.metrics.exact import risk_from_hazard_logits  # noqa: E402
from smm_model.metrics.federated import c_index_counts, c_index_from_counts  # noqa: E402
from smm_model.nn.model import build_model  # noqa: E402

#: ridge penalty of the Cox fits: a few hundred validation patients, a handful of covariates
COX_PENALIZER = 0.1
#: the WHO grade each grade class stands for (smm_model.config: grade classes are grades 2, 3, 4)
GRADES = np.array([2.0, 3.0, 4.0])
SCORES = ("head", "expected_grade", "cox_class_probabilities", "cox_class_probabilities_and_head")


@dataclass
class SiteOutputs:
    """One site's survival-labelled patients of one split: (N,) arrays and (N, C) probabilities."""

    site: str
    time: np.ndarray
    event: np.ndarray
    head: np.ndarray  # (N,) risk from the survival head, higher = shorter survival
    probs: dict[str, np.ndarray]  # class task -> (N, C) softmax


@torch.no_grad()
def site_outputs(model: LoadedModel, net: torch.nn.Module, site_dir: Path, split: str) -> SiteOutputs:
    """The model's outputs on one split of a site, for the patients with a survival label."""
    cfg = model.cfg
    ds = split_dataset(load_site(site_dir, cfg), cfg, model.shared, split)
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=False, collate_fn=collate_patients)
    tasks = [t for t in cfg.model.tasks if t != "survival"]
    acc: dict[str, list[np.ndarray]] = {k: [] for k in ("time", "event", "head", *tasks)}
    for batch in loader:
        out = forward(net, batch, None)
        m = batch.task_mask("survival")  # (B,) bool
        acc["time"].append(batch.labels["survival_time"][m].numpy())
        acc["event"].append(batch.labels["event"][m].numpy())
        acc["head"].append(risk_from_hazard_logits(out.logits["survival"][m]))
        for t in tasks:
            acc[t].append(torch.softmax(out.logits[t][m].float(), dim=1).numpy())
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in acc.items()}
    return SiteOutputs(site_dir.name, cat["time"], cat["event"], cat["head"], {t: cat[t] for t in tasks})


def within_site_c_index(sites: Sequence[SiteOutputs], risk: Callable[[SiteOutputs], np.ndarray]) -> float:
    """Harrell's C over pairs within a site, pair counts summed over sites (the runs' C-index)."""
    counts = sum((c_index_counts(s.time, s.event, risk(s)) for s in sites), np.zeros(4))
    return float(c_index_from_counts(counts)[0])


def class_covariates(s: SiteOutputs) -> pd.DataFrame:
    """Each class task's probabilities without its first class (they sum to 1: one is redundant)."""
    cols = {f"{t}_{k}": p[:, k] for t, p in s.probs.items() for k in range(1, TASK_CLASSES[t])}
    return pd.DataFrame(cols)


def fit_cox(sites: Sequence[SiteOutputs], covariates: Callable[[SiteOutputs], pd.DataFrame]
            ) -> Callable[[SiteOutputs], np.ndarray]:
    """A Cox model of the covariates on ``sites``, stratified by site (baseline hazards differ
    between sites); returns the risk (log partial hazard) it gives another site's patients. A
    covariate constant over the fitted patients carries nothing and is left out."""
    frame = pd.concat([covariates(s).assign(_time=s.time, _event=s.event, _site=s.site) for s in sites],
                      ignore_index=True)
    cols = [c for c in frame.columns if not c.startswith("_") and frame[c].std() > 0]
    if not cols:
        raise ValueError("no covariate varies over the fitted patients")
    cox = CoxPHFitter(penalizer=COX_PENALIZER).fit(frame[[*cols, "_time", "_event", "_site"]], "_time", "_event",
                                                   strata=["_site"])
    return lambda s: cox.predict_log_partial_hazard(covariates(s)[cols]).to_numpy()


def diagnose(run_dir: Path) -> dict[str, float]:
    """The within-site test C-index of each of ``SCORES`` (and the head's on validation) for one run."""
    model = load_model_file(run_dir / MODEL_FILE)
    cfg = model.cfg
    missing = {"survival", "grade"} - set(cfg.model.tasks)
    if missing:
        raise ValueError(f"{run_dir}: the model has no {' or '.join(sorted(missing))} task (model.tasks = "
                         f"{list(cfg.model.tasks)}); this diagnostic needs survival and grade")
    net = build_model(cfg.model)
    net.load_state_dict(dict(model.weights), strict=True)
    net.eval()
    dirs = simulation_site_dirs(cfg.data)
    val = [site_outputs(model, net, d, "val") for d in dirs]
    test = [site_outputs(model, net, d, "test") for d in dirs]

    def with_head(s: SiteOutputs) -> pd.DataFrame:
        return class_covariates(s).assign(head=s.head)

    cox_p, cox_ph = fit_cox(val, class_covariates), fit_cox(val, with_head)  # validation only
    return {
        "head": within_site_c_index(test, lambda s: s.head),
        "expected_grade": within_site_c_index(test, lambda s: s.probs["grade"] @ GRADES),
        "cox_class_probabilities": within_site_c_index(test, cox_p),
        "cox_class_probabilities_and_head": within_site_c_index(test, cox_ph),
        "head_validation": within_site_c_index(val, lambda s: s.head),
        "test_patients": int(sum(len(s.time) for s in test)),
    }


def summarise(per_run: dict[str, dict[str, float]]) -> dict[str, dict[str, dict]]:
    """Per run-folder name (the same variant on several cohorts), mean and sd of each score."""
    groups: dict[str, list[dict[str, float]]] = {}
    for key, res in per_run.items():
        groups.setdefault(Path(key).name, []).append(res)
    return {name: {k: quality.mean_sd([r[k] for r in rows]) for k in (*SCORES, "head_validation")}
            for name, rows in groups.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="trained run folders (with model.pt)")
    ap.add_argument("--label", required=True, help="the result's name: results/survival_head_<label>_<cpu|gpu>.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    for r in args.runs:
        if not (r / MODEL_FILE).is_file():
            ap.error(f"{r}: no {MODEL_FILE} (expected a finished run folder)")
    per_run = {}
    for r in args.runs:
        key = f"{r.parent.name}/{r.name}"
        per_run[key] = diagnose(r)
        print(f"{key}: " + ", ".join(f"{k} {100 * per_run[key][k]:.1f}" for k in (*SCORES, "head_validation")))
    summary = summarise(per_run)
    payload = {
        **quality.result_header(f"survival_head_{args.label}", __file__, argv, t0),
        "setting": {"scores": list(SCORES), "cox_penalizer": COX_PENALIZER,
                    "fit_on": "validation patients (Cox fits stratified by site); test patients only scored",
                    "c_index": "within-site Harrell's C, pair counts summed over sites"},
        "summary": summary, "runs": per_run,
    }
    path = quality.write_result(payload, quick=False)
    for name, row in summary.items():
        print(f"{name}: " + ", ".join(f"{k} {quality.fmt(row[k])}" for k in SCORES))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
