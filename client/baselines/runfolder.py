"""Run-folder files written on the site side (``smm centralized``, ``smm evaluate``).

A centralized or local-only run, and a local evaluation of a final model, leave the same files as a
federated run (``server/runs/runlog.py``), so ``smm report`` reads them alike::

    <run_dir>/config.yaml          the resolved configuration
    <run_dir>/rounds.jsonl         one JSON object per round (0 = the initial model)
    <run_dir>/final_metrics.json   best round, selection metric, test metrics (global + per site)
    <run_dir>/model.pt             the selected model: format, weights, model_config, schema, shared, ...

``client`` may not import ``server`` (architecture.md), so the few format constants are repeated
here; ``tests/client/test_centralized.py`` runs both sides and checks that they agree. Per-site
entries are keyed by the site folder's name here (a federated run keys them by node id).

JSON is strict, as the server writes it: an undefined metric is ``null`` with its reason beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from client.site.folder import atomic_path
from smm_model.config import ExperimentConfig, to_dict
from smm_model.contract.protocol import EvalStats, config_text, metrics_from_eval, round_lr, selection_lower_is_better
from smm_model.contract.records import dumps, library_versions

__all__ = ["CONFIG_FILE", "ROUNDS_FILE", "FINAL_FILE", "MODEL_FILE", "MODEL_FORMAT", "CHECKPOINT_FORMAT",
           "C_INDEX_NOTE", "FINAL_KEYS", "FEDERATED_KEYS", "config_text", "selection_lower_is_better", "round_lr", "eval_record",
           "site_names", "library_versions", "dumps", "atomic_write_bytes", "write_json", "append_jsonl",
           "model_payload", "write_model", "write_run_report"]

CONFIG_FILE = "config.yaml"
ROUNDS_FILE = "rounds.jsonl"
FINAL_FILE = "final_metrics.json"
MODEL_FILE = "model.pt"
MODEL_FORMAT = "fedsmm-model"
CHECKPOINT_FORMAT = "fedsmm-server-checkpoint"
C_INDEX_NOTE = ("survival.c_index is the within-site C-index: concordance pairs are formed within each site only "
                "(a site cannot compare its patients with another site's), and the pair counts are summed over sites")
#: The keys every run folder's final_metrics.json has (federated: server.federation.loop; centralized, local-only).
FINAL_KEYS = ("mode", "run", "rounds", "best_round", "selection_metric", "selection_value", "lower_is_better",
              "selection_note", "test", "suppressed_sites", "notes", "sites", "refused_sites", "skipped_rounds",
              "model", "versions", "wall_s", "config_sha256", "site_info")
#: The keys only a federated run adds.
FEDERATED_KEYS = ("strategy", "bytes", "resumed_after_round")








def site_names(dirs: Sequence[Path]) -> list[str]:
    """A name per site folder: its folder name, or its full path where two folders share a name."""
    names = [Path(d).name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


def eval_record(split: str, stats: Mapping[str, EvalStats], cfg: ExperimentConfig,
                km_grid: Sequence[float] | None = None) -> dict[str, Any]:
    """One evaluation over sites, in the format of a federated run's ``val``/``test`` records: global
    metrics from the summed statistics of the unsuppressed sites (kept under ``global.stats``, except
    for validation rounds, for the report's plots, with the Kaplan-Meier ``km_grid``), per-site metrics, suppressed sites
    (fewer than ``federation.min_site_patients`` patients: no numbers at all)."""
    n_classes = cfg.model.n_classes
    min_p = cfg.federation.min_site_patients
    suppressed = [s for s, st in stats.items() if st.suppressed or st.n < min_p]
    per_site = {s: (int(st.n), metrics_from_eval(st, n_classes)) for s, st in stats.items() if s not in suppressed}
    total = EvalStats.merge([stats[s] for s in per_site])
    return {"split": split, "sampled": list(stats), "patients": int(sum(n for n, _ in per_site.values())),
            "global": {**metrics_from_eval(total, n_classes).to_dict(),
                       **({"stats": total.to_record()} if split != "val" else {})},
            "km_grid": list(km_grid) if km_grid is not None else None,
            "per_site": {s: {"patients": n, **r.to_dict()} for s, (n, r) in per_site.items()},
            "suppressed": suppressed, "dropped": []}




# --- strict JSON and atomic writes ----------------------------------------------------------------------





def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``client.site.folder.atomic_path``, with the data fsynced before the rename (run results)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (dumps(obj, indent=2) + "\n").encode("utf-8"))


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one whole line (one write on an O_APPEND descriptor), fsynced."""
    data = (dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# --- model.pt -------------------------------------------------------------------------------------------

def model_payload(weights: Mapping[str, torch.Tensor], cfg: ExperimentConfig, schema: Mapping[str, Any],
                  shared_json: str, best_round: int, best_value: float | None) -> dict[str, Any]:
    """``model.pt``'s content, as a federated run writes it (server.federation.loop)."""
    return {"format": MODEL_FORMAT, "version": 1,
            "weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
            "model_config": to_dict(cfg.model), "schema": dict(schema), "shared": shared_json,
            "config": config_text(cfg), "round": int(best_round),
            "selection_metric": cfg.federation.selection_metric,
            "selection_value": None if best_value is None or not math.isfinite(best_value) else float(best_value),
            "versions": library_versions()}


def write_model(path: Path, payload: Mapping[str, Any]) -> str:
    """Write ``model.pt`` atomically; returns its sha256."""
    buf = io.BytesIO()
    torch.save(dict(payload), buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_run_report(run_dir: Path, prog: str) -> Path | None:
    """Write the run folder's report (``smm report``), as every run does when it ends, and say
    where it is, or why it could not be drawn (the finished run's results stay as they are)."""
    from server.report.build import report_after_run  # matplotlib: only once a run has finished

    path, problem = report_after_run(run_dir)
    if path is None:
        print(f"{prog}: {problem}", file=sys.stderr)
    else:
        print(f"{prog}: report {path}")
    return path
