"""Tests for smm_model.nn.model: the SMM model, its branch and query fusion, and the baselines."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from smm_model.nn.attention import GeneDeformableAttention
from smm_model.nn.batch import Batch
from smm_model.config import TASKS, LossConfig, ModelConfig
from smm_model.objectives.losses import multitask_loss
from smm_model.nn.layers import masked_mean
from smm_model.nn.model import (ABMILModel, ConcatModel, QueryFusion, SMMModel, SNNModel, SubspaceBranch,
                             build_model, count_parameters)

# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
STEP = 256.0  # level-0 pixels between neighbouring patches
SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(TASKS, r)]


def _cfg(**kw) -> ModelConfig:
    base = dict(feature_dim=32, hidden_dim=16, heads=4, dim_head=8, offset_groups=2, grid_size=8,
                n_patches=64, key_grid=4, genes_tumour=5, genes_micro=7, snn_hidden=(8,),
                bias_table_size=33, survival_bins=5, abmil_hidden=8)
    base.update(kw)
    return ModelConfig(**base)


def _model(cfg: ModelConfig, seed: int = 0, train: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg).train(train)


def _bags(lens, D: int = 32, seed: int = 0, lattice: int = 10):
    """One (features (L, D), coords (L, 2)) per bag; coords are distinct nodes of a lattice x lattice
    tiling with stride STEP, shifted by a per-bag origin."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for L in lens:
        nodes = torch.randperm(lattice * lattice, generator=gen)[:L]
        origin = torch.randint(0, 50, (1, 2), generator=gen).float() * STEP
        coords = torch.stack((nodes % lattice, nodes // lattice), -1).float() * STEP + origin
        out.append((torch.randn(L, D, generator=gen), coords))
    return out


def _batch(cfg: ModelConfig, bags, seed: int = 0, pad_feat: float = 0.0, pad_coord: float = 0.0,
           genes=None) -> Batch:
    """Right-pad bags to the longest one (mask False on padding) and add genes and all labels."""
    gen = torch.Generator().manual_seed(seed + 1)
    B, N = len(bags), max(f.shape[0] for f, _ in bags)
    D = bags[0][0].shape[1]
    patches = torch.full((B, N, D), pad_feat)
    coords = torch.full((B, N, 2), pad_coord)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, (f, c) in enumerate(bags):
        L = f.shape[0]
        patches[b, :L], coords[b, :L], mask[b, :L] = f, c, True
    if genes is None:
        genes = (torch.randn(B, cfg.genes_tumour, generator=gen), torch.randn(B, cfg.genes_micro, generator=gen))
    labels = {
        "diagnosis": torch.randint(0, 4, (B,), generator=gen),
        "grade": torch.randint(0, 3, (B,), generator=gen),
        "survival_bin": torch.randint(0, cfg.survival_bins, (B,), generator=gen),
        "survival_time": torch.rand(B, generator=gen) * 1000,
        "event": torch.randint(0, 2, (B,), generator=gen).float(),
    }
    return Batch(patches=patches, patch_mask=mask, genes_tumour=genes[0], genes_micro=genes[1],
                 coords=coords, labels=labels)


def _sub_batch(batch: Batch, b: int) -> Batch:
    """Sample b alone, without any padding."""
    L = int(batch.patch_mask[b].sum())
    return Batch(patches=batch.patches[b:b + 1, :L], patch_mask=batch.patch_mask[b:b + 1, :L],
                 genes_tumour=batch.genes_tumour[b:b + 1], genes_micro=batch.genes_micro[b:b + 1],
                 coords=batch.coords[b:b + 1, :L])


def _flat(out) -> dict[str, torch.Tensor]:
    """Every tensor of a ModelOutput by name."""
    d = {f"logits.{k}": v for k, v in out.logits.items()}
    for name in ("subspaces", "genes", "grids"):
        pair = getattr(out, name)
        if pair is not None:
            d[f"{name}.tumour"], d[f"{name}.micro"] = pair
    return d


def _trained_like_norms(model: nn.Module, seed: int = 0) -> None:
    """Random LayerNorm gains and shifts (at init beta = 0, which hides a missing mask after a norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))


def _assert_outputs_close(a, b, atol: float) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=atol, msg=k)


# --------------------------------------------------------------------------- #
# shapes, masking, task subsets
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("layout", ["seed", "spatial"])
@pytest.mark.parametrize("tasks", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_output_shapes_for_every_task_subset(layout, tasks):
    cfg = _cfg(layout=layout, tasks=tasks)
    model = _model(cfg)
    lens = (3, 64, 90, 17)  # smaller and larger than n_patches = 64
    batch = _batch(cfg, _bags(lens))
    assert batch.patches.shape[1] == 90 and batch.patch_mask.sum(1).tolist() == list(lens)
    with torch.no_grad():
        out = model(batch)
    B, H, g, K = len(lens), cfg.hidden_dim, cfg.offset_groups, cfg.key_grid
    assert tuple(out.logits) == tasks
    for t, logits in out.logits.items():
        assert logits.shape == (B, {"diagnosis": 4, "grade": 3, "survival": 5}[t])
    for pair in (out.subspaces, out.genes):
        assert len(pair) == 2 and all(v.shape == (B, H) for v in pair)
    assert len(out.grids) == 2 and all(v.shape == (B, g, 2 * K * K) for v in out.grids)
    assert all(torch.isfinite(v).all() for v in _flat(out).values())


@pytest.mark.parametrize("layout", ["seed", "spatial"])
def test_padding_values_do_not_change_outputs(layout):
    cfg = _cfg(layout=layout)
    model = _model(cfg)
    bags = _bags((5, 40, 100, 12), seed=1)
    with torch.no_grad():
        ref = model(_batch(cfg, bags))
        for garbage in (1e6, -3e30, float("nan"), float("inf")):
            out = model(_batch(cfg, bags, pad_feat=garbage, pad_coord=garbage))
            _assert_outputs_close(out, ref, atol=1e-6)
        b = _batch(cfg, bags)
        gen = torch.Generator().manual_seed(2)
        pad = ~b.patch_mask
        b.patches[pad] = torch.randn(int(pad.sum()), 32, generator=gen) * 1e4
        b.coords[pad] = torch.randn(int(pad.sum()), 2, generator=gen) * 1e7
        _assert_outputs_close(model(b), ref, atol=1e-6)


@pytest.mark.parametrize("layout", ["seed", "spatial"])
def test_sample_in_padded_batch_equals_sample_alone(layout):
    cfg = _cfg(layout=layout)
    model = _model(cfg, seed=3)
    batch = _batch(cfg, _bags((7, 100, 33), seed=3))
    with torch.no_grad():
        together = _flat(model(batch))
        for b in range(batch.size):
            alone = _flat(model(_sub_batch(batch, b)))
            for k, v in alone.items():
                torch.testing.assert_close(together[k][b:b + 1], v, rtol=0, atol=1e-5, msg=k)


def test_seed_layout_uses_storage_order_and_spatial_layout_uses_coordinates():
    """Permuting (patch, coordinate) pairs inside a bag: the spatial layout places patches by their
    coordinates, so nothing changes; the seed layout reads the stored order, so outputs change.
    Moving the coordinates instead changes the spatial model only."""
    bags = _bags((50, 30), seed=4)
    gen = torch.Generator().manual_seed(4)
    perm = [(f[p], c[p]) for (f, c), p in ((bc, torch.randperm(bc[0].shape[0], generator=gen)) for bc in bags)]
    moved = [(f, c.flip(-1)) for f, c in bags]  # transpose the tissue
    for layout in ("seed", "spatial"):
        cfg = _cfg(layout=layout)
        model = _model(cfg, seed=4)
        with torch.no_grad():
            ref = model(_batch(cfg, bags)).logits["diagnosis"]
            out_perm = model(_batch(cfg, perm)).logits["diagnosis"]
            out_moved = model(_batch(cfg, moved)).logits["diagnosis"]
        if layout == "spatial":
            torch.testing.assert_close(out_perm, ref, rtol=0, atol=1e-5)
            assert (out_moved - ref).abs().max() > 1e-4
        else:
            assert (out_perm - ref).abs().max() > 1e-4
            torch.testing.assert_close(out_moved, ref, rtol=0, atol=0)


def test_spatial_layout_needs_coords():
    cfg = _cfg(layout="spatial")
    model = _model(cfg)
    batch = _batch(cfg, _bags((4, 6)))
    batch.coords = None
    with pytest.raises(ValueError, match="coords"):
        model(batch)
    seed_model = _model(_cfg(layout="seed"))
    with torch.no_grad():
        assert seed_model(batch).logits["diagnosis"].shape == (2, 4)  # the seed layout ignores coords


# --------------------------------------------------------------------------- #
# spatial masking: empty cells are not tissue
# --------------------------------------------------------------------------- #
def _uniform_bag(coords_xy, feat: torch.Tensor):
    c = torch.tensor(coords_xy, dtype=torch.float32) * STEP
    return feat.expand(c.shape[0], -1).clone(), c


def _shapes():
    square = [(x, y) for x in range(8) for y in range(8)]  # fills the 8x8 map
    rect = [(x, y) for x in range(3) for y in range(8)]  # 3 x 8 strip, 5 empty columns
    ring = [(x, y) for x in range(7) for y in range(7) if x in (0, 6) or y in (0, 6)]  # empty inside
    blob = [(x, y) for x in range(8) for y in range(8) if (x - 3.5) ** 2 + (y - 3.5) ** 2 < 9]
    return [square, rect, ring, blob]


def test_spatial_output_ignores_empty_cells_for_uniform_tissue(monkeypatch):
    """Every patch of a slide has the same feature f. Each tissue cell then holds f and, if empty
    cells are really left out (path and keys zeroed, keys normalised by the tissue they cover, pooling
    over tissue only), every sampled key carries the same value and every tissue token ends up
    identical: the model's output cannot depend on the tissue's shape or size. If empty cells counted
    as zero-valued tissue anywhere, it would (checked at the end by removing the key mask)."""
    cfg = _cfg(layout="spatial", attn_dropout=0.0, dropout=0.0, offset_scale=2.0)
    model = _model(cfg, seed=5)
    _trained_like_norms(model)  # LayerNorm(0) = beta != 0: empty cells must be masked after the norm
    f = torch.randn(1, 32, generator=torch.Generator().manual_seed(5))
    bags = [_uniform_bag(s, f) for s in _shapes()]
    genes = (torch.randn(1, 5).expand(4, -1), torch.randn(1, 7).expand(4, -1))
    batch = _batch(cfg, bags, genes=genes)
    with torch.no_grad():
        tokens, tmask = model.tokens(batch)
        assert not tmask[0].logical_not().any() and tmask[1:].logical_not().any(dim=1).all()
        out = model(batch)
    for name, v in _flat(out).items():
        if name.startswith(("logits", "subspaces")):
            torch.testing.assert_close(v, v[:1].expand_as(v), rtol=0, atol=1e-4, msg=name)

    # Sensitivity: the same model with key masking switched off depends on the tissue shape.
    real_forward = GeneDeformableAttention.forward
    monkeypatch.setattr(GeneDeformableAttention, "forward",
                        lambda self, x_q, x_kv, key_mask=None: real_forward(self, x_q, x_kv, None))
    with torch.no_grad():
        unmasked = model(batch).subspaces[0]
    assert (unmasked - unmasked[:1]).abs().max() > 1e-3


def test_branch_ignores_token_values_in_empty_cells():
    cfg = _cfg(layout="spatial", attn_dropout=0.0)
    torch.manual_seed(6)
    branch = SubspaceBranch(cfg).eval()
    _trained_like_norms(branch)
    B, T = 3, 64
    tokens = torch.randn(B, T, 32)
    tmask = torch.rand(B, T) > 0.4
    gene = torch.randn(B, 16)
    garbage = torch.where(tmask[..., None], tokens, 1e4 * torch.randn(B, T, 32))
    with torch.no_grad():
        v_ref, grid_ref = branch(tokens * tmask[..., None], tmask, gene)
        v, grid = branch(garbage, tmask, gene)
        torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(grid, grid_ref, rtol=0, atol=1e-5)
        # a change on one tissue cell does change the result
        bumped = tokens.clone()
        cell = int(tmask[0].nonzero()[0])
        bumped[0, cell] += 5.0
        v_bumped, _ = branch(bumped * tmask[..., None], tmask, gene)
    assert (v_bumped[0] - v_ref[0]).abs().max() > 1e-4
    torch.testing.assert_close(v_bumped[1:], v_ref[1:], rtol=0, atol=1e-6)  # samples independent


# --------------------------------------------------------------------------- #
# gradients
# --------------------------------------------------------------------------- #
_SHIFT_INVARIANT = ("attn.cpb.mlp.4.bias",)  # adds one constant to every key's score of a head


@pytest.mark.parametrize("layout,position_bias",
                         [("seed", "table"), ("seed", "exact"), ("spatial", "table"), ("spatial", "exact")])
def test_every_smm_parameter_gets_a_gradient(layout, position_bias):
    cfg = _cfg(layout=layout, position_bias=position_bias, exact_chunk=256)
    model = _model(cfg, seed=7, train=True)
    batch = _batch(cfg, _bags((9, 70, 40, 25), seed=7))
    out = model(batch)
    loss, parts = multitask_loss(out, batch, LossConfig())
    assert set(parts) == {"diagnosis", "grade", "survival", "consistency_tumour", "consistency_micro"}
    assert parts["consistency_tumour"] > 0 and parts["consistency_micro"] > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        scale = float(p.grad.abs().max())
        if name.endswith(_SHIFT_INVARIANT):
            # softmax is shift-invariant, so the CPB output bias has (numerically) zero gradient;
            # the reference shares this property.
            assert scale < 1e-6, name
        else:
            assert scale > 0, name


@pytest.mark.parametrize("arch,cls", [("snn", SNNModel), ("abmil", ABMILModel), ("concat", ConcatModel)])
def test_every_baseline_parameter_gets_a_gradient(arch, cls):
    cfg = _cfg(arch=arch)
    model = _model(cfg, seed=8, train=True)
    assert isinstance(model, cls)
    batch = _batch(cfg, _bags((9, 70, 40, 25), seed=8))
    out = model(batch)
    assert out.subspaces is None and out.genes is None and out.grids is None
    loss, parts = multitask_loss(out, batch, LossConfig())
    assert set(parts) == set(TASKS)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name == "encoder.pool.score.bias":  # one constant on every patch's score: softmax drops it
            assert float(p.grad.abs().max()) < 1e-6, name
        else:
            assert float(p.grad.abs().max()) > 0, name


@pytest.mark.parametrize("arch", ["abmil", "concat"])
def test_baseline_padding_values_do_not_change_outputs(arch):
    cfg = _cfg(arch=arch)
    model = _model(cfg, seed=9)
    bags = _bags((5, 40, 12), seed=9)
    with torch.no_grad():
        ref = model(_batch(cfg, bags)).logits
        for garbage in (1e6, -1e30):
            out = model(_batch(cfg, bags, pad_feat=garbage)).logits
            for t in ref:
                torch.testing.assert_close(out[t], ref[t], rtol=0, atol=1e-6)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
def test_abmil_ignores_non_finite_padding(garbage):
    cfg = _cfg(arch="abmil")
    model = _model(cfg, seed=10)
    bags = _bags((5, 40), seed=10)
    with torch.no_grad():
        ref = model(_batch(cfg, bags)).logits["diagnosis"]
        out = model(_batch(cfg, bags, pad_feat=garbage)).logits["diagnosis"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- #
# query fusion
# --------------------------------------------------------------------------- #
def test_query_fusion_equals_concatenate_repeat_linear():
    torch.manual_seed(11)
    H, B, T = 16, 3, 50
    fusion = QueryFusion(H)
    path, gene = torch.randn(B, T, H), torch.randn(B, H)
    ref = nn.Linear(2 * H, H)
    with torch.no_grad():
        ref.weight.copy_(torch.cat([fusion.path.weight, fusion.gene.weight], dim=1))
        ref.bias.copy_(fusion.path.bias)
        want = ref(torch.cat([path, gene.unsqueeze(1).expand(-1, T, -1)], -1))
        got = fusion(path, gene)
    assert got.shape == (B, T, H)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fusion.gene.bias is None  # one bias, as in the single Linear(2H, H)
    assert count_parameters(fusion) == count_parameters(ref)


# --------------------------------------------------------------------------- #
# ablation switches (ModelConfig docstring)
# --------------------------------------------------------------------------- #
def _reference_branch(branch: SubspaceBranch, tokens, tmask, gene):
    """The branch forward as written before the gene_queries switch existed, from its own modules."""
    B, T, _ = tokens.shape
    G = branch.grid
    m = tmask.unsqueeze(-1).to(tokens.dtype)
    path = branch.path_fc(tokens) * m
    h = branch.fuse.path(path) + branch.fuse.gene(gene).unsqueeze(1)
    xq, xkv = branch.norm(h) * m, branch.norm(path) * m
    to_map = lambda x: x.transpose(1, 2).reshape(B, -1, G, G)  # noqa: E731
    a, grid = branch.attn(to_map(xq), to_map(xkv), tmask.view(B, G, G))
    h = h + a.flatten(2).transpose(1, 2)
    return branch.proj(branch.pool(masked_mean(branch.final_norm(h), tmask))), grid


def test_default_branch_is_bit_identical_to_the_reference_forward():
    cfg = _cfg(layout="spatial")
    assert cfg.gene_queries
    model = _model(cfg, seed=4)
    _trained_like_norms(model, seed=4)
    batch = _batch(cfg, _bags((9, 70), seed=4))
    tokens, tmask = model.tokens(batch)
    gene = model.gene_tumour(batch.genes_tumour)
    with torch.no_grad():
        got = model.branch_tumour(tokens, tmask, gene)
        want = _reference_branch(model.branch_tumour, tokens, tmask, gene)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_without_gene_queries_the_queries_and_offsets_ignore_the_genes_but_the_output_does_not():
    cfg = _cfg(layout="spatial", gene_queries=False)
    model = _model(cfg, seed=5)
    _trained_like_norms(model, seed=5)
    bags = _bags((12, 60), seed=5)
    a = _batch(cfg, bags, seed=5)
    b = _batch(cfg, bags, seed=6)  # same patches, other genes
    assert not torch.equal(a.genes_tumour, b.genes_tumour)
    branch = model.branch_tumour
    with torch.no_grad():
        tokens, tmask = model.tokens(a)
        qa = branch.attention_inputs(tokens, tmask, model.gene_tumour(a.genes_tumour))
        qb = branch.attention_inputs(tokens, tmask, model.gene_tumour(b.genes_tumour))
        oa, ob = model(a), model(b)
    for x, y in zip(qa, qb):  # residual stream, query map, key map, key mask
        assert torch.equal(x, y)
    assert torch.equal(oa.grids[0], ob.grids[0]) and torch.equal(oa.grids[1], ob.grids[1])
    assert (oa.logits["diagnosis"] - ob.logits["diagnosis"]).abs().max() > 1e-4  # genes still reach the heads
    assert branch.fuse.gene is None and branch.proj.in_features == 2 * cfg.hidden_dim
    # the same size as the full model: W_g (H x H) moved into proj's gene half
    assert count_parameters(model) == count_parameters(_model(_cfg(layout="spatial")))
    out = model.train()(a)  # every parameter trains, the gene encoders through proj's gene half
    multitask_loss(out, a, LossConfig())[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # with gene queries (default) the same two batches do move the sampled positions
    full = _model(_cfg(layout="spatial"), seed=5)
    with torch.no_grad():
        assert not torch.equal(full(a).grids[0], full(b).grids[0])


def test_zero_offset_scale_ablation_samples_the_fixed_grid_in_the_model():
    cfg = _cfg(layout="spatial", offset_scale=0.0)
    model = _model(cfg, seed=6)
    with torch.no_grad():
        out = model(_batch(cfg, _bags((20, 50), seed=6)))
    K = cfg.key_grid
    ref = model.branch_tumour.attn.ref_grid.reshape(1, 1, 2 * K * K).expand(2, cfg.offset_groups, -1)
    for grid in out.grids:
        assert torch.equal(grid, ref)  # offsets exactly zero whatever the queries


def test_zero_consistency_weight_removes_the_consistency_terms():
    cfg = _cfg(layout="spatial")
    model = _model(cfg, seed=7)
    batch = _batch(cfg, _bags((20, 50), seed=7))
    with torch.no_grad():
        out = model(batch)
    full, parts = multitask_loss(out, batch, LossConfig(consistency_weight=0.5))
    off, off_parts = multitask_loss(out, batch, LossConfig(consistency_weight=0.0))
    assert {"consistency_tumour", "consistency_micro"} <= set(parts)
    assert not {"consistency_tumour", "consistency_micro"} & set(off_parts)
    tasks = sum(v for k, v in parts.items() if not k.startswith("consistency"))
    assert float(off) == pytest.approx(tasks, rel=1e-6)
    assert float(full) == pytest.approx(tasks + 0.5 * (parts["consistency_tumour"] + parts["consistency_micro"]),
                                        rel=1e-6)
    assert float(full) > float(off)


# --------------------------------------------------------------------------- #
# reference setting: parameter counts and geometry
# --------------------------------------------------------------------------- #
def test_parameter_counts_match_the_reference():
    torch.manual_seed(12)
    model = build_model(ModelConfig(tasks=("diagnosis",)))
    assert isinstance(model, SMMModel)
    assert count_parameters(model.gene_tumour) == 12_752  # MaxNet(59) without its unused classifier
    assert count_parameters(model.gene_micro) == 32_080  # MaxNet(361) likewise
    for branch in (model.branch_tumour, model.branch_micro):
        assert count_parameters(branch.attn) == 93_921  # DeformCrossAttention2D
        assert count_parameters(branch.fuse) == 32_896  # FusionNet's Linear(256, 128)
        assert sum(p.numel() for p in branch.fuse.parameters()) == 128 * 256 + 128
    assert count_parameters(model.heads) == 1_028  # Linear(256, 4)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_reference_offset_network_gives_12x12_without_pooling(monkeypatch):
    cfg = ModelConfig()  # grid 50, key grid 12, 8 groups, inner 512 -> 64 channels per group
    torch.manual_seed(13)
    attn = GeneDeformableAttention(cfg).eval()
    conv = attn.offset_net[0]
    assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == ((6, 6), (4, 4), (1, 1), 64)
    with torch.no_grad():
        assert attn.offset_net(torch.randn(1 * 8, 64, 50, 50)).shape == (8, 2, 12, 12)

        def no_pool(*a, **k):
            raise AssertionError("adaptive pooling used at the reference setting")

        monkeypatch.setattr("smm_model.nn.attention.F.adaptive_avg_pool2d", no_pool)
        off = attn._offsets(torch.randn(1, 512, 50, 50))
    assert off.shape == (8, 2, 12, 12)


def test_key_grid_is_independent_of_the_bag_size(monkeypatch):
    """grid 100 / 10,000 patches: still 12x12 keys per group (stride 8, kernel 10, no pooling)."""
    cfg = _cfg(grid_size=100, n_patches=10_000, key_grid=12, offset_groups=4, attn_dropout=0.0)
    torch.manual_seed(14)
    attn = GeneDeformableAttention(cfg).eval()
    keys = {}
    attn.to_k.register_forward_pre_hook(lambda mod, inp: keys.__setitem__("shape", tuple(inp[0].shape)))

    def no_pool(*a, **k):
        raise AssertionError("adaptive pooling used")

    monkeypatch.setattr("smm_model.nn.attention.F.adaptive_avg_pool2d", no_pool)
    x = torch.randn(2, 16, 100, 100)
    with torch.no_grad():
        out, grid = attn(x, x)
    assert keys["shape"] == (2, 16, 12, 12)
    assert grid.shape == (2, 4, 2 * 12 * 12)
    assert out.shape == (2, 16, 100, 100)


def test_seed_model_at_larger_bag_keeps_key_grid():
    cfg = _cfg(grid_size=20, n_patches=400, key_grid=4)
    model = _model(cfg)
    with torch.no_grad():
        out = model(_batch(cfg, _bags((500, 30), lattice=30)))
    assert all(g.shape == (2, cfg.offset_groups, 2 * 4 * 4) for g in out.grids)


# --------------------------------------------------------------------------- #
# factory, train / eval
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("arch,cls", [("smm", SMMModel), ("snn", SNNModel), ("abmil", ABMILModel),
                                      ("concat", ConcatModel)])
def test_build_model_returns_the_named_class(arch, cls):
    model = build_model(_cfg(arch=arch, tasks=("grade", "survival")))
    assert type(model) is cls
    assert set(model.heads) == {"grade", "survival"}
    heads = model.split_heads()
    assert (set(heads) == {"grade", "survival"}) if arch == "smm" else heads == {}


@pytest.mark.parametrize("layout", ["seed", "spatial"])
def test_eval_is_deterministic_and_train_uses_dropout(layout):
    cfg = _cfg(layout=layout, dropout=0.3, attn_dropout=0.3)
    model = _model(cfg, seed=15)
    batch = _batch(cfg, _bags((20, 60), seed=15))
    with torch.no_grad():
        _assert_outputs_close(model(batch), model(batch), atol=0.0)
        model.train()
        torch.manual_seed(0)
        a = model(batch).logits["diagnosis"]
        torch.manual_seed(1)
        b = model(batch).logits["diagnosis"]
    assert (a - b).abs().max() > 1e-6


# --------------------------------------------------------------------------- #
# survival reading the model's own class predictions (model.survival_reads_tasks)
# --------------------------------------------------------------------------- #
ARCHS = ("smm", "snn", "abmil", "concat")


@pytest.mark.parametrize("arch", ARCHS)
def test_untrained_survival_link_gives_the_plain_heads_output(arch):
    plain = _model(_cfg(arch=arch), seed=3)
    linked = _model(_cfg(arch=arch, survival_reads_tasks=True), seed=3)
    extra = set(linked.state_dict()) - set(plain.state_dict())
    assert extra == {"survival_link.link.weight", "survival_link.link.bias"}
    assert linked.state_dict()["survival_link.link.weight"].shape == (5, 4 + 3)  # bins x (diagnosis + grade)
    linked.load_state_dict({**plain.state_dict(), **{k: linked.state_dict()[k] for k in extra}})
    batch = _batch(_cfg(arch=arch), _bags((9, 30, 20), seed=3))
    _assert_outputs_close(plain(batch), linked(batch), atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_survival_link_reads_class_probabilities_and_never_trains_the_class_heads(arch):
    cfg = _cfg(arch=arch, survival_reads_tasks=True)
    model = _model(cfg, seed=4, train=True)
    batch = _batch(cfg, _bags((9, 30, 20, 12), seed=4))
    with torch.no_grad():
        model.survival_link.link.weight.normal_()
    out = model(batch)
    head = model.heads["survival"]
    out.logits["survival"].sum().backward()
    assert float(model.survival_link.link.weight.grad.abs().max()) > 0
    for task in ("diagnosis", "grade"):
        assert model.heads[task].weight.grad is None or float(model.heads[task].weight.grad.abs().max()) == 0, task
    assert head.weight.grad is not None and float(head.weight.grad.abs().max()) > 0


def test_survival_link_moves_risk_with_the_predicted_class():
    """A link weight on one diagnosis class raises the hazard of patients predicted in it."""
    cfg = _cfg(arch="snn", survival_reads_tasks=True)
    model = _model(cfg, seed=5)
    batch = _batch(cfg, _bags((4, 4, 4, 4), seed=5))
    base = model(batch).logits
    with torch.no_grad():
        model.survival_link.link.weight[:, 0] = 2.0  # diagnosis class 0 raises every bin's hazard
    moved = model(batch).logits["survival"] - base["survival"]  # (B, bins)
    p0 = torch.softmax(base["diagnosis"], dim=1)[:, 0]  # (B,)
    torch.testing.assert_close(moved, (2.0 * p0).unsqueeze(1).expand_as(moved))


def test_survival_reads_tasks_needs_survival_and_a_class_task():
    with pytest.raises(ValueError, match="model.survival_reads_tasks"):
        _cfg(tasks=("survival",), survival_reads_tasks=True)
    with pytest.raises(ValueError, match="model.survival_reads_tasks"):
        _cfg(tasks=("diagnosis", "grade"), survival_reads_tasks=True)
    assert _cfg(tasks=("grade", "survival"), survival_reads_tasks=True).survival_reads_tasks
