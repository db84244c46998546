"""Small run folders in the run-folder format, written in milliseconds, for the report's tests and
``benchmarks/report_render.py``.

The evaluation records are not made up: each site's predictions are drawn at random, turned into
statistics with the same functions a site uses (``smm_model.metrics.federated``: confusion counts, score
histograms, C-index pair counts, Kaplan-Meier grid counts) and into metrics with the server's own
``metrics_from_eval`` / ``EvalStats.merge``, so every number obeys the contract of
``server.federation.loop`` (``EvalOutcome.to_record``, ``_train_round``, ``_final``) and ``client.baselines.runfolder``,
including the newer fields (``mode``, ``site_info``, ``wall_s``, ``bytes``, ``config_sha256``, pooled
``stats`` and ``km_grid``), which ``new_fields=False`` leaves out (an older folder).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from smm_model.config import TASK_CLASSES, ExperimentConfig
from smm_model.metrics.federated import c_index_counts, confusion_counts, km_counts, score_histograms
from smm_model.contract.protocol import EvalStats, config_text, evaluation_round, metrics_from_eval
from smm_model.contract.records import dumps

NODES = ("6973886229763441519", "9823713738652676939", "11131370818272998597")
SITE_NAMES = ("site_1", "site_2", "site_3")
C_INDEX_NOTE = ("survival.c_index is the within-site C-index: concordance pairs are formed within each site only "
                "(a site cannot compare its patients with another site's), and the pair counts are summed over sites")
GROUPS = 4
KM_GRID = [float(x) for x in np.arange(0.0, 2400.0 + 30.0, 30.0)]
OVERRIDES = ["model.tasks=[diagnosis, grade, survival]", "model.survival_bins=4", "federation.min_site_patients=3",
             "federation.selection_metric=loss", "federation.local_epochs=2"]


def site_stats(rng: np.random.Generator, n: int, quality: float) -> EvalStats:
    """One site's evaluation statistics from random patients; ``quality`` in [0, 1] makes the
    predictions agree more with the labels."""
    stats = EvalStats(n=n, loss_sum=float(n * (2.0 - quality + rng.uniform(0, 0.3))), km_groups=GROUPS)
    for task, C in TASK_CLASSES.items():
        y = rng.integers(0, C, size=n)
        logits = rng.normal(size=(n, C))
        logits[np.arange(n), y] += 3.0 * quality
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        stats.confusion[task] = confusion_counts(y, probs.argmax(axis=1), C).ravel().tolist()
        stats.histograms[task] = score_histograms(y, probs, C).ravel().tolist()
    time = rng.uniform(0, 2400, size=n).round()
    event = rng.random(n) < 0.6
    risk = -time * quality + rng.normal(scale=600, size=n)
    quartile = np.searchsorted(np.quantile(risk, [0.25, 0.5, 0.75]), risk, side="right")  # 0..3
    group = GROUPS - 1 - quartile  # group 0 = highest predicted risk
    stats.cindex = c_index_counts(time, event, risk).tolist()
    stats.km = km_counts(time, event, group, GROUPS, KM_GRID).ravel().tolist()
    return stats


def eval_record(split: str, stats: dict[str, EvalStats], min_patients: int, new_fields: bool) -> dict[str, Any]:
    """``EvalOutcome.to_record`` (+ ``stats`` and ``km_grid`` when ``new_fields``)."""
    n_classes = {**TASK_CLASSES, "survival": GROUPS}
    suppressed = sorted(k for k, s in stats.items() if s.n < min_patients)
    per_site = {k: s for k, s in stats.items() if k not in suppressed}
    total = EvalStats.merge(list(per_site.values()))
    glob = metrics_from_eval(total, n_classes).to_dict()
    if new_fields:
        glob["stats"] = total.to_record()
    rec = {"split": split, "sampled": [int(k) if k.isdigit() else k for k in stats],
           "patients": int(sum(s.n for s in per_site.values())), "global": glob,
           "per_site": {k: {"patients": s.n, **metrics_from_eval(s, n_classes).to_dict()} for k, s in per_site.items()},
           "suppressed": [int(k) if k.isdigit() else k for k in suppressed], "dropped": []}
    if new_fields:
        rec["km_grid"] = KM_GRID
    return json.loads(dumps(rec))  # strict JSON, as the run writes it: nan -> null


def _site_info(keys, sizes) -> dict[str, Any]:
    info = {}
    for i, k in enumerate(keys):
        n = sizes[i]
        split = {s: {"patients": m, "diagnosis": [m // 4] * 3 + [m - 3 * (m // 4)], "diagnosis_unknown": 0,
                     "grade": [m // 3] * 2 + [m - 2 * (m // 3)], "grade_unknown": 1, "survival_labelled": m,
                     "events": (m * 3) // 5} for s, m in (("train", 4 * n), ("val", n), ("test", n))}
        info[k] = {"label": SITE_NAMES[i], "splits": split, "excluded": {"no_slides": 1} if i == 0 else {},
                   "data_digest": hashlib.sha256(f"site{i}".encode()).hexdigest(), "synthetic": True,
                   "encoder": "null", "weights": "random"}
    return info


def write_run(run_dir: Path, *, mode: str = "federated", rounds: int = 3, configured: int | None = None,
              skip: tuple[int, ...] = (), final: bool = True, new_fields: bool = True, seed: int = 0,
              sizes: tuple[int, ...] = (9, 7, 2), quality: float = 0.6, torn_last_line: bool = False,
              keys: tuple[str, ...] | None = None, overrides: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Write config.yaml, rounds.jsonl and (``final``) final_metrics.json; returns the final metrics.

    ``mode``: "federated" (sites keyed by node id, train.per_site with coordination counts) or
    "centralized"/"local-only" (keyed by site name, train.epoch_losses). The last site of ``sizes``
    is below ``federation.min_site_patients`` (3) and so suppressed. ``overrides``: extra config
    ``key=value`` settings of the run; with ``federation.eval_every=k`` the rounds that are not
    validated (``evaluation_round``) have no ``val`` and no selection value, as ``server.federation.loop``
    writes them.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    configured = rounds if configured is None else configured
    cfg = ExperimentConfig.from_yaml_text("", [*OVERRIDES, f"federation.rounds={configured}", *overrides])
    text = config_text(cfg)
    (run_dir / "config.yaml").write_text(text)
    federated = mode == "federated"
    keys = tuple(keys or (NODES if federated else SITE_NAMES))[: len(sizes)]
    min_p = cfg.federation.min_site_patients
    lines = []
    best, best_value, skipped = None, None, []
    for r in range(0, rounds + 1):
        q = quality * r / max(rounds, 1)
        val = eval_record("val", {k: site_stats(rng, sizes[i], q) for i, k in enumerate(keys)}, min_p, new_fields)
        status = "initial" if r == 0 else ("skipped" if r in skip else ("aggregated" if federated else "trained"))
        evaluated = r == 0 or evaluation_round(r, configured, cfg.federation.eval_every)
        if status == "skipped":
            val = None
            skipped.append(r)
        elif not evaluated:
            val = None
        value = val["global"]["values"]["loss"] if val else None
        if value is not None and (best_value is None or value < best_value) and r > 0:
            best, best_value = r, value
        rec: dict[str, Any] = {"round": r, "status": status, "lr": None if r == 0 else 0.003,
                               "timings": {"evaluate": 0.5} if r == 0 else {"wait": 0.01, "train": 3.0,
                                                                           "aggregate": 0.05,
                                                                           **({"evaluate": 0.5} if evaluated else {})},
                               "train": None, "val": val,
                               "selection": {"metric": "loss", "value": value, "best_round": best,
                                             "best_value": best_value}}
        if federated:
            rec["bytes"] = {"sent": 100_000 * (r + 1), "received": 40_000 * (r + 1)}
        if r > 0 and federated:
            per_site = {}
            for i, k in enumerate(keys):
                m = {"num-examples": 4 * sizes[i], "train-loss": float(2.5 - q + rng.uniform(0, 0.2)), "seconds": 1.0}
                for task in ("diagnosis", "grade", "survival"):
                    t, mi = int(rng.integers(0, 8)), int(rng.integers(0, 8))
                    m.update({f"coord-{task}-tumour": t, f"coord-{task}-micro": mi,
                              f"coord-{task}-conflicts": t + mi + int(rng.integers(0, 3))})
                per_site[k] = m
            rec.update(skip_reason="E_TOO_FEW_REPLIES: 1 of 3 replies usable, 2 needed" if status == "skipped"
                       else None, joined=[])
            rec["train"] = {"sampled": [int(k) for k in keys],
                            "kept": [] if status == "skipped" else [int(k) for k in keys],
                            "dropped": [{"node": int(keys[0]), "reason": "E_NONFINITE"}] if status == "skipped" else [],
                            "clamped": [], "per_site": {} if status == "skipped" else per_site,
                            "aggregate": {"train-loss": float(np.mean([m["train-loss"] for m in per_site.values()]))},
                            "update_norms": {k: 0.5 for k in keys}, "norm_outliers": []}
        elif r > 0:
            losses = [float(2.5 - q + rng.uniform(0, 0.2)) for _ in range(2)]
            rec["train"] = {"sites": list(keys), "epochs": 2, "epoch_losses": losses,
                            "aggregate": {"num-examples": 4 * sum(sizes), "train-loss": losses[-1]}}
        lines.append(dumps(rec))
    body = "\n".join(lines) + "\n"
    if torn_last_line:
        body = body[: -len(lines[-1]) // 2 - 1]
    (run_dir / "rounds.jsonl").write_text(body)
    if not final:
        return None
    test = eval_record("test", {k: site_stats(rng, sizes[i], quality) for i, k in enumerate(keys)}, min_p, new_fields)
    fm: dict[str, Any] = {
        "run": cfg.name, "rounds": rounds, "best_round": best, "selection_metric": "loss",
        "selection_value": best_value, "lower_is_better": True, "selection_note": None, "test": test,
        "suppressed_sites": test["suppressed"], "notes": {"survival.c_index": C_INDEX_NOTE},
        "sites": [int(k) if k.isdigit() else k for k in keys], "refused_sites": {}, "skipped_rounds": skipped,
        "model": {"file": "model.pt", "sha256": "0" * 64},
        "versions": {"python": "3.11.7", "torch": "2.14.1", "numpy": "2.4.6", "flwr": "1.42.0", "fedsmm": "0.1.0"},
    }
    if new_fields or not federated:
        fm["mode"] = mode
    if new_fields:
        fm.update(wall_s=42.5, bytes={"sent": 1_234_567, "received": 456_789},
                  config_sha256=hashlib.sha256(text.encode()).hexdigest(), site_info=_site_info(keys, sizes))
    (run_dir / "final_metrics.json").write_text(dumps(fm, indent=2) + "\n")
    return json.loads(dumps(fm))


def write_local_only(run_dir: Path, *, seed: int = 7, sizes: tuple[int, ...] = (9, 7, 4)) -> dict[str, Any]:
    """A local-only run: RUN_DIR/local_only.json + RUN_DIR/local/<site>/ (client.baselines.centralized)."""
    run_dir = Path(run_dir)
    table = {}
    for i, site in enumerate(SITE_NAMES[: len(sizes)]):
        sub = run_dir / "local" / site
        fm = write_run(sub, mode="local-only", seed=seed + i, sizes=(sizes[i],), keys=(site,), new_fields=True)
        assert fm is not None
        rng = np.random.default_rng(seed + 100 + i)
        sites = SITE_NAMES[: len(sizes)]
        all_test = eval_record("test", {s: site_stats(rng, sizes[j], 0.3) for j, s in enumerate(sites)}, 3, False)
        fm["all_sites_test"] = all_test
        (sub / "final_metrics.json").write_text(dumps(fm, indent=2) + "\n")
        table[site] = {"run_dir": f"local/{site}", "best_round": fm["best_round"],
                       "own_test": {"patients": fm["test"]["patients"], **{k: v for k, v in fm["test"]["global"].items()
                                                                           if k != "stats"}},
                       "all_sites_test": {"patients": all_test["patients"], **all_test["global"]}}
    summary = {"mode": "local-only", "run": "experiment", "selection_metric": "loss",
               "notes": {"survival.c_index": C_INDEX_NOTE}, "sites": table, "versions": {"python": "3.11.7"}}
    (run_dir / "config.yaml").write_text((run_dir / "local" / SITE_NAMES[0] / "config.yaml").read_text())
    (run_dir / "local_only.json").write_text(dumps(summary, indent=2) + "\n")
    return summary


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
