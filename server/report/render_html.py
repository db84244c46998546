"""report.html: the document model (``server.report.document``) rendered as one self-contained page.

Figures are embedded as base64 PNG and the CSS is inline; there is no script and no external
reference of any kind, so the file can be mailed or archived alone. The print styles keep figures
and table rows whole on A4/Letter and start each section on a new page. Every text is escaped.
(The module is not called ``html``: run as a script, it would shadow the standard library's.)
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from server.report.document import Bullets, Fig, Heading, Para, Section, Table, is_num

__all__ = ["CSS", "render_html"]


CSS = """
:root { --fg: #1a1a1a; --muted: #555; --line: #d0d0d0; --warn-bg: #fff4e5; --warn: #8a4b00; --miss: #6b6b6b; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: var(--fg);
       max-width: 1100px; margin: 0 auto; padding: 1.5rem; line-height: 1.45; font-size: 15px; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { border-bottom: 2px solid var(--fg); padding-bottom: .2rem; margin-top: 2.2rem; }
h3 { margin-top: 1.4rem; }
.meta { color: var(--muted); font-size: .9rem; }
nav.toc { border: 1px solid var(--line); padding: .6rem 1rem; display: inline-block; }
nav.toc ol { margin: .2rem 0; padding-left: 1.4rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .85rem; width: 100%; }
caption { text-align: left; font-weight: 600; padding: .2rem 0; }
th, td { border: 1px solid var(--line); padding: .25rem .45rem; text-align: left; vertical-align: top; }
td.long { overflow-wrap: anywhere; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
thead th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
ol.notes { font-size: .8rem; color: var(--muted); margin-top: -.4rem; }
figure { margin: 1rem 0; break-inside: avoid; page-break-inside: avoid; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: .85rem; color: var(--muted); }
.warning { background: var(--warn-bg); color: var(--warn); border-left: 4px solid var(--warn); padding: .4rem .7rem; }
ul.warning { padding-left: 2rem; }
.missing { color: var(--miss); font-style: italic; }
.note { color: var(--muted); }
code { font-size: .9em; }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  nav.toc { display: block; page-break-after: always; border: none; }
  h2 { page-break-before: always; break-after: avoid; }
  h2:first-of-type { page-break-before: avoid; }
  h3, caption { break-after: avoid; }
  tr, figure { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
  tbody tr:nth-child(even) { background: none; }
}
@page { size: A4; margin: 15mm; }
"""


def _td(cell: str, col: int) -> str:
    """A table cell: numbers right-aligned; long tokens (digests, paths) may wrap anywhere."""
    if col and is_num(cell):
        return f'<td class="num">{html.escape(cell)}</td>'
    if any(len(tok) > 24 for tok in cell.split()):
        return f'<td class="long">{html.escape(cell)}</td>'
    return f"<td>{html.escape(cell)}</td>"


def render_html(sections: Sequence[Section], title: str, meta: Sequence[str]) -> str:
    """The page: ``title``, the ``meta`` lines, a contents list, then the numbered sections."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<header><h1>{e(title)}</h1>", *[f'<p class="meta">{e(m)}</p>' for m in meta], "</header>",
           '<nav class="toc" id="contents"><strong>Contents</strong><ol>',
           *[f'<li><a href="#{s.id}">{e(s.title)}</a></li>' for s in sections], "</ol></nav>"]
    n_fig = 0
    for i, s in enumerate(sections, 1):
        out.append(f'<section id="{s.id}"><h2>{i}. {e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Para):
                out.append(f'<p class="{b.kind}">{e(b.text)}</p>' if b.kind else f"<p>{e(b.text)}</p>")
            elif isinstance(b, Bullets):
                cls = f' class="{b.kind}"' if b.kind else ""
                out.append(f"<ul{cls}>" + "".join(
                    f"<li>{e(x[0])}<ul>" + "".join(f"<li>{e(y)}</li>" for y in x[1]) + "</ul></li>"
                    if isinstance(x, tuple) else f"<li>{e(x)}</li>" for x in b.items) + "</ul>")
            elif isinstance(b, Heading):
                out.append(f"<h3>{e(b.text)}</h3>")
            elif isinstance(b, Table):
                out.append("<table>" + (f"<caption>{e(b.caption)}</caption>" if b.caption else ""))
                out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr></thead><tbody>")
                for row in b.rows:
                    out.append("<tr>" + "".join(_td(c, j) for j, c in enumerate(row)) + "</tr>")
                out.append("</tbody></table>")
                if b.notes:
                    out.append('<ol class="notes">' + "".join(f"<li>{e(n)}</li>" for n in b.notes) + "</ol>")
            elif isinstance(b, Fig):
                n_fig += 1
                data = base64.b64encode(b.png).decode("ascii")
                out.append(f'<figure id="fig-{b.name}"><img src="data:image/png;base64,{data}" alt="{e(b.alt)}">'
                           f"<figcaption>Figure {n_fig}. {e(b.caption)}</figcaption></figure>")
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
