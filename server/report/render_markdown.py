"""report.md: the document model (``server.report.document``) rendered as GitHub-flavoured Markdown.

The same content as report.html; its figures are the same PNG files, which ``server.report.build``
writes to ``FIGURES_DIR``/<name>.png next to report.md and which are linked relatively (move the
folder whole). The contents list links GitHub's heading anchors.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.report.document import Bullets, Fig, Heading, Para, Section, Table, is_num
from server.report.files import FIGURES_DIR

__all__ = ["render_markdown"]


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    keep = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return keep.strip().replace(" ", "-")


def render_markdown(sections: Sequence[Section], title: str, meta: Sequence[str]) -> str:
    """The Markdown text: ``title``, the ``meta`` lines, a contents list, then the numbered sections."""
    out = [f"# {title}", "", *[f"{m}  " for m in meta], "", "## Contents", ""]
    out += [f"{i}. [{s.title}](#{_slug(f'{i}. {s.title}')})" for i, s in enumerate(sections, 1)]
    n_fig = 0
    for i, s in enumerate(sections, 1):
        out += ["", f"## {i}. {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Para):
                text = b.text
                out += [f"> **{text}**" if b.kind == "warning" else f"*{text}*" if b.kind == "missing" else text, ""]
            elif isinstance(b, Bullets):
                for x in b.items:
                    out += [f"- {x[0]}", *[f"  - {y}" for y in x[1]]] if isinstance(x, tuple) else [f"- {x}"]
                out.append("")
            elif isinstance(b, Heading):
                out += [f"### {b.text}", ""]
            elif isinstance(b, Table):
                if b.caption:
                    out += [f"**{b.caption}**", ""]
                out.append("| " + " | ".join(_md_cell(h) or " " for h in b.headers) + " |")
                out.append("|" + "".join(" ---: |" if j and b.rows and all(is_num(r[j]) for r in b.rows)
                                         else " --- |" for j in range(len(b.headers))))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
                if b.notes:
                    out += [f"[{k}] {n}  " for k, n in enumerate(b.notes, 1)] + [""]
            elif isinstance(b, Fig):
                n_fig += 1
                out += [f"![{b.alt}]({FIGURES_DIR}/{b.name}.png)", "", f"*Figure {n_fig}. {b.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"
