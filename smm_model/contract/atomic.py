"""Atomic file writes and strict JSON for everything the server writes into a run folder.

A run folder is read by people, by ``smm report`` and by a resumed server. A crash (power loss,
SIGKILL, a full disk) must leave each file either as it was or complete, never half written: every
write goes to a temporary file in the same directory, is fsynced, and is renamed over the target
(``os.replace`` is atomic on POSIX and Windows), then the directory is fsynced so the rename itself
survives a power loss.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from smm_model.contract.records import dumps, jsonable

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "append_line", "sha256_bytes",
           "sha256_file", "jsonable", "dumps"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, nothing between."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))






def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one whole line and fsync it: a crash loses at most this line, never an earlier one.

    The line is written with a single ``write`` call on an ``O_APPEND`` descriptor; a reader that
    finds a last line without its newline knows it is torn (``RunLog.read_rounds`` drops it).
    """
    if "\n" in line:
        raise ValueError("append_line: the line must not contain a newline")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # pragma: no cover - only on a full disk
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
