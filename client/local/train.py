"""The local trainer: plain PyTorch, no Flower.

One function trains any ``smm_model`` model for some epochs on a data loader: multi-task loss,
gradient coordination after ``backward`` and before the optimiser step, optional FedProx term,
cosine learning-rate schedule. The centralized baseline, local-only runs and the Flower ClientApp
all call it, so they differ only in the data they hand it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, is_dataclass

import numpy as np
import torch
from torch import Tensor, nn

from smm_model.nn.batch import Batch
from smm_model.config import ExperimentConfig, TrainConfig
from smm_model.objectives.coordination import coordinate_gradients
from smm_model.objectives.losses import multitask_loss
from smm_model.metrics.exact import MetricReport, classification_report, risk_from_hazard_logits, survival_report

__all__ = ["resolve_device", "autocast_dtype", "forward", "make_optimizer", "make_scheduler", "step_batches", "optimizer_state_arrays",
           "load_optimizer_state", "EpochLog", "train_epochs", "Predictions", "predict", "evaluate"]


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` takes the GPU when one is present, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {spec!r} but no CUDA device is available")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward pass for ``train.precision`` on ``device`` (None = fp32).

    ``auto`` takes bf16 on a CUDA device that supports it (Ampere and later: no loss scaling is
    needed, its exponent range is fp32's) and fp32 elsewhere, so a CPU run is bit-for-bit what it was;
    ``bf16`` forces it on any device (a CPU supports bf16 autocast too, slowly: for tests).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def forward(model: nn.Module, batch: Batch, dtype: torch.dtype | None):
    """``model(batch)`` under autocast to ``dtype`` (None: plain fp32), every output tensor back in fp32.

    Why the cast back: the losses (survival NLL, consistency over sampled positions), gradient
    coordination's cosines and the metrics then run in fp32 whatever the forward used; only the
    matrix products and convolutions, where bf16 is safe and fast, run in the lower precision.
    """
    if dtype is None:
        return model(batch)
    with torch.autocast(device_type=batch.patches.device.type, dtype=dtype):
        out = model(batch)
    return _to_float(out)


def _to_float(x):
    if isinstance(x, Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_float(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_to_float(v) for v in x)
    if is_dataclass(x):
        return type(x)(**{f.name: _to_float(getattr(x, f.name)) for f in fields(x)})
    return x


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """Adam with coupled L2 (the reference), AdamW with decoupled weight decay, or SGD with momentum.

    Why SGD is offered: Adam scales every step to about ``lr`` whatever the gradient's size, so in a
    federation a site whose loss is nearly satisfied (logit adjustment's point at a skewed site)
    still moves the shared weights as far as any other; SGD's steps keep the gradients' sizes, which
    is what the averaging of the sites' updates assumes.
    """
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int | None = None):
    """Cosine annealing over the epochs, stepped once per epoch (as the reference)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs or cfg.epochs,
                                                      eta_min=cfg.min_lr)


def step_batches(n: int, steps: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """``steps`` batches of ``batch_size`` indices into ``range(n)``, from reshuffled passes.

    Why: local work counted in optimizer steps is the same at every site, whatever its size (epochs
    give a 20-patient site one step per round and a 200-patient site ten). Indices run through one
    random permutation after another, so every patient is seen before any is seen again; a batch
    that spans the end of one pass and the start of the next can hold a patient twice, and a site
    with fewer patients than one batch repeats patients in every batch (sampling with replacement).
    """
    if n < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"step_batches: need n, steps and batch_size >= 1, got {n}, {steps}, {batch_size}")
    need = steps * batch_size
    order: list[int] = []
    while len(order) < need:
        order.extend(torch.randperm(n, generator=generator).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def optimizer_state_arrays(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimizer's per-parameter state (Adam's step count and moments) as a flat
    ``"<param index>.<name>" -> tensor`` mapping on the CPU: what a site keeps between rounds
    (Flower's ``Context.state``; it never leaves the site). Hyper-parameters are not kept: every
    round sets them from the run's config and the server's learning rate."""
    out: dict[str, Tensor] = {}
    for idx, st in optimizer.state_dict()["state"].items():
        for name, v in st.items():
            out[f"{idx}.{name}"] = torch.as_tensor(v).detach().cpu().clone()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, arrays: Mapping[str, Tensor]) -> None:
    """Put ``optimizer_state_arrays`` back into a freshly built optimizer of the same model; a state
    of another shape (another model) raises ValueError."""
    current = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in current["param_groups"])
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in arrays.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or not name or int(idx) >= n_params:
            raise ValueError(f"optimizer state: unexpected entry {key!r} for a model with {n_params} parameters")
        state.setdefault(int(idx), {})[name] = v.detach().clone()  # the optimizer steps its state in place
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, st in state.items():
        for name, v in st.items():
            if v.ndim > 0 and v.shape != params[idx].shape:
                raise ValueError(f"optimizer state: {idx}.{name} has shape {tuple(v.shape)}, the parameter "
                                 f"{tuple(params[idx].shape)}")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


@dataclass
class EpochLog:
    """What one epoch did: mean losses, coordination counts, examples seen, time."""

    epoch: int
    lr: float
    loss: float
    parts: dict[str, float]
    coordination: dict[str, dict[str, int]]
    examples: int
    steps: int
    seconds: float
    val: dict[str, dict] | None = None
    precision: str = "fp32"  # the forward pass's precision (train.precision resolved on the device)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _proximal(model: nn.Module, global_params: list[Tensor]) -> Tensor:
    """FedProx: (1/2) sum ||w - w_global||^2 (the caller multiplies by mu)."""
    return 0.5 * sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))


def train_epochs(model: nn.Module, loader: Iterable[Batch], cfg: ExperimentConfig, *,
                 epochs: int | None = None, device: torch.device | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                 class_weights: Mapping[str, Tensor] | None = None,
                 global_params: list[Tensor] | None = None,
                 logit_offsets: Mapping[str, Tensor] | None = None,
                 grad_correction: Mapping[str, Tensor] | None = None,
                 grad_mean: dict[str, Tensor] | None = None,
                 val_loader: Iterable[Batch] | None = None, progress: bool = False) -> list[EpochLog]:
    """Train ``model`` in place and return one ``EpochLog`` per epoch.

    ``optimizer``/``scheduler`` default to ``make_optimizer``/``make_scheduler`` from ``cfg.train``;
    pass them to keep their state across calls (a site across federated rounds).
    ``global_params`` with ``cfg.train.proximal_mu > 0`` adds the FedProx term.
    ``logit_offsets`` (task -> (C,)) enter the classification losses only (logit adjustment).
    ``grad_correction`` (parameter name -> tensor) is added to every step's gradient, after gradient
    coordination and before clipping (SCAFFOLD's c - c_i); ``grad_mean``, an empty dict when given,
    receives the mean over all steps of the gradients before that correction (the site's new
    SCAFFOLD control variate). ``val_loader``, when given, is evaluated after each epoch.
    """
    tc = cfg.train
    epochs = epochs or tc.epochs
    device = device or resolve_device(tc.device)
    model.to(device)
    optimizer = optimizer or make_optimizer(model, tc)
    scheduler = scheduler if scheduler is not None else make_scheduler(optimizer, tc, epochs)
    weights = {k: v.to(device) for k, v in (class_weights or {}).items()}
    offsets = {k: v.to(device) for k, v in (logit_offsets or {}).items()}
    prox = tc.proximal_mu > 0 and global_params is not None
    if prox:
        global_params = [g.detach().to(device) for g in global_params]
    heads = model.split_heads() if tc.coordination != "off" else {}
    named = dict(model.named_parameters())
    correction = {k: v.to(device) for k, v in (grad_correction or {}).items()}
    if set(correction) - set(named):
        raise ValueError(f"grad_correction names {len(set(correction) - set(named))} tensors the model does not have")
    sums = {k: torch.zeros_like(p) for k, p in named.items()} if grad_mean is not None else None
    amp = autocast_dtype(tc.precision, device)
    total_steps = 0
    logs: list[EpochLog] = []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        tot, n_ex, steps = 0.0, 0, 0
        parts_sum: dict[str, float] = {}
        coord: dict[str, dict[str, int]] = {}
        it = loader
        if progress:
            from tqdm import tqdm
            it = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for batch in it:
            batch = batch.to(device)
            out = forward(model, batch, amp)
            loss, parts = multitask_loss(out, batch, cfg.loss, weights, offsets)
            if prox:
                loss = loss + tc.proximal_mu * _proximal(model, global_params)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {float(loss)} at epoch {epoch + 1}, "
                                         f"step {steps + 1} (parts: {parts})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if heads and out.subspaces is not None:
                for task, rec in coordinate_gradients(heads, out.subspaces, batch, tc.coordination).items():
                    acc = coord.setdefault(task, {})
                    for k, v in rec.items():
                        acc[k] = acc.get(k, 0) + v
            if sums is not None:
                for k, p in named.items():
                    if p.grad is not None:
                        sums[k] += p.grad
            for k, c in correction.items():
                p = named[k]
                p.grad = c.clone() if p.grad is None else p.grad + c
            if tc.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            total_steps += 1
            b = batch.size
            tot += float(loss.detach()) * b
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * b
            n_ex += b
            steps += 1
        if steps == 0:
            raise ValueError("train_epochs: the data loader yielded no batch (too few training "
                             "patients for the batch size with drop_last?)")
        scheduler.step()
        log = EpochLog(epoch=epoch + 1, lr=lr, loss=tot / n_ex, parts={k: v / n_ex for k, v in parts_sum.items()},
                       coordination=coord, examples=n_ex, steps=steps, seconds=time.perf_counter() - t0,
                       precision="fp32" if amp is None else str(amp).removeprefix("torch."))
        if val_loader is not None:
            log.val = {t: r.to_dict() for t, r in evaluate(model, val_loader, device, amp).items()}
        logs.append(log)
    if sums is not None and grad_mean is not None:
        grad_mean.update({k: (v / max(total_steps, 1)).detach().cpu() for k, v in sums.items()})
    return logs


@dataclass
class Predictions:
    """Per-task outputs and labels over a whole loader (numpy), labelled samples only."""

    probs: dict[str, np.ndarray] = field(default_factory=dict)  # classification: (N, C) softmax
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    risk: np.ndarray | None = None  # survival: (N,) higher = shorter survival
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    loss: float = math.nan


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Batch], device: torch.device | None = None,
            amp: torch.dtype | None = None) -> Predictions:
    """Run the model in eval mode over ``loader`` (forward under autocast to ``amp`` when given);
    keeps only samples labelled for each task."""
    device = device or next(model.parameters()).device
    model.eval()
    probs: dict[str, list] = {}
    targets: dict[str, list] = {}
    surv: dict[str, list] = {"risk": [], "time": [], "event": []}
    for batch in loader:
        batch = batch.to(device)
        out = forward(model, batch, amp)
        for task, logits in out.logits.items():
            m = batch.task_mask(task)
            if task == "survival":
                surv["risk"].append(risk_from_hazard_logits(logits[m]))
                surv["time"].append(batch.labels["survival_time"][m].cpu().numpy())
                surv["event"].append(batch.labels["event"][m].cpu().numpy())
            else:
                probs.setdefault(task, []).append(torch.softmax(logits[m], dim=1).cpu().numpy())
                targets.setdefault(task, []).append(batch.labels[task][m].cpu().numpy())
    pred = Predictions(probs={t: np.concatenate(v) for t, v in probs.items()},
                       targets={t: np.concatenate(v) for t, v in targets.items()})
    if surv["risk"]:
        pred.risk, pred.time, pred.event = (np.concatenate(surv[k]) for k in ("risk", "time", "event"))
    return pred


def evaluate(model: nn.Module, loader: Iterable[Batch], device: torch.device | None = None,
             amp: torch.dtype | None = None) -> dict[str, MetricReport]:
    """Metrics per task (classification report; C-index for survival) on ``loader``."""
    pred = predict(model, loader, device, amp)
    reports = {t: classification_report(pred.targets[t], p, p.shape[1]) for t, p in pred.probs.items()}
    if pred.risk is not None:
        reports["survival"] = (survival_report(pred.time, pred.event, pred.risk) if len(pred.risk)
                               else MetricReport({"c_index": math.nan}, {"c_index": "no labelled samples"}))
    return reports
