"""What sites and server say to each other, as plain data (no Flower types).

The Flower apps only move these objects in and out of messages; everything here is pure and
testable, and it is the one place that fixes the names of the keys.

Round trip of a federated run (architecture.md, "Federated protocol"):

1. preflight (query): server -> site: the run's config (YAML text). Site -> server: a
   ``SiteSummary``: schema and aggregate statistics only (counts, per-feature sums, a histogram of
   training survival times on the fixed ``SURVIVAL_HIST_EDGES``).
2. the server merges the summaries into ``SharedStats`` (genomic standardisation, survival bin
   edges, class weights, the Kaplan-Meier time grid) and sends them with every round.
3. train: weights + config + shared stats -> weights + scalar metrics.
4. evaluate: weights + config + shared stats + split -> ``EvalStats``: sums of per-patient
   statistics (confusion matrices, score histograms, C-index pair counts, Kaplan-Meier counts), from
   which ``smm_model.metrics.federated`` computes global metrics. No reply carries a patient identifier, a
   path or a per-patient value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import yaml

from smm_model.config import TASK_CLASSES, TASKS, ConfigError, ExperimentConfig, TrainConfig, to_dict
from smm_model.metrics.federated import (SCORE_BINS, auc_from_histograms, c_index_from_counts, logrank_from_counts,
                        metrics_from_confusion)
from smm_model.metrics.exact import MetricReport
from smm_model.contract.sites import ARCH_MODALITIES, MODALITIES, PARTIAL_STRATEGIES
from smm_model.contract.stats import GenomicsStats

__all__ = ["config_text", "selection_lower_is_better", "round_lr", "PROTOCOL_VERSION", "SURVIVAL_HIST_EDGES", "KM_GRID_STEP_DAYS", "SiteSummary", "SharedStats", "merge_patch_stats",
           "SchemaMismatch", "check_schemas", "site_modalities", "derive_shared", "EvalStats", "metrics_from_eval"]

PROTOCOL_VERSION = 2  # 2: SharedStats.class_counts, SCAFFOLD control records, local steps
#: Fixed survival-time histogram edges (days) every site uses in its preflight summary, so the
#: server can add histograms and read quantiles off the sum: 10-day bins up to 30 years.
SURVIVAL_HIST_EDGES = np.arange(0.0, 30 * 365.25 + 10.0, 10.0)
#: Spacing of the shared Kaplan-Meier time grid (days).
KM_GRID_STEP_DAYS = 30.0
#: Schema fields every site must share with the run (anything else may differ between sites).
SCHEMA_FIELDS = ("encoder", "encoder_weights", "feature_dim", "gene_set", "genes_tumour", "genes_micro",
                 "genomics_policy")
#: Schema fields a genomics-only model does not read (its sites may differ in them).
HISTOLOGY_FIELDS = ("encoder", "encoder_weights", "feature_dim")


_CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")
_SURVIVAL_METRICS = ("c_index", "logrank_chi2", "logrank_p")
_LOWER_IS_BETTER = ("loss", "survival.logrank_p")


def config_text(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML: what sites receive and what a run's ``config.yaml`` holds."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def selection_terms(cfg: ExperimentConfig) -> list[str]:
    """The metrics ``federation.selection_metric`` names (one, or several joined by ``+``),
    validated against the enabled tasks."""
    name = cfg.federation.selection_metric
    if name == "loss":
        return ["loss"]
    field_ = "federation.selection_metric"
    terms = name.split("+")
    for term in terms:
        task, _, metric = term.partition(".")
        if task not in TASKS or task not in cfg.model.tasks:
            raise ConfigError(f"{field_}: {term!r} names task {task!r}, but the run's tasks are "
                              f"{list(cfg.model.tasks)}")
        allowed = _SURVIVAL_METRICS if task == "survival" else _CLASSIFICATION_METRICS
        if metric not in allowed:
            raise ConfigError(f"{field_}: unknown metric {metric!r} for {task}; expected one of {list(allowed)}")
        if len(terms) > 1 and term in _LOWER_IS_BETTER:
            raise ConfigError(f"{field_}: a mean of metrics takes higher-is-better ones only; {term!r} is not")
    if len(set(terms)) != len(terms):
        raise ConfigError(f"{field_}: {name!r} lists a metric twice")
    return terms


def selection_lower_is_better(cfg: ExperimentConfig) -> bool:
    """Validate ``federation.selection_metric`` against the enabled tasks; True for loss-like ones."""
    terms = selection_terms(cfg)
    return len(terms) == 1 and terms[0] in _LOWER_IS_BETTER


def selection_value(values: Mapping[str, float], cfg: ExperimentConfig) -> float | None:
    """The selection metric of one evaluation (``values``: ``<task>.<metric>`` -> value): the named
    metric, or the mean of the named ones; None when any of them is missing or not finite (that
    round cannot be compared)."""
    out = []
    for term in selection_terms(cfg):
        v = values.get(term)
        if v is None or not math.isfinite(float(v)):
            return None
        out.append(float(v))
    return float(np.mean(out))


def evaluation_round(server_round: int, rounds: int, every: int) -> bool:
    """Whether round ``server_round`` of ``rounds`` is validated (``federation.eval_every``): every
    ``every``-th round and always the last, so the final model can be selected. Fewer evaluations
    cost fewer message phases; selection then chooses among the evaluated rounds."""
    return server_round == rounds or server_round % every == 0


def round_lr(train: TrainConfig, rounds: int, server_round: int) -> float:
    """The learning rate of round ``server_round`` (1-based): cosine from ``train.lr`` to
    ``train.min_lr`` over the rounds, held for the round's local epochs (federated and centralized
    runs share it, so they compare)."""
    e = server_round - 1
    return float(train.lr - (train.lr - train.min_lr) * (1 - math.cos(math.pi * e / rounds)) / 2)


class SchemaMismatch(ValueError):
    """A site's data does not match the run (encoder, feature width, gene set, ...)."""


@dataclass
class SiteSummary:
    """A site's preflight answer: schema and aggregate numbers, nothing per patient.

    ``splits``: {split: {"patients", "diagnosis": [counts], "grade": [counts], "survival_labelled",
    "events"}}; ``genomics``: GenomicsStats.to_dict() of the training split; ``survival_hist``:
    counts of training event times and of all training times on SURVIVAL_HIST_EDGES.
    ``patches``: {"n", "sum", "sum_sq"} per feature dimension over every training patch (histology
    runs with ``data.patch_norm: standardize``), for the shared patch standardisation.
    ``label``: the name the site chose to appear under in reports (deployment: node_config
    ``site-name``; simulation: the site folder's name), or None. ``data_digest``: sha256 over the
    site's tables and feature manifest, so a report can tell which data a run saw without seeing
    it. ``synthetic``: the site folder was written by ``smm synth``.
    """

    schema: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    genomics: dict[str, Any] | None
    survival_hist_events: list[int]
    survival_hist_all: list[int]
    excluded: dict[str, int] = field(default_factory=dict)
    patches: dict[str, Any] | None = None
    label: str | None = None
    data_digest: str | None = None
    synthetic: bool = False
    disclosure: dict[str, Any] = field(default_factory=dict)  # {"min_cell": k, "coarsened": [what, ...]}
    version: int = PROTOCOL_VERSION

    def info(self) -> dict[str, Any]:
        """What a run folder records about the site: counts, provenance, schema (no statistics)."""
        return {"label": self.label, "splits": self.splits, "excluded": self.excluded,
                "data_digest": self.data_digest, "synthetic": bool(self.synthetic),
                "encoder": self.schema.get("encoder"), "weights": self.schema.get("encoder_weights"),
                "feature_dim": self.schema.get("feature_dim"), "gene_set": self.schema.get("gene_set"),
                "disclosure": self.disclosure}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SiteSummary":
        d = json.loads(text)
        if d.get("version") != PROTOCOL_VERSION:
            raise ValueError(f"site summary protocol version {d.get('version')}, expected {PROTOCOL_VERSION}")
        return cls(**d)


def site_modalities(s: SiteSummary) -> tuple[str, ...]:
    """The modalities a site's summary declares (schema ``modalities``; absent: all of them)."""
    raw = s.schema.get("modalities")
    return MODALITIES if raw is None else tuple(raw) if isinstance(raw, list) else ()


def _modality_problems(site: str, s: SiteSummary, cfg: ExperimentConfig) -> list[str]:
    """Why a site's modalities keep it out of this run: unknown ones, none the model reads, or a
    partial site (it trains only part of the model) in a run whose aggregation or privacy cannot
    average each weight over the sites that trained it."""
    have = site_modalities(s)
    if not have or not set(have) <= set(MODALITIES):
        return [f"site {site}: modalities is {s.schema.get('modalities')!r}, expected a non-empty list from "
                f"{list(MODALITIES)}"]
    reads = ARCH_MODALITIES[cfg.model.arch]
    if not set(have) & set(reads):
        return [f"site {site}: holds {' and '.join(have)} only, but model.arch {cfg.model.arch!r} reads "
                f"{' and '.join(reads)}"]
    if set(reads) <= set(have):
        return []
    what = f"site {site}: holds {' and '.join(have)} only, so it trains part of the {cfg.model.arch} model"
    fed, pc = cfg.federation, cfg.privacy
    if fed.strategy not in PARTIAL_STRATEGIES:
        return [f"{what}, and federation.strategy {fed.strategy!r} cannot average each weight over the sites that "
                f"trained it; use one of {list(PARTIAL_STRATEGIES)}"]
    if pc.central_dp:
        return [f"{what}, and privacy.central_dp clips and noises whole updates of every site; it is not "
                "supported with sites that train part of the model"]
    return []


def check_schemas(summaries: Mapping[str, SiteSummary], cfg: ExperimentConfig) -> None:
    """Refuse sites whose schema differs from the run's or from the others', naming site and field,
    and sites whose genomic features measure a label fact (``smm_model.contract.label_facts``) unless the
    run sets ``data.allow_label_features``."""
    from smm_model.contract.label_facts import OPT_IN_HINT, describe_hits, label_feature_hits

    m = cfg.model
    expected = {"genes_tumour": m.genes_tumour, "genes_micro": m.genes_micro,
                "genomics_policy": cfg.data.genomics_policy}
    problems = []
    for site, s in summaries.items():
        want_here = dict(expected)
        if m.arch != "snn" and "histology" in site_modalities(s):
            want_here["feature_dim"] = m.feature_dim
        for key, want in want_here.items():
            got = s.schema.get(key)
            if got != want:
                problems.append(f"site {site}: {key} is {got!r}, the run expects {want!r}")
        problems.extend(_modality_problems(site, s, cfg))
    first = next(iter(summaries.items()), None)
    if first is not None:
        ref_site, ref = first
        for site, s in summaries.items():
            # histology fields compare only between sites that both hold slides
            no_slides = m.arch == "snn" or "histology" not in site_modalities(s) or \
                "histology" not in site_modalities(ref)
            for key in SCHEMA_FIELDS:
                if key in expected or key == "feature_dim" and m.arch != "snn" or \
                        (key in HISTOLOGY_FIELDS and no_slides):
                    continue
                if s.schema.get(key) != ref.schema.get(key):
                    problems.append(f"site {site}: {key} is {s.schema.get(key)!r}, site {ref_site} has "
                                    f"{ref.schema.get(key)!r}")
    if not cfg.data.allow_label_features:
        # An input that measures a fact the label rules read (IDH1_mut, CDKN2A_cnv...) lets the
        # model read its labels off its input. `smm site check` refuses it too; this catches a site
        # that joined without running it (smm_model.contract.label_facts holds the rule for both).
        for site, s in summaries.items():
            hits = label_feature_hits((s.genomics or {}).get("features") or [])
            if hits:
                problems.append(f"site {site}: genomic feature(s) {describe_hits(hits)} measure a fact the label "
                                f"rules read, so the model could read its labels off its input; {OPT_IN_HINT}")
    if problems:
        raise SchemaMismatch("; ".join(problems))


def _quantile_edges(hist: np.ndarray, edges: np.ndarray, n_bins: int) -> list[float]:
    """Inner quantile edges (n_bins - 1) of a histogram, interpolating linearly within bins."""
    total = hist.sum()
    if total == 0:
        return []
    cdf = np.concatenate(([0.0], np.cumsum(hist) / total))  # at each edge
    qs = np.linspace(0, 1, n_bins + 1)[1:-1]
    return [float(np.interp(q, cdf, edges)) for q in qs]


@dataclass
class SharedStats:
    """What the server derives from all sites' summaries and sends with every round."""

    genomics_features: list[str]
    genomics_mean: list[float]
    genomics_std: list[float]
    survival_bin_edges: list[float]
    class_weights: dict[str, list[float]]
    km_grid: list[float]
    n_sites: int
    patch_mean: list[float] | None = None  # shared patch standardisation (None: raw features)
    patch_std: list[float] | None = None
    # Pooled training class counts per classification task: the reference prior of the sites'
    # logit adjustment, sent only when train.logit_adjustment is on (the class weights already give
    # their ratios; the counts add the federation's size per class).
    class_counts: dict[str, list[float]] | None = None
    version: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SharedStats":
        d = json.loads(text)
        if d.get("version") != PROTOCOL_VERSION:
            raise ValueError(f"shared stats protocol version {d.get('version')}, expected {PROTOCOL_VERSION}")
        return cls(**d)

    def genomics_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.genomics_mean), np.asarray(self.genomics_std)

    def patch_norm(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean (D,), std (D,)) float32 of the shared patch standardisation, or None."""
        if self.patch_mean is None or self.patch_std is None:
            return None
        mean = np.asarray(self.patch_mean, dtype=np.float32)
        std = np.asarray(self.patch_std, dtype=np.float32)
        if mean.ndim != 1 or mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all()
                                                             and (std > 0).all()):
            raise ValueError("shared patch statistics: mean and std must be finite vectors of one length, std > 0")
        return mean, std


#: Floor of the shared patch standard deviation, relative to the median dimension's, so that a
#: dimension that is (almost) constant at every site is centred but not blown up.
PATCH_STD_FLOOR = 1e-3


def merge_patch_stats(parts: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Pooled per-dimension mean and standard deviation from the sites' {"n", "sum", "sum_sq"}.

    Sums are float64 over at most a few million patches per site; the variance uses the pooled
    sums (E[x^2] - E[x]^2, clipped at 0), whose cancellation error is far below the floor for
    encoder features (|mean| / std of order 1-10).
    """
    n = sum(int(p["n"]) for p in parts)
    if n < 2:
        raise ValueError("derive_shared: fewer than 2 training patches over all sites for the patch statistics")
    dims = {len(p["sum"]) for p in parts} | {len(p["sum_sq"]) for p in parts}
    if len(dims) != 1:
        raise ValueError(f"derive_shared: sites' patch statistics differ in length {sorted(dims)}")
    s = np.sum([np.asarray(p["sum"], dtype=np.float64) for p in parts], axis=0)
    sq = np.sum([np.asarray(p["sum_sq"], dtype=np.float64) for p in parts], axis=0)
    mean = s / n
    var = np.maximum(sq / n - mean ** 2, 0.0) * n / (n - 1)
    std = np.sqrt(var)
    floor = PATCH_STD_FLOOR * max(float(np.median(std)), 1e-12)
    return mean.tolist(), np.maximum(std, floor).tolist()


def released_class_counts(split: Mapping[str, Any], task: str) -> np.ndarray:
    """A split's class counts as the server can know them after disclosure control.

    A site suppresses small class counts (``client.local.release``) and names them in
    ``<task>_hidden`` (indices into [*classes, unknown]); their sum is the split's patients minus
    the released cells, at least k. Each hidden cell is estimated as an equal share of that sum, so a
    class that is present but rare at every site keeps a positive count (and a class weight),
    rather than reading as absent."""
    counts = np.asarray(split[task], dtype=float)
    hidden = list(split.get(f"{task}_hidden") or [])
    if hidden:
        released = counts.sum() + float(split.get(f"{task}_unknown", 0))
        share = max(float(split["patients"]) - released, 0.0) / len(hidden)
        counts = counts.copy()
        for i in hidden:
            if i < counts.size:
                counts[i] = share
    return counts


def derive_shared(summaries: Sequence[SiteSummary], cfg: ExperimentConfig) -> SharedStats:
    """Shared preprocessing from the sites' training-split aggregates (never from patient rows).

    Genomic standardisation: merged GenomicsStats. Survival bin edges: quantiles of the pooled
    histogram of training event times (as the reference's quartiles, fitted on training data only).
    Class weights: largest class count / class count over the pooled training split (the
    reference's weighting), 0 for a class no site has. Kaplan-Meier grid: KM_GRID_STEP_DAYS steps up
    to the largest training time. Patch standardisation (histology models with ``data.patch_norm:
    standardize``): pooled per-dimension mean and std of every site's training patches.
    """
    if not summaries:
        raise ValueError("derive_shared: no site summary")
    # A fixed order (not the order replies arrived in, nor node ids, which change between runs), so
    # the floating-point sums, and with them a resumed run's statistics, are reproducible.
    summaries = sorted(summaries, key=lambda s: s.to_json())
    gstats = [GenomicsStats.from_dict(s.genomics) for s in summaries if s.genomics]
    if not gstats:
        raise ValueError("derive_shared: no site has training patients with genomics")
    merged = GenomicsStats.merge(*gstats)
    ev = np.sum([np.asarray(s.survival_hist_events) for s in summaries], axis=0)
    allh = np.sum([np.asarray(s.survival_hist_all) for s in summaries], axis=0)
    n_bins = cfg.model.survival_bins
    edges = _quantile_edges(ev, SURVIVAL_HIST_EDGES, n_bins) or _quantile_edges(allh, SURVIVAL_HIST_EDGES, n_bins)
    if "survival" in cfg.model.tasks and len(edges) != n_bins - 1:
        raise ValueError("derive_shared: no site has survival times in its training split")
    weights, class_counts = {}, {}
    for task, n in TASK_CLASSES.items():
        counts = np.sum([released_class_counts(s.splits["train"], task) for s in summaries], axis=0)
        weights[task] = [float(counts.max() / c) if c > 0 else 0.0 for c in counts] if counts.max() > 0 else [1.0] * n
        class_counts[task] = [float(c) for c in counts]
    nz = np.flatnonzero(allh)
    t_max = float(SURVIVAL_HIST_EDGES[nz[-1] + 1]) if nz.size else KM_GRID_STEP_DAYS
    km_grid = np.arange(0.0, t_max + KM_GRID_STEP_DAYS, KM_GRID_STEP_DAYS).tolist()
    patch_mean = patch_std = None
    if cfg.model.arch != "snn" and cfg.data.patch_norm == "standardize":
        parts = [s.patches for s in summaries if s.patches and int(s.patches.get("n", 0)) > 0]
        if not parts:
            raise ValueError("derive_shared: data.patch_norm is 'standardize' but no site sent patch statistics")
        patch_mean, patch_std = merge_patch_stats(parts)
    return SharedStats(list(merged.features), merged.mean().tolist(), merged.std().tolist(), edges, weights,
                       km_grid, n_sites=len(summaries), patch_mean=patch_mean, patch_std=patch_std,
                       class_counts=class_counts if cfg.train.logit_adjustment > 0 else None)


@dataclass
class EvalStats:
    """Additive evaluation statistics of one site (or the sum of several).

    ``n``: patients evaluated; ``loss_sum``: summed per-patient loss (loss = loss_sum / n);
    ``confusion``/``histograms``: per classification task, flattened (C*C) and (C*2*SCORE_BINS);
    ``cindex``: [concordant, discordant, tied, comparable]; ``km``: flattened (G*2*K) counts of
    events and numbers at risk per predicted risk group on SharedStats.km_grid.
    ``suppressed`` is True when the site had fewer patients than the minimum and sent no numbers.
    Disclosure control (``client.local.release``): ``hidden`` names, per task, the confusion cells
    (flat indices) suppressed to 0; ``withheld`` the statistics not sent (``<task>-hist``,
    ``<task>-hist-class-<c>``, ``survival-km``) or sent coarsened (``<task>-hist-coarsened``);
    ``min_cell`` the threshold k applied (0: not recorded).
    ``site_values``: metrics a site computed on its own full-resolution statistics and sent because
    the pooled ones may not be computable from its coarsened counts (today ``<task>.auc``), as
    ``[sum of n x value, sum of n, sites]`` so that they add; a site's value is weighted by its
    evaluated patients ``n`` (already sent), never by a per-task count that would tell how many of
    its patients are unlabelled.
    """

    n: int
    loss_sum: float = 0.0
    confusion: dict[str, list[int]] = field(default_factory=dict)
    histograms: dict[str, list[int]] = field(default_factory=dict)
    cindex: list[int] | None = None
    km: list[int] | None = None
    km_groups: int = 0
    suppressed: bool = False
    hidden: dict[str, list[int]] = field(default_factory=dict)
    withheld: list[str] = field(default_factory=list)
    min_cell: int = 0
    site_values: dict[str, list[float]] = field(default_factory=dict)

    def to_record(self) -> dict[str, int | float | list[int] | list[float]]:
        """Flat mapping of scalars and lists (what a Flower MetricRecord holds)."""
        rec: dict[str, Any] = {"num-examples": int(self.n), "loss-sum": float(self.loss_sum),
                               "suppressed": int(self.suppressed), "km-groups": int(self.km_groups)}
        for t, v in self.confusion.items():
            rec[f"{t}-confusion"] = [int(x) for x in v]
        for t, v in self.histograms.items():
            rec[f"{t}-hist"] = [int(x) for x in v]
        if self.cindex is not None:
            rec["survival-cindex"] = [int(x) for x in self.cindex]
        if self.km is not None:
            rec["survival-km"] = [int(x) for x in self.km]
        if self.min_cell:
            rec["min-cell"] = int(self.min_cell)
        for t, v in self.hidden.items():
            rec[f"{t}-confusion-hidden"] = [int(x) for x in v]
        for name in self.withheld:
            rec[f"withheld-{name}"] = 1
        for name, (wsum, weight, _sites) in self.site_values.items():
            task, metric = name.split(".")
            rec[f"{task}-site-{metric}"] = float(wsum / weight)
        return rec

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "EvalStats":
        conf = {k[: -len("-confusion")]: list(v) for k, v in rec.items() if k.endswith("-confusion")}
        hidden = {k[: -len("-confusion-hidden")]: [int(x) for x in v] for k, v in rec.items()
                  if k.endswith("-confusion-hidden")}
        withheld = sorted(k[len("withheld-"):] for k in rec if k.startswith("withheld-"))
        n = int(rec["num-examples"])
        site_values = {".".join(k.partition("-site-")[::2]): [n * float(v), float(n), 1.0]
                       for k, v in rec.items() if "-site-" in k and n > 0}
        hist = {k[: -len("-hist")]: list(v) for k, v in rec.items()
                if k.endswith("-hist") and not k.startswith("withheld-")}
        return cls(n=int(rec["num-examples"]), loss_sum=float(rec.get("loss-sum", 0.0)), confusion=conf,
                   histograms=hist, cindex=list(rec["survival-cindex"]) if "survival-cindex" in rec else None,
                   km=list(rec["survival-km"]) if "survival-km" in rec else None,
                   km_groups=int(rec.get("km-groups", 0)), suppressed=bool(rec.get("suppressed", 0)),
                   hidden=hidden, withheld=withheld, min_cell=int(rec.get("min-cell", 0)), site_values=site_values)

    @classmethod
    def merge(cls, stats: Sequence["EvalStats"]) -> "EvalStats":
        """Sum of the sites' statistics (suppressed sites contribute nothing)."""
        used = [s for s in stats if not s.suppressed]
        out = cls(n=sum(s.n for s in used), loss_sum=sum(s.loss_sum for s in used))
        for s in used:
            for attr in ("confusion", "histograms"):
                acc = getattr(out, attr)
                for t, v in getattr(s, attr).items():
                    acc[t] = (np.asarray(acc[t]) + np.asarray(v)).tolist() if t in acc else list(v)
            if s.cindex is not None:
                out.cindex = (np.asarray(out.cindex) + s.cindex).tolist() if out.cindex is not None else list(s.cindex)
            if s.km is not None:
                out.km = (np.asarray(out.km) + s.km).tolist() if out.km is not None else list(s.km)
                out.km_groups = s.km_groups
            for name, part in s.site_values.items():
                acc = out.site_values.setdefault(name, [0.0, 0.0, 0.0])
                out.site_values[name] = [a + b for a, b in zip(acc, part)]
        out.withheld = sorted({w for s in used for w in s.withheld})
        out.min_cell = max((s.min_cell for s in used), default=0)
        # Which confusion cells any site suppressed: the summed matrix is then incomplete.
        out.hidden = {t: sorted({i for s in used for i in s.hidden.get(t, [])})
                      for t in sorted({t for s in used for t in s.hidden if s.hidden[t]})}
        return out


def metrics_from_eval(stats: EvalStats, n_classes: Mapping[str, int]) -> MetricReport:
    """Global metrics from (summed) evaluation statistics: ``<task>.<metric>`` names, plus ``loss``
    and, for survival, ``survival.c_index`` (within-site pairs) and ``survival.logrank_p``."""
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    if stats.suppressed or stats.n == 0:
        return MetricReport({"loss": float("nan")}, {"loss": "suppressed or no patients"})
    values["loss"] = stats.loss_sum / stats.n
    for task, flat in stats.confusion.items():
        C = n_classes[task]
        rep = metrics_from_confusion(np.asarray(flat).reshape(C, C))
        values.update({f"{task}.{k}": v for k, v in rep.values.items()})
        reasons.update({f"{task}.{k}": v for k, v in rep.reasons.items()})
        if stats.hidden.get(task):
            # Suppressed cells are sent as 0: what is left is mostly the large (diagonal) cells, so
            # accuracy and F1 computed from it would be biased upwards (measured: 100 % where the
            # complete matrix gives 88 %). Not computable from what was sent, and said so.
            for k in rep.values:
                values[f"{task}.{k}"] = float("nan")
                reasons[f"{task}.{k}"] = (f"{len(stats.hidden[task])} confusion cell(s) suppressed by disclosure "
                                          f"control (k = {stats.min_cell}); not computable from what the sites sent")
        if task in stats.histograms:
            auc = auc_from_histograms(np.asarray(stats.histograms[task]).reshape(C, 2, SCORE_BINS))
            values[f"{task}.auc"] = auc.values["auc"]
            if "auc" in auc.reasons:
                reasons[f"{task}.auc"] = auc.reasons["auc"]
        coarse = [w for w in stats.withheld if w.startswith(f"{task}-hist")]
        if coarse and f"{task}.auc" in values:
            # Merged bins tie most pairs (each counts half) and a withheld class leaves its site's
            # patients out: measured 56 % where the full histograms give 96 %. Not reported as an AUC.
            values[f"{task}.auc"] = float("nan")
            reasons[f"{task}.auc"] = (f"score histograms coarsened or withheld by disclosure control (k = "
                                      f"{stats.min_cell}): {', '.join(coarse)}; not computable at full resolution")
        site = stats.site_values.get(f"{task}.auc")
        if site and site[1] > 0 and not math.isfinite(values.get(f"{task}.auc", float("nan"))):
            # Not the pooled AUC (no pairs across sites; each site's AUC over its classes with at
            # least k positives and k negatives), but each site's exact one, and labelled as such.
            why = reasons.get(f"{task}.auc", "no pooled score histograms")
            values[f"{task}.auc"] = site[0] / site[1]
            reasons[f"{task}.auc"] = (f"patient-weighted mean of {int(site[2])} site(s)' own AUCs ({int(site[1])} of "
                                      f"{stats.n} patients), not the pooled AUC, which is n/a: {why}")
    if stats.cindex is not None:
        c, why = c_index_from_counts(stats.cindex)
        values["survival.c_index"] = c
        if why:
            reasons["survival.c_index"] = why
    if stats.km is not None and stats.km_groups > 0:
        km = np.asarray(stats.km).reshape(stats.km_groups, 2, -1)
        chi2, p, _df = logrank_from_counts(km)
        values["survival.logrank_chi2"], values["survival.logrank_p"] = chi2, p
    return MetricReport(values, reasons)
