"""``smm report``: the evaluation report coordinators read (HTML, Markdown, metrics.json) and its figures."""
