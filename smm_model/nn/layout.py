"""Turn a padded bag of WSI patch features into a fixed square token map.

A whole-slide image yields a *bag* of patch features whose size varies from
slide to slide (hundreds to tens of thousands of patches).  The downstream
model wants a fixed-size square token map ``(B, G*G, D)`` so that its cost does
not depend on the bag size and so that image-style operators (2-D attention
windows, convolutions, pseudo-image views) apply.  Two layouts are provided:

* :func:`seed_tokens` -- the reference code's fixed-count strategy: pick
  ``n_tokens`` patches at evenly spaced positions of the stored order (or tile
  the bag when it is smaller).  It ignores geometry; the caller views the
  result as a ``sqrt(n) x sqrt(n)`` pseudo-image.
* :func:`spatial_tokens` -- place every patch on a ``G x G`` grid by its real
  level-0 coordinates, mean-merging patches that share a cell, so that
  neighbouring tokens are neighbouring tissue.

Both are vectorised over the batch (no Python loop over samples or patches),
pure PyTorch, and differentiable with respect to ``feats``.

Input conventions (shared by both functions):

* ``feats``  ``(B, N, D)`` float -- patch features, padded along ``N``;
* ``mask``   ``(B, N)`` bool     -- True for a real patch, False for padding;
* ``coords`` ``(B, N, 2)``       -- level-0 pixel (x, y) of each patch's
  top-left corner; padding entries may hold anything (even NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["seed_tokens", "seed_token_index", "spatial_tokens", "spatial_cell_index"]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _check_bag(feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Validate shapes, return ``(mask as bool, L per sample)``; reject empty samples."""
    if feats.dim() != 3:
        raise ValueError(f"feats must be (B, N, D), got shape {tuple(feats.shape)}")
    if mask.shape != feats.shape[:2]:
        raise ValueError(
            f"mask must be (B, N) = {tuple(feats.shape[:2])}, got {tuple(mask.shape)}"
        )
    return _check_mask(mask.to(device=feats.device))


def _check_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(mask as bool, L per sample)`` of a (B, N) mask; reject empty samples."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, N), got shape {tuple(mask.shape)}")
    mask = mask.to(dtype=torch.bool)  # (B, N)
    lengths = mask.sum(dim=1)  # (B,) int64
    empty = (lengths == 0).nonzero().flatten()  # (n_empty,)
    if empty.numel() > 0:
        raise ValueError(
            f"sample(s) {empty.tolist()} have no valid patch (mask is all False); "
            "a bag needs at least one patch"
        )
    return mask, lengths


def _coord_dtype(device: torch.device) -> torch.dtype:
    """float64 keeps integer pixel coordinates exact; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


# --------------------------------------------------------------------------- #
# 1. fixed-count seed tokens (reference strategy)
# --------------------------------------------------------------------------- #
def seed_tokens(feats: Tensor, mask: Tensor, n_tokens: int) -> Tensor:
    """Pick exactly ``n_tokens`` patch features per sample -> ``(B, n_tokens, D)``.

    Reproduces the reference implementation's fixed-count sampling so results
    stay comparable with it.  With ``L`` valid patches in a sample:

    * ``L >= n_tokens``: token ``i`` is patch ``round(i * L / n_tokens)``
      (half rounded *up*, i.e. ``floor(x + 0.5)``, not Python's banker's
      rounding; clamped to ``L - 1``) -- evenly spaced over the stored order;
    * ``L < n_tokens``: the whole bag is tiled, token ``i`` is patch ``i % L``,
      so small bags still fill the pseudo-image instead of leaving holes.

    Every output token is a real patch (no padding, hence no token mask).  The
    selection is one ``torch.gather`` so gradients flow back to the chosen
    entries of ``feats``.

    Valid patches must be the first ``L`` entries of each row (right padding),
    since indices are positions in that prefix.

    Raises:
        ValueError: bad shapes, ``n_tokens < 1``, a sample with no valid patch,
            or a mask that is not right-padded (offending samples are named).
    """
    mask, _ = _check_bag(feats, mask)  # (B, N)
    B, _, D = feats.shape
    idx = seed_token_index(mask, n_tokens)  # (B, n) int64, all < L
    return torch.gather(feats, 1, idx[:, :, None].expand(B, n_tokens, D))  # (B, n, D)


def seed_token_index(mask: Tensor, n_tokens: int) -> Tensor:
    """Which patch each seed token is: ``(B, n_tokens)`` int64 positions into the bag.

    ``seed_tokens(feats, mask, n)`` is ``feats`` gathered at these positions; exposed so that a
    token's attention can be handed back to the patch it copies (``smm_model.nn.attention_maps``).
    Same rules and errors as :func:`seed_tokens`.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    mask, lengths = _check_mask(mask)  # (B, N), (B,)
    N = mask.shape[1]

    # Right padding <=> mask equals the prefix mask of its own length.
    prefix = torch.arange(N, device=mask.device)[None, :] < lengths[:, None]  # (B, N)
    bad = (prefix != mask).any(dim=1).nonzero().flatten()  # (n_bad,)
    if bad.numel() > 0:
        raise ValueError(
            f"sample(s) {bad.tolist()} are not right-padded: valid patches must be "
            "the first L entries of each row of mask"
        )

    i = torch.arange(n_tokens, device=mask.device)[None, :]  # (1, n)
    L = lengths[:, None]  # (B, 1)
    # floor(i*L/n + 0.5) == floor((2*i*L + n) / (2*n)) in exact integer arithmetic
    # (no float rounding, and half-way values round up as the reference does).
    down = torch.minimum((2 * i * L + n_tokens) // (2 * n_tokens), L - 1)  # (B, n)
    tiled = i % L  # (B, n)
    return torch.where(L >= n_tokens, down, tiled)  # (B, n) int64, all < L


# --------------------------------------------------------------------------- #
# 2. coordinate-aware spatial tokens
# --------------------------------------------------------------------------- #
def _infer_step(c: Tensor, mask: Tensor) -> Tensor:
    """Smallest positive gap between distinct valid x or y coordinates -> ``(B,)``.

    On a regular tiling this is the patch stride.  Samples with no positive
    gap (a single patch, or all patches on one point) get step 1: any step
    maps them to cell (0, 0).
    """
    B, N, _ = c.shape
    if N < 2:
        return torch.ones(B, dtype=c.dtype, device=c.device)  # (B,)
    inf = torch.tensor(float("inf"), dtype=c.dtype, device=c.device)
    v = torch.where(mask[..., None], c, inf)  # (B, N, 2) padding -> +inf
    v, _ = torch.sort(v, dim=1)  # (B, N, 2) valid first, ascending per axis
    gaps = v[:, 1:] - v[:, :-1]  # (B, N-1, 2); inf-inf = nan, x-inf = inf... all filtered
    ok = torch.isfinite(gaps) & (gaps > 0)  # (B, N-1, 2)
    gaps = torch.where(ok, gaps, inf)  # (B, N-1, 2)
    step = gaps.flatten(1).amin(dim=1)  # (B,)
    return torch.where(torch.isfinite(step), step, torch.ones_like(step))  # (B,)


def _as_step(patch_step: Tensor | float, B: int, like: Tensor) -> Tensor:
    """Broadcast a user-given step (float, 0-d or (B,) tensor) to ``(B,)`` and validate it."""
    step = torch.as_tensor(patch_step, dtype=like.dtype, device=like.device)
    if step.dim() == 0:
        step = step.expand(B)  # (B,)
    if step.shape != (B,):
        raise ValueError(f"patch_step must be a float or a (B,)=({B},) tensor, got {tuple(step.shape)}")
    bad = (~torch.isfinite(step) | (step <= 0)).nonzero().flatten()  # (n_bad,)
    if bad.numel() > 0:
        raise ValueError(f"patch_step must be finite and > 0; bad for sample(s) {bad.tolist()}")
    return step  # (B,)


def spatial_tokens(
    feats: Tensor,
    mask: Tensor,
    coords: Tensor,
    grid_size: int,
    patch_step: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """Lay the bag out on a ``G x G`` grid by real coordinates.

    Returns ``(tokens, token_mask)`` of shapes ``(B, G*G, D)`` and
    ``(B, G*G)`` bool; token ``row * G + col`` is grid cell ``[row, col]`` (so
    ``tokens.view(B, G, G, D)`` is indexed ``[b, row, col]``), ``col`` coming
    from x and ``row`` from y.

    Why this layout: a model with local 2-D operators only makes sense if
    neighbouring tokens are neighbouring tissue, which the storage order of a
    bag does not guarantee.  Steps, per sample:

    1. ``cell = floor((coords - min valid coords) / step)`` per axis, with
       ``step`` = ``patch_step`` or, if None, the inferred patch stride (the
       smallest positive gap between distinct valid x or y values; 1 for a
       single patch).  This maps the slide's tiling lattice onto integer cells.
    2. If the tissue extent ``E = max(max cell + 1 over both axes)`` exceeds
       ``G``, cells are merged by the integer factor ``f = ceil(E / G)``
       (``cell //= f``), the same factor on both axes to keep the aspect ratio.
    3. The occupied region is centred (``offset = (G - extent) // 2`` per
       axis) so tissue is not stuck in the top-left corner; positional
       encodings / windows then see it in a consistent place regardless of
       its size.
    4. Features of all patches in one cell are averaged (scatter-sum of
       features and counts, then divide).  Mean-merging keeps the cost fixed at
       ``G*G`` tokens whatever the bag size, while every patch still
       contributes (unlike sub-sampling) and the scale of a token does not
       grow with how many patches fell into it (unlike a plain sum).

    Cells without tissue hold exactly 0 and are masked False.  Padding entries
    (``mask == False``) are ignored entirely, whatever their values (even NaN).
    Vectorised over the batch; differentiable w.r.t. ``feats``.

    Raises:
        ValueError: bad shapes / ``grid_size``, a sample with no valid patch,
            non-finite coordinates among valid patches, or a non-positive
            ``patch_step`` (offending samples are named).
    """
    mask, _ = _check_bag(feats, mask)  # (B, N)
    B, N, D = feats.shape
    G = grid_size
    dev = feats.device
    cell = _cells(mask, coords, grid_size, patch_step)  # (B, N) row * G + col; padding: some cell

    # -- 4. scatter-mean into a flattened (B*G*G, D) buffer --------------------
    batch_base = torch.arange(B, device=dev)[:, None] * (G * G)  # (B, 1)
    flat_idx = (batch_base + cell).reshape(B * N)  # (B*N,)
    acc_dtype = torch.promote_types(feats.dtype, torch.float32)  # accumulate bf16/fp16 in fp32
    src = torch.where(mask[..., None], feats, torch.zeros((), dtype=feats.dtype, device=dev))  # (B, N, D)
    src = src.to(acc_dtype).reshape(B * N, D)  # (B*N, D) padding contributes 0 (even if NaN)
    sums = torch.zeros(B * G * G, D, dtype=acc_dtype, device=dev).index_add(0, flat_idx, src)  # (B*G*G, D)
    counts = torch.zeros(B * G * G, dtype=acc_dtype, device=dev).index_add(
        0, flat_idx, mask.reshape(B * N).to(acc_dtype)
    )  # (B*G*G,)
    tokens = sums / counts.clamp_min(1.0)[:, None]  # (B*G*G, D) empty cells stay exactly 0

    tokens = tokens.to(feats.dtype).view(B, G * G, D)  # (B, G*G, D)
    token_mask = (counts > 0).view(B, G * G)  # (B, G*G) bool
    return tokens, token_mask


def spatial_cell_index(
    mask: Tensor,
    coords: Tensor,
    grid_size: int,
    patch_step: Tensor | float | None = None,
) -> Tensor:
    """The token each patch falls into under :func:`spatial_tokens`: ``(B, N)`` int64.

    Entry ``[b, i]`` is ``row * G + col`` of patch ``i``'s cell (steps 1-3 of
    :func:`spatial_tokens`, the same code), -1 for padding. Token ``t`` of
    ``spatial_tokens`` is the mean of the patches whose index is ``t``, so
    whatever a model assigns to a token can be handed back to its patches
    (``smm_model.nn.attention_maps``). Same arguments and errors.
    """
    mask, _ = _check_mask(mask.to(device=coords.device))  # (B, N)
    cell = _cells(mask, coords, grid_size, patch_step)  # (B, N)
    return torch.where(mask, cell, torch.full_like(cell, -1))  # (B, N)


def _cells(mask: Tensor, coords: Tensor, grid_size: int, patch_step: Tensor | float | None) -> Tensor:
    """Steps 1-3 of :func:`spatial_tokens`: ``(B, N)`` flat cell ``row * G + col`` per patch.

    ``mask`` is a validated bool (B, N); padding entries get some valid cell (their features are
    zeroed by the caller, so where they land does not matter).
    """
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive int, got {grid_size!r}")
    B, N = mask.shape
    G = grid_size
    if coords.shape != (B, N, 2):
        raise ValueError(f"coords must be (B, N, 2) = {(B, N, 2)}, got {tuple(coords.shape)}")
    dev = mask.device

    c = coords.to(device=dev, dtype=_coord_dtype(dev))  # (B, N, 2) float
    nonfinite = (~torch.isfinite(c) & mask[..., None]).any(dim=(1, 2)).nonzero().flatten()
    if nonfinite.numel() > 0:
        raise ValueError(
            f"sample(s) {nonfinite.tolist()} have non-finite coords among valid patches"
        )
    c = torch.where(mask[..., None], c, torch.zeros_like(c))  # (B, N, 2) padding -> 0 (finite)

    # -- 1. integer cells relative to the sample's top-left valid patch -------
    step = _infer_step(c, mask) if patch_step is None else _as_step(patch_step, B, c)  # (B,)
    inf = torch.tensor(float("inf"), dtype=c.dtype, device=dev)
    cmin = torch.where(mask[..., None], c, inf).amin(dim=1)  # (B, 2)
    q = (c - cmin[:, None, :]) / step[:, None, None]  # (B, N, 2)
    # Tiny tolerance: a coordinate that is an exact multiple of the step must not
    # drop one cell because of float rounding (e.g. 0.3 / 0.1 = 2.9999...).
    q = torch.where(mask[..., None], q, torch.zeros_like(q))  # (B, N, 2)
    cell = torch.floor(q + 1e-6).long()  # (B, N, 2) (col, row), >= 0 for valid

    # -- 2. merge cells so the extent fits in G -------------------------------
    cell = torch.where(mask[..., None], cell, torch.zeros_like(cell))  # (B, N, 2)
    extent = cell.amax(dim=1) + 1  # (B, 2) padding cells are 0 -> never enlarge
    E = extent.amax(dim=1)  # (B,)
    f = ((E + G - 1) // G).clamp_min(1)  # (B,) ceil(E / G)
    cell = cell // f[:, None, None]  # (B, N, 2)

    # -- 3. centre the occupied region -----------------------------------------
    extent = cell.amax(dim=1) + 1  # (B, 2) <= G by construction of f
    offset = (G - extent) // 2  # (B, 2) >= 0
    cell = cell + offset[:, None, :]  # (B, N, 2) in [0, G)
    return cell[..., 1] * G + cell[..., 0]  # (B, N) row * G + col

