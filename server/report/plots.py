"""The report's figures: matplotlib on the Agg canvas, one style, PNG bytes out.

Every function takes plain numbers (lists, numpy arrays, small dataclasses) and returns the PNG
file's bytes; ``server.report.build`` decides where they go (embedded as base64 in ``report.html``,
written to ``report_files/`` for ``report.md``). No pyplot: figures are built on
``matplotlib.figure.Figure`` with the Agg canvas, so nothing depends on a display, a global backend
or pyplot's figure registry, and drawing is safe in a server process.

Style: the Okabe-Ito colour-blind-safe palette, the pooled ("global") series black and thicker than
the per-site ones, comparison runs dashed, every axis labelled with its unit, skipped rounds shaded
grey and the selected round marked by a dotted line. Fonts are matplotlib's bundled DejaVu Sans, so
nothing is fetched.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PALETTE", "Series", "Panel", "curves", "confusion", "roc_points", "roc", "KMCurves", "kaplan_meier",
           "coordination"]

#: Okabe-Ito (colour-blind safe), black left out: it is the pooled series' colour.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
GLOBAL_COLOUR = "#000000"

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.4,
    "lines.markersize": 4, "legend.frameon": False, "font.family": "DejaVu Sans", "svg.fonttype": "none",
}
WIDTH_IN = 7.6  # fits an A4 page's text width at 100 %


@dataclass
class Series:
    """One line of a curve plot: ``kind`` is "global" (pooled), "site" or "comparison"."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    kind: str = "site"


@dataclass
class Panel:
    """One subplot of a curve plot."""

    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    ylim: tuple[float, float] | None = None


def _figure(rows: int = 1, cols: int = 1, height: float = 3.2, width: float = WIDTH_IN, layout: str | None = None):
    """A figure on the Agg canvas. The callers place the axes with fixed margins in inches
    (``_margins``, ``_grid_layout``): constrained layout would be exact but costs about half a
    second per figure, and the report is drawn at the end of every run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows), layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _styled(draw):
    """Run ``draw`` under the report's rc style and return its PNG bytes."""
    import matplotlib

    def wrapper(*args, **kwargs) -> bytes:
        with matplotlib.rc_context(STYLE):
            return _png(draw(*args, **kwargs))

    wrapper.__name__, wrapper.__doc__ = draw.__name__, draw.__doc__
    return wrapper


def _finite(x: Sequence[float], y: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray([np.nan if v is None else v for v in y], dtype=np.float64)
    return xa, ya


def _mark_rounds(ax, skipped: Sequence[int], missing: Sequence[int], best_round: int | None) -> None:
    for r in skipped:
        ax.axvspan(r - 0.5, r + 0.5, color="#bbbbbb", alpha=0.35, lw=0, label=None)
    for r in missing:
        ax.axvspan(r - 0.5, r + 0.5, facecolor="none", edgecolor="#D55E00", hatch="//", lw=0, alpha=0.5)
    if best_round is not None:
        ax.axvline(best_round, color="#555555", ls=":", lw=1.0)


@_styled
def curves(panels: Sequence[Panel], *, xlabel: str = "round", skipped: Sequence[int] = (),
           missing: Sequence[int] = (), best_round: int | None = None, cols: int = 2):
    """Per-round curves, one subplot per panel; legend under the figure. Grey band: skipped round;
    hatched: round not recorded; dotted line: the selected (best) round."""
    n = len(panels)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = _figure(rows, cols, height=2.6 if n > 1 else 3.0)
    colours: dict[str, str] = {}
    handles: dict[str, object] = {}
    for i, panel in enumerate(panels):
        ax = axes[i // cols][i % cols]
        for s in panel.series:
            x, y = _finite(s.x, s.y)
            if s.kind == "global":
                style = dict(color=GLOBAL_COLOUR, lw=2.2, marker="o", zorder=5)
            else:
                colour = colours.setdefault(s.label, PALETTE[len(colours) % len(PALETTE)])
                style = dict(color=colour, lw=1.2, marker=".", alpha=0.9)
                if s.kind == "comparison":
                    style.update(ls="--", marker="s", lw=1.4)
            (line,) = ax.plot(x, y, label=s.label, **style)
            handles.setdefault(s.label, line)
            if np.isfinite(y).sum() == 1:  # a lone point between gaps still shows
                ax.plot(x[np.isfinite(y)], y[np.isfinite(y)], ls="none", **{k: v for k, v in style.items()
                                                                             if k not in ("ls", "lw")})
        _mark_rounds(ax, skipped, missing, best_round)
        ax.set_title(panel.title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    ncols = min(4, max(1, len(handles)))
    _grid_layout(fig, rows, legend_rows=(len(handles) + ncols - 1) // ncols)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncols=ncols)
    return fig


def _margins(fig, *, left: float, bottom: float, right: float, top: float) -> None:
    """Fixed margins in inches for a single-axes figure (cheaper than constrained layout)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h)


def _grid_layout(fig, rows: int, legend_rows: int) -> None:
    """Fixed margins for a grid of labelled axes with a legend underneath (inches, not fractions,
    so panels keep their look whatever the figure's height)."""
    w, h = fig.get_size_inches()
    bottom, top, gap = 0.55 + 0.2 * legend_rows, 0.35, 0.8
    axes_h = max(0.5, (h - bottom - top - (rows - 1) * gap) / rows)
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.15 / w, top=1 - top / h, bottom=bottom / h,
                        hspace=gap / axes_h, wspace=0.32)


@_styled
def confusion(cm: np.ndarray, class_names: Sequence[str], title: str):
    """Confusion matrix: counts in the cells, colour = share of the true class (row-normalised)."""
    cm = np.asarray(cm, dtype=np.int64)
    C = cm.shape[0]
    fig, axes = _figure(1, 1, height=3.6 + 0.3 * C, width=4.6 + 0.4 * C)
    _margins(fig, left=1.75, bottom=1.2, right=0.3, top=0.4)
    ax = axes[0][0]
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(C):
        for j in range(C):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}" if rows[i, 0] else "0", ha="center", va="center",
                    fontsize=8, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(C), [_wrap(n, 11) for n in class_names], rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(C), [f"{_wrap(n)} (n={int(rows[i, 0])})" for i, n in enumerate(class_names)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (patients)")
    ax.grid(False)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of the true class", shrink=0.8, pad=0.03)
    return fig


def _wrap(name: str, width: int = 14) -> str:
    words, lines, cur = name.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join([*lines, cur])


def roc_points(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) of a one-vs-rest ROC from score histograms.

    ``pos``/``neg``: counts of the class's predicted probability on equal bins over [0, 1] for the
    patients of the class and for the others. Lowering the threshold bin by bin from the top gives
    one point per bin; the trapezoidal area under these points equals
    ``smm_model.metrics.federated.auc_from_histograms`` (scores sharing a bin count as ties).
    """
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    P, N = pos.sum(), neg.sum()
    tpr = np.concatenate(([0.0], np.cumsum(pos[::-1]))) / (P if P else 1.0)
    fpr = np.concatenate(([0.0], np.cumsum(neg[::-1]))) / (N if N else 1.0)
    return fpr, tpr


@_styled
def roc(hist: np.ndarray, class_names: Sequence[str], title: str):
    """One-vs-rest ROC curves per class from (C, 2, bins) histograms; AUC in the legend."""
    hist = np.asarray(hist)
    fig, axes = _figure(1, 1, height=4.2, width=6.2)
    _margins(fig, left=0.7, bottom=0.55, right=0.15, top=0.35)
    ax = axes[0][0]
    ax.plot([0, 1], [0, 1], color="#999999", ls=":", lw=1.0, label="chance (AUC 0.5)")
    for c, name in enumerate(class_names):
        pos, neg = hist[c, 0], hist[c, 1]
        if pos.sum() == 0 or neg.sum() == 0:
            ax.plot([], [], color=PALETTE[c % len(PALETTE)],
                    label=f"{name}: not drawn (no {'positives' if pos.sum() == 0 else 'negatives'})")
            continue
        fpr, tpr = roc_points(pos, neg)
        auc = float(np.trapezoid(tpr, fpr))
        ax.plot(fpr, tpr, color=PALETTE[c % len(PALETTE)], drawstyle="default",
                label=f"{name} (n={int(pos.sum())}): AUC {auc:.3f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false-positive rate (share of the other classes)")
    ax.set_ylabel("true-positive rate (share of the class)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return fig


@dataclass
class KMCurves:
    """Kaplan-Meier curves per risk group on the shared grid (``server.report.build.km_lifelines``)."""

    grid: np.ndarray  # (K,) days
    survival: np.ndarray  # (G, K) survival just after each grid time, nan where nobody is at risk
    at_risk: np.ndarray  # (G, K)
    events: np.ndarray  # (G, K)
    labels: list[str]
    chi2: float
    p: float
    df: int


@_styled
def kaplan_meier(km: KMCurves, title: str):
    """Step curves per predicted risk group, drawn until the last grid time with anyone at risk."""
    legend_rows = (len(km.labels) + 1) // 2
    fig, axes = _figure(1, 1, height=3.6 + 0.2 * legend_rows)
    _margins(fig, left=0.7, bottom=0.6 + 0.2 * legend_rows, right=0.15, top=0.55)
    ax = axes[0][0]
    grid = np.asarray(km.grid, dtype=np.float64)
    for g, label in enumerate(km.labels):
        alive = np.flatnonzero(km.at_risk[g] > 0)
        if alive.size == 0:
            ax.plot([], [], color=PALETTE[g % len(PALETTE)], label=f"{label}: no patients")
            continue
        last = alive[-1]
        x = np.concatenate(([grid[0]], grid[: last + 1], [grid[last + 1] if last + 1 < grid.size else grid[last]]))
        y = np.concatenate(([1.0], km.survival[g, : last + 1], [km.survival[g, last]]))
        ax.plot(x, y, drawstyle="steps-post", color=PALETTE[g % len(PALETTE)],
                label=f"{label} (n={int(km.at_risk[g, 0])}, events={int(km.events[g].sum())})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.set_xlabel("time (days)")
    ax.set_ylabel("survival probability (Kaplan-Meier)")
    p = "n/a" if not np.isfinite(km.p) else (f"{km.p:.3g}" if km.p >= 1e-4 else f"{km.p:.1e}")
    ax.set_title(f"{title}\nlog-rank p = {p}" + (f" (chi-square {km.chi2:.2f}, df {km.df})"
                                                  if np.isfinite(km.chi2) else ""))
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncols=2)
    return fig


@_styled
def coordination(rounds: Sequence[int], per_task: Mapping[str, Mapping[str, Sequence[float]]],
                 skipped: Sequence[int] = ()):
    """Per task: head rows whose gradient was projected in the tumour or the microenvironment half
    (stacked bars) and rows with conflicting halves (line), summed over sites, per round."""
    tasks = list(per_task)
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = _figure(rows, cols, height=2.8)
    x = np.asarray(rounds, dtype=np.float64)
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        parts = per_task[task]
        t = np.asarray(parts.get("tumour", np.zeros_like(x)), dtype=np.float64)
        m = np.asarray(parts.get("micro", np.zeros_like(x)), dtype=np.float64)
        c = np.asarray(parts.get("conflicts", np.zeros_like(x)), dtype=np.float64)
        ax.bar(x, t, width=0.7, color=PALETTE[0], label="tumour half corrected")
        ax.bar(x, m, width=0.7, bottom=t, color=PALETTE[1], label="microenvironment half corrected")
        ax.plot(x, c, color=GLOBAL_COLOUR, marker="o", lw=1.2, label="conflicting rows")
        for r in skipped:
            ax.axvspan(r - 0.5, r + 0.5, color="#bbbbbb", alpha=0.35, lw=0)
        ax.set_title(task)
        ax.set_xlabel("round")
        ax.set_ylabel("head rows per round (all sites)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for j in range(len(tasks), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    h, lab = axes[0][0].get_legend_handles_labels()
    _grid_layout(fig, rows, legend_rows=1)
    fig.legend(h, lab, loc="lower center", ncols=3)
    return fig
