"""Shared vocabulary for validating a site folder: one error type, a problem collector, and the
message helpers every reader uses so that messages look the same everywhere.

Why a collector and not "raise at the first problem": a site operator fixing a clinical table wants
every bad column at once, not one per run. Readers gather problems for a whole file and raise one
``SiteDataError`` listing them; ``smm site check`` gathers them across files and keeps going.

Messages name the file, the column (field) and the row (for patient tables: the patient id, never
a value), and say what was expected. Values of genomic features or labels are never printed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["SiteDataError", "Report", "preview", "MISSING_TOKENS"]

#: Cell texts read as "missing" in site tables (pandas' defaults plus TCGA's bracketed codes).
MISSING_TOKENS = frozenset({
    "", "na", "n/a", "nan", "null", "none", "-", "?", "unknown", "not available", "[not available]",
    "[unknown]", "[not evaluated]", "[not applicable]", "[discrepancy]", "#n/a", "<na>",
})


class SiteDataError(ValueError):
    """One or more problems in a site folder's files; ``problems`` lists them, one per line."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def preview(items: Iterable[object], n: int = 5) -> str:
    """``'a', 'b', 'c'`` or ``'a', 'b', 'c' and 7 more (10 in all)``: names, never a wall of them."""
    items = list(items)
    head = ", ".join(repr(str(x)) for x in items[:n])
    return head if len(items) <= n else f"{head} and {len(items) - n} more ({len(items)} in all)"


@dataclass
class Report:
    """Errors (the folder cannot be used as is), warnings (usable; something was left out or
    looks odd, and the user should know) and notes (plain facts for the summary)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def absorb(self, exc: SiteDataError) -> None:
        """Record every problem of a failed reader as an error."""
        self.errors.extend(exc.problems)

    def extend(self, other: "Report") -> None:
        self.errors.extend(other.errors)
        self.warnings.extend(other.warnings)
        self.notes.extend(other.notes)

    def raise_if_errors(self) -> None:
        if self.errors:
            raise SiteDataError(self.errors)
