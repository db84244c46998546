"""Run-folder files written on the site side (``smm centralized``, ``smm evaluate``).

A centralized or local-only run, and a local evaluation of a final model, leave the same files as a
federated run, in the format ``smm_model.contract.runfolder`` defines, so ``smm report`` reads them
alike. Per-site entries are keyed by the site folder's name here (a federated run keys them by
node id). Every file is written through ``smm_model.contract.atomic`` (fsynced, then renamed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smm_model.config import ExperimentConfig
from smm_model.contract.protocol import EvalStats, config_text, metrics_from_eval, round_lr, selection_lower_is_better
from smm_model.contract.atomic import append_line, atomic_write_bytes, atomic_write_json
from smm_model.contract.records import dumps, library_versions
from smm_model.contract.runfolder import (C_INDEX_NOTE, CHECKPOINT_FORMAT, CONFIG_FILE, FEDERATED_KEYS, FINAL_FILE,
                                          FINAL_KEYS, MODEL_FILE, MODEL_FORMAT, ROUNDS_FILE, model_payload, write_model)

__all__ = ["CONFIG_FILE", "ROUNDS_FILE", "FINAL_FILE", "MODEL_FILE", "MODEL_FORMAT", "CHECKPOINT_FORMAT",
           "C_INDEX_NOTE", "FINAL_KEYS", "FEDERATED_KEYS", "config_text", "selection_lower_is_better", "round_lr", "eval_record",
           "site_names", "library_versions", "dumps", "atomic_write_bytes", "write_json", "append_jsonl",
           "model_payload", "write_model"]


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


# --- strict JSON ---------------------------------------------------------------------------------------

def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one whole, fsynced line (``smm_model.contract.atomic.append_line``)."""
    append_line(path, dumps(record))
