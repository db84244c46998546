"""Losses: class-weighted cross-entropy, discrete-time NLL survival, gene-guided consistency.

Every task loss takes a per-sample label mask: a patient whose label for a task is unknown is left
out of that task's loss only (and a batch with no labelled sample contributes an exact zero that
still keeps the graph connected).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from smm_model.nn.batch import Batch
from smm_model.config import LossConfig
from smm_model.nn.model import ModelOutput

__all__ = ["logit_adjustment_offsets", "weighted_cross_entropy", "nll_survival_loss", "nll_survival_terms",
           "relation_map", "consistency_loss", "multitask_loss", "per_patient_loss"]


def _zero(like: Tensor) -> Tensor:
    return like.sum() * 0.0


def weighted_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor | None = None,
                           weight: Tensor | None = None) -> Tensor:
    """Class-weighted CE over the labelled samples (torch's weighted mean: sum w_y l / sum w_y)."""
    if mask is not None:
        if not bool(mask.any()):
            return _zero(logits)
        logits, target = logits[mask], target[mask]
    return F.cross_entropy(logits, target.long(), weight=weight)


def nll_survival_loss(logits: Tensor, bins: Tensor, event: Tensor, mask: Tensor | None = None,
                      alpha: float = 0.0) -> Tensor:
    """Discrete-time negative log-likelihood with censoring (the MCAT/PORPOISE ``nll_loss``).

    logits (B, T) hazard logits, h_k = sigmoid(logit_k), S_k = prod_{j<=k} (1 - h_j), S_{-1} = 1.
    For a patient in bin y: an observed death contributes -log S_{y-1} - log h_y (survived the
    earlier bins, died in y); a censored one contributes -log S_y (survived bin y). ``alpha``
    adds weight to the uncensored term: (1 - alpha) * total + alpha * uncensored. Computed in log
    space (logsigmoid) rather than by clamping probabilities, so it stays finite and exact.
    """
    if mask is not None:
        if not bool(mask.any()):
            return _zero(logits)
        logits, bins, event = logits[mask], bins[mask], event[mask]
    return nll_survival_terms(logits, bins, event, alpha).mean()


def nll_survival_terms(logits: Tensor, bins: Tensor, event: Tensor, alpha: float = 0.0) -> Tensor:
    """The (B,) per-patient terms of ``nll_survival_loss`` (no mask, no mean): logits (B, T),
    bins (B,), event (B,) -> (B,)."""
    y = bins.long().unsqueeze(1)  # (B, 1)
    e = event.to(logits.dtype)  # (B,) 1 = death observed
    log_h = F.logsigmoid(logits)  # (B, T)
    log_S = torch.cumsum(F.logsigmoid(-logits), dim=1)  # (B, T)
    log_S_pad = F.pad(log_S, (1, 0))  # (B, T+1); index k+1 is S_k, index 0 is S_{-1} = 1
    uncensored = -e * (log_S_pad.gather(1, y) + log_h.gather(1, y)).squeeze(1)
    censored = -(1 - e) * log_S_pad.gather(1, y + 1).squeeze(1)
    return (1 - alpha) * (uncensored + censored) + alpha * uncensored  # (B,)


def relation_map(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Batch relation map as in the reference: Gram matrix X X^T with each row divided by its L2
    norm. (N, F) -> (N, N); (..., N, F) -> (..., N, N)."""
    gram = x @ x.transpose(-1, -2)
    return gram / gram.norm(dim=-1, keepdim=True).clamp_min(eps)


def consistency_loss(gene: Tensor, grid: Tensor) -> Tensor:
    """Gene-guided consistency for one subspace: sum((S_g - S_v)^2) / N.

    gene (N, H) gene embeddings; grid (N, g, F) sampled key positions per offset group. S_v is the
    mean over offset groups of each group's sample-by-sample relation map (the intended grouping;
    the reference's ``view(groups, N, -1)`` mixed groups and samples). Nothing is detached: the
    relation structure of where each sample looks is pulled toward the relation structure of its
    genes, and the genes toward it.
    """
    n = gene.shape[0]
    s_g = relation_map(gene)  # (N, N)
    s_v = relation_map(grid.transpose(0, 1)).mean(dim=0)  # (g, N, F) -> (g, N, N) -> (N, N)
    return ((s_g - s_v) ** 2).sum() / n


def multitask_loss(out: ModelOutput, batch: Batch, cfg: LossConfig,
                   class_weights: Mapping[str, Tensor] | None = None,
                   logit_offsets: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the enabled tasks' losses plus the consistency terms (SMM only).

    ``logit_offsets``: per classification task a (C,) vector added to the logits inside the loss
    only (logit adjustment for a site's label skew, ``logit_adjustment_offsets``); predictions use
    the raw logits. Returns the total and its parts as floats for logging.
    """
    class_weights = class_weights or {}
    logit_offsets = logit_offsets or {}
    parts: dict[str, Tensor] = {}
    for task, logits in out.logits.items():
        mask = batch.task_mask(task)
        if task == "survival":
            parts[task] = nll_survival_loss(logits, batch.labels["survival_bin"], batch.labels["event"],
                                            mask, cfg.survival_alpha)
        else:
            if task in logit_offsets:
                logits = logits + logit_offsets[task]  # (B, C) + (C,)
            parts[task] = weighted_cross_entropy(logits, batch.labels[task], mask, class_weights.get(task))
    total = sum(cfg.task_weight(t) * v for t, v in parts.items())
    if out.genes is not None and out.grids is not None and cfg.consistency_weight > 0:
        # Only patients with both modalities have a grid (ModelOutput.grid_rows); a batch without
        # any has out.grids None and no consistency term.
        rows = out.grid_rows
        for name, gene, grid in zip(("consistency_tumour", "consistency_micro"), out.genes, out.grids):
            parts[name] = consistency_loss(gene if rows is None else gene[rows], grid)
            total = total + cfg.consistency_weight * parts[name]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def per_patient_loss(out: ModelOutput, batch: Batch, cfg: LossConfig,
                     class_weights: Mapping[str, Tensor] | None = None,
                     logit_offsets: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(B,) loss of each patient on its own, for patient-level DP-SGD (``client.local.dp``).

    Why not ``multitask_loss`` per row: DP-SGD clips each patient's gradient, so a patient's loss
    must not depend on who else is in the batch, and ``multitask_loss`` couples them three ways:
    the class-weighted cross-entropy divides by the batch's summed class weights (on a batch of one
    that weight cancels), each masked task mean divides by the batch's label count, and the
    consistency terms compare patients through batch relation maps. Here, for patient i,

        L_i = sum_t task_weight(t) * m_it * l_it

    where m_it is 1 when i is labelled for task t (else the term is an exact 0, not a smaller
    denominator), l_it = class_weight_t[y_it] * CE(logits_it + offset_t, y_it) for a classification
    task (the weight kept, not normalised away; no weights = 1) and the discrete-time survival NLL
    of i (``nll_survival_terms``, ``cfg.survival_alpha``) for survival. Logit offsets enter as in
    ``multitask_loss``. The DP trainer divides the sum over a step's patients by the expected batch
    size q * n (not by label counts), so against ``multitask_loss`` a task with missing labels
    weighs in proportion to its labelled share, and a weighted task by its mean class weight.

    No consistency term: on one patient each relation map is 1 x 1 (a row normalised by its own
    norm, 1 for any non-zero embedding), so the term is the constant 0 with zero gradient; across
    patients it is not a per-patient quantity. Returns the (B,) total and the (B,) per-task terms.
    """
    class_weights = class_weights or {}
    logit_offsets = logit_offsets or {}
    parts: dict[str, Tensor] = {}
    total: Tensor | None = None
    for task, logits in out.logits.items():
        mask = batch.task_mask(task)  # (B,) bool
        if task == "survival":
            term = nll_survival_terms(logits, batch.labels["survival_bin"], batch.labels["event"],
                                      cfg.survival_alpha)  # (B,)
        else:
            if task in logit_offsets:
                logits = logits + logit_offsets[task]  # (B, C) + (C,)
            target = batch.labels[task].long()  # (B,); 0 where unlabelled, masked below
            term = F.cross_entropy(logits, target, reduction="none")  # (B,)
            if task in class_weights:
                term = class_weights[task].to(term.dtype)[target] * term  # (B,)
        parts[task] = torch.where(mask, term, torch.zeros_like(term))  # (B,) an exact 0 where unlabelled
        weighted = cfg.task_weight(task) * parts[task]
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError("per_patient_loss: the model output has no task logits")
    return total, parts


def logit_adjustment_offsets(site_counts: Sequence[float], pooled_counts: Sequence[float], tau: float) -> Tensor:
    """(C,) offsets ``tau * (log prior_site - log prior_pooled)`` for one classification task.

    Why: a site whose case mix differs from the federation's (an all-GBM hospital) otherwise pulls
    the shared head towards its own prior. Training on logits + log prior_site models the site's
    posterior while the raw logits keep log p(x|y) + log prior_pooled, i.e. the pooled posterior,
    the same at every site (logit adjustment, Menon et al. 2021; its federated form, FedLC, Zhang
    et al. 2022). Both priors are add-one smoothed, so a class a site lacks gets a finite, strongly
    negative offset (the site's data then rarely push that class down) instead of -inf.
    """
    site = torch.as_tensor(site_counts, dtype=torch.float64)
    pooled = torch.as_tensor(pooled_counts, dtype=torch.float64)
    if site.ndim != 1 or site.shape != pooled.shape or bool((site < 0).any()) or bool((pooled < 0).any()):
        raise ValueError(f"logit adjustment: class counts must be two non-negative vectors of one length, got "
                         f"{tuple(site.shape)} and {tuple(pooled.shape)}")
    c = site.numel()
    p_site = (site + 1.0) / (site.sum() + c)
    p_pooled = (pooled + 1.0) / (pooled.sum() + c)
    return (tau * (p_site.log() - p_pooled.log())).float()
