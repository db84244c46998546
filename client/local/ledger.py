"""A site's privacy ledger: every DP-SGD step it ever took, on its own disk, and the epsilon they cost.

Why a ledger and not an accountant per round: privacy losses compose. Five rounds of 8 steps at
sigma 1, q 1/8 each report epsilon 3.79 (delta 1e-5, RDP) on their own, but together they spend
6.59; a site that restarted its accountant every round (or every run, or after a crash) would
under-report what its patients have given away. So the ledger keeps the full history of
mechanisms, ``(noise_multiplier, sample_rate, steps)`` with the run and round that used them, and
recomputes epsilon(delta) from that history with a fresh Opacus accountant of the configured kind
each time it is asked. Nothing else is stored that the answer depends on, so the number is the
same in a new process, after a restart, and whichever accountant a later run configures (the
history describes the mechanism, not an accountant's state).

Reserve before train: ``reserve`` checks the site's budget, appends the round's steps and writes
the file (atomically, fsynced) BEFORE the round trains. A crash mid-round then still counts those
steps (over-counting a round that released nothing is safe; under-counting one that did is not),
and a round that would exceed the budget is refused with the file untouched. A ledger that cannot
be read or does not parse is an error naming the file, never a fresh empty ledger: silently
resetting it would reset the budget. (A missing file is a site that has not trained under DP yet.)

One ledger per site: the caller gives the path (e.g. a file in the site's own state folder, not in
a run folder, so that every run at the site draws on one budget). Concurrent writers at one site
are serialised by an advisory lock on a sidecar ``<name>.lock`` file where the platform has one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smm_model.config import ACCOUNTANTS
from smm_model.contract.accounting import epsilon_of, mechanisms
from smm_model.contract.atomic import atomic_write_json

__all__ = ["LEDGER_FORMAT", "LEDGER_VERSION", "LedgerError", "BudgetExceeded", "LedgerEntry", "PrivacyLedger",
           "mechanisms", "epsilon_of"]

#: What the file says it is (a ledger is never confused with another JSON file at the site).
LEDGER_FORMAT = "fedsmm-privacy-ledger"
LEDGER_VERSION = 1


class LedgerError(RuntimeError):
    """The ledger file cannot be read, does not parse, or holds an impossible entry; names the file."""


class BudgetExceeded(RuntimeError):
    """A round would take the site's epsilon past its budget (nothing was recorded or trained)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One reservation: ``steps`` DP-SGD steps at ``noise_multiplier`` with Poisson rate ``sample_rate``.

    ``run``/``round`` say who spent it; ``accountant``, ``delta`` and ``epsilon_after`` are what the
    reserving run saw (an audit trail for people; epsilon is always recomputed from the mechanisms).
    """

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str = ""
    delta: float | None = None
    epsilon_after: float | None = None
    recorded_at: str = ""

    @property
    def mechanism(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _check_mechanism(sigma: float, q: float, steps: int, where: str) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"{where}: noise_multiplier must be a finite number >= 0, got {sigma!r}")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0.0 < q <= 1.0):
        raise ValueError(f"{where}: sample_rate must be in (0, 1], got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: steps must be an integer >= 1, got {steps!r}")


def _check_accountant(kind: str) -> None:
    if kind not in ACCOUNTANTS:
        raise ValueError(f"privacy.dp_accountant: unknown {kind!r}; expected one of {ACCOUNTANTS}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<path>.lock`` (POSIX); elsewhere no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(path: Path) -> list[LedgerEntry]:
    """The entries in ``path``; [] when there is no file; LedgerError naming the file otherwise."""
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LedgerError(f"privacy ledger {path}: cannot be read ({e}); it is never reset automatically") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LedgerError(f"privacy ledger {path}: not valid JSON ({e}); restore it from a backup, it is never "
                          "reset automatically") from e
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
        raise LedgerError(f"privacy ledger {path}: not a {LEDGER_FORMAT} file")
    if data.get("version") != LEDGER_VERSION:
        raise LedgerError(f"privacy ledger {path}: version {data.get('version')!r}, this code reads {LEDGER_VERSION}")
    raw = data.get("entries")
    if not isinstance(raw, list):
        raise LedgerError(f"privacy ledger {path}: 'entries' must be a list")
    fields = set(LedgerEntry.__dataclass_fields__)
    out = []
    for i, item in enumerate(raw):
        where = f"privacy ledger {path}: entry {i}"
        if not isinstance(item, dict) or set(item) - fields:
            raise LedgerError(f"{where}: expected an object with some of {sorted(fields)}")
        try:
            entry = LedgerEntry(**item)
            _check_mechanism(entry.noise_multiplier, entry.sample_rate, entry.steps, where)
            if not isinstance(entry.run, str) or isinstance(entry.round, bool) or not isinstance(entry.round, int):
                raise ValueError(f"{where}: run must be a string and round an integer")
        except (TypeError, ValueError) as e:
            raise LedgerError(str(e) if str(e).startswith("privacy ledger") else f"{where}: {e}") from e
        out.append(entry)
    return out


class PrivacyLedger:
    """The DP history of one site, kept in one JSON file (see the module docstring)."""

    def __init__(self, path: Path, accountant: str, entries: list[LedgerEntry]) -> None:
        self.path = path
        self.accountant = accountant
        self._entries = entries

    @classmethod
    def open(cls, path: str | Path, accountant: str = "rdp") -> "PrivacyLedger":
        """The ledger at ``path`` (empty when there is no file yet), answering with ``accountant``."""
        _check_accountant(accountant)
        path = Path(path)
        return cls(path, accountant, _read(path))

    @property
    def history(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    @property
    def steps(self) -> int:
        """DP-SGD steps recorded over the site's whole history."""
        return sum(e.steps for e in self._entries)

    def epsilon(self, delta: float) -> float:
        """epsilon(delta) spent over everything the ledger records."""
        return epsilon_of(self._entries, delta, self.accountant)

    def would_spend(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """epsilon(delta) after adding ``steps`` steps at (noise_multiplier, sample_rate)."""
        _check_mechanism(noise_multiplier, sample_rate, steps, "would_spend")
        return epsilon_of([*self._entries, (noise_multiplier, sample_rate, steps)], delta, self.accountant)

    def reserve(self, run: str, round: int, noise_multiplier: float, sample_rate: float, steps: int,
                delta: float, budget: float) -> LedgerEntry:
        """Record a round's steps before it trains; BudgetExceeded (file untouched) if they would
        take epsilon(delta) past ``budget``. Re-reads the file under the lock first, so another
        process's reservation is counted. Returns the entry (its ``epsilon_after`` is the site's
        epsilon once this round has run)."""
        _check_mechanism(noise_multiplier, sample_rate, steps, "reserve")
        if not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"privacy.dp_epsilon_budget: must be > 0, got {budget!r}")
        with _locked(self.path):
            self._entries = _read(self.path)
            spent = self.epsilon(delta)
            after = self.would_spend(noise_multiplier, sample_rate, steps, delta)
            if after > budget:
                raise BudgetExceeded(
                    f"privacy budget of this site: privacy.dp_epsilon_budget={budget:g} at delta={delta:g}; the ledger "
                    f"{self.path} has spent epsilon={spent:.4g} over {self.steps} steps, and round {round} of run "
                    f"{run!r} ({steps} steps at noise multiplier {noise_multiplier:.4g}, sample rate "
                    f"{sample_rate:.4g}) "
                    f"would bring it to {after:.4g} ({self.accountant} accountant); nothing was recorded or trained")
            entry = LedgerEntry(run=str(run), round=int(round), noise_multiplier=float(noise_multiplier),
                                sample_rate=float(sample_rate), steps=int(steps), accountant=self.accountant,
                                delta=float(delta), epsilon_after=float(after),
                                recorded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self._write([*self._entries, entry])
            self._entries.append(entry)
        return entry

    def _write(self, entries: list[LedgerEntry]) -> None:
        doc: dict[str, Any] = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                               "entries": [asdict(e) for e in entries]}
        atomic_write_json(self.path, doc)
