"""Confidence-guided gradient coordination on the split task heads (method.md Part B, section 4).

After ``backward`` and before the optimiser step, for each task head W = [W_t | W_e] (C, 2H):

1. partial logits per subspace, ``out_s = f_s W_s^T + b/2`` on this batch;
2. a confidence per subspace: the summed true-class probability (classification), or the batch
   C-index of the partial survival risk (survival; no comparable pair -> skip this head);
3. the less confident subspace's gradient row is changed wherever it conflicts (cosine < 0) with
   the other's, for every class row at once:
   - ``pcgrad`` (default, the paper's text): project onto the normal plane of the other row,
     ``x - p`` with ``p = (x.y / |y|^2) y``;
   - ``seed`` (the reference code): ``|x - p| (x - 2p) / |x - 2p|``, a reflection with the PCGrad norm;
   - ``off``: nothing.

It decides from the local batch only and touches only ``weight.grad`` of the heads it is given, so it
works the same on one device, under DDP and inside a federated client, with no ``model.module``.

Under patient-level DP (``privacy.dp``), ``coordinate_private`` runs instead, on the privatized
(clipped, summed, noised) gradient: the confidences of step 2 read the batch's un-noised outputs
and labels, so that rule cannot be used; the symmetric rule (both halves give way where their rows
conflict, each changed against the other's original row) reads only the noised gradient, so it
and its counts are post-processing of the DP release and cost no privacy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from smm_model.nn.batch import Batch
from smm_model.nn.layers import SplitHead

__all__ = ["project_conflicting", "batch_c_index", "coordinate_gradients", "coordinate_private"]

_EPS = 1e-12


def project_conflicting(x: Tensor, y: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Change rows of ``x`` (C, H) that conflict with the rows of ``y`` (C, H).

    Returns the new x and a (C,) bool of the rows changed. A row conflicts when x.y < 0
    (cosine < 0); rows with a zero vector never conflict.
    """
    dot = (x * y).sum(dim=1, keepdim=True)  # (C, 1)
    conflict = dot.squeeze(1) < 0
    if mode == "off" or not bool(conflict.any()):
        return x, torch.zeros_like(conflict)
    p = dot / (y * y).sum(dim=1, keepdim=True).clamp_min(_EPS) * y  # (C, H) projection of x on y
    if mode == "pcgrad":
        new = x - p
    elif mode == "seed":
        d = x - 2 * p
        new = (x - p).norm(dim=1, keepdim=True) * d / d.norm(dim=1, keepdim=True).clamp_min(_EPS)
    else:
        raise ValueError(f"unknown coordination mode {mode!r}; expected pcgrad, seed or off")
    return torch.where(conflict.unsqueeze(1), new, x), conflict


def batch_c_index(time: Tensor, event: Tensor, risk: Tensor) -> Tensor | None:
    """Harrell's C on a small batch (N x N pairs); None when no pair is comparable.

    A pair (i, j) is comparable when t_i < t_j and i had the event; it is concordant when
    risk_i > risk_j, half when tied.
    """
    t, e, r = time.reshape(-1, 1), event.reshape(-1, 1).bool(), risk.reshape(-1, 1)
    comparable = (t < t.T) & e  # (N, N)
    n = comparable.sum()
    if n == 0:
        return None
    score = (r > r.T).to(risk.dtype) + 0.5 * (r == r.T).to(risk.dtype)
    return (score * comparable).sum() / n


def _confidence(task: str, out: Tensor, batch: Batch, mask: Tensor) -> Tensor | None:
    if task == "survival":
        risk = -torch.cumprod(1 - torch.sigmoid(out[mask]), dim=1).sum(dim=1)
        return batch_c_index(batch.labels["survival_time"][mask], batch.labels["event"][mask], risk)
    y = batch.labels[task][mask].long()
    return torch.softmax(out[mask], dim=1).gather(1, y.unsqueeze(1)).sum()


@torch.no_grad()
def coordinate_gradients(heads: Mapping[str, SplitHead], subspaces: tuple[Tensor, Tensor],
                         batch: Batch, mode: str = "pcgrad") -> dict[str, dict[str, int]]:
    """Apply coordination in place to each head's ``weight.grad``; report what was done.

    ``subspaces`` are the (B, H) tumour and microenvironment vectors the heads read on this batch.
    Returns, per task: ``conflicts`` (rows with cosine < 0), ``tumour`` and ``micro`` (rows
    changed in that half; one of them is 0) and ``skipped`` (1 when the batch could not decide).
    """
    stats: dict[str, dict[str, int]] = {}
    f_t, f_e = (s.detach() for s in subspaces)
    for task, head in heads.items():
        rec = {"conflicts": 0, "tumour": 0, "micro": 0, "skipped": 0}
        stats[task] = rec
        grad = head.weight.grad
        mask = batch.task_mask(task)
        if mode == "off" or grad is None or not bool(mask.any()):
            rec["skipped"] = int(mode != "off")
            continue
        H = head.half
        W, b = head.weight, head.bias
        half_b = b / 2 if b is not None else 0.0
        out_t = f_t @ W[:, :H].T + half_b  # (B, C)
        out_e = f_e @ W[:, H:].T + half_b
        s_t, s_e = _confidence(task, out_t, batch, mask), _confidence(task, out_e, batch, mask)
        g_t, g_e = grad[:, :H], grad[:, H:]
        rec["conflicts"] = int(((g_t * g_e).sum(dim=1) < 0).sum())
        if s_t is None or s_e is None:
            rec["skipped"] = 1
            continue
        if s_t < s_e:  # tumour less confident: its rows give way
            new, changed = project_conflicting(g_t, g_e, mode)
            grad[:, :H] = new
            rec["tumour"] = int(changed.sum())
        elif s_e < s_t:
            new, changed = project_conflicting(g_e, g_t, mode)
            grad[:, H:] = new
            rec["micro"] = int(changed.sum())
    return stats


@torch.no_grad()
def coordinate_private(heads: Mapping[str, SplitHead], mode: str = "pcgrad") -> dict[str, dict[str, int]]:
    """Symmetric coordination in place on each head's (privatized) ``weight.grad``; no data is read.

    For every class row where the tumour and microenvironment halves conflict (cosine < 0), each
    half is changed against the other's original row with ``project_conflicting`` (``pcgrad``:
    both projected onto the other's normal plane; ``seed``: both reflected). Returns per task the
    same counts as ``coordinate_gradients``: ``conflicts``, ``tumour`` and ``micro`` (rows changed
    in each half; here both equal ``conflicts``) and ``skipped`` (1 without a gradient).
    """
    stats: dict[str, dict[str, int]] = {}
    for task, head in heads.items():
        rec = {"conflicts": 0, "tumour": 0, "micro": 0, "skipped": 0}
        stats[task] = rec
        grad = head.weight.grad
        if mode == "off" or grad is None:
            rec["skipped"] = int(mode != "off")
            continue
        H = head.half
        g_t, g_e = grad[:, :H].clone(), grad[:, H:].clone()  # (C, H) each, the originals
        rec["conflicts"] = int(((g_t * g_e).sum(dim=1) < 0).sum())
        new_t, changed_t = project_conflicting(g_t, g_e, mode)
        new_e, changed_e = project_conflicting(g_e, g_t, mode)
        grad[:, :H], grad[:, H:] = new_t, new_e
        rec["tumour"], rec["micro"] = int(changed_t.sum()), int(changed_e.sum())
    return stats
