"""Tests for smm_model.nn.attention_maps: per-patch attention of SMM, ABMIL and Concat."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import smm_model.nn.attention as attention_mod
from smm_model.config import ModelConfig
from smm_model.nn.attention_maps import map_names, patch_attention
from smm_model.nn.batch import Batch
from smm_model.nn.layout import seed_token_index, spatial_cell_index, spatial_tokens
from smm_model.nn.model import build_model

STEP = 256.0  # level-0 pixels between neighbouring patches


def _cfg(**kw) -> ModelConfig:
    base = dict(feature_dim=12, hidden_dim=16, heads=4, dim_head=8, offset_groups=2, grid_size=8, n_patches=64,
                key_grid=4, genes_tumour=5, genes_micro=7, snn_hidden=(8,), bias_table_size=33, abmil_hidden=8,
                layout="spatial", offset_scale=2.0)
    base.update(kw)
    return ModelConfig(**base)


def _model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # trained-like attention: larger query/key weights give peaked softmaxes
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _batch(cfg: ModelConfig, lens=(40, 150), lattice: int = 14, seed: int = 0) -> Batch:
    """Right-padded bags on a lattice x lattice tiling (150 patches on 14 x 14 merge 2 x 2 per cell on
    the 8 x 8 grid); padding holds NaN coordinates and junk features."""
    gen = torch.Generator().manual_seed(seed)
    B, N = len(lens), max(lens)
    patches = torch.full((B, N, cfg.feature_dim), 1e6)
    coords = torch.full((B, N, 2), float("nan"))
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, L in enumerate(lens):
        nodes = torch.randperm(lattice * lattice, generator=gen)[:L]
        coords[b, :L] = torch.stack((nodes % lattice, nodes // lattice), -1).float() * STEP + 1000
        patches[b, :L] = torch.randn(L, cfg.feature_dim, generator=gen)
        mask[b, :L] = True
    return Batch(patches=patches, patch_mask=mask, genes_tumour=torch.randn(B, cfg.genes_tumour, generator=gen),
                 genes_micro=torch.randn(B, cfg.genes_micro, generator=gen), coords=coords)


@pytest.mark.parametrize("arch, layout", [("smm", "spatial"), ("smm", "seed"), ("abmil", "seed"),
                                          ("concat", "spatial")])
def test_maps_sum_to_one_over_real_patches_and_padding_gets_zero(arch, layout):
    cfg = _cfg(arch=arch, layout=layout)
    batch = _batch(cfg)
    maps = patch_attention(_model(cfg), batch)
    assert tuple(maps) == map_names(arch)
    for w in maps.values():
        assert w.shape == batch.patch_mask.shape and torch.isfinite(w).all() and (w >= 0).all()
        assert (w[~batch.patch_mask] == 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(2), rtol=0, atol=1e-5)
        assert w[0, :40].std() > 0  # not trivially uniform


def test_snn_has_no_patch_attention():
    cfg = _cfg(arch="snn")
    with pytest.raises(ValueError, match="'snn' has no attention over patches"):
        map_names("snn")
    with pytest.raises(ValueError, match="SNNModel has no attention over patches"):
        patch_attention(_model(cfg), _batch(cfg))


def test_model_mode_is_restored():
    cfg = _cfg()
    model = _model(cfg).train()
    patch_attention(model, _batch(cfg))
    assert model.training


def _target_offsets(attn, row: int, col: int, G: int):
    """An ``_offsets`` replacement that puts every sampled key on the centre of cell (row, col)."""
    K = attn.key_grid

    def offsets(q):
        # align_corners=False: cell c's centre is at normalised (2c + 1) / G - 1; k_pos = v / (K-1) * 2 - 1
        target = torch.tensor([(2 * col + 1) / G - 1, (2 * row + 1) / G - 1], dtype=q.dtype)
        units = (target + 1) * (K - 1) / 2  # (2,) key-grid units
        return units[:, None, None] - attn.ref_grid + torch.zeros(q.shape[0] * attn.groups, 1, 1, 1)
    return offsets


def test_all_keys_on_one_cell_give_that_cells_patches_all_the_mass(monkeypatch):
    cfg = _cfg()
    model = _model(cfg)
    batch = _batch(cfg, lens=(150,))
    cell = spatial_cell_index(batch.patch_mask, batch.coords, cfg.grid_size)[0]  # (N,)
    target = int(torch.mode(cell).values)  # a cell holding several patches
    inside = cell == target
    assert inside.sum() >= 2
    for branch in (model.branch_tumour, model.branch_micro):
        monkeypatch.setattr(branch.attn, "_offsets", _target_offsets(branch.attn, target // 8, target % 8, 8))
    maps = patch_attention(model, batch)
    for w in maps.values():
        w = w[0]
        torch.testing.assert_close(w[inside], torch.full((int(inside.sum()),), 1.0 / int(inside.sum())))
        assert (w[~inside] == 0).all()


def _brute_force(model, batch, monkeypatch) -> list[torch.Tensor]:
    """Patch attention from the forward's own SDPA inputs and sampled positions, by loops."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + attn_mask, dim=-1))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = model(batch)
    monkeypatch.undo()
    cfg = model.cfg
    G, K, g, h = cfg.grid_size, cfg.key_grid, cfg.offset_groups, cfg.heads
    B, N = batch.patch_mask.shape
    if cfg.layout == "spatial":
        _, tmask = spatial_tokens(batch.patches, batch.patch_mask, batch.coords, G)
        owner = spatial_cell_index(batch.patch_mask, batch.coords, G)  # (B, N) token of each patch
    else:
        tmask = torch.ones(B, G * G, dtype=torch.bool)
        owner = seed_token_index(batch.patch_mask, cfg.n_patches)  # (B, T) patch of each token
    results = []
    for probs, grid in zip(seen, out.grids):  # tumour, then micro
        k_pos = (grid.reshape(B * g, 2, K, K) / (K - 1) * 2 - 1).permute(0, 2, 3, 1)
        res = torch.zeros(B, N, dtype=torch.float64)
        for b in range(B):
            tissue = tmask[b].view(G, G).double()
            cell_mass = torch.zeros(G * G, dtype=torch.float64)
            for grp in range(g):
                # each cell's share of every key: sample a one-hot map (times tissue), normalise over cells
                shares = torch.stack([F.grid_sample((torch.eye(G * G, dtype=torch.float64)[c].view(1, 1, G, G)
                                                     * tissue), k_pos[b * g + grp][None].double(),
                                                    align_corners=False).flatten() for c in range(G * G)])
                if cfg.layout == "spatial":
                    shares = shares / shares.sum(0, keepdim=True).clamp_min(1e-6)
                for head in range(grp * h // g, (grp + 1) * h // g):
                    for q in range(G * G):
                        if tmask[b, q]:
                            cell_mass += shares @ probs[b, head, q].double()
            if cfg.layout == "spatial":
                for i in range(N):
                    if batch.patch_mask[b, i]:
                        res[b, i] = cell_mass[owner[b, i]] / int((owner[b] == owner[b, i]).sum())
            else:
                for t in range(G * G):
                    res[b, owner[b, t]] += cell_mass[t]
            res[b] /= res[b].sum()
        results.append(res.float())
    return results


@pytest.mark.parametrize("layout", ["spatial", "seed"])
def test_smm_maps_match_a_brute_force_recomputation(layout, monkeypatch):
    cfg = _cfg(layout=layout, grid_size=6, n_patches=36, key_grid=3)
    model = _model(cfg, seed=3)
    batch = _batch(cfg, lens=(20, 90), lattice=12, seed=4)
    expected = _brute_force(model, batch, monkeypatch)
    maps = patch_attention(model, batch)
    for name, ref in zip(("tumour", "micro"), expected):
        torch.testing.assert_close(maps[name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_abmil_map_is_the_gated_pool_weights():
    cfg = _cfg(arch="abmil")
    model = _model(cfg)
    batch = _batch(cfg)
    enc = model.encoder
    x = enc.fc(batch.patches.masked_fill(~batch.patch_mask[..., None], 0.0))
    s = enc.pool.score(enc.pool.a(x) * enc.pool.b(x)).squeeze(-1).masked_fill(~batch.patch_mask, -math.inf)
    torch.testing.assert_close(patch_attention(model, batch)["abmil"], torch.softmax(s, 1))
