"""The run folder's format: what every run leaves behind, whoever wrote it.

A federated run (``server.runs.runlog``, ``server.federation.loop``), a centralized or local-only
run and a local evaluation (``client.baselines``) leave the same files, so that ``smm report`` and
the benchmarks read them alike::

    <run_dir>/config.yaml          the resolved configuration
    <run_dir>/rounds.jsonl         one JSON object per round (0 = the initial model), in order
    <run_dir>/final_metrics.json   best round, selection metric, test metrics (global + per site)
    <run_dir>/model.pt             the selected model: format, weights, model_config, schema, shared, ...
    <run_dir>/checkpoints/         server checkpoints (federated runs; server.runs.checkpoint)
    <run_dir>/server.log           the server's log lines (federated runs)

JSON is strict: an undefined metric is ``null`` with its reason beside it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smm_model.config import ExperimentConfig, to_dict
from smm_model.contract.atomic import atomic_write_bytes, sha256_bytes
from smm_model.contract.protocol import config_text
from smm_model.contract.records import library_versions

__all__ = ["CONFIG_FILE", "ROUNDS_FILE", "FINAL_FILE", "FAILURE_FILE", "MODEL_FILE", "LOG_FILE", "LOCAL_ONLY_FILE", "CHECKPOINT_DIR", "MODEL_FORMAT",
           "CHECKPOINT_FORMAT", "C_INDEX_NOTE", "FINAL_KEYS", "FEDERATED_KEYS", "RUNS_DIR", "default_run_dir",
           "model_payload", "write_model", "RoundsFile", "read_rounds_file"]

CONFIG_FILE = "config.yaml"
ROUNDS_FILE = "rounds.jsonl"
FINAL_FILE = "final_metrics.json"
MODEL_FILE = "model.pt"
#: Written by a federated run that failed (the reason, the last checkpointed round, the sites it had);
#: removed when a resumed run finishes. The report reads it.
FAILURE_FILE = "failure.json"
LOG_FILE = "server.log"
#: A local-only run's summary over its per-site run folders (``RUN_DIR/local/<site>/``).
LOCAL_ONLY_FILE = "local_only.json"
CHECKPOINT_DIR = "checkpoints"
#: ``model.pt``'s ``format`` field, and a server checkpoint's.
MODEL_FORMAT = "fedsmm-model"
CHECKPOINT_FORMAT = "fedsmm-server-checkpoint"
#: What ``survival.c_index`` means in every run's results (a site cannot pair its patients with another's).
C_INDEX_NOTE = ("survival.c_index is the within-site C-index: concordance pairs are formed within each site only "
                "(a site cannot compare its patients with another site's), and the pair counts are summed over sites")
#: The keys every run folder's final_metrics.json has (federated, centralized, local-only).
FINAL_KEYS = ("mode", "run", "rounds", "best_round", "selection_metric", "selection_value", "lower_is_better",
              "selection_note", "test", "suppressed_sites", "notes", "sites", "refused_sites", "skipped_rounds",
              "model", "versions", "wall_s", "config_sha256", "site_info")
#: The keys only a federated run adds.
FEDERATED_KEYS = ("strategy", "bytes", "resumed_after_round")
#: Where a run goes when no folder is named (relative to the working directory).
RUNS_DIR = Path("runs")


def default_run_dir(name: str, kind: str | None = None, now: datetime | None = None) -> Path:
    """``runs/<name>[-<kind>]-<UTC time>``: the folder of a run that was given none. One clock (UTC)
    for every command, so folders sort in the order the runs started wherever they ran."""
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return RUNS_DIR / "-".join(p for p in (name, kind, stamp) if p)


def model_payload(weights: Mapping[str, torch.Tensor | np.ndarray], cfg: ExperimentConfig, schema: Mapping[str, Any],
                  shared_json: str, best_round: int, best_value: float | None) -> dict[str, Any]:
    """``model.pt``'s content, whoever selected the model (the federation loop, a pooled run): the
    weights with what is needed to use them safely elsewhere (the model config to rebuild the
    network, the accepted site schema so ``smm evaluate`` can refuse a mismatching site, the shared
    statistics to preprocess a site the same way). Weights are copied (tensors or arrays)."""
    return {"format": MODEL_FORMAT, "version": 1,
            "weights": {k: torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray)
                        else v.detach().cpu().clone() for k, v in weights.items()},
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
    return sha256_bytes(data)


@dataclass
class RoundsFile:
    """What ``rounds.jsonl`` holds, read once for every reader (the server's resume, the report,
    the benchmarks), each deciding how strict to be.

    ``records``: the round records in file order (dicts with an integer ``round``). ``torn``: the
    last line had no newline (the run stopped while appending it, ``atomic.append_line``); it is
    left out even when it parses. ``bad_lines``: 1-based numbers of other lines that are not round
    records, left out.
    """

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    torn: bool = False
    bad_lines: list[int] = field(default_factory=list)

    def problems(self) -> list[str]:
        """What was left out, in words a report can show."""
        out = [f"{self.path.name} line {n} is not a round record; it is left out" for n in self.bad_lines]
        if self.torn:
            out.append(f"the last line of {self.path.name} is incomplete (the run stopped while writing it); "
                       "it is left out")
        return out

    def strict(self) -> list[dict[str, Any]]:
        """The records, or a ValueError naming the file and line when a line other than a torn
        last one is not a round record."""
        if self.bad_lines:
            raise ValueError(f"{self.path}: line {self.bad_lines[0]} is not a valid round record (a JSON object "
                             "with an integer 'round')")
        return self.records

    def by_round(self) -> list[dict[str, Any]]:
        """One record per round, in round order; a repeated round (a run resumed by an older
        version that appended instead of truncating) counts with its later record."""
        latest = {int(r["round"]): r for r in self.records}
        return [latest[k] for k in sorted(latest)]


def read_rounds_file(path: Path) -> RoundsFile:
    """Read a run folder's ``rounds.jsonl`` (absent: no records). An unreadable file raises
    ``OSError``; the caller names what it was doing."""
    out = RoundsFile(path)
    if not path.exists():
        return out
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if i == len(lines) - 1:  # no newline after it
            out.torn = True
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("round"), int) and not isinstance(rec["round"], bool):
            out.records.append(rec)
        else:
            out.bad_lines.append(i + 1)
    return out
