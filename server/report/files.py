"""The names of the files a report writes into its output folder.

``server.report.build`` writes them, ``server.report.render_markdown`` links the figures by
``FIGURES_DIR`` and ``metrics.json`` lists them (``server.report.metrics``), so they are named once,
here, where none of those modules has to import another.
"""

from __future__ import annotations

__all__ = ["REPORT_HTML", "REPORT_MD", "METRICS_JSON", "FIGURES_DIR"]

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
METRICS_JSON = "metrics.json"
#: report.md's figures: <FIGURES_DIR>/<figure name>.png next to it (report.html embeds them).
FIGURES_DIR = "report_files"
