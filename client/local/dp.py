"""Patient-level differential privacy (DP-SGD) for a site's local training.

One DP sample is one patient's bag. A DP step (Abadi et al. 2016) draws a Poisson batch (each
training patient independently with probability q), computes each patient's gradient, clips it to
norm C (``privacy.dp_max_grad_norm``), sums, adds N(0, sigma^2 C^2) noise and divides by the
expected batch size q * n; the optimizer then steps on that. Opacus does the clip / sum / noise /
scale (``opacus.optimizers.DPOptimizer``) and the accounting (``client.local.ledger``); this module
supplies what Opacus cannot for this model:

* Per-patient gradients by a loop of one-patient forward/backward passes, written to
  ``p.grad_sample`` (B, *p.shape). Opacus's hook-based ``GradSampleModule`` gives wrong per-sample
  gradients for the ``smm`` arch (the offset network's B*g pseudo-batch, the position-bias MLP whose
  (T, T, 2) input it reads as a batch, the custom autograd of the ``exact`` bias, a conv on a
  non-contiguous input, the split heads); the loop is exact for every layer of every arch, the
  ``exact`` bias included, and at the reference size it was faster than the hooks (3.0 s vs 5.2 s
  per step at batch 8).
* Per-patient losses (``smm_model.objectives.losses.per_patient_loss``): the batch losses couple
  patients (weighted means, label-count denominators, relation maps), and DP's sensitivity bound
  needs each patient's gradient to depend on that patient alone.
* A Poisson sampler of our own (``poisson_batches``): Opacus's ``DPDataLoader`` collates an empty
  draw with a collate that does not know this project's ``Batch``. An empty draw is a noise-only
  step (the clipped sum is 0, the noise is not) and it is accounted like any other.

What DP changes in the local trainer (``check_dp_config`` refuses, or reports, each of these):

* Gradient coordination runs on the privatized gradient, after Opacus's noise and before the
  step (``coordinate_private``: the symmetric rule, both halves of a head give way where their
  rows conflict). The trainer's usual rule cannot be used: applied before the noise Opacus would
  overwrite it (measured: parameters identical to a run without it), and its confidences read the
  batch's un-noised outputs and labels. The symmetric rule and its ``coord-*`` counts read only
  the noised gradient, so they are post-processing and cost no budget.
* The consistency terms are dropped: on one patient each relation map is 1 x 1 (a row divided by
  its own norm), so the term is the constant 0 with no gradient (``per_patient_loss``).
* FedProx's proximal gradient mu (w - w_global) is data-independent, so it is added after the
  noise (post-processing); ``train.grad_clip`` > 0 then clips that final gradient (post-processing
  too; the per-patient clip C is what bounds each patient).
* SCAFFOLD is refused: its control variate is the mean of un-noised gradients and would leave the
  site unprivatized.
* BatchNorm is refused (batch statistics couple patients and running statistics are not noised).

Randomness: the sampler's generator and the noise generator must be secret. A generator seeded
from ``train.seed`` (which the server knows) would tell it which patients were in each batch,
which voids the subsampling amplification the accountant assumes, and a known noise seed lets it
subtract the noise. ``secret_generator`` draws a seed from the operating system; tests pass seeded
generators to be repeatable.

Not covered by the guarantee: anything computed from the data outside these steps (the preflight
statistics, which disclosure control protects instead, the logit-adjustment offsets built from
the site's class counts already released there, evaluation metrics, and the training loss this
trainer logs, which must stay at the site or be dropped from what a DP round sends).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from client.local.ledger import PrivacyLedger
from client.local.train import EpochLog, make_optimizer, resolve_device
from client.site.collate import collate_patients
from smm_model.config import ConfigError, ExperimentConfig, PrivacyConfig
from smm_model.objectives.coordination import coordinate_private
from smm_model.objectives.losses import per_patient_loss

__all__ = ["REFUSED_STRATEGIES", "DPRecord", "check_dp_config", "check_dp_model", "plan_steps", "calibrate_noise",
           "secret_generator", "poisson_batches", "per_sample_gradients", "dp_train_steps"]

log = logging.getLogger(__name__)

#: Strategies whose client side sends un-noised gradient statistics (SCAFFOLD's control variate).
REFUSED_STRATEGIES = ("scaffold",)
#: Bits of operating-system entropy in a secret generator's seed (torch seeds are 64-bit).
_SEED_BITS = 63


@dataclass
class DPRecord:
    """What one call of ``dp_train_steps`` spent: the mechanism and what the round reports.

    ``steps`` counts every step, empty draws included (each is accounted); ``examples`` the
    patient passes; ``epsilon`` the site's epsilon(delta) over its whole ledger after this call
    (None when no ledger was given).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    empty_draws: int
    expected_batch_size: float
    examples: int
    delta: float
    accountant: str
    epsilon: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# --------------------------------------------------------------------------------------------- #
# configuration
# --------------------------------------------------------------------------------------------- #
def check_dp_config(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Refuse settings DP-SGD cannot honour (ConfigError naming the field); return notes on what
    DP turns off, for the site's log. Nothing to check (and no note) when ``privacy.dp`` is off."""
    if not cfg.privacy.dp:
        return ()
    if cfg.federation.strategy in REFUSED_STRATEGIES:
        raise ConfigError(f"federation.strategy: {cfg.federation.strategy!r} cannot run with privacy.dp: its control "
                          "variate is the mean of the site's un-noised gradients and would leave the site without "
                          "privacy; use fedavg, fedprox or a server optimizer")
    notes = []
    if cfg.train.coordination != "off":
        notes.append(f"train.coordination {cfg.train.coordination!r} runs symmetric on the privatized gradient "
                     "under privacy.dp (no confidence: that would read un-noised outputs)")
    if cfg.loss.consistency_weight > 0 and cfg.model.arch == "smm":
        notes.append("loss.consistency_weight: the consistency terms are dropped under privacy.dp (they are "
                     "constant on one patient)")
    return tuple(notes)


def check_dp_model(model: nn.Module) -> None:
    """Refuse a model DP-SGD cannot train per patient: BatchNorm layers, or nothing to train."""
    bn = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ConfigError(f"model.arch: the model has BatchNorm layer(s) {bn[:3]}; its batch statistics couple "
                          "patients and its running statistics are not privatized, so privacy.dp cannot train it")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("model.arch: the model has no trainable parameter for privacy.dp to train")


def plan_steps(cfg: ExperimentConfig, n_train: int, *, local_steps: int = 0,
               local_epochs: int = 1) -> tuple[float, int]:
    """(sample rate q, steps) of a DP round at a site with ``n_train`` training patients.

    q = min(1, train.batch_size / n_train), so the expected batch is the configured batch size;
    ``local_steps > 0`` steps per round, else ``local_epochs`` expected passes, ceil(n / batch) steps each.
    """
    if n_train < 1:
        raise ValueError(f"privacy.dp: a site needs training patients, got {n_train}")
    bs = cfg.train.batch_size
    q = min(1.0, bs / n_train)
    steps = int(local_steps) if local_steps > 0 else int(local_epochs) * math.ceil(n_train / bs)
    if steps < 1:
        raise ValueError(f"federation.local_epochs: must be >= 1 under privacy.dp, got {local_epochs}")
    return q, steps


def calibrate_noise(privacy: PrivacyConfig, sample_rate: float, steps_per_round: int, rounds: int) -> float:
    """The noise multiplier sigma of a DP run: ``privacy.dp_noise_multiplier`` when set, else the
    smallest sigma (Opacus ``get_noise_multiplier``, the configured accountant) whose epsilon at
    ``privacy.dp_delta`` over ``rounds`` rounds of ``steps_per_round`` steps at ``sample_rate`` is at
    most ``privacy.dp_target_epsilon``. Calibrating over all planned rounds (a site that sits out
    a round spends less) leaves the site's budget to ``PrivacyLedger.reserve`` to enforce."""
    if privacy.dp_noise_multiplier is not None:
        return float(privacy.dp_noise_multiplier)
    if privacy.dp_target_epsilon is None:
        raise ConfigError("privacy.dp_noise_multiplier: with privacy.dp on, set it or privacy.dp_target_epsilon")
    if steps_per_round < 1 or rounds < 1:
        raise ValueError(f"calibrate_noise: need steps_per_round and rounds >= 1, got {steps_per_round}, {rounds}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"calibrate_noise: sample_rate must be in (0, 1], got {sample_rate}")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=privacy.dp_target_epsilon, target_delta=privacy.dp_delta,
                                          sample_rate=sample_rate, steps=steps_per_round * rounds,
                                          accountant=privacy.dp_accountant))
    except ValueError as e:  # Opacus: "The privacy budget is too low."
        raise ConfigError(f"privacy.dp_target_epsilon: {privacy.dp_target_epsilon} is out of reach for "
                          f"{rounds} x {steps_per_round} steps at sample rate {sample_rate:.4g} ({e})") from None


# --------------------------------------------------------------------------------------------- #
# sampling
# --------------------------------------------------------------------------------------------- #
def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's entropy (nobody else can know the seed)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(_SEED_BITS))


def poisson_batches(n: int, steps: int, sample_rate: float, generator: torch.Generator) -> list[list[int]]:
    """``steps`` Poisson draws over ``range(n)``: each index joins each draw independently with
    probability ``sample_rate`` (so a draw may be empty). Deterministic given the generator."""
    if n < 1 or steps < 1 or not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"poisson_batches: need n, steps >= 1 and sample_rate in (0, 1], got {n}, {steps}, "
                         f"{sample_rate}")
    draws = torch.rand(steps, n, generator=generator) < sample_rate  # (steps, n) bool
    return [torch.nonzero(row).flatten().tolist() for row in draws]


# --------------------------------------------------------------------------------------------- #
# per-patient gradients
# --------------------------------------------------------------------------------------------- #
def per_sample_gradients(model: nn.Module, items: Sequence[Mapping[str, Any]], cfg: ExperimentConfig,
                         params: Sequence[nn.Parameter], *, device: torch.device,
                         class_weights: Mapping[str, Tensor] | None = None,
                         logit_offsets: Mapping[str, Tensor] | None = None
                         ) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
    """Each patient's gradient of its own ``per_patient_loss``, by one forward/backward pass per patient.

    Returns per parameter a (B, *p.shape) tensor (zeros where a parameter does not reach a
    patient's loss), the (B,) losses and the (B,) per-task terms, detached. Exact for any layer
    (custom autograd functions included) since each pass is an ordinary single-patient backward.
    """
    B = len(items)
    grads = [torch.zeros((B, *p.shape), dtype=p.dtype, device=p.device) for p in params]  # per param (B, *p.shape)
    losses = torch.zeros(B, device=device)  # (B,)
    parts: dict[str, Tensor] = {}
    for i, item in enumerate(items):
        batch = collate_patients([item]).to(device)  # a batch of one: no padding, no other patient
        loss, terms = per_patient_loss(model(batch), batch, cfg.loss, class_weights, logit_offsets)  # (1,), {t: (1,)}
        if not bool(torch.isfinite(loss).all()):
            raise FloatingPointError(f"non-finite per-patient training loss {float(loss[0])} "
                                     f"(parts: { {k: float(v[0]) for k, v in terms.items()} })")
        g = torch.autograd.grad(loss[0], list(params), allow_unused=True)
        for buf, gi in zip(grads, g):
            if gi is not None:
                buf[i] = gi
        losses[i] = loss[0].detach()
        for k, v in terms.items():
            parts.setdefault(k, torch.zeros(B, device=device))[i] = v[0].detach()
    return grads, losses, parts


# --------------------------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------------------------- #
def dp_train_steps(model: nn.Module, dataset: Sequence[Mapping[str, Any]], cfg: ExperimentConfig, *,
                   steps: int, sample_rate: float, noise_multiplier: float,
                   generator: torch.Generator, device: torch.device | None = None,
                   optimizer: torch.optim.Optimizer | None = None,
                   class_weights: Mapping[str, Tensor] | None = None,
                   logit_offsets: Mapping[str, Tensor] | None = None,
                   global_params: list[Tensor] | None = None,
                   noise_generator: torch.Generator | None = None,
                   ledger: PrivacyLedger | None = None, run: str = "", server_round: int = 0
                   ) -> tuple[list[EpochLog], DPRecord]:
    """Train ``model`` in place for ``steps`` DP-SGD steps; return ``[EpochLog]`` (one log for the
    call, as ``train_epochs`` returns one per epoch) and the ``DPRecord``.

    ``dataset`` holds patient items (``collate_patients``' dict form; a ``SiteDataset``), drawn
    with ``poisson_batches(len(dataset), steps, sample_rate, generator)``. The clip is
    ``privacy.dp_max_grad_norm`` C; the noised sum is divided by ``sample_rate * len(dataset)``.
    ``optimizer`` (default ``make_optimizer(model, cfg.train)``) is wrapped in Opacus's
    ``DPOptimizer`` for these steps only; its own state (Adam's moments, from noised gradients)
    stays the caller's to keep. The learning rate is whatever it holds (no schedule here).
    ``global_params`` with ``train.proximal_mu > 0`` add FedProx's gradient after the noise;
    ``logit_offsets`` and ``class_weights`` enter ``per_patient_loss``. ``noise_generator``
    defaults to ``secret_generator``; ``generator`` must be secret too outside tests (module
    docstring). ``ledger``: the round's steps are reserved there BEFORE the first step (raises
    ``BudgetExceeded`` with nothing trained), and the record gets the site's epsilon after them.
    """
    check_dp_model(model)
    for note in check_dp_config(cfg):
        log.info("privacy.dp: %s", note)
    pc, tc = cfg.privacy, cfg.train
    n = len(dataset)
    if n < 1:
        raise ValueError("dp_train_steps: the dataset has no patient")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"privacy.dp_noise_multiplier: must be a finite number >= 0, got {noise_multiplier}")
    batches = poisson_batches(n, steps, sample_rate, generator)  # validates steps and sample_rate
    device = device or resolve_device(tc.device)
    model.to(device)
    optimizer = optimizer or make_optimizer(model, tc)
    weights = {k: v.to(device) for k, v in (class_weights or {}).items()}
    offsets = {k: v.to(device) for k, v in (logit_offsets or {}).items()}
    prox = tc.proximal_mu > 0 and global_params is not None
    anchor_of: dict[int, Tensor] = {}
    if prox:
        model_params = list(model.parameters())
        if len(global_params) != len(model_params):
            raise ValueError(f"global_params: {len(global_params)} tensors for a model with {len(model_params)} "
                             "parameters")
        anchor_of = {id(p): g.detach().to(device) for p, g in zip(model_params, global_params)}
    if ledger is not None:  # reserve before train: a crash from here on still counts these steps
        ledger.reserve(run, server_round, float(noise_multiplier), float(sample_rate), int(steps), pc.dp_delta,
                       pc.dp_epsilon_budget)

    from opacus.optimizers import DPOptimizer

    expected = sample_rate * n
    dp_opt = DPOptimizer(optimizer, noise_multiplier=float(noise_multiplier), max_grad_norm=pc.dp_max_grad_norm,
                         expected_batch_size=expected, loss_reduction="mean",
                         generator=noise_generator if noise_generator is not None else secret_generator(device))
    params = dp_opt.params  # the trainable parameters the optimizer holds

    heads = model.split_heads() if tc.coordination != "off" and hasattr(model, "split_heads") else {}
    coord: dict[str, dict[str, int]] = {}

    @torch.no_grad()
    def after_noise(_opt: DPOptimizer) -> None:
        """Post-processing of the privatized gradient: coordination, FedProx's term, the global clip."""
        for task, rec in coordinate_private(heads, tc.coordination).items():
            acc = coord.setdefault(task, {})
            for k, v in rec.items():
                acc[k] = acc.get(k, 0) + v
        if prox:
            for p in params:
                p.grad.add_(p.detach() - anchor_of[id(p)], alpha=tc.proximal_mu)  # d/dw (mu/2)||w - w_g||^2
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, tc.grad_clip)

    dp_opt.attach_step_hook(after_noise)

    model.train()
    t0 = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    loss_sum, examples, empty = 0.0, 0, 0
    parts_sum: dict[str, float] = {}
    try:
        for idx in batches:
            dp_opt.zero_grad(set_to_none=True)
            if idx:
                items = [dataset[i] for i in idx]
                grads, losses, parts = per_sample_gradients(model, items, cfg, params, device=device,
                                                            class_weights=weights, logit_offsets=offsets)
                loss_sum += float(losses.sum())
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v.sum())
                examples += len(idx)
            else:  # an empty draw: a noise-only step, accounted like the others
                grads = [p.new_zeros((0, *p.shape)) for p in params]  # per param (0, *p.shape)
                empty += 1
            for p, g in zip(params, grads):
                p.grad_sample = g
            dp_opt.step()
    finally:
        dp_opt.zero_grad(set_to_none=True)
        for p in params:  # leave plain parameters behind (the optimizer may be reused without DP)
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
    mean = (lambda s: s / examples) if examples else (lambda s: math.nan)
    epoch_log = EpochLog(epoch=1, lr=lr, loss=mean(loss_sum), parts={k: mean(v) for k, v in parts_sum.items()},
                         coordination=coord, examples=examples, steps=len(batches), seconds=time.perf_counter() - t0)
    record = DPRecord(noise_multiplier=float(noise_multiplier), max_grad_norm=float(pc.dp_max_grad_norm),
                      sample_rate=float(sample_rate), steps=len(batches), empty_draws=empty,
                      expected_batch_size=float(expected), examples=examples, delta=float(pc.dp_delta),
                      accountant=ledger.accountant if ledger is not None else pc.dp_accountant,
                      epsilon=ledger.epsilon(pc.dp_delta) if ledger is not None else None)
    return [epoch_log], record
