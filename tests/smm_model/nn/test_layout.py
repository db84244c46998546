"""Tests for smm_model.nn.layout: seed_tokens and spatial_tokens."""

from __future__ import annotations

import math

import pytest
import torch

from smm_model.nn.layout import seed_token_index, seed_tokens, spatial_cell_index, spatial_tokens


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _ids(n: int, D: int = 3) -> torch.Tensor:
    """(1, n, D) features whose value encodes the patch index: feats[0, j] == j."""
    return torch.arange(n, dtype=torch.float32)[None, :, None].expand(1, n, D).clone()


def _ref_seed_indices(L: int, n: int) -> list[int]:
    if L >= n:
        return [min(math.floor(i * L / n + 0.5), L - 1) for i in range(n)]
    return [i % L for i in range(n)]


def _ref_spatial(feats, coords, G, step=None):
    """Loop-based reference for one unpadded sample: feats (L, D), coords (L, 2)."""
    L, D = feats.shape
    xs = [float(v) for v in coords[:, 0]]
    ys = [float(v) for v in coords[:, 1]]
    if step is None:
        gaps = []
        for vals in (sorted(set(xs)), sorted(set(ys))):
            gaps += [b - a for a, b in zip(vals, vals[1:])]
        step = min(gaps) if gaps else 1.0
    x0, y0 = min(xs), min(ys)
    cells = [(math.floor((x - x0) / step), math.floor((y - y0) / step)) for x, y in zip(xs, ys)]
    E = max(max(c for c, _ in cells), max(r for _, r in cells)) + 1
    f = max(1, math.ceil(E / G))
    cells = [(c // f, r // f) for c, r in cells]
    ox = (G - (max(c for c, _ in cells) + 1)) // 2
    oy = (G - (max(r for _, r in cells) + 1)) // 2
    out = torch.zeros(G, G, D, dtype=torch.float64)
    cnt = torch.zeros(G, G, dtype=torch.float64)
    for j, (c, r) in enumerate(cells):
        out[r + oy, c + ox] += feats[j].double()
        cnt[r + oy, c + ox] += 1
    out = torch.where(cnt[..., None] > 0, out / cnt.clamp_min(1)[..., None], out)
    return out.view(G * G, D).float(), (cnt > 0).view(G * G)


def _pad_batch(samples, N, D, pad_feat=float("nan"), pad_coord=float("nan")):
    """Stack [(feats (L, D), coords (L, 2)), ...] right-padded to N with garbage."""
    B = len(samples)
    feats = torch.full((B, N, D), pad_feat)
    coords = torch.full((B, N, 2), pad_coord, dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, (f, c) in enumerate(samples):
        L = f.shape[0]
        feats[b, :L] = f
        coords[b, :L] = c.double()
        mask[b, :L] = True
    return feats, mask, coords


def _lattice_sample(gen, L, D, step, span, origin):
    """L distinct random lattice positions in a span x span area (coords = origin + k*step)."""
    perm = torch.randperm(span * span, generator=gen)[:L]
    cx, cy = perm % span, perm // span
    coords = torch.stack([cx, cy], dim=1).double() * step + torch.tensor(origin, dtype=torch.float64)
    feats = torch.randn(L, D, generator=gen)
    return feats, coords


# --------------------------------------------------------------------------- #
# seed_tokens
# --------------------------------------------------------------------------- #
def test_seed_l_greater_than_n_rounds_half_up():
    out = seed_tokens(_ids(10), torch.ones(1, 10, dtype=torch.bool), 4)
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 3, 5, 8]  # round(2.5)=3, round(7.5)=8 (not banker's)


def test_seed_l_less_than_n_tiles():
    out = seed_tokens(_ids(3), torch.ones(1, 3, dtype=torch.bool), 8)
    assert out[0, :, 0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


def test_seed_l_equal_n_identity():
    feats = torch.randn(2, 9, 5)
    out = seed_tokens(feats, torch.ones(2, 9, dtype=torch.bool), 9)
    assert torch.equal(out, feats)


@pytest.mark.parametrize("n", [1, 4, 16, 49])
def test_seed_variable_lengths_never_pick_padding(n):
    lengths = [1, 3, 16, 49, 100, 101]
    N, D = max(lengths), 4
    feats = torch.full((len(lengths), N, D), -1e9)
    mask = torch.zeros(len(lengths), N, dtype=torch.bool)
    for b, L in enumerate(lengths):
        feats[b, :L] = torch.arange(L, dtype=torch.float32)[:, None]
        mask[b, :L] = True
    out = seed_tokens(feats, mask, n)
    assert out.shape == (len(lengths), n, D)
    assert (out != -1e9).all()
    for b, L in enumerate(lengths):
        assert out[b, :, 0].long().tolist() == _ref_seed_indices(L, n)
        assert (out[b] == out[b, :, :1]).all()  # whole feature rows are copied


def test_seed_gradient_flows():
    feats = torch.randn(2, 6, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    seed_tokens(feats, mask, 4).sum().backward()
    g = feats.grad[:, :, 0]
    # sample 0 (L=6, n=4): indices round(0,1.5,3,4.5)=[0,2,3,5]; sample 1 (L=2): tiled [0,1,0,1]
    assert g[0].tolist() == [1, 0, 1, 1, 0, 1]
    assert g[1].tolist() == [2, 2, 0, 0, 0, 0]


def test_seed_empty_sample_raises():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[1\]"):
        seed_tokens(torch.randn(2, 3, 2), mask, 4)


def test_seed_non_right_padded_raises():
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[1\].*right-padded"):
        seed_tokens(torch.randn(2, 3, 2), mask, 4)


def test_seed_bad_n_tokens_raises():
    with pytest.raises(ValueError):
        seed_tokens(torch.randn(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), 0)


# --------------------------------------------------------------------------- #
# spatial_tokens
# --------------------------------------------------------------------------- #
def _block_3x2(step=256, x0=1000, y0=2000):
    """6 patches: 3 columns x 2 rows; feature value = 10*row + col + 1."""
    coords, feats = [], []
    for r in range(2):
        for c in range(3):
            coords.append([x0 + c * step, y0 + r * step])
            feats.append([10.0 * r + c + 1, -(10.0 * r + c + 1)])
    return torch.tensor(feats)[None], torch.tensor(coords)[None]


def test_spatial_block_adjacent_cells_centred():
    feats, coords = _block_3x2()
    mask = torch.ones(1, 6, dtype=torch.bool)
    G = 6
    tok, tmask = spatial_tokens(feats, mask, coords, G, patch_step=256)
    assert tok.shape == (1, G * G, 2) and tmask.shape == (1, G * G) and tmask.dtype == torch.bool
    grid, gmask = tok.view(G, G, 2), tmask.view(G, G)
    oy, ox = (G - 2) // 2, (G - 3) // 2  # centred: rows 2..3, cols 1..3
    expected_mask = torch.zeros(G, G, dtype=torch.bool)
    expected_mask[oy : oy + 2, ox : ox + 3] = True
    assert torch.equal(gmask, expected_mask)
    for r in range(2):
        for c in range(3):
            v = 10.0 * r + c + 1
            assert grid[oy + r, ox + c].tolist() == [v, -v]
    assert (grid[~gmask] == 0).all()


def test_spatial_merge_averages_cells():
    # 8 patches in a row (E = 8) on a 4x4 grid -> factor 2, pairs averaged.
    step, G = 224, 4
    L = 8
    coords = torch.stack([torch.arange(L) * step + 500, torch.full((L,), 77)], dim=1)[None]
    feats = torch.randn(1, L, 5)
    tok, tmask = spatial_tokens(feats, torch.ones(1, L, dtype=torch.bool), coords, G, patch_step=step)
    grid, gmask = tok.view(G, G, 5), tmask.view(G, G)
    row = (G - 1) // 2  # single row, centred vertically
    assert gmask.sum() == 4 and gmask[row].all()
    for c in range(4):
        torch.testing.assert_close(grid[row, c], feats[0, 2 * c : 2 * c + 2].mean(0))
    assert (grid[~gmask] == 0).all()


def test_spatial_merge_uses_same_factor_on_both_axes_and_counts():
    # 2-D: 5x3 block, G=2 -> E=5, f=3: x cells {0,0,0,1,1}, y cells {0,0,0}.
    step, G = 10, 2
    xs, ys = torch.meshgrid(torch.arange(5), torch.arange(3), indexing="xy")
    coords = torch.stack([xs.flatten(), ys.flatten()], 1)[None].double() * step
    feats = torch.randn(1, 15, 3)
    tok, tmask = spatial_tokens(feats, torch.ones(1, 15, dtype=torch.bool), coords, G)
    grid = tok.view(G, G, 3)
    # extent after merge: 2 cols, 1 row -> row offset (2-1)//2 = 0
    assert tmask.view(G, G).tolist() == [[True, True], [False, False]]
    left = (coords[0, :, 0] < 30)
    torch.testing.assert_close(grid[0, 0], feats[0, left].mean(0))
    torch.testing.assert_close(grid[0, 1], feats[0, ~left].mean(0))


def test_spatial_step_inference_matches_explicit():
    gen = torch.Generator().manual_seed(0)
    samples = [_lattice_sample(gen, L, 4, 256, 12, (1024, 4096)) for L in (7, 30, 60)]
    feats, mask, coords = _pad_batch(samples, 60, 4)
    a = spatial_tokens(feats, mask, coords, 8)
    b = spatial_tokens(feats, mask, coords, 8, patch_step=256.0)
    c = spatial_tokens(feats, mask, coords, 8, patch_step=torch.full((3,), 256.0))
    for other in (b, c):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


def test_spatial_step_inference_per_sample_and_single_patch():
    # sample 0: stride 512; sample 1: single patch (step 1 -> cell 0, centred).
    f0 = torch.randn(3, 2)
    c0 = torch.tensor([[0.0, 0.0], [512.0, 0.0], [1024.0, 0.0]])
    f1 = torch.randn(1, 2)
    c1 = torch.tensor([[12345.0, 678.0]])
    feats, mask, coords = _pad_batch([(f0, c0), (f1, c1)], 3, 2)
    G = 5
    tok, tmask = spatial_tokens(feats, mask, coords, G)
    grid0, grid1 = tok[0].view(G, G, 2), tok[1].view(G, G, 2)
    assert tmask[0].sum() == 3 and tmask[0].view(G, G)[2, 1:4].all()
    torch.testing.assert_close(grid0[2, 1:4], f0)
    assert tmask[1].sum() == 1 and tmask[1].view(G, G)[2, 2]
    torch.testing.assert_close(grid1[2, 2], f1[0])


def test_spatial_padding_is_ignored():
    gen = torch.Generator().manual_seed(1)
    samples = [_lattice_sample(gen, L, 6, 128, 9, (0, 0)) for L in (5, 20)]
    clean = spatial_tokens(*_pad_batch(samples, 25, 6, pad_feat=0.0, pad_coord=0.0), 6)
    for pf, pc in [(float("nan"), float("nan")), (1e9, -1e12), (float("inf"), 3.0)]:
        dirty = spatial_tokens(*_pad_batch(samples, 25, 6, pad_feat=pf, pad_coord=pc), 6)
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
        assert torch.isfinite(dirty[0]).all()


def test_spatial_batch_equals_individual():
    gen = torch.Generator().manual_seed(2)
    samples = [
        _lattice_sample(gen, 5, 4, 256, 4, (3000, 100)),
        _lattice_sample(gen, 40, 4, 448, 20, (0, 50000)),
    ]
    tok, tmask = spatial_tokens(*_pad_batch(samples, 40, 4), 7)
    for b, (f, c) in enumerate(samples):
        t1, m1 = spatial_tokens(f[None], torch.ones(1, f.shape[0], dtype=torch.bool), c[None], 7)
        torch.testing.assert_close(tok[b], t1[0])
        assert torch.equal(tmask[b], m1[0])


@pytest.mark.parametrize("G", [1, 3, 8, 16])
def test_spatial_matches_loop_reference_and_distinct_cells(G):
    gen = torch.Generator().manual_seed(G)
    samples = [_lattice_sample(gen, L, 3, 256, span, (512, 1024)) for L, span in ((1, 3), (9, 3), (50, 10), (120, 30))]
    feats, mask, coords = _pad_batch(samples, 120, 3)
    tok, tmask = spatial_tokens(feats, mask, coords, G)
    for b, (f, c) in enumerate(samples):
        ref_tok, ref_mask = _ref_spatial(f, c, G)
        torch.testing.assert_close(tok[b], ref_tok)
        assert torch.equal(tmask[b], ref_mask)
        # masked-in cells == number of distinct (merged) cells; all patches counted once
        assert int(tmask[b].sum()) == int(ref_mask.sum())
        assert (tok[b][~tmask[b]] == 0).all()


def test_spatial_distinct_cell_count_without_merge():
    # Duplicated coordinates share one cell: 4 distinct positions, 7 patches.
    coords = torch.tensor([[[0, 0], [0, 0], [256, 0], [256, 0], [256, 0], [0, 256], [256, 256]]])
    feats = torch.arange(7, dtype=torch.float32)[None, :, None]
    tok, tmask = spatial_tokens(feats, torch.ones(1, 7, dtype=torch.bool), coords, 4)
    assert int(tmask.sum()) == 4
    grid = tok.view(4, 4)
    assert grid[1, 1] == 0.5 and grid[1, 2] == 3.0 and grid[2, 1] == 5.0 and grid[2, 2] == 6.0


def test_spatial_integer_coords_and_dtype_preserved():
    feats, coords = _block_3x2()
    tok, _ = spatial_tokens(feats.double(), torch.ones(1, 6, dtype=torch.bool), coords.int(), 4)
    assert tok.dtype == torch.float64
    tok16, _ = spatial_tokens(feats.bfloat16(), torch.ones(1, 6, dtype=torch.bool), coords, 4)
    assert tok16.dtype == torch.bfloat16


def test_spatial_gradient_flows():
    gen = torch.Generator().manual_seed(3)
    samples = [_lattice_sample(gen, L, 4, 256, 10, (0, 0)) for L in (6, 30)]
    feats, mask, coords = _pad_batch(samples, 30, 4, pad_feat=0.0)
    feats.requires_grad_(True)
    tok, tmask = spatial_tokens(feats, mask, coords, 3)  # G=3 forces merging
    tok.sum().backward()
    g = feats.grad
    assert torch.isfinite(g).all()
    assert (g[mask] > 0).all()  # each valid patch gets 1/count of its cell
    assert (g[~mask] == 0).all()
    # per sample, gradient mass = D * number of occupied cells (mean of each cell sums to 1)
    for b in range(2):
        torch.testing.assert_close(g[b].sum(), torch.tensor(4.0 * float(tmask[b].sum())))


def test_spatial_empty_sample_raises():
    feats, mask, coords = _pad_batch([(torch.randn(2, 3), torch.zeros(2, 2))], 3, 3)
    feats = torch.cat([feats, feats])
    coords = torch.cat([coords, coords])
    mask = torch.stack([mask[0], torch.zeros(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"\[1\]"):
        spatial_tokens(feats, mask, coords, 4)


def test_spatial_nan_coords_raise():
    coords = torch.tensor([[[0.0, 0.0], [256.0, 0.0]], [[0.0, float("nan")], [256.0, 0.0]]])
    with pytest.raises(ValueError, match=r"non-finite.*\[1\]|\[1\].*non-finite"):
        spatial_tokens(torch.randn(2, 2, 3), torch.ones(2, 2, dtype=torch.bool), coords, 4)
    coords[1, 0, 1] = float("inf")
    with pytest.raises(ValueError):
        spatial_tokens(torch.randn(2, 2, 3), torch.ones(2, 2, dtype=torch.bool), coords, 4)


def test_spatial_bad_step_raises():
    feats, coords = _block_3x2()
    with pytest.raises(ValueError):
        spatial_tokens(feats, torch.ones(1, 6, dtype=torch.bool), coords, 4, patch_step=0.0)


# --------------------------------------------------------------------------- #
# patch -> token indices
# --------------------------------------------------------------------------- #
def test_spatial_cell_index_names_the_token_each_patch_is_averaged_into():
    """Token t of spatial_tokens is the mean of exactly the patches whose index is t; padding is -1."""
    gen = torch.Generator().manual_seed(5)
    samples = [_lattice_sample(gen, L, 4, 256.0, 13, (1000, 500)) for L in (7, 150)]
    feats, mask, coords = _pad_batch(samples, 160, 4)
    G = 6  # 13 x 13 lattice -> merge factor 3
    tokens, tmask = spatial_tokens(feats, mask, coords, G)
    idx = spatial_cell_index(mask, coords, G)
    assert idx.shape == mask.shape and idx.dtype == torch.int64
    assert (idx[~mask] == -1).all() and ((idx[mask] >= 0) & (idx[mask] < G * G)).all()
    for b in range(2):
        for t in range(G * G):
            members = mask[b] & (idx[b] == t)
            assert bool(tmask[b, t]) == bool(members.any())
            if members.any():
                torch.testing.assert_close(tokens[b, t], feats[b][members].mean(0), rtol=1e-5, atol=1e-6)
    assert (torch.bincount(idx[1][mask[1]], minlength=G * G) > 1).any()  # cells did merge


def test_seed_token_index_is_what_seed_tokens_gathers():
    feats = _ids(30)
    mask = torch.ones(1, 30, dtype=torch.bool)
    for n in (7, 30, 64):
        idx = seed_token_index(mask, n)
        assert idx.tolist() == [_ref_seed_indices(30, n)]
        torch.testing.assert_close(seed_tokens(feats, mask, n)[0, :, 0], idx[0].float())
