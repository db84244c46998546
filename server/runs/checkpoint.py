"""Server checkpoints: complete, atomic, checksummed, resumable.

Flower's SuperLink database is orchestration state, not training state; ``Strategy.start`` has no
start round. So the server writes its own checkpoint after every round::

    <run_dir>/checkpoints/round_0003.pt   one torch file per round (weights_only-loadable)
    <run_dir>/checkpoints/index.json      file -> round, sha256, size; and the best round

A checkpoint holds everything a resumed run needs to continue *bit-exactly*: the global weights
(a plain ``state_dict``, no ``_module.``/``_orig_mod.`` prefixes, loadable with
``load_state_dict(strict=True)``), the server-optimiser state, the round, the resolved config
text, the shared statistics, the node sampler's state, the Python/NumPy/torch RNG states, the best
round so far, the accepted site schema, and library versions.

Write order: the round file (temp + fsync + rename), then the index (same), then pruning. A crash
before the index is renamed leaves a file no index names; it is never loaded and is removed by
the next save. ``load_latest`` verifies each file against the index's sha256 and falls back,
with an explicit warning, to the newest checkpoint that verifies.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smm_model.contract.records import library_versions

from smm_model.contract.runfolder import CHECKPOINT_DIR, CHECKPOINT_FORMAT
from smm_model.contract.atomic import atomic_write_bytes, atomic_write_json, sha256_bytes

__all__ = ["CHECKPOINT_DIR", "INDEX_FILE", "CheckpointError", "ServerState", "capture_rng", "restore_rng",
           "library_versions", "save_checkpoint", "load_latest", "load_checkpoint", "read_index"]

log = logging.getLogger("fedsmm.server.checkpoint")

INDEX_FILE = "index.json"
_FORMAT = CHECKPOINT_FORMAT
_INDEX_FORMAT = "fedsmm-checkpoint-index"
_VERSION = 1
_ROUND_FILE = re.compile(r"^round_(\d{4,})\.pt$")
_STALE_TMP = re.compile(r"^\.(round_\d{4,}\.pt|index\.json)\..*\.tmp$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint that does not verify; the message names the file."""




def capture_rng() -> dict[str, Any]:
    """The global Python, NumPy and torch (CPU) RNG states."""
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"bit_generator": np_state["bit_generator"],
                      "key": np.asarray(np_state["state"]["key"]).astype(np.int64).tolist(),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "torch": torch.get_rng_state()}


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put ``capture_rng()``'s states back."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.asarray(n["key"], dtype=np.int64).astype(np.uint32), "pos": int(n["pos"])},
                         "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])})
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))


@dataclass
class ServerState:
    """Everything the server loop needs to continue after ``round``.

    ``weights``: ordered name -> ndarray (a state_dict's order and dtypes). ``strategy_state``:
    ``server.aggregation.strategy.strategy_state(...)``. ``sampler_state``: ``random.Random.getstate()`` of the
    node sampler. ``best_round``/``best_value``: the best round by ``federation.selection_metric``
    so far (None before any). ``skipped_rounds``: rounds that aggregated nothing.
    """

    round: int
    weights: dict[str, np.ndarray]
    config_text: str
    shared_json: str
    strategy_state: dict[str, Any] = field(default_factory=dict)
    sampler_state: Any = None
    best_round: int | None = None
    best_value: float | None = None
    schema: dict[str, Any] = field(default_factory=dict)
    skipped_rounds: list[int] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=capture_rng)
    versions: dict[str, str] = field(default_factory=library_versions)


# --- (de)serialisation: numpy <-> torch so that torch.load(weights_only=True) can read it all -----------

def _to_torch(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True, order="C"))
    if isinstance(obj, Mapping):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


def _to_numpy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.numpy().copy()
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_numpy(v) for v in obj]
    return obj


def _serialise(state: ServerState) -> bytes:
    payload = {
        "format": _FORMAT, "version": _VERSION, "round": int(state.round),
        "weights": {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in state.weights.items()},
        "strategy": _to_torch(state.strategy_state), "config": state.config_text, "shared": state.shared_json,
        "sampler": state.sampler_state, "best_round": state.best_round,
        "best_value": None if state.best_value is None else float(state.best_value),
        "schema": dict(state.schema), "skipped_rounds": [int(r) for r in state.skipped_rounds],
        "rng": state.rng, "versions": dict(state.versions),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _deserialise(data: bytes, name: str) -> ServerState:
    try:
        p = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, unpickling errors
        raise CheckpointError(f"{name}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(p, dict) or p.get("format") != _FORMAT or p.get("version") != _VERSION:
        raise CheckpointError(f"{name}: not a fedsmm server checkpoint of version {_VERSION}")
    return ServerState(round=int(p["round"]), weights={k: v.numpy().copy() for k, v in p["weights"].items()},
                       config_text=p["config"], shared_json=p["shared"], strategy_state=_to_numpy(p["strategy"]),
                       sampler_state=p["sampler"], best_round=p["best_round"], best_value=p["best_value"],
                       schema=dict(p["schema"]), skipped_rounds=list(p["skipped_rounds"]), rng=p["rng"],
                       versions=dict(p["versions"]))


# --- index ----------------------------------------------------------------------------------------------

def read_index(run_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint index of ``run_dir``, or None when the run has no checkpoint yet."""
    path = Path(run_dir) / CHECKPOINT_DIR / INDEX_FILE
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint index ({type(e).__name__}: {e}); it is written "
                              f"atomically, so this points to disk corruption or a manual edit") from None
    if not isinstance(index, dict) or index.get("format") != _INDEX_FORMAT:
        raise CheckpointError(f"{path}: not a fedsmm checkpoint index")
    return index


def save_checkpoint(run_dir: str | Path, state: ServerState, *, keep_last: int = 3) -> Path:
    """Write ``state`` as ``checkpoints/round_<r>.pt`` and register it in the index, atomically.

    Keeps the newest ``keep_last`` checkpoints plus the one of ``state.best_round``. Entries for
    rounds at or after ``state.round`` from an abandoned timeline (a resumed run redoing them) are
    replaced. Returns the checkpoint path.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    data = _serialise(state)
    name = f"round_{state.round:04d}.pt"
    atomic_write_bytes(ckpt_dir / name, data)
    index = read_index(run_dir) or {"format": _INDEX_FORMAT, "version": _VERSION, "checkpoints": []}
    entries = [e for e in index["checkpoints"] if int(e["round"]) < state.round]
    entries.append({"file": name, "round": int(state.round), "sha256": sha256_bytes(data), "bytes": len(data)})
    entries.sort(key=lambda e: int(e["round"]))
    keep = {int(e["round"]) for e in entries[-keep_last:]}
    if state.best_round is not None:
        keep.add(int(state.best_round))
    entries = [e for e in entries if int(e["round"]) in keep]
    index.update(checkpoints=entries, best_round=state.best_round, latest_round=int(state.round))
    atomic_write_json(ckpt_dir / INDEX_FILE, index)
    listed = {e["file"] for e in entries}
    for p in ckpt_dir.iterdir():  # older rounds, and files of writes that crashed before the index
        if (_ROUND_FILE.match(p.name) and p.name not in listed) or _STALE_TMP.match(p.name):
            p.unlink(missing_ok=True)
    return ckpt_dir / name


def _verified(ckpt_dir: Path, entry: Mapping[str, Any]) -> ServerState:
    path = ckpt_dir / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: missing or unreadable ({type(e).__name__})") from None
    digest = sha256_bytes(data)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch (index says sha256 {entry['sha256'][:12]}..., the file "
                              f"has {digest[:12]}..., {len(data)} of {entry.get('bytes', '?')} bytes): "
                              f"truncated or corrupt")
    state = _deserialise(data, str(path))
    if state.round != int(entry["round"]):
        raise CheckpointError(f"{path}: holds round {state.round}, the index says {entry['round']}")
    return state


def load_latest(run_dir: str | Path) -> ServerState | None:
    """The newest checkpoint that verifies, or None when the run has none.

    A checkpoint that is missing, truncated or fails its checksum is skipped with a warning that
    names it, and the previous one is tried; if none verifies, ``CheckpointError``.
    """
    index = read_index(run_dir)
    if index is None or not index["checkpoints"]:
        return None
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    problems = []
    for entry in sorted(index["checkpoints"], key=lambda e: -int(e["round"])):
        try:
            state = _verified(ckpt_dir, entry)
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("ignoring checkpoint of round %s: %s; falling back to the previous one", entry["round"], e)
            continue
        if problems:
            log.warning("resuming from round %d, not the latest checkpoint (%d unusable)", state.round, len(problems))
        return state
    raise CheckpointError(f"no valid checkpoint in {ckpt_dir}: " + "; ".join(problems))


def load_checkpoint(run_dir: str | Path, round_: int) -> ServerState:
    """The verified checkpoint of round ``round_`` (e.g. the best round, for the final evaluation)."""
    index = read_index(run_dir)
    for entry in (index or {}).get("checkpoints", []):
        if int(entry["round"]) == int(round_):
            return _verified(Path(run_dir) / CHECKPOINT_DIR, entry)
    raise CheckpointError(f"{Path(run_dir) / CHECKPOINT_DIR}: no checkpoint of round {round_} in the index")
