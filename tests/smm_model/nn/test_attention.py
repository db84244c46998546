"""Tests for smm_model.nn.attention: GeneDeformableAttention, its position bias and its key mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smm_model.nn.attention as attention_mod
from smm_model.nn.attention import ContinuousPositionBias, GeneDeformableAttention, _ExactPositionBias
from smm_model.config import ModelConfig


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _cfg(**kw) -> ModelConfig:
    """A small attention setting (C=16, 4 heads of 8, 2 offset groups, 8x8 map, 4x4 keys)."""
    base = dict(feature_dim=32, hidden_dim=16, heads=4, dim_head=8, offset_groups=2, grid_size=8,
                n_patches=64, key_grid=4, genes_tumour=5, genes_micro=7, snn_hidden=(8,),
                bias_table_size=33, attn_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def _attn(seed: int = 0, **kw) -> GeneDeformableAttention:
    torch.manual_seed(seed)
    return GeneDeformableAttention(_cfg(**kw)).eval()


def _query_positions(G: int) -> torch.Tensor:
    """(G*G, 2) query positions exactly as forward() builds them: (x, y) in [-1, 1]."""
    ys, xs = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    return torch.stack((xs.flatten() / (G - 1), ys.flatten() / (G - 1)), -1) * 2 - 1


def _reachable_keys(n: int, K: int, scale: float, seed: int) -> torch.Tensor:
    """(n, K*K, 2) key positions uniform over the reachable box [-1 - 2s/(K-1), 1 + 2s/(K-1)]^2."""
    gen = torch.Generator().manual_seed(seed)
    lim = 1.0 + 2.0 * scale / (K - 1)
    return (torch.rand(n, K * K, 2, generator=gen) * 2 - 1) * lim


def _cpb_linears(module: GeneDeformableAttention) -> list[nn.Linear]:
    return [m for m in module.cpb.mlp if isinstance(m, nn.Linear)]


def _trained_like(module: GeneDeformableAttention, std: float, seed: int) -> None:
    """Give the CPB MLP larger weights (and biases), so its output is far from trivially smooth."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in _cpb_linears(module):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * std)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * std)


def _plain_bias(module: GeneDeformableAttention, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The CPB MLP on every (query, key) pair with plain autograd -> (N, h/g, Q, K2)."""
    rel = q_pos[None, :, None, :] - k_pos[:, None, :, :]  # (N, Q, K2, 2)
    return module.cpb(rel).permute(0, 3, 1, 2)


def _lipschitz_bound(module: GeneDeformableAttention, T: int) -> float:
    """A rigorous bound on |table - exact| for a table of side T.

    The bilinear read is a convex combination of the 4 surrounding table nodes, each within
    sqrt(2) * h (h = node spacing) of the query point, so the error is at most sqrt(2) * h * Lip(f).
    f = MLP(sign(r) log(1 + |r|)): the log map is 1-Lipschitz per coordinate and ReLU is
    1-Lipschitz, so Lip(f) <= prod of the spectral norms of the three weight matrices.
    """
    lip = math.prod(float(torch.linalg.matrix_norm(lin.weight.detach(), 2)) for lin in _cpb_linears(module))
    h = 2.0 * module._max_rel() / (T - 1)
    return math.sqrt(2.0) * h * lip


def _table_error(T: int, std: float | None, seed: int = 0, G: int = 25) -> tuple[float, float, float]:
    """Max |table - exact| over reachable positions at the reference key grid / offset scale.

    Returns (max abs error, max |exact bias|, rigorous Lipschitz bound).
    """
    torch.manual_seed(seed)
    module = GeneDeformableAttention(ModelConfig(bias_table_size=T)).eval()  # K=12, s=4 (reference)
    if std is not None:
        _trained_like(module, std, seed)
    q = _query_positions(G)
    k = _reachable_keys(2, module.key_grid, module.offset_scale, seed)
    with torch.no_grad():
        table = module._bias_table(q, k)
        exact = module._bias_exact(q, k)
    return (float((table - exact).abs().max()), float(exact.abs().max()), _lipschitz_bound(module, T))


# --------------------------------------------------------------------------- #
# table vs exact relative-position bias
# --------------------------------------------------------------------------- #
def test_exact_bias_equals_plain_mlp_on_every_pair():
    m = _attn(exact_chunk=20)  # 20 // 16 keys = 1 query per block: many blocks
    _trained_like(m, 0.5, seed=1)
    q = _query_positions(8)
    k = _reachable_keys(3, m.key_grid, m.offset_scale, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(m._bias_exact(q, k), _plain_bias(m, q, k), rtol=1e-5, atol=1e-5)


def test_table_bias_close_to_exact_at_default_init():
    # Default (PyTorch) init, default table side 129, reference K=12 / offset_scale 4: the issue's
    # quick check saw ~4e-4; here 9.1e-4 for seed 0 and at most 1.2e-3 over seeds 0..9 (the bias
    # itself is ~0.4 in size). Bound with 2x margin.
    err, _, bound = _table_error(129, std=None, seed=0)
    assert err < 2.5e-3
    assert err <= bound


def test_table_bias_error_bounded_and_shrinks_with_table_size_for_trained_like_weights():
    """CPB weights ~ N(0, 0.5^2): a bias of range ~10 with many ReLU kinks.

    Measured with this helper over seeds 0..9 (625 queries x 2x144 reachable keys): max error
    0.138 / 0.045 / 0.023 at T = 33 / 129 / 257, i.e. <= 1.6 % of max|bias| at T=129 and <= 1.6 %
    of the rigorous Lipschitz bound; err(33)/err(257) >= 5.4. The decay is about first order in
    the node spacing h (linear interpolation across the MLP's ReLU kinks is O(h), not O(h^2)).
    Bounds below keep a 2x margin.
    """
    errs = {}
    for T in (33, 129, 257):
        err, scale, bound = _table_error(T, std=0.5, seed=3)
        assert err <= bound, (T, err, bound)  # rigorous, for every table size
        errs[T] = (err, scale)
    err129, scale129 = errs[129]
    assert err129 < 0.1
    assert err129 / scale129 < 0.03  # relative to the size of the bias
    # shrinks as the table grows, roughly like 1/T (32 -> 256 intervals: x8)
    assert errs[33][0] > errs[129][0] > errs[257][0]
    assert errs[33][0] / errs[257][0] > 4.0


def test_table_is_oriented_like_exact_for_an_asymmetric_bias():
    """A lookup with x and y swapped (table[row=x, col=y]) would violate the bound at once."""
    m = _attn(bias_table_size=257)
    _trained_like(m, 0.5, seed=4)
    q = _query_positions(8)
    k = _reachable_keys(2, m.key_grid, m.offset_scale, seed=5)
    with torch.no_grad():
        exact = m._bias_exact(q, k)
        swapped = m._bias_exact(q.flip(-1), k.flip(-1))  # the transposed function
        table = m._bias_table(q, k)
    assert (exact - swapped).abs().max() > 0.5  # the function really is asymmetric
    assert (table - exact).abs().max() <= _lipschitz_bound(m, 257)


def test_table_covers_every_reachable_relative_position():
    """With saturated offsets the key positions reach the edge of the range but never pass it."""
    m = _attn(grid_size=8, key_grid=4, offset_scale=4.0)
    with torch.no_grad():
        for p in m.offset_net.parameters():
            p.mul_(50.0)  # tanh saturates at +-1
    torch.manual_seed(6)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        _, grid = m(x, x)
    K = m.key_grid
    k_pos = grid.reshape(-1, 2, K * K).transpose(1, 2) / (K - 1) * 2 - 1  # (B*g, K2, 2)
    rel = _query_positions(8)[None, :, None, :] - k_pos[:, None]
    R = m._max_rel()
    assert rel.abs().max() <= R * (1 + 1e-6)
    assert rel.abs().max() > 0.9 * R  # the test does reach the edge of the table


def test_full_module_exact_and_table_outputs_agree():
    torch.manual_seed(7)
    table = GeneDeformableAttention(_cfg(bias_table_size=129, position_bias="table")).eval()
    exact = GeneDeformableAttention(_cfg(bias_table_size=129, position_bias="exact")).eval()
    exact.load_state_dict(table.state_dict())
    xq, xkv = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    km = torch.rand(2, 8, 8) > 0.3
    with torch.no_grad():
        for mask in (None, km):
            out_t, grid_t = table(xq, xkv, mask)
            out_e, grid_e = exact(xq, xkv, mask)
            torch.testing.assert_close(grid_t, grid_e, rtol=0, atol=0)  # positions do not use the bias
            torch.testing.assert_close(out_t, out_e, rtol=1e-3, atol=1e-3)
            assert (out_t - out_e).abs().max() < 1e-3 * out_e.abs().max()


def test_table_mode_differs_from_exact_when_table_is_coarse():
    """Sanity for the agreement test above: the two modes are genuinely different code paths."""
    torch.manual_seed(8)
    table = GeneDeformableAttention(_cfg(bias_table_size=3, position_bias="table")).eval()
    exact = GeneDeformableAttention(_cfg(bias_table_size=3, position_bias="exact")).eval()
    _trained_like(table, 1.0, seed=8)
    exact.load_state_dict(table.state_dict())
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert (table(x, x)[0] - exact(x, x)[0]).abs().max() > 1e-2


# --------------------------------------------------------------------------- #
# exact-mode gradients (custom autograd function)
# --------------------------------------------------------------------------- #
def test_exact_position_bias_gradcheck_float64():
    torch.manual_seed(9)
    cpb = ContinuousPositionBias(4, 2).double()
    params = [t for m in cpb.mlp if isinstance(m, nn.Linear) for t in (m.weight, m.bias)]
    q = torch.rand(6, 2, dtype=torch.float64) * 2 - 1
    k = (torch.rand(2, 4, 2, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    # 5 pairs per block with 4 keys -> 1 query per block: exercises the block loop in backward
    fn = lambda k_pos, *p: _ExactPositionBias.apply(q, k_pos, 5, *p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (k, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk", [7, 40, 16384])  # 1 query/block, 2 with a remainder, 1 block
def test_exact_position_bias_gradients_match_plain_autograd(chunk):
    m = _attn(exact_chunk=chunk)
    _trained_like(m, 0.5, seed=10)
    q = _query_positions(5)  # 25 queries
    k0 = _reachable_keys(3, m.key_grid, m.offset_scale, seed=11)
    gy = torch.randn(3, m.heads // m.groups, 25, 16, generator=torch.Generator().manual_seed(12))

    def grads(fn):
        m.zero_grad()
        k = k0.clone().requires_grad_()
        (fn(q, k) * gy).sum().backward()
        return [k.grad] + [p.grad.clone() for p in m.cpb.parameters()]

    got = grads(m._bias_exact)
    want = grads(lambda q_, k_: _plain_bias(m, q_, k_))
    assert all(float(w.abs().max()) > 0 for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_exact_mode_module_gradients_match_plain_autograd(monkeypatch):
    """Through the whole module (offsets, sampling, attention), exact mode backprops like autograd."""
    torch.manual_seed(13)
    m = GeneDeformableAttention(_cfg(position_bias="exact", exact_chunk=50)).eval()
    xq, xkv = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    km = torch.rand(2, 8, 8) > 0.3

    def grads():
        m.zero_grad()
        out, grid = m(xq, xkv, km)
        (out.square().sum() + grid.sum()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    got = grads()
    monkeypatch.setattr(m, "_bias_exact", lambda q, k: _plain_bias(m, q, k))
    want = grads()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=n)
    assert float(got["offset_net.0.weight"].abs().max()) > 0  # the bias backprops into the offsets


# --------------------------------------------------------------------------- #
# offsets and geometry
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("grid_size,key_grid", [(8, 4), (10, 4)])  # (10, 4): adaptive-pool path
def test_offsets_bounded_by_offset_scale(grid_size, key_grid):
    m = _attn(grid_size=grid_size, n_patches=grid_size ** 2, key_grid=key_grid, offset_scale=1.5)
    with torch.no_grad():
        for p in m.offset_net.parameters():
            p.mul_(30.0)  # push tanh into saturation so the bound is actually approached
    x = torch.randn(3, 16, grid_size, grid_size)
    with torch.no_grad():
        _, grid = m(x, x)
    K = key_grid
    assert grid.shape == (3, m.groups, 2 * K * K)
    ref = m.ref_grid.reshape(1, 1, 2 * K * K)  # channel 0 = x (column), 1 = y (row)
    dev = (grid - ref).abs()
    assert dev.max() <= 1.5 + 1e-5
    assert dev.max() > 0.9 * 1.5


def test_zero_offset_scale_samples_the_reference_grid():
    m = _attn(offset_scale=0.0)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        _, grid = m(x, x)
    K = m.key_grid
    expected = m.ref_grid.reshape(1, 1, 2 * K * K).expand(2, m.groups, -1)
    torch.testing.assert_close(grid, expected, rtol=0, atol=0)
    xs = grid[0, 0, : K * K].reshape(K, K)
    ys = grid[0, 0, K * K:].reshape(K, K)
    assert torch.equal(xs[0], torch.arange(K, dtype=xs.dtype))  # x varies along columns
    assert torch.equal(ys[:, 0], torch.arange(K, dtype=ys.dtype))  # y along rows


# --------------------------------------------------------------------------- #
# key mask: cells without tissue are not treated as tissue
# --------------------------------------------------------------------------- #
def _half_tissue(B: int = 2, G: int = 8) -> torch.Tensor:
    km = torch.zeros(B, G, G, dtype=torch.bool)
    km[:, :, : G // 2] = True  # left half of the map is tissue
    km[1, :2] = False  # second sample: also no tissue in the top rows
    return km


def _capture_keys(m: GeneDeformableAttention, *args):
    """Run m(*args) and return (out, grid, sampled keys entering to_k (B, C, K, K))."""
    box = {}
    h = m.to_k.register_forward_pre_hook(lambda mod, inp: box.__setitem__("keys", inp[0].detach().clone()))
    try:
        with torch.no_grad():
            out, grid = m(*args)
    finally:
        h.remove()
    return out, grid, box["keys"]


def test_masked_sampling_is_normalised_over_tissue_only():
    """Tissue holds one constant feature vector c; empty cells hold 0 (as SubspaceBranch feeds them).

    With the mask, every key with any tissue under its bilinear footprint reads exactly c (empty
    cells do not dilute it toward 0) and the output at every query is to_out(to_v(c)): keys in
    empty regions get no attention weight. Without the mask, empty cells act as zero-valued tissue
    and both properties fail.
    """
    m = _attn(seed=14, offset_scale=2.0)
    B, C, G, K = 2, 16, 8, m.key_grid
    km = _half_tissue(B, G)
    c = torch.randn(C)
    xkv = c[None, :, None, None] * km[:, None].float()
    xq = torch.randn(B, C, G, G)

    # the bilinear tissue weight of every key, computed independently of the module
    _, grid, keys = _capture_keys(m, xq, xkv, km)
    k_pos = (grid.reshape(B * m.groups, 2, K, K) / (K - 1) * 2 - 1).permute(0, 2, 3, 1)
    w = F.grid_sample(km.float().repeat_interleave(m.groups, 0)[:, None], k_pos,
                      mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*g, 1, K, K)
    w = w.reshape(B, m.groups, 1, K, K).expand(B, m.groups, C // m.groups, K, K).reshape(B, C, K, K)
    partial = (w > 1e-3) & (w < 0.999)
    assert partial.any() and (w == 0).any()  # keys on the border of tissue and keys off tissue
    expected_keys = c[None, :, None, None].expand_as(keys)
    on = w > 1e-3
    torch.testing.assert_close(keys[on], expected_keys[on], rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        const = m.to_out(m.to_v(c[None, :, None, None]))  # (1, C, 1, 1)
        out, _ = m(xq, xkv, km)
        out_nomask, _ = m(xq, xkv, None)
    torch.testing.assert_close(out, const.expand_as(out), rtol=0, atol=1e-4)
    assert (out_nomask - const).abs().max() > 1e-2  # without the mask, empty cells count


def test_keys_off_tissue_get_negligible_attention_weight(monkeypatch):
    """Recompute softmax(q k^T / sqrt(d) + bias) from what reaches SDPA: keys with no tissue in
    their footprint get (almost) no weight."""
    m = _attn(seed=15, offset_scale=2.0)
    B, C, G, K = 2, 16, 8, m.key_grid
    km = _half_tissue(B, G)
    xkv = torch.randn(B, C, G, G) * km[:, None]
    xq = torch.randn(B, C, G, G)
    seen = {}
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen["w"] = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + attn_mask, dim=-1)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        _, grid = m(xq, xkv, km)
    k_pos = (grid.reshape(B * m.groups, 2, K, K) / (K - 1) * 2 - 1).permute(0, 2, 3, 1)
    w = F.grid_sample(km.float().repeat_interleave(m.groups, 0)[:, None], k_pos,
                      mode="bilinear", padding_mode="zeros", align_corners=False)
    off = (w.reshape(B, m.groups, K * K) == 0)  # (B, g, K2) keys with no tissue at all
    assert off.any()
    heads_per_group = m.heads // m.groups
    off_h = off.repeat_interleave(heads_per_group, 1)[:, :, None, :]  # (B, h, 1, K2)
    mass_off = (seen["w"] * off_h).sum(-1)  # (B, h, Q) attention mass on keys off tissue
    assert mass_off.max() < 1e-4


@pytest.mark.parametrize("garbage", ["randn*1e4", "1e30"])
def test_values_in_empty_cells_do_not_reach_the_output(garbage):
    """The module itself must not rely on its caller zeroing x_kv on empty cells: normalised
    convolution is grid_sample(mask * x) / grid_sample(mask), not grid_sample(x) / grid_sample(mask)."""
    m = _attn(seed=16, offset_scale=2.0)
    B, C, G = 2, 16, 8
    km = _half_tissue(B, G)
    xq = torch.randn(B, C, G, G)
    xkv = torch.randn(B, C, G, G) * km[:, None]
    junk = 1e4 * torch.randn(B, C, G, G) if garbage == "randn*1e4" else torch.full((B, C, G, G), 1e30)
    dirty = torch.where(km[:, None], xkv, junk)
    with torch.no_grad():
        out_clean, grid_clean = m(xq, xkv, km)
        out_dirty, grid_dirty = m(xq, dirty, km)
        out_nomask, _ = m(xq, dirty, None)
    torch.testing.assert_close(grid_dirty, grid_clean, rtol=0, atol=0)
    torch.testing.assert_close(out_dirty, out_clean, rtol=1e-5, atol=1e-5)
    assert (out_nomask - out_clean).abs().max() > 1.0  # without the mask the junk does reach it
