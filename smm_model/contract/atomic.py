"""Atomic file writes and strict JSON: the one way fedsmm writes a file, at the site and at the server.

A run folder is read by people, by ``smm report`` and by a resumed server; a site folder by every
later stage and by ``smm site check``. A crash (power loss,
SIGKILL, a full disk) must leave each file either as it was or complete, never half written: every
write goes to a temporary file in the same directory, is fsynced, and is renamed over the target
(``os.replace`` is atomic on POSIX and Windows), then the directory is fsynced so the rename itself
survives a power loss.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smm_model.contract.records import dumps, jsonable

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "append_line", "sha256_bytes",
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for a writer that wants a path (h5py, pandas,
    ``Path.write_text``); when the block ends without an exception, fsync it and rename it over
    ``target`` (then fsync the folder). On any exception the temporary file is removed and
    ``target`` is left as it was.

    The file gets the mode a plain ``open()`` would (0666 less the umask; ``mkstemp`` makes 0600),
    so outputs stay readable by a site's other accounts and containers as usual.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


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
