"""The report as a document: ``Section``s of plain blocks (paragraphs, lists, headings, tables,
figures), with no markup in them.

``server.report.sections`` builds this model once; ``server.report.render_html`` and
``server.report.render_markdown`` each render all of it, so report.html and report.md always say
the same thing. ``is_num`` is here because both renderers right-align the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Para", "Bullets", "Heading", "Table", "Fig", "Section", "is_num"]


@dataclass
class Para:
    """A paragraph; ``kind`` styles it."""

    text: str
    kind: str = ""  # "", "warning", "missing", "note"


@dataclass
class Bullets:
    """A list; an item may be (text, [sub-items])."""

    items: list[Any]
    kind: str = ""


@dataclass
class Heading:
    """A sub-heading within a section."""

    text: str


@dataclass
class Table:
    """Cells are text already; ``notes`` are the numbered notes its cells refer to ("n/a [1]")."""

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Fig:
    """A figure's PNG bytes; ``name`` is its file name (without .png) and anchor."""

    name: str
    png: bytes
    caption: str
    alt: str


@dataclass
class Section:
    """A numbered section of the report; ``id`` is its HTML anchor."""

    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)


def is_num(cell: str) -> bool:
    """A cell to right-align: a short number or n/a (not a digest or a node id)."""
    head = cell.split(" [")[0]
    if len(head) > 12:
        return False
    try:
        float(head)
        return True
    except ValueError:
        return head == "n/a"
