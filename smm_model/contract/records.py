"""Plain forms of what a run records (JSON text, library versions), shared by the site side and
the server side so both write their run files identically. No file is read or written here."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["jsonable", "dumps", "library_versions"]


def jsonable(obj: Any) -> Any:
    """Plain JSON data: numpy scalars and arrays become Python numbers and lists, tuples become
    lists, mapping keys become strings, and non-finite floats become ``None`` (strict JSON, which
    ``jq`` and browsers can read; the metric's reason says why it is undefined)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """Strict JSON text of ``jsonable(obj)`` (no NaN/Infinity tokens)."""
    return json.dumps(jsonable(obj), indent=indent, sort_keys=False, allow_nan=False)


def library_versions() -> dict[str, str]:
    """Versions that decide whether a run reproduces: torch, flwr, numpy, fedsmm, Python."""
    import torch

    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses to unpickle.
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(np.__version__)}
    for dist in ("flwr", "fedsmm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out
