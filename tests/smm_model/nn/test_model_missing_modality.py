"""Patients without a modality (Batch.has_patches / has_genes): each model trains only what their
data reaches, full batches are unchanged, and ``trained_parameters`` names exactly what gets a
gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from smm_model.config import LossConfig
from smm_model.nn.batch import Batch
from smm_model.nn.model import trained_parameters
from smm_model.objectives.coordination import coordinate_gradients
from smm_model.objectives.losses import multitask_loss
from test_model import _bags, _batch, _cfg, _flat, _model, _trained_like_norms

LOSS = LossConfig(consistency_weight=0.5)


def _flags(batch: Batch, has_patches=None, has_genes=None) -> Batch:
    as_t = lambda v: None if v is None else torch.tensor(v, dtype=torch.bool)
    return dataclasses.replace(batch, has_patches=as_t(has_patches), has_genes=as_t(has_genes))


def _grads(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor | None]:
    """Gradient of each parameter after one multitask loss (consistency on) and backward."""
    model.zero_grad(set_to_none=True)
    out = model(batch)
    loss, parts = multitask_loss(out, batch, LOSS)
    assert torch.isfinite(loss) and all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}


def _reached(grads) -> set[str]:
    return {k for k, g in grads.items() if g is not None and bool(g.abs().sum() > 0)}


@pytest.fixture(scope="module")
def cfg():
    return _cfg(layout="spatial", tasks=("diagnosis", "grade", "survival"), dropout=0.0)


@pytest.mark.parametrize("arch", ["smm", "concat"])
def test_full_flags_give_the_same_outputs_as_no_flags(cfg, arch):
    c = dataclasses.replace(cfg, arch=arch)
    model = _model(c)
    _trained_like_norms(model)
    batch = _batch(c, _bags([5, 9, 3]))
    ref = _flat(model(batch))
    got = _flat(model(_flags(batch, [True] * 3, [True] * 3)))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("arch,have", [("smm", ("genomics",)), ("smm", ("histology",)),
                                       ("concat", ("genomics",)), ("concat", ("histology",)),
                                       ("snn", ("genomics",)), ("abmil", ("histology",))])
def test_a_site_with_one_modality_trains_exactly_trained_parameters(cfg, arch, have):
    c = dataclasses.replace(cfg, arch=arch)
    model = _model(c, train=True)
    _trained_like_norms(model)
    B = 4
    batch = _flags(_batch(c, _bags([6, 4, 8, 5])), [("histology" in have)] * B, [("genomics" in have)] * B)
    grads = _grads(model, batch)
    expected = set(trained_parameters(model, have))
    assert _reached(grads) == expected
    untouched = set(grads) - expected
    assert all(grads[k] is None for k in untouched)  # not reached at all, not a zero gradient
    if arch == "smm":
        assert untouched  # something is really left out
    # coordination on the split heads reads the subspace vectors, which exist: finite, no error
    if arch == "smm":
        out = model(batch)
        stats = coordinate_gradients(model.split_heads(), out.subspaces, batch)
        assert set(stats) == set(c.tasks)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_smm_without_slides_reads_one_virtual_token(cfg):
    model = _model(cfg)
    _trained_like_norms(model)
    batch = _flags(_batch(cfg, _bags([4, 4])), [False, False], None)
    out = model(batch)
    assert out.grids is None  # no keys sampled, no consistency term
    for branch, gene, v in zip((model.branch_tumour, model.branch_micro), out.genes, out.subspaces):
        h = branch.fuse.path.bias + gene @ branch.fuse.gene.weight.T  # fuse(0, gene), (B, H)
        ref = branch.proj(branch.pool(branch.final_norm(h)))
        torch.testing.assert_close(v, ref)


def test_smm_without_genomics_uses_a_zero_gene_embedding(cfg):
    model = _model(cfg)
    _trained_like_norms(model)
    batch = _batch(cfg, _bags([5, 7]))
    out = model(_flags(batch, None, [False, False]))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in out.genes)
    zero_genes = dataclasses.replace(batch, genes_tumour=torch.full_like(batch.genes_tumour, 3.0))
    # the placeholder gene vectors are never read
    assert torch.equal(model(_flags(zero_genes, None, [False, False])).logits["grade"], out.logits["grade"])


@pytest.mark.parametrize("arch", ["smm", "concat"])
def test_a_mixed_batch_predicts_each_patient_from_what_it_has(cfg, arch):
    """Rows of a mixed batch equal the same patients in batches of their own kind (eval mode)."""
    c = dataclasses.replace(cfg, arch=arch)
    model = _model(c)
    _trained_like_norms(model)
    batch = _batch(c, _bags([5, 7, 6, 4]))
    has_p, has_g = [True, False, True, True], [True, True, False, True]
    mixed = model(_flags(batch, has_p, has_g))
    alone = {
        "full": model(_flags(batch, None, None)),
        "genomics": model(_flags(batch, [False] * 4, None)),
        "histology": model(_flags(batch, None, [False] * 4)),
    }
    kind = ["full", "genomics", "histology", "full"]
    for b, k in enumerate(kind):
        for task in c.tasks:
            torch.testing.assert_close(mixed.logits[task][b], alone[k].logits[task][b], rtol=1e-5, atol=1e-5)
    if arch == "smm":
        # grids only for the rows with both modalities, in batch order
        assert mixed.grid_rows.tolist() == [0, 3]
        torch.testing.assert_close(mixed.grids[0], alone["full"].grids[0][[0, 3]], rtol=1e-5, atol=1e-5)
        loss, _ = multitask_loss(mixed, _flags(batch, has_p, has_g), LOSS)
        assert torch.isfinite(loss)


def test_single_modality_baselines_refuse_a_patient_without_their_modality(cfg):
    batch = _batch(cfg, _bags([3, 3]))
    for arch, flags in (("snn", dict(has_genes=[True, False])), ("abmil", dict(has_patches=[False, True]))):
        model = _model(dataclasses.replace(cfg, arch=arch))
        with pytest.raises(ValueError, match=f"arch '{arch}' reads"):
            model(_flags(batch, **flags))
    with pytest.raises(ValueError, match="neither slides nor genomics"):
        _model(cfg)(_flags(batch, [False, True], [False, True]))


def test_trained_parameters_refuses_what_a_site_cannot_train(cfg):
    with pytest.raises(ValueError, match="reads genomics"):
        trained_parameters(_model(dataclasses.replace(cfg, arch="snn")), ["histology"])
    with pytest.raises(ValueError, match="reads histology"):
        trained_parameters(_model(dataclasses.replace(cfg, arch="abmil")), ["genomics"])
    with pytest.raises(ValueError, match="non-empty subset"):
        trained_parameters(_model(cfg), [])
    model = _model(cfg)
    assert trained_parameters(model, ["histology", "genomics"]) == list(model.state_dict())


@pytest.mark.parametrize("have", [("genomics",), ("histology",)])
def test_the_gene_queries_ablation_also_trains_exactly_trained_parameters(cfg, have):
    """model.gene_queries: false joins the genes after pooling; a missing modality still reaches
    exactly what trained_parameters names (a zero gene vector joins for a site without genomics)."""
    c = dataclasses.replace(cfg, gene_queries=False)
    model = _model(c, train=True)
    _trained_like_norms(model)
    batch = _flags(_batch(c, _bags([6, 4, 8])), [("histology" in have)] * 3, [("genomics" in have)] * 3)
    grads = _grads(model, batch)
    expected = set(trained_parameters(model, have))
    assert _reached(grads) == expected and all(grads[k] is None for k in set(grads) - expected)


@pytest.mark.parametrize("arch", ["smm", "concat"])
@pytest.mark.parametrize("have", [("genomics",), ("histology",)])
def test_the_survival_link_is_trained_by_every_site_and_nothing_else_changes(cfg, arch, have):
    """model.survival_reads_tasks: the link reads class probabilities every site has, so a site
    holding one modality trains it too, and still exactly what trained_parameters names."""
    c = dataclasses.replace(cfg, arch=arch, survival_reads_tasks=True)
    model = _model(c, train=True)
    _trained_like_norms(model)
    batch = _flags(_batch(c, _bags([6, 4, 8])), [("histology" in have)] * 3, [("genomics" in have)] * 3)
    grads = _grads(model, batch)
    expected = set(trained_parameters(model, have))
    assert {"survival_link.link.weight", "survival_link.link.bias"} <= expected
    assert _reached(grads) == expected and all(grads[k] is None for k in set(grads) - expected)
