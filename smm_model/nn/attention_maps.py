"""Where a model looked: per-patch attention weights (B, N), aligned with the batch's patches.

For the histology attention models of ``smm_model.nn.model``:

* ``abmil`` and ``concat``: the gated attention pooling's weights (``GatedAttentionPool``), one map
  named ``"abmil"``. They are a patch's share of the pooled bag vector, already over patches.
* ``smm``: one map per subspace (``"tumour"``, ``"micro"``), the attention probability mass each
  patch receives in that branch's deformable cross-attention, defined in three exact steps:

  1. **keys**: ``softmax(q k^T / sqrt(d) + position bias + tissue bias)`` (recomputed by
     ``GeneDeformableAttention.attention_probs`` from the tensors the forward uses; no dropout)
     summed over the heads and over the queries whose output reaches the subspace vector (every
     token in the seed layout, tissue tokens in the spatial one: the pooler averages those only),
     so each sampled key gets the attention mass all queries put on it;
  2. **cells**: a key is bilinear sampling of the G x G token map, ``key = sum_c s_c token_c``
     (with the spatial layout's tissue mask, normalised convolution: ``s_c = w_c m_c / sum w m``;
     without a mask, ``s_c = w_c``). A key's mass goes to the cells in the proportions ``s_c`` in
     which its features were made of them. ``grid_sample`` is linear in the map, so these shares
     are read off exactly by its adjoint (the gradient of the sampled values with respect to the
     map) rather than re-deriving bilinear weights by hand;
  3. **patches**: a spatial token is the mean of the ``n_c`` patches in its cell
     (``spatial_cell_index``), so each gets ``1 / n_c`` of the cell's mass; a seed token is one
     patch (``seed_token_index``), which gets all of it (summed when a small bag is tiled).

  Each map is then normalised to sum 1 over a slide's real patches. This is where the attention
  read from, not a gradient attribution: the residual stream and the pooler also carry every
  token. A uniform map means "no preference", not "nothing seen".

Every map is ``(B, N)`` float, padding exactly 0, each row summing to 1 over ``batch.patch_mask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smm_model.nn.batch import Batch
from smm_model.nn.layout import seed_token_index, spatial_cell_index
from smm_model.nn.model import ABMILModel, ConcatModel, SMMModel, SubspaceBranch

__all__ = ["SMM_MAPS", "ABMIL_MAPS", "map_names", "patch_attention"]

#: Map names per architecture, in the order ``patch_attention`` returns them.
SMM_MAPS = ("tumour", "micro")
ABMIL_MAPS = ("abmil",)
#: Floor of a key's tissue weight, as in ``GeneDeformableAttention`` (a key over no tissue reads nothing).
_TISSUE_EPS = 1e-6


def map_names(arch: str) -> tuple[str, ...]:
    """The attention maps a model of ``arch`` has; ValueError for one without patch attention."""
    if arch == "smm":
        return SMM_MAPS
    if arch in ("abmil", "concat"):
        return ABMIL_MAPS
    raise ValueError(f"model.arch {arch!r} has no attention over patches (expected smm, abmil or concat)")


@torch.no_grad()
def patch_attention(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """Per-patch attention of ``model`` on ``batch``: name -> (B, N), rows summing to 1, padding 0.

    The model is evaluated in eval mode (no dropout) and put back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, SMMModel):
            maps = _smm_maps(model, batch)
        elif isinstance(model, (ABMILModel, ConcatModel)):
            maps = {"abmil": model.encoder.attend(batch)[1]}  # (B, N) softmax over real patches
        else:
            raise ValueError(f"{type(model).__name__} has no attention over patches (expected SMMModel, "
                             "ABMILModel or ConcatModel)")
    finally:
        model.train(was_training)
    return {k: _normalise(v, batch.patch_mask) for k, v in maps.items()}


def _normalise(w: Tensor, mask: Tensor) -> Tensor:
    """(B, N) weights -> zero on padding, each row summing to 1 over its real patches."""
    w = torch.where(mask, w, torch.zeros_like(w))  # (B, N)
    return w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def _smm_maps(model: SMMModel, batch: Batch) -> dict[str, Tensor]:
    tokens, tmask = model.tokens(batch)  # (B, T, D), (B, T) or None
    genes = (model.gene_tumour(batch.genes_tumour), model.gene_micro(batch.genes_micro))  # (B, H) each
    branches = (model.branch_tumour, model.branch_micro)
    cells = {name: _cell_mass(branch, tokens, tmask, gene)
             for name, branch, gene in zip(SMM_MAPS, branches, genes)}  # name -> (B, T)
    return {name: _cells_to_patches(model, batch, c) for name, c in cells.items()}


def _cell_mass(branch: SubspaceBranch, tokens: Tensor, tmask: Tensor | None, gene: Tensor) -> Tensor:
    """Steps 1-2 of the module docstring for one branch: (B, T) attention mass per token cell."""
    attn = branch.attn
    _, xq, xkv, key_mask = branch.attention_inputs(tokens, tmask, gene)  # maps (B, H, G, G)
    probs, k_pos = attn.attention_probs(xq, xkv, key_mask)  # (B, h, T, K2), (B*g, K, K, 2)
    B, h, T, K2 = probs.shape
    g, G, K = attn.groups, branch.grid, attn.key_grid
    qw = tmask.to(probs.dtype) if tmask is not None else probs.new_ones(B, T)  # (B, T) queries that count
    key_mass = torch.einsum("bhqk,bq->bhk", probs, qw)  # (B, h, K2)
    key_mass = key_mass.reshape(B, g, h // g, K2).sum(dim=2)  # (B, g, K2): head i is group i // (h/g)
    if key_mask is not None:
        m = key_mask.to(probs.dtype)[:, None].expand(B, g, G, G).reshape(B * g, 1, G, G)
    else:
        m = probs.new_ones(B * g, 1, G, G)
    with torch.enable_grad():
        x = m.detach().clone().requires_grad_(True)  # (B*g, 1, G, G)
        # Exactly the forward's sampling (mode, padding, align_corners); linear in x, so its value
        # (here the tissue mask itself) only serves to also give each key's tissue weight.
        w = F.grid_sample(x, k_pos.detach(), mode="bilinear", padding_mode="zeros",
                          align_corners=False)  # (B*g, 1, K, K) sum_c w_c m_c per key
        coef = key_mass.reshape(B * g, 1, K, K)
        if key_mask is not None:
            coef = coef / w.detach().clamp_min(_TISSUE_EPS)  # normalised convolution: shares w_c m_c / sum w m
        (adjoint,) = torch.autograd.grad(w, x, grad_outputs=coef)  # (B*g, 1, G, G): sum_k coef_k w_ck
    cell = adjoint * m  # (B*g, 1, G, G) only tissue cells make up a key
    return cell.reshape(B, g, G * G).sum(dim=1)  # (B, T)


def _cells_to_patches(model: SMMModel, batch: Batch, cell_mass: Tensor) -> Tensor:
    """Step 3: (B, T) token mass -> (B, N) patch mass (padding 0)."""
    cfg = model.cfg
    mask = batch.patch_mask.to(torch.bool)
    B, N = mask.shape
    if cfg.layout == "seed":
        idx = seed_token_index(mask, cfg.n_patches)  # (B, T) patch behind each token
        return cell_mass.new_zeros(B, N).scatter_add(1, idx, cell_mass)  # (B, N)
    cell = spatial_cell_index(mask, batch.coords, cfg.grid_size, batch.patch_step)  # (B, N), -1 padding
    safe = cell.clamp_min(0)  # (B, N)
    counts = torch.zeros_like(cell_mass).scatter_add(1, safe, mask.to(cell_mass.dtype))  # (B, T) patches per cell
    share = cell_mass.gather(1, safe) / counts.gather(1, safe).clamp_min(1.0)  # (B, N)
    return torch.where(mask, share, torch.zeros_like(share))
