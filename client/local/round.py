"""What a site does in a federated round, as plain functions (no Flower types).

``client/app.py`` is a thin Flower adapter over these four functions; everything here can be tested
by calling it directly on a site folder:

* ``resolve_site_dir``: which site folder this node serves (deployment: ``--node-config
  'site-dir="..."'``; simulation: Flower's ``partition-id`` indexes the config's site list);
* ``preflight_summary``: schema and aggregate statistics of the site (``SiteSummary``), from which the
  server derives the shared preprocessing;
* ``train_round``: load the global weights, train locally with the SHARED genomic standardisation,
  survival bin edges and class weights, return the new weights and scalar metrics;
* ``evaluate_round``: additive evaluation statistics (``EvalStats``) of one split, or a suppressed
  reply for a site below ``federation.min_site_patients``.

Why the errors look the way they do: Flower sends the text of any exception raised in a ClientApp
handler back to the server (``"<class 'X'>:<'message'>"``), and our readers' messages name files
and patients (that is what a site operator needs). So every failure here is re-raised as a
``SiteError`` whose text is only a stage code and the original exception's class name, e.g.
``"E_DATA: SiteDataError"``; the original exception stays attached as ``__cause__`` so the site can
log it in full, locally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from client.site.collate import collate_patients
from client.site.dataset import SiteData, SiteDataset, find_genomics_file
from client.site.folder import Manifest, SiteLayout
from smm_model.contract.atomic import sha256_file
from client.site.labels import SPLITS
from client.local.train import (autocast_dtype, forward, load_optimizer_state, make_optimizer,
                                optimizer_state_arrays, resolve_device, step_batches, train_epochs)
from smm_model.config import TASK_CLASSES, ConfigError, ExperimentConfig
from smm_model.metrics.federated import c_index_counts, confusion_counts, km_counts, score_histograms
from smm_model.objectives.losses import logit_adjustment_offsets, nll_survival_loss, weighted_cross_entropy
from smm_model.metrics.exact import risk_from_hazard_logits
from smm_model.nn.model import build_model, trained_parameters
from smm_model.contract import wire
from smm_model.contract.sites import simulation_site_dirs
from client.local.release import check_training_size, release_eval, release_summary
from smm_model.contract.disclosure import SITE_FLOOR_KEY, DisclosurePolicy
from smm_model.contract.protocol import SURVIVAL_HIST_EDGES, EvalStats, SharedStats, SiteSummary

__all__ = ["SiteError", "ERROR_CODES", "SITE_DIR_KEY", "stage", "resolve_site_dir", "site_label", "SITE_NAME_KEY", "load_site", "split_dataset",
           "data_digest", "preflight_summary", "train_round", "evaluate_round", "evaluate_dataset", "risk_groups", "SharedGenomicsStats", "site_policy",
           "ledger_file", "LEDGER_KEY", "check_privacy_plan", "site_modalities", "trained_tensors"]

log = logging.getLogger(__name__)

#: Stage codes a site error carries (the only detail that leaves the site besides the class name).
ERROR_CODES = {
    "E_CONFIG": "the run's configuration or this node's node_config cannot be used",
    "E_PROTOCOL": "a message lacks a field or holds an unreadable value",
    "E_DATA": "the site folder cannot be read or validated",
    "E_SCHEMA": "the shared statistics do not fit this site's data (gene set, feature order)",
    "E_MODEL": "the global weights do not fit the configured model",
    "E_TRAIN": "local training failed",
    "E_EVAL": "local evaluation failed",
    "E_TOO_FEW_PATIENTS": "the split has fewer patients than the minimum cell count (privacy.min_cell / min-cell)",
    "E_DISCLOSURE": "disclosure control could not be applied to an outgoing statistic",
    "E_PRIVACY_LEDGER": "the site's privacy ledger cannot be read or written",
    "E_PRIVACY_BUDGET": "this round would take the site past its privacy budget (privacy.dp_epsilon_budget)",
    "E_INTERNAL": "an unexpected failure in the site's federated code",
}
#: The only keys a node_config may use to name its site folder (deployment).
SITE_DIR_KEY = "site-dir"
#: The optional node_config key of the site's display name in reports (deployment).
SITE_NAME_KEY = "site-name"


class SiteError(RuntimeError):
    """A site-side failure whose text is safe to send to the server: ``"<code>: <ExceptionClass>"``.

    It never holds a path, a patient id or a value; the full original exception is its
    ``__cause__`` (for the site's own log only).
    """

    def __init__(self, code: str, cause_type: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown site error code {code!r}")
        self.code = code
        self.cause_type = cause_type
        super().__init__(f"{code}: {cause_type}")


@contextmanager
def stage(code: str) -> Iterator[None]:
    """Re-raise any exception of the block as a sanitized ``SiteError(code, class name)``, chained to
    the original (a ``SiteError`` from an inner stage passes through unchanged)."""
    try:
        yield
    except SiteError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure must leave the site sanitized
        raise SiteError(code, type(e).__name__) from e


# --------------------------------------------------------------------------------------------- #
# which site folder
# --------------------------------------------------------------------------------------------- #
def resolve_site_dir(node_config: Mapping[str, Any], cfg: ExperimentConfig) -> Path:
    """The site folder this node serves.

    Deployment: ``node_config["site-dir"]`` (a SuperNode started with ``--node-config
    'site-dir="/data/site"'``). Simulation: Flower only injects ``partition-id`` and
    ``num-partitions``; the partition indexes ``smm_model.contract.sites.simulation_site_dirs``. A simulation started with
    another number of nodes than there are sites is refused (it would silently skip or repeat
    sites).
    """
    if SITE_DIR_KEY in node_config:
        value = node_config[SITE_DIR_KEY]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"node_config[{SITE_DIR_KEY!r}]: expected a folder path (a non-empty string)")
        return Path(value).expanduser()
    if "partition-id" not in node_config:
        raise ConfigError(f"node_config has neither {SITE_DIR_KEY!r} (deployment: start the SuperNode with "
                          f"--node-config '{SITE_DIR_KEY}=\"/path/to/site\"') nor 'partition-id' (simulation)")
    dirs = simulation_site_dirs(cfg.data)
    pid = int(node_config["partition-id"])
    n = int(node_config.get("num-partitions", len(dirs)))
    if n != len(dirs):
        raise ConfigError(f"the simulation has {n} nodes but the config lists {len(dirs)} site folders; "
                          "set num-supernodes to the number of sites")
    if not 0 <= pid < len(dirs):
        raise ConfigError(f"partition-id {pid} is outside the {len(dirs)} site folders")
    return dirs[pid]


def site_label(node_config: Mapping[str, Any], site_dir: Path) -> str | None:
    """The name this site appears under in the server's reports.

    Deployment: only what the site chose (``--node-config 'site-dir="..." site-name="hospital-a"'``);
    without it, None, since the folder's name is part of a local path and stays at the site.
    Simulation: the site folder's name (the coordinator listed the folders, nothing leaves a site).
    """
    if SITE_NAME_KEY in node_config:
        value = node_config[SITE_NAME_KEY]
        if not isinstance(value, str) or not value.strip() or len(value) > 64:
            raise ConfigError(f"node_config[{SITE_NAME_KEY!r}]: expected a short name (1-64 characters)")
        return value.strip()
    if SITE_DIR_KEY in node_config:
        return None
    return Path(site_dir).name


# --------------------------------------------------------------------------------------------- #
# site data
# --------------------------------------------------------------------------------------------- #
def site_modalities(site_dir: Path | str) -> tuple[str, ...]:
    """The modalities the site declares it holds (its manifest; ``client.site.folder``)."""
    return Manifest.load(SiteLayout(Path(site_dir)).manifest).modalities


def trained_tensors(cfg: ExperimentConfig, modalities: Sequence[str]) -> list[str] | None:
    """The weight names this site trains, or None when it trains all of them (a site holding every
    modality the model reads). A site-level fact, from the architecture and the site's declared
    modalities only (``smm_model.nn.model.trained_parameters``), never from its patients: what it
    tells the server is that the site lacks a modality, which the preflight schema already says.
    Raises ValueError when the site cannot train the architecture (``snn`` without genomics,
    ``abmil`` without slides)."""
    model = build_model(cfg.model)
    names = trained_parameters(model, tuple(modalities))
    return None if names == list(model.state_dict()) else names


def load_site(site_dir: Path | str, cfg: ExperimentConfig, *, check_feature_dim: bool = True) -> SiteData:
    """Load and validate the site folder for this run's model.

    Genomics-only models (``snn``) and sites without slides open no feature file.
    ``check_feature_dim`` refuses features of another width at load (training/evaluation); the
    preflight leaves it off so that the site's real width reaches the server, whose schema check
    then names the site and the field.
    """
    histology = cfg.model.arch != "snn"
    return SiteData.load(site_dir, cfg.data, require_features=histology,
                         feature_dim=cfg.model.feature_dim if histology and check_feature_dim else None)


class SharedGenomicsStats:
    """The server's shared standardisation in the shape ``GenomicsData.encode`` reads (``features``,
    ``mean()``, ``std()``).

    Why not a ``GenomicsStats``: the server sends means and standard deviations, not counts and
    sums, and rebuilding sums from them (sum_sq = n (std^2 + mean^2)) loses precision for features
    whose mean dwarfs their spread.
    """

    def __init__(self, shared: SharedStats) -> None:
        self.features = tuple(shared.genomics_features)
        self._mean = np.asarray(shared.genomics_mean, dtype=np.float64)
        self._std = np.asarray(shared.genomics_std, dtype=np.float64)
        F = len(self.features)
        if self._mean.shape != (F,) or self._std.shape != (F,):
            raise ValueError(f"shared genomics statistics: {F} features but mean {self._mean.shape} and std "
                             f"{self._std.shape}")
        if not (np.isfinite(self._mean).all() and np.isfinite(self._std).all() and (self._std > 0).all()):
            raise ValueError("shared genomics statistics: means must be finite and stds finite and positive")

    def mean(self) -> np.ndarray:
        return self._mean

    def std(self) -> np.ndarray:
        return self._std


def _shared_inputs(site: SiteData, cfg: ExperimentConfig, shared: SharedStats
                   ) -> tuple[SharedGenomicsStats, np.ndarray]:
    """Shared genomic stats and survival bin edges, checked against this site (E_SCHEMA)."""
    with stage("E_SCHEMA"):
        stats = SharedGenomicsStats(shared)
        if stats.features != tuple(site.geneset.features):
            raise ValueError(f"the shared statistics describe {len(stats.features)} genomic features, the site's "
                             f"gene set has {len(site.geneset.features)} (or another order)")
        edges = np.asarray(shared.survival_bin_edges, dtype=np.float64)
        n_bins = cfg.model.survival_bins
        if "survival" in cfg.model.tasks and edges.shape != (n_bins - 1,):
            raise ValueError(f"{len(edges)} shared survival bin edges for {n_bins} bins")
        if edges.size == 0:
            edges = np.zeros(n_bins - 1)
        if not (np.isfinite(edges).all() and np.all(np.diff(edges) >= 0)):
            raise ValueError("shared survival bin edges must be finite and non-decreasing")
    return stats, edges


def split_dataset(site: SiteData, cfg: ExperimentConfig, shared: SharedStats, split: str) -> SiteDataset:
    """One split of a site as the model reads it, with the federation's shared preprocessing
    (genomics standardisation, survival bin edges, patch normalisation): what training, evaluation
    and the local benchmarks all read."""
    stats, edges = _shared_inputs(site, cfg, shared)
    with stage("E_DATA"):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {SPLITS}")
        grid = cfg.model.grid_size if cfg.model.layout == "spatial" else None
        # ``stats`` is duck-typed: SiteDataset only calls features/mean()/std() (SharedGenomicsStats).
        norm = shared.patch_norm() if cfg.model.arch != "snn" else None
        if norm is not None and norm[0].shape != (cfg.model.feature_dim,):
            raise ValueError(f"shared patch statistics have {norm[0].shape[0]} dimensions, model.feature_dim is "
                             f"{cfg.model.feature_dim}")
        return site.dataset(split, stats=stats, bin_edges=edges,  # type: ignore[arg-type]
                            n_bins=cfg.model.survival_bins, grid_size=grid, patch_norm=norm,
                            placeholder_dim=cfg.model.feature_dim)


def _model(cfg: ExperimentConfig, state_dict: Mapping[str, Tensor], device: torch.device) -> nn.Module:
    """The configured model with the global weights (strict: every key and shape must match)."""
    with stage("E_MODEL"):
        model = build_model(cfg.model)
        model.load_state_dict(dict(state_dict), strict=True)
        return model.to(device)


# --------------------------------------------------------------------------------------------- #
# preflight
# --------------------------------------------------------------------------------------------- #
#: Per-split keys of the preflight summary (aggregate counts only).
SPLIT_KEYS = ("patients", "diagnosis", "diagnosis_unknown", "grade", "grade_unknown", "survival_labelled",
              "events")


def data_digest(site: SiteData) -> str:
    """sha256 identifying the site's data: its tables' bytes, the feature schema and every usable
    slide's feature-file checksum (as the manifest records it), so re-running extraction on the same
    slides gives the same digest. It reveals nothing about the data; it only lets a report say
    whether two runs saw the same files."""
    layout = site.layout
    genomics = [find_genomics_file(layout)] if site.genomics is not None else []
    tables = {p.name: sha256_file(p) for p in (layout.clinical, layout.slides, layout.geneset, *genomics)
              if p.is_file()}
    manifest = Manifest.load(layout.manifest)
    used = sorted(s for sl in site.slides.values() for s in sl)
    features = {s: manifest.slides.get(s, {}).get("checksum") for s in used}
    blob = json.dumps({"tables": tables, "schema": manifest.schema, "features": features}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def preflight_summary(site_dir: Path | str, cfg: ExperimentConfig, label: str | None = None, *,
                      patch_sums: bool = True, policy: DisclosurePolicy | None = None,
                      ledger_path: Path | None = None) -> SiteSummary:
    """The site's schema and aggregate statistics (``smm_model.contract.protocol.SiteSummary``).

    Everything in it is a count, a sum over training patients or a schema identifier: no patient
    id, slide id, path or per-patient value. Survival histograms count TRAINING survival times on
    the fixed ``SURVIVAL_HIST_EDGES``; a time beyond the last edge (30 years) is counted in the last
    bin so the histogram totals equal the labelled counts. Histology runs with ``data.patch_norm:
    standardize`` add per-dimension sums over every training patch (``SiteData.patch_sums``).
    ``label`` is the site's chosen display name (never derived from a path here). ``patch_sums=False``
    skips reading every training feature file where the statistics are not needed (evaluating a
    model that carries its own). The summary leaves through ``client.local.release.release_summary``
    under ``policy`` (default: ``privacy.min_cell``; the ClientApp adds the site's own floor).
    With ``privacy.dp`` on, the site first checks that it can honour the run: the DP config
    (``client.local.dp.check_dp_config``, ``E_CONFIG``) and its budget for every planned round
    (``check_privacy_plan``, ``E_PRIVACY_BUDGET``), so a site that cannot take part is refused at
    the preflight rather than in a later round.
    """
    with stage("E_DATA"):
        site = load_site(site_dir, cfg, check_feature_dim=False)
        patches = None
        if patch_sums and cfg.model.arch != "snn" and cfg.data.patch_norm == "standardize":
            patches = site.patch_sums("train")
        source = Manifest.load(site.layout.manifest).data.get("source") or {}
        agg = site.aggregate_stats()
        schema = {"encoder": None, "feature_dim": None, **agg["schema"]}
        splits = {s: {k: agg["splits"][s][k] for k in SPLIT_KEYS} for s in SPLITS}
        pos = site.clinical.positions(site.patients("train"))
        if cfg.privacy.dp:
            check_privacy_plan(cfg, len(pos), ledger_path or ledger_file(site_dir))
        known = site.clinical.survival_known[pos]
        t = site.clinical.survival_time[pos][known]
        e = site.clinical.event[pos][known] > 0
        t = np.clip(t, SURVIVAL_HIST_EDGES[0], SURVIVAL_HIST_EDGES[-1])
        hist_all = np.histogram(t, bins=SURVIVAL_HIST_EDGES)[0]
        hist_ev = np.histogram(t[e], bins=SURVIVAL_HIST_EDGES)[0]
        summary = SiteSummary(schema=schema, splits=splits, genomics=agg.get("genomics_stats"),
                              survival_hist_events=[int(x) for x in hist_ev],
                              survival_hist_all=[int(x) for x in hist_all],
                              excluded={str(k): int(v) for k, v in agg["excluded"].items()},
                              patches=patches, label=label, data_digest=data_digest(site),
                              synthetic=bool(source.get("synthetic", False)))
    with stage("E_DISCLOSURE"):
        return release_summary(summary, policy or site_policy(cfg))


def site_policy(cfg: ExperimentConfig, node_config: Mapping[str, Any] | None = None) -> DisclosurePolicy:
    """The disclosure policy at this site: the run's ``privacy.min_cell`` raised to the site's own
    floor (node config ``min-cell``), which the server cannot lower."""
    floor = (node_config or {}).get(SITE_FLOOR_KEY)
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int) or floor < 1):
        raise ValueError(f"node config {SITE_FLOOR_KEY}: expected an integer >= 1, got {floor!r}")
    return DisclosurePolicy.at_site(cfg.privacy.min_cell, floor)


# --------------------------------------------------------------------------------------------- #
# train
# --------------------------------------------------------------------------------------------- #
def _class_weights(cfg: ExperimentConfig, shared: SharedStats, device: torch.device) -> dict[str, Tensor]:
    out = {}
    with stage("E_SCHEMA"):
        for task in cfg.model.tasks:
            if task in TASK_CLASSES and task in shared.class_weights:
                w = torch.tensor(shared.class_weights[task], dtype=torch.float32)
                if w.shape != (TASK_CLASSES[task],) or not torch.isfinite(w).all() or bool((w < 0).any()):
                    raise ValueError(f"shared class weights of {task}: expected {TASK_CLASSES[task]} finite, "
                                     "non-negative values")
                out[task] = w.to(device)
    return out


def _logit_offsets(cfg: ExperimentConfig, site: SiteData, shared: SharedStats, device: torch.device
                   ) -> dict[str, Tensor]:
    """Per classification task the site's logit-adjustment offsets (``train.logit_adjustment``):
    this site's training class counts against the pooled ones the server sent."""
    tau = cfg.train.logit_adjustment
    if tau <= 0:
        return {}
    with stage("E_SCHEMA"):
        if not shared.class_counts:
            raise ValueError("train.logit_adjustment needs the pooled class counts in the shared statistics")
        own = site.aggregate_stats()["splits"]["train"]
        return {task: logit_adjustment_offsets(own[task], shared.class_counts[task], tau).to(device)
                for task in cfg.model.tasks if task in TASK_CLASSES}


def train_round(site_dir: Path | str, cfg: ExperimentConfig, shared: SharedStats, state_dict: Mapping[str, Tensor],
                lr: float, local_epochs: int, proximal_mu: float = 0.0, *, server_round: int = 0,
                local_steps: int = 0, optimizer_state: Mapping[str, Tensor] | None = None,
                control: Mapping[str, Tensor] | None = None, policy: DisclosurePolicy | None = None,
                ledger_path: Path | None = None
                ) -> tuple[dict[str, Tensor], dict[str, int | float], dict[str, Tensor], dict[str, Tensor] | None]:
    """Train the global model locally; return (new state_dict on the CPU, metrics, optimizer state,
    new SCAFFOLD control variate or None).

    Local work: ``local_steps > 0`` optimizer steps (``client.local.train.step_batches``: the same count
    at every site, whatever its size), else ``local_epochs`` passes over the training patients.
    The learning rate is held at ``lr`` for the whole round (the server owns the schedule across
    rounds). ``optimizer_state`` (``client.local.train.optimizer_state_arrays`` of this site's previous
    round) continues the site's optimizer; None starts a fresh one. The optimizer state returned
    is for the site to keep: it never goes into a reply. ``proximal_mu > 0`` adds FedProx's
    (mu/2)||w - w_global||^2 with the weights received here; ``train.logit_adjustment > 0`` adds the
    site's label-skew offsets to the classification logits inside the loss. ``control`` (SCAFFOLD,
    Karimireddy et al. 2020: c - c_i, the server's control variate minus this site's own as the
    server holds it, one tensor per model parameter) is added to every step's gradient, so that
    local steps follow the federation's gradient rather than drift to the site's own optimum; the
    returned control variate is the site's new c_i, the mean of its gradients over the round
    (SCAFFOLD's option II, which for plain SGD without weight decay or clipping equals
    c_i - c + (x - y) / (K lr), and stays a gradient estimate under momentum). Seeds derive from
    ``train.seed`` and ``server_round``, so a rerun of a round is repeatable.

    With ``privacy.dp`` on, the round is patient-level DP-SGD (``client.local.dp.dp_train_steps``):
    Poisson batches drawn with a secret generator, per-patient clipping and Gaussian noise, the
    round's steps reserved in the site's privacy ledger (``ledger_path``, default
    ``<site>/privacy/ledger.json``; node config ``privacy-ledger``) before it trains, and a round
    that would take the site past ``privacy.dp_epsilon_budget`` declined (``E_PRIVACY_BUDGET``,
    nothing trained). Coordination runs off and its counts are not sent; the reply adds ``dp-*``
    metrics: the site's cumulative epsilon at ``dp-delta``, sigma, the clipping norm, the sample
    rate and the round's steps (empty draws included).

    Metrics (the same keys at every site, as Flower's strategies require): ``num-examples`` (training
    patients), ``train-loss`` (mean training loss of the last local epoch), ``steps`` (optimizer
    steps taken), ``seconds`` (wall time of the round), and per task ``coord-<task>-tumour`` /
    ``-micro`` / ``-conflicts``: gradient coordination counts summed over the round (0 when
    coordination is off or the model has no split heads).
    """
    t0 = time.perf_counter()
    with stage("E_CONFIG"):
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError("lr must be a positive number")
        if int(local_epochs) < 1:
            raise ValueError("local-epochs must be >= 1")
        if int(local_steps) < 0:
            raise ValueError("local-steps must be >= 0")
        if not (np.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ValueError("proximal-mu must be >= 0")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, proximal_mu=float(proximal_mu),
                                                                 lr=float(lr)))
        device = resolve_device(cfg.train.device)
    with stage("E_DATA"):
        site = load_site(site_dir, cfg)
    ds = split_dataset(site, cfg, shared, "train")
    ds.set_epoch(server_round)  # another (deterministic) patch sample of capped bags every round
    n_train = len(ds)
    with stage("E_TOO_FEW_PATIENTS"):
        check_training_size(n_train, policy or site_policy(cfg))
    torch.manual_seed(cfg.train.seed + server_round)
    model = _model(cfg, state_dict, device)
    with stage("E_CONFIG"):
        trained = trained_tensors(cfg, site.modalities)
    if trained is not None:  # a site lacking a modality: what its data cannot reach stays as received
        keep = set(trained)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
    weights = _class_weights(cfg, shared, device)
    offsets = _logit_offsets(cfg, site, shared, device)
    with stage("E_TRAIN"):
        bs = cfg.train.batch_size
        generator = torch.Generator().manual_seed(cfg.train.seed + server_round)
        if local_steps > 0:
            loader = DataLoader(ds, batch_sampler=step_batches(n_train, int(local_steps), bs, generator),
                                collate_fn=collate_patients, num_workers=cfg.train.num_workers)
            epochs = 1
        else:
            # A site smaller than one batch still trains (on one partial batch) rather than on nothing.
            loader = DataLoader(ds, batch_size=bs, shuffle=True, collate_fn=collate_patients,
                                drop_last=cfg.train.drop_last and n_train >= bs, num_workers=cfg.train.num_workers,
                                generator=generator)
            epochs = int(local_epochs)
        global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
        optimizer = make_optimizer(model, cfg.train, lr=float(lr))
        if optimizer_state:
            load_optimizer_state(optimizer, optimizer_state)
            for g in optimizer.param_groups:  # the state keeps moments, never the previous round's lr
                g["lr"] = float(lr)
        if cfg.privacy.dp:
            logs, metrics = _dp_round(model, ds, cfg, n_train, int(local_steps), epochs, device, optimizer, weights,
                                      offsets, global_params, server_round, ledger_path or ledger_file(site_dir))
            new_control = None
        else:
            constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)
            correction, new_control = _scaffold_correction(model, control)
            logs = train_epochs(model, loader, cfg, epochs=epochs, device=device, optimizer=optimizer,
                                scheduler=constant, class_weights=weights, global_params=global_params,
                                logit_offsets=offsets, grad_correction=correction, grad_mean=new_control)
            metrics = {wire.NUM_EXAMPLES: int(n_train), wire.TRAIN_LOSS: float(logs[-1].loss),
                       wire.STEPS: int(sum(log.steps for log in logs))}
            metrics.update(_coordination_metrics(cfg, logs))
        new_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        new_optimizer_state = optimizer_state_arrays(optimizer)
    metrics[wire.SECONDS] = float(time.perf_counter() - t0)
    return new_state, metrics, new_optimizer_state, new_control


#: SuperNode node-config key naming the site's privacy ledger file (one per site, across runs).
LEDGER_KEY = "privacy-ledger"


def ledger_file(site_dir: Path | str, node_config: Mapping[str, Any] | None = None) -> Path:
    """Where this site's privacy ledger lives: node config ``privacy-ledger``, else
    ``<site>/privacy/ledger.json`` (a deployment with a read-only data volume names a writable file)."""
    value = (node_config or {}).get(LEDGER_KEY)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"node config {LEDGER_KEY}: expected a file path, got {value!r}")
    return Path(value).expanduser() if value else Path(site_dir) / "privacy" / "ledger.json"


def _dp_plan(cfg: ExperimentConfig, n_train: int, local_steps: int, local_epochs: int, ledger_path: Path):
    """(sample rate, steps per round, noise multiplier, the site's ledger) of a DP round, after the
    DP config is checked (``E_CONFIG``) and the ledger opened (``E_PRIVACY_LEDGER``)."""
    # Imported here: Opacus adds seconds to every ClientApp start, and only DP runs need it.
    from client.local.dp import calibrate_noise, check_dp_config, plan_steps
    from client.local.ledger import PrivacyLedger

    pc = cfg.privacy
    with stage("E_CONFIG"):
        check_dp_config(cfg)  # refuses what DP cannot honour; its notes are in client.local.dp's docstring
        q, steps = plan_steps(cfg, n_train, local_steps=local_steps, local_epochs=local_epochs)
        sigma = calibrate_noise(pc, q, steps, cfg.federation.rounds)
    with stage("E_PRIVACY_LEDGER"):
        ledger = PrivacyLedger.open(ledger_path, accountant=pc.dp_accountant)
    return q, steps, sigma, ledger


def check_privacy_plan(cfg: ExperimentConfig, n_train: int, ledger_path: Path) -> None:
    """Refuse, before any training, a DP run this site cannot honour: a DP config it cannot run
    (``E_CONFIG``), or a budget that the planned rounds would pass (``E_PRIVACY_BUDGET``: the
    site's spent epsilon plus ``federation.rounds`` rounds at the planned sigma and sample rate)."""
    fed, pc = cfg.federation, cfg.privacy
    q, steps, sigma, ledger = _dp_plan(cfg, n_train, fed.local_steps, fed.local_epochs, ledger_path)
    with stage("E_PRIVACY_LEDGER"):
        planned = ledger.would_spend(sigma, q, steps * fed.rounds, pc.dp_delta)
    if planned > pc.dp_epsilon_budget:
        raise SiteError("E_PRIVACY_BUDGET", "BudgetExceeded")


def _dp_round(model: nn.Module, ds: SiteDataset, cfg: ExperimentConfig, n_train: int, local_steps: int,
              epochs: int, device: torch.device, optimizer: torch.optim.Optimizer,
              weights: Mapping[str, Tensor], offsets: Mapping[str, Tensor] | None,
              global_params: list[Tensor] | None, server_round: int, ledger_path: Path
              ) -> tuple[list[Any], dict[str, int | float]]:
    """One DP-SGD round (see ``train_round``); returns the logs and the reply's metrics."""
    from client.local.dp import check_dp_model, dp_train_steps, secret_generator
    from client.local.ledger import BudgetExceeded

    pc = cfg.privacy
    q, steps, sigma, ledger = _dp_plan(cfg, n_train, local_steps, epochs, ledger_path)
    with stage("E_CONFIG"):
        check_dp_model(model)
    try:
        logs, record = dp_train_steps(model, ds, cfg, steps=steps, sample_rate=q, noise_multiplier=sigma,
                                      generator=secret_generator(), device=device, optimizer=optimizer,
                                      class_weights=weights, logit_offsets=offsets, global_params=global_params,
                                      ledger=ledger, run=cfg.name, server_round=server_round)
    except BudgetExceeded as e:
        raise SiteError("E_PRIVACY_BUDGET", type(e).__name__) from e
    # No training loss in the reply: it is a mean of un-noised per-patient losses (it stays in the
    # site's own log). The coordination counts are read from the noised gradient (post-processing).
    log.info("train round %d: DP-SGD training loss %.4f over %d patient passes (kept at the site)", server_round,
             float(logs[-1].loss) if logs else float("nan"), record.examples)
    metrics: dict[str, int | float] = {
        wire.NUM_EXAMPLES: int(n_train),
        wire.STEPS: int(record.steps), wire.DP_EPSILON: float(record.epsilon), wire.DP_DELTA: float(pc.dp_delta),
        wire.DP_SIGMA: float(record.noise_multiplier), wire.DP_CLIP: float(record.max_grad_norm),
        wire.DP_SAMPLE_RATE: float(record.sample_rate)}
    metrics.update(_coordination_metrics(cfg, logs))
    return logs, metrics


def _coordination_metrics(cfg: ExperimentConfig, logs: Sequence[Any]) -> dict[str, int]:
    """``coord-<task>-<part>``: the coordination counts summed over the round's logs."""
    return {f"coord-{task}-{part}": int(sum(lg.coordination.get(task, {}).get(part, 0) for lg in logs))
            for task in cfg.model.tasks for part in ("tumour", "micro", "conflicts")}


def _scaffold_correction(model: nn.Module, control: Mapping[str, Tensor] | None
                         ) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
    """(c - c_i per parameter, an empty dict for the new c_i), or (None, None) without SCAFFOLD; a
    correction that does not fit the model's parameters is an E_PROTOCOL error."""
    if control is None:
        return None, None
    with stage("E_PROTOCOL"):
        shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
        got = {k: tuple(v.shape) for k, v in control.items()}
        if got != shapes:
            wrong = sorted(set(got) ^ set(shapes)) or sorted(k for k in shapes if got[k] != shapes[k])
            raise ValueError(f"the SCAFFOLD correction does not match the model's parameters (first: {wrong[0]!r})")
        return {k: control[k].float() for k in shapes}, {}


# --------------------------------------------------------------------------------------------- #
# evaluate
# --------------------------------------------------------------------------------------------- #
def risk_groups(hazard_logits: np.ndarray) -> np.ndarray:
    """Predicted risk group per patient: the first discrete-time bin in which the predicted survival
    S_k = prod_{j<=k} (1 - sigmoid(logit_j)) drops below 0.5 (the predicted median-survival bin); the
    last bin when it never does. Earlier group = higher risk."""
    logits = np.asarray(hazard_logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"hazard logits must be (N, T), got {logits.shape}")
    surv = np.cumprod(1.0 - 1.0 / (1.0 + np.exp(-logits)), axis=1)
    below = surv < 0.5
    return np.where(below.any(axis=1), below.argmax(axis=1), logits.shape[1] - 1).astype(np.int64)


@torch.no_grad()
def _per_patient(model: nn.Module, loader: DataLoader, cfg: ExperimentConfig,
                 device: torch.device) -> tuple[float, dict[str, dict[str, np.ndarray]]]:
    """One pass: summed per-patient loss and, per task, the labelled patients' outputs and labels."""
    model.eval()
    loss_sum = 0.0
    amp = autocast_dtype(cfg.train.precision, device)
    out_t: dict[str, dict[str, list]] = {t: {} for t in cfg.model.tasks}
    for batch in loader:
        batch = batch.to(device)
        out = forward(model, batch, amp)
        for task, logits in out.logits.items():
            mask = batch.task_mask(task)
            w = cfg.loss.task_weight(task)
            for i in range(batch.size):  # per patient: the loss must not depend on batch composition
                if not bool(mask[i]):
                    continue
                if task == "survival":
                    li = nll_survival_loss(logits[i:i + 1], batch.labels["survival_bin"][i:i + 1],
                                           batch.labels["event"][i:i + 1], alpha=cfg.loss.survival_alpha)
                else:
                    li = weighted_cross_entropy(logits[i:i + 1], batch.labels[task][i:i + 1])
                loss_sum += w * float(li)
            acc = out_t[task]
            if task == "survival":
                acc.setdefault("logits", []).append(logits[mask].float().cpu().numpy())
                acc.setdefault("time", []).append(batch.labels["survival_time"][mask].cpu().numpy())
                acc.setdefault("event", []).append(batch.labels["event"][mask].cpu().numpy())
            else:
                acc.setdefault("probs", []).append(torch.softmax(logits[mask].float(), dim=1).cpu().numpy())
                acc.setdefault("target", []).append(batch.labels[task][mask].cpu().numpy())
    return loss_sum, {t: {k: np.concatenate(v) for k, v in d.items()} for t, d in out_t.items()}


def evaluate_round(site_dir: Path | str, cfg: ExperimentConfig, shared: SharedStats,
                   state_dict: Mapping[str, Tensor], split: str, policy: DisclosurePolicy | None = None) -> EvalStats:
    """Additive evaluation statistics of the global model on one split of this site.

    ``n``: patients evaluated. ``loss_sum``: the sum over those patients of each patient's own
    multitask loss, sum_t task_weight(t) * loss_t(patient), where loss_t is the unweighted
    cross-entropy (classification) or the discrete-time survival NLL (``loss.survival_alpha``), 0
    for a task the patient has no label for. Class weights and the consistency terms are left out:
    they depend on the federation's class balance and on which patients share a batch, and an
    evaluation loss must be a plain per-patient sum so that adding sites' sums gives the pooled
    loss (global loss = sum of loss_sum / sum of n). Per classification task: the confusion matrix
    and the score histograms (``smm_model.metrics.federated``); survival: C-index pair counts on the risk
    -sum(S) and Kaplan-Meier counts on ``shared.km_grid`` per predicted risk group
    (``risk_groups``; ``survival_bins`` groups).

    A split with fewer than ``federation.min_site_patients`` patients (or none) is reported as
    ``EvalStats(n, suppressed=True)`` with no statistic at all (small-cell suppression). What is
    returned has passed disclosure control (``client.local.release.release_eval`` under ``policy``).
    """
    with stage("E_CONFIG"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        device = resolve_device(cfg.train.device)
    with stage("E_DATA"):
        site = load_site(site_dir, cfg)
    stats = evaluate_dataset(split_dataset(site, cfg, shared, split), cfg, shared, state_dict, device)
    with stage("E_DISCLOSURE"):
        return release_eval(stats, policy or site_policy(cfg), split)


def evaluate_dataset(ds: SiteDataset, cfg: ExperimentConfig, shared: SharedStats, state_dict: Mapping[str, Tensor],
                     device: torch.device) -> EvalStats:
    """``evaluate_round`` on an already built dataset (its patients, the shared preprocessing):
    the same statistics, the same small-cell suppression. ``smm evaluate --split all`` uses it on a
    site's whole cohort."""
    n = len(ds)
    if n == 0 or n < cfg.federation.min_site_patients:
        return EvalStats(n=n, suppressed=True)
    model = _model(cfg, state_dict, device)
    with stage("E_EVAL"):
        loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=False, collate_fn=collate_patients,
                            num_workers=cfg.train.num_workers)
        loss_sum, per_task = _per_patient(model, loader, cfg, device)
        stats = EvalStats(n=n, loss_sum=float(loss_sum))
        n_classes = cfg.model.n_classes
        for task in cfg.model.tasks:
            d = per_task[task]
            if task == "survival":
                logits = d.get("logits", np.zeros((0, n_classes[task])))
                time_, event = d.get("time", np.zeros(0)), d.get("event", np.zeros(0))
                risk = risk_from_hazard_logits(logits) if len(logits) else np.zeros(0)
                stats.cindex = c_index_counts(time_, event, risk).tolist()
                groups = risk_groups(logits) if len(logits) else np.zeros(0, dtype=np.int64)
                stats.km = km_counts(time_, event, groups, n_classes[task], shared.km_grid).ravel().tolist()
                stats.km_groups = n_classes[task]
            else:
                C = n_classes[task]
                probs = d.get("probs", np.zeros((0, C)))
                target = d.get("target", np.zeros(0, dtype=np.int64)).astype(np.int64)
                stats.confusion[task] = confusion_counts(target, probs.argmax(axis=1), C).ravel().tolist()
                stats.histograms[task] = score_histograms(target, probs, C).ravel().tolist()
    return stats
