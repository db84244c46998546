"""One typed, validated configuration for everything the method needs.

A run is described by a YAML file (plus ``--set key=value`` overrides, plus Flower's run config);
it is parsed once into frozen dataclasses here, and nothing deeper in the code reads raw dicts.
Every error names the dotted field path and what was expected, so a bad config fails at load, not
an hour into training. This module parses text but reads no files: callers pass the YAML text.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

__all__ = [
    "TASKS",
    "TASK_CLASSES",
    "ARCHS",
    "ConfigError",
    "ModelConfig",
    "LossConfig",
    "TrainConfig",
    "DataConfig",
    "FederationConfig",
    "ExperimentConfig",
    "from_dict",
    "apply_overrides",
    "to_dict",
]

#: The tasks a run may enable (any non-empty subset).
TASKS = ("diagnosis", "grade", "survival")
#: Classes of the classification tasks: WHO 2021 diagnosis (GBM, astrocytoma G4, lower-grade
#: astrocytoma, oligodendroglioma) and grade (2, 3, 4). Survival has ``ModelConfig.survival_bins``.
TASK_CLASSES = {"diagnosis": 4, "grade": 3}
#: ``smm`` is the proposed model; the others are the paper's baselines behind the same factory.
ARCHS = ("smm", "snn", "abmil", "concat")
LAYOUTS = ("seed", "spatial")
POSITION_BIAS = ("table", "exact")
COORDINATION = ("pcgrad", "seed", "off")
OPTIMIZERS = ("adam", "adamw", "sgd")
#: train.precision: auto = bf16 autocast on a CUDA device that supports it, fp32 elsewhere.
PRECISIONS = ("auto", "fp32", "bf16")
GENOMICS_POLICIES = ("error", "impute_mean", "impute_zero")
PATCH_NORMS = ("standardize", "none")
SITE_OPTIMIZERS = ("fresh", "persist")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
              "multikrum")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: only true/false are booleans (so
    ``coordination: off`` stays a string) and ``1e-3`` is a float, not a string."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


def _require(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Defaults are the reference setting (method.md Part B, section 3).

    Ablations of the method's parts (each one switch; the defaults are the full method):

    * no deformable offsets: ``offset_scale: 0``. The offsets are ``tanh(...) * offset_scale``, so
      every group samples the fixed K x K reference grid (regularly spaced keys over the map); the
      offset network is then unused.
    * no gene conditioning of the queries: ``gene_queries: false``. The queries (and offsets) see
      the patches only; the subspace's gene embedding joins the branch vector after pooling
      (``SubspaceBranch``), so the genes still reach the heads. The consistency loss still pulls the
      sampled positions' relations toward the genes' during training; add
      ``loss.consistency_weight: 0`` for no gene guidance of where the model looks at all.
    * no gene-guided consistency loss: ``loss.consistency_weight: 0`` (the term is not computed).
    """

    arch: str = "smm"
    tasks: tuple[str, ...] = TASKS
    feature_dim: int = 1024  # D of the patch features (ResNet-50 trunk: 1024)
    hidden_dim: int = 128  # path_dim = omic_dim = mmhid in the reference
    genes_tumour: int = 59  # inputs of the tumour-subspace gene encoder
    genes_micro: int = 361  # inputs of the microenvironment-subspace gene encoder
    snn_hidden: tuple[int, ...] = (64, 48, 32)  # SNN (MaxNet) hidden widths before hidden_dim
    dropout: float = 0.1  # AlphaDropout in the SNN, dropout in ABMIL
    attn_dropout: float = 0.1
    layout: str = "seed"  # seed: fixed count as a square pseudo-image; spatial: by coordinates
    n_patches: int = 2500  # seed layout: tokens per bag, viewed as grid_size x grid_size
    grid_size: int = 50  # side of the token map (both layouts)
    heads: int = 8
    dim_head: int = 64
    offset_groups: int = 8
    key_grid: int = 12  # side of the sampled-key grid: keys per group = key_grid**2
    offset_scale: float = 4.0  # max offset, in cells of the key grid
    position_bias: str = "table"  # table: interpolated lookup; exact: the reference MLP per pair
    bias_table_size: int = 129  # table side (odd, so 0 is on the grid)
    bias_hidden: int = 32  # continuous position bias MLP width (reference: hidden_dim // 4)
    exact_chunk: int = 16384  # query-key pairs per block in exact mode (bounds memory)
    survival_bins: int = 4
    abmil_hidden: int = 128  # gated-attention width in the ABMIL baselines
    gene_queries: bool = True  # SMM: genes condition the queries (false: ablation, genes fused after pooling)
    # Survival also reads the model's own diagnosis and grade probabilities (every arch; see
    # smm_model.nn.model.SurvivalLink): false is the paper's independent heads.
    survival_reads_tasks: bool = False

    def __post_init__(self) -> None:
        p = "model"
        _require(self.arch in ARCHS, f"{p}.arch", f"unknown {self.arch!r}; expected one of {ARCHS}")
        _require(len(self.tasks) > 0, f"{p}.tasks", "at least one task is needed")
        for t in self.tasks:
            _require(t in TASKS, f"{p}.tasks", f"unknown task {t!r}; expected a subset of {TASKS}")
        _require(len(set(self.tasks)) == len(self.tasks), f"{p}.tasks", "a task is listed twice")
        for name in ("feature_dim", "hidden_dim", "genes_tumour", "genes_micro", "n_patches",
                     "grid_size", "heads", "dim_head", "offset_groups", "key_grid",
                     "bias_table_size", "bias_hidden", "exact_chunk", "survival_bins",
                     "abmil_hidden"):
            v = getattr(self, name)
            _require(v > 0, f"{p}.{name}", f"must be a positive integer, got {v}")
        _require(all(h > 0 for h in self.snn_hidden), f"{p}.snn_hidden",
                 f"widths must be positive, got {list(self.snn_hidden)}")
        for name in ("dropout", "attn_dropout"):
            v = getattr(self, name)
            _require(0.0 <= v < 1.0, f"{p}.{name}", f"must be in [0, 1), got {v}")
        _require(self.offset_scale >= 0, f"{p}.offset_scale", f"must be >= 0, got {self.offset_scale}")
        _require(self.layout in LAYOUTS, f"{p}.layout", f"unknown {self.layout!r}; expected one of {LAYOUTS}")
        _require(self.position_bias in POSITION_BIAS, f"{p}.position_bias",
                 f"unknown {self.position_bias!r}; expected one of {POSITION_BIAS}")
        _require(self.bias_table_size >= 3 and self.bias_table_size % 2 == 1, f"{p}.bias_table_size",
                 f"must be an odd integer >= 3, got {self.bias_table_size}")
        if self.layout == "seed":
            side = math.isqrt(self.n_patches)
            _require(self.grid_size * self.grid_size == self.n_patches, f"{p}.grid_size",
                     f"the seed layout views model.n_patches={self.n_patches} tokens as a square "
                     f"grid_size x grid_size map, so grid_size {self.grid_size} cannot hold them"
                     + (f" (use grid_size {side})" if side * side == self.n_patches
                        else "; n_patches must be a perfect square"))
        if self.survival_reads_tasks:
            _require("survival" in self.tasks and len(self.tasks) > 1, f"{p}.survival_reads_tasks",
                     f"needs the survival task and a classification task in model.tasks, got {list(self.tasks)}")
        _require(self.key_grid >= 2, f"{p}.key_grid", f"must be >= 2, got {self.key_grid}")
        _require(self.key_grid <= self.grid_size, f"{p}.key_grid",
                 f"{self.key_grid} sampled keys per side exceed the {self.grid_size}-cell token map")
        _require(self.heads % self.offset_groups == 0, f"{p}.heads",
                 f"{self.heads} heads must be a multiple of offset_groups={self.offset_groups}")
        _require(self.hidden_dim % self.offset_groups == 0, f"{p}.hidden_dim",
                 f"{self.hidden_dim} must be divisible by offset_groups={self.offset_groups}")

    @property
    def n_classes(self) -> dict[str, int]:
        """Output width per enabled task (survival: number of discrete-time bins)."""
        return {t: (self.survival_bins if t == "survival" else TASK_CLASSES[t]) for t in self.tasks}


@dataclass(frozen=True)
class LossConfig:
    """Loss weights. Reference: loss = L_task + 0.5 L_cons_tumour + 0.5 L_cons_micro, alpha 0."""

    task_weights: Mapping[str, float] = field(default_factory=dict)  # default 1.0 per task
    consistency_weight: float = 0.5  # per subspace
    survival_alpha: float = 0.0  # weight of the uncensored-only term in the NLL survival loss

    def __post_init__(self) -> None:
        p = "loss"
        for t, w in self.task_weights.items():
            _require(t in TASKS, f"{p}.task_weights", f"unknown task {t!r}; expected one of {TASKS}")
            _require(w >= 0, f"{p}.task_weights.{t}", f"must be >= 0, got {w}")
        _require(self.consistency_weight >= 0, f"{p}.consistency_weight",
                 f"must be >= 0, got {self.consistency_weight}")
        _require(0.0 <= self.survival_alpha <= 1.0, f"{p}.survival_alpha",
                 f"must be in [0, 1], got {self.survival_alpha}")

    def task_weight(self, task: str) -> float:
        return float(self.task_weights.get(task, 1.0))


@dataclass(frozen=True)
class TrainConfig:
    """Local training. Defaults are the reference's (Adam 1e-3, L2 0.1, cosine over 20 epochs)."""

    epochs: int = 20
    batch_size: int = 8
    optimizer: str = "adam"  # adam (coupled L2, the reference), adamw, or sgd (with momentum)
    momentum: float = 0.9  # sgd's momentum
    lr: float = 1e-3
    weight_decay: float = 0.1
    min_lr: float = 0.0  # eta_min of the cosine schedule
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    coordination: str = "pcgrad"
    proximal_mu: float = 0.0  # FedProx proximal term; 0 = off
    # Label-skew-aware local loss (logit adjustment, Menon et al. 2021, in its federated form): a
    # site trains on logits + tau * (log prior_site - log prior_pooled), so the shared model learns
    # the pooled posterior whatever a site's case mix. 0 = off; centralized training is unaffected
    # (its prior is the pooled one).
    logit_adjustment: float = 0.0
    drop_last: bool = True
    num_workers: int = 0
    device: str = "auto"  # auto (GPU when present) | cpu | cuda | cuda:N
    # Mixed precision of the forward pass (client.local.train.autocast_dtype): auto = bf16 autocast on
    # a CUDA device with bf16 support, fp32 elsewhere; losses, gradient coordination and the optimizer
    # stay in fp32. fp16 is not offered: it needs loss scaling, which would rescale the gradients
    # that coordination compares and that DP clips. DP-SGD runs in fp32 (Opacus' per-sample hooks).
    precision: str = "auto"
    seed: int = 42

    def __post_init__(self) -> None:
        p = "train"
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            _require(v > 0, f"{p}.{name}", f"must be a positive integer, got {v}")
        _require(self.optimizer in OPTIMIZERS, f"{p}.optimizer",
                 f"unknown {self.optimizer!r}; expected one of {OPTIMIZERS}")
        _require(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        _require(0.0 <= self.momentum < 1.0, f"{p}.momentum", f"must be in [0, 1), got {self.momentum}")
        for name in ("weight_decay", "min_lr", "grad_clip", "proximal_mu", "logit_adjustment"):
            v = getattr(self, name)
            _require(v >= 0, f"{p}.{name}", f"must be >= 0, got {v}")
        _require(self.coordination in COORDINATION, f"{p}.coordination",
                 f"unknown {self.coordination!r}; expected one of {COORDINATION}")
        _require(self.num_workers >= 0, f"{p}.num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.precision in PRECISIONS, f"{p}.precision",
                 f"unknown {self.precision!r}; expected one of {PRECISIONS}")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")
                 or self.device == "mps", f"{p}.device",
                 f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the site folders are and how a site folder becomes tensors.

    Paths here are the only paths in a run; nothing deeper in the code holds one.
    """

    sites_root: str | None = None  # a folder of site folders (as `smm synth` / `smm tcga` write)
    sites: tuple[str, ...] = ()  # or explicit site folders; relative ones are under sites_root
    max_patches: int = 4096  # cap per patient bag, by seeded sampling (0 = keep all)
    genomics_policy: str = "error"  # NaN/missing genomic values: error, or impute + missingness indicator
    log1p_features: tuple[str, ...] = ()  # suffixes of features to log1p before standardising (e.g. _rnaseq)
    clip: float = 0.0  # clip standardised genomic values to [-clip, clip] (0 = off)
    # Patch features: "standardize" = per-dimension (x - mean) / std with statistics pooled from every
    # site's training patches (additive sums in the preflight); "none" = the encoder's raw values.
    patch_norm: str = "standardize"
    val_fraction: float = 0.15  # patient-level splits when clinical.csv has no split column
    test_fraction: float = 0.15
    split_seed: int = 42
    # Genomic features that measure a fact a label rule reads (IDH mutation, 1p/19q, CDKN2A/B copy
    # number, grade: smm_model.contract.label_facts) are refused by `smm site check` and the server's
    # preflight unless this is true; a run that opts in says so among its report's caveats.
    allow_label_features: bool = False

    def __post_init__(self) -> None:
        p = "data"
        _require(self.max_patches >= 0, f"{p}.max_patches", f"must be >= 0, got {self.max_patches}")
        _require(self.genomics_policy in GENOMICS_POLICIES, f"{p}.genomics_policy",
                 f"unknown {self.genomics_policy!r}; expected one of {GENOMICS_POLICIES}")
        _require(self.clip >= 0, f"{p}.clip", f"must be >= 0, got {self.clip}")
        _require(self.patch_norm in PATCH_NORMS, f"{p}.patch_norm",
                 f"unknown {self.patch_norm!r}; expected one of {PATCH_NORMS}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            _require(0.0 <= v < 1.0, f"{p}.{name}", f"must be in [0, 1), got {v}")
        _require(self.val_fraction + self.test_fraction < 1.0, f"{p}.val_fraction",
                 "val_fraction + test_fraction must leave patients for training")


@dataclass(frozen=True)
class FederationConfig:
    """The federated run: rounds, strategy, guards, evaluation and simulation resources."""

    rounds: int = 10
    local_epochs: int = 1
    # Local work per round in optimizer steps, the same at every site whatever its size (batches
    # drawn from reshuffled passes over the site's training patients, so a site smaller than
    # steps x batch sees its patients more than once). 0 = local_epochs passes instead, which give
    # a 20-patient site one step and a 200-patient site ten.
    local_steps: int = 0
    # "persist": each site keeps its optimizer state (Adam's moments) from round to round, on the
    # site (Flower's Context.state; it never leaves the site); "fresh": a new optimizer every round.
    site_optimizer: str = "fresh"
    eval_every: int = 1  # validation (and so model selection) every k-th round, and always the last
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2  # sites needed to start and to aggregate a round
    wait_for_nodes_s: float = 300.0  # bounded wait for min_nodes (Flower's own wait is unbounded)
    round_timeout_s: float = 3600.0  # per send-and-receive
    # How often the server pulls replies while a message phase is open (Flower's own
    # send_and_receive sleeps a fixed 3 s); each pull is one small request to the SuperLink.
    poll_interval_s: float = 0.2
    max_examples_per_site: int = 100_000  # a site's claimed example count is clamped to this
    # Server learning rate: FedAdam / FedYogi / FedAdagrad's eta (default 0.01) or FedAvgM's
    # (default 1.0, plain averaging); None = the strategy's default.
    server_lr: float | None = None
    server_momentum: float = 0.0  # FedAvgM's server momentum
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1e-3
    trimmed_beta: float = 0.2  # FedTrimmedAvg: fraction cut from each end
    krum_byzantine: int = 0  # (Multi)Krum: number of malicious nodes assumed
    multikrum_keep: int = 0  # MultiKrum: nodes kept (0 = n - krum_byzantine)
    min_site_patients: int = 5  # sites with fewer evaluated patients send no metrics
    # Best round by this federated validation metric: "loss", "<task>.<metric>", or the mean of
    # several higher-is-better ones joined by "+" (e.g. "diagnosis.macro_f1+grade.macro_f1+survival.c_index").
    selection_metric: str = "loss"
    seed: int = 42
    client_cpus: float = 1.0  # simulation: CPUs reserved per simulated site
    client_gpus: float = 0.0  # simulation: GPU fraction per simulated site

    def __post_init__(self) -> None:
        p = "federation"
        for name in ("rounds", "local_epochs", "min_nodes", "max_examples_per_site", "eval_every"):
            v = getattr(self, name)
            _require(v > 0, f"{p}.{name}", f"must be a positive integer, got {v}")
        _require(self.local_steps >= 0, f"{p}.local_steps", f"must be >= 0 (0 = local_epochs), got {self.local_steps}")
        _require(self.site_optimizer in SITE_OPTIMIZERS, f"{p}.site_optimizer",
                 f"unknown {self.site_optimizer!r}; expected one of {SITE_OPTIMIZERS}")
        _require(self.server_lr is None or self.server_lr > 0, f"{p}.server_lr",
                 f"must be > 0 (or null for the strategy's default), got {self.server_lr}")
        _require(0.0 <= self.server_momentum < 1.0, f"{p}.server_momentum",
                 f"must be in [0, 1), got {self.server_momentum}")
        _require(self.server_momentum == 0.0 or self.strategy == "fedavgm", f"{p}.server_momentum",
                 f"is FedAvgM's; federation.strategy is {self.strategy!r}")
        _require(self.strategy in STRATEGIES, f"{p}.strategy",
                 f"unknown {self.strategy!r}; expected one of {STRATEGIES}")
        for name in ("fraction_train", "fraction_evaluate"):
            v = getattr(self, name)
            _require(0.0 < v <= 1.0, f"{p}.{name}", f"must be in (0, 1], got {v}")
        for name in ("wait_for_nodes_s", "round_timeout_s", "server_tau", "client_cpus"):
            v = getattr(self, name)
            _require(v > 0, f"{p}.{name}", f"must be > 0, got {v}")
        _require(0.01 <= self.poll_interval_s <= 10.0, f"{p}.poll_interval_s",
                 f"must be in [0.01, 10] seconds, got {self.poll_interval_s}")
        for name in ("server_beta_1", "server_beta_2"):
            v = getattr(self, name)
            _require(0.0 <= v < 1.0, f"{p}.{name}", f"must be in [0, 1), got {v}")
        _require(0.0 < self.trimmed_beta < 0.5, f"{p}.trimmed_beta", f"must be in (0, 0.5), got {self.trimmed_beta}")
        for name in ("krum_byzantine", "multikrum_keep", "min_site_patients"):
            v = getattr(self, name)
            _require(v >= 0, f"{p}.{name}", f"must be >= 0, got {v}")
        _require(self.client_gpus >= 0, f"{p}.client_gpus", f"must be >= 0, got {self.client_gpus}")
        _require(self.selection_metric == "loss" or all("." in t for t in self.selection_metric.split("+")),
                 f"{p}.selection_metric", "expected 'loss', '<task>.<metric>' (e.g. diagnosis.auc) or several joined "
                 f"by '+', got {self.selection_metric!r}")

    def check_sites(self, n_sites: int) -> None:
        """Strategy constraints that depend on the number of sites."""
        p = "federation"
        _require(n_sites >= self.min_nodes, f"{p}.min_nodes",
                 f"{self.min_nodes} sites needed but the run has {n_sites}")
        if self.strategy == "fedtrimmedavg":
            _require(int(self.trimmed_beta * n_sites) > 0, f"{p}.trimmed_beta",
                     f"trimming {self.trimmed_beta} of {n_sites} sites removes none; raise it or add sites")
        if self.strategy in ("krum", "multikrum"):
            _require(n_sites > 2 * self.krum_byzantine + 2, f"{p}.krum_byzantine",
                     f"Krum needs more than 2f + 2 = {2 * self.krum_byzantine + 2} sites, the run has {n_sites}")


ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class PrivacyConfig:
    """What may leave a site, and differential privacy of what its training sends.

    ``min_cell`` is the disclosure-control threshold k applied at the site to everything it sends
    (``smm_model.contract.disclosure``): no count cell between 1 and k - 1, sums and means over at
    least k patients. A site applies the larger of this and its own floor (SuperNode node config
    ``min-cell``), so a server cannot lower it. ``min_cell: 1`` switches the policy off (tests and
    closed simulations only). The ``dp_*`` keys configure patient-level DP-SGD (one sample = one
    patient's bag) in the local trainer, with one accountant per site kept on the site's disk.
    The ``central_dp*`` keys configure site-level DP at the server (``server.aggregation.central_dp``):
    it protects a site's contribution in the released models from the sites and anyone who
    receives a model, but not from the server, which sees every update.
    """

    min_cell: int = 5  # k: no outgoing count cell below k (except 0); sums and means over >= k patients
    dp: bool = False  # patient-level DP-SGD at every site (Opacus accounting)
    dp_noise_multiplier: float | None = None  # sigma; null: calibrated from dp_target_epsilon over the planned rounds
    dp_target_epsilon: float | None = None  # epsilon the planned run may spend at a site (with dp_noise_multiplier null)
    dp_delta: float = 1e-5  # delta of every reported epsilon
    dp_max_grad_norm: float = 1.0  # per-patient gradient clipping norm C
    dp_accountant: str = "rdp"  # rdp or prv (Opacus accountants)
    dp_epsilon_budget: float = 10.0  # most epsilon a site spends over everything its ledger records; sites may lower it
    # Central (site-level) DP at the server: each site's update clipped to central_dp_clipping_norm,
    # the sum noised with sigma = central_dp_noise_multiplier, before the mean leaves the server.
    central_dp: bool = False  # site-level DP at the server: clip each site's update, noise the sum (protects against sites and model users, not the server)
    central_dp_noise_multiplier: float | None = None  # sigma of the noise on the sum of clipped updates (required with central_dp)
    central_dp_clipping_norm: float | None = None  # L2 bound C on each site's update (required with central_dp)

    def __post_init__(self) -> None:
        p = "privacy"
        _require(self.min_cell >= 1, f"{p}.min_cell", f"must be >= 1 (1 = no disclosure control), got {self.min_cell}")
        _require(self.dp_accountant in ACCOUNTANTS, f"{p}.dp_accountant",
                 f"unknown {self.dp_accountant!r}; expected one of {ACCOUNTANTS}")
        _require(0.0 < self.dp_delta < 1.0, f"{p}.dp_delta", f"must be in (0, 1), got {self.dp_delta}")
        _require(self.dp_max_grad_norm > 0, f"{p}.dp_max_grad_norm", f"must be > 0, got {self.dp_max_grad_norm}")
        _require(self.dp_epsilon_budget > 0, f"{p}.dp_epsilon_budget", f"must be > 0, got {self.dp_epsilon_budget}")
        for name in ("dp_noise_multiplier", "dp_target_epsilon"):
            v = getattr(self, name)
            _require(v is None or v > 0, f"{p}.{name}", f"must be > 0 or null, got {v}")
        for name in ("central_dp_noise_multiplier", "central_dp_clipping_norm"):
            v = getattr(self, name)
            _require(v is None or v > 0, f"{p}.{name}", f"must be > 0 or null, got {v}")
            _require(not self.central_dp or v is not None, f"{p}.{name}", "must be set when privacy.central_dp is on")
        if self.dp:
            _require((self.dp_noise_multiplier is None) != (self.dp_target_epsilon is None), f"{p}.dp_noise_multiplier",
                     "with privacy.dp on, set exactly one of dp_noise_multiplier and dp_target_epsilon")
            _require(self.dp_target_epsilon is None or self.dp_target_epsilon <= self.dp_epsilon_budget,
                     f"{p}.dp_target_epsilon",
                     f"{self.dp_target_epsilon} exceeds the site budget dp_epsilon_budget={self.dp_epsilon_budget}")


@dataclass(frozen=True)
class ExperimentConfig:
    """The root of a run's configuration."""

    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _require(not (self.privacy.dp and self.train.precision == "bf16"), "train.precision",
                 "bf16 is not used with privacy.dp (DP-SGD's per-sample gradients and clipping run in fp32); "
                 "set train.precision to auto or fp32")

    @classmethod
    def from_yaml_text(cls, text: str, overrides: list[str] | tuple[str, ...] = (),
                       source: str = "<config>") -> "ExperimentConfig":
        """Parse YAML text plus ``key.path=value`` overrides; ``source`` names the file in errors."""
        try:
            raw = _load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
        raw = apply_overrides(raw, overrides)
        try:
            return from_dict(cls, raw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


# --- generic dataclass <-> dict ---------------------------------------------------------------

def _convert(tp: Any, value: Any, path: str) -> Any:
    """Coerce a YAML value to the annotated type, strictly (no silent str->number, bool->int)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (elem, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(elem, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (str, Any)
        return {_convert(kt, k, path): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = path or "top level"
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {names}")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # e.g. a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-serialisable form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(raw: Mapping[str, Any], overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, returning a copy."""
    out: dict = _deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key component")
        try:
            value = _load_yaml(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj
