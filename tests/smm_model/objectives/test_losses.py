"""Tests for smm_model.objectives.losses: hand-computed values, masking, the consistency grouping, multitask sum."""

from __future__ import annotations

import math

import pytest
import torch

from smm_model.nn.batch import Batch
from smm_model.config import LossConfig
from smm_model.objectives.losses import (
    consistency_loss,
    logit_adjustment_offsets,
    multitask_loss,
    nll_survival_loss,
    relation_map,
    weighted_cross_entropy,
)
from smm_model.nn.model import ModelOutput

# --------------------------------------------------------------------------- helpers


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hand_nll(logits: list[list[float]], bins: list[int], events: list[int], alpha: float) -> float:
    """MCAT nll_loss by plain Python: h = sigmoid, S = cumprod(1 - h), S_{-1} = 1."""
    total = 0.0
    for row, y, e in zip(logits, bins, events):
        h = [_sigmoid(v) for v in row]
        S = []
        acc = 1.0
        for hk in h:
            acc *= 1.0 - hk
            S.append(acc)
        s_prev = 1.0 if y == 0 else S[y - 1]
        unc = -(math.log(s_prev) + math.log(h[y])) if e == 1 else 0.0
        cen = -math.log(S[y]) if e == 0 else 0.0
        total += (1 - alpha) * (unc + cen) + alpha * unc
    return total / len(bins)


def hand_weighted_ce(logits: list[list[float]], target: list[int], weight: list[float]) -> float:
    num = den = 0.0
    for row, y in zip(logits, target):
        lse = math.log(sum(math.exp(v) for v in row))
        nll = lse - row[y]
        num += weight[y] * nll
        den += weight[y]
    return num / den


def slow_relation(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix with each row divided by its L2 norm, by explicit loops (float64)."""
    n = x.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        row = [_f(torch.dot(x[i].double(), x[j].double())) for j in range(n)]
        norm = math.sqrt(sum(v * v for v in row))
        for j in range(n):
            out[i, j] = row[j] / norm
    return out


def slow_consistency(gene: torch.Tensor, grid: torch.Tensor) -> float:
    """Intended grouping: per offset group j, the sample x sample relation of grid[:, j, :]."""
    n, g, _ = grid.shape
    s_g = slow_relation(gene)
    s_v = torch.zeros(n, n, dtype=torch.float64)
    for j in range(g):
        s_v += slow_relation(grid[:, j, :])
    s_v /= g
    return _f(((s_g - s_v) ** 2).sum() / n)


def buggy_reference_consistency(gene: torch.Tensor, grid: torch.Tensor) -> float:
    """The reference's grouping: rows laid out (N*g) sample-major, then view(g, N, -1)."""
    n, g, f = grid.shape
    mixed = grid.reshape(n * g, f).view(g, n, f)
    s_v = torch.stack([slow_relation(mixed[k]) for k in range(g)]).mean(0)
    return _f(((slow_relation(gene) - s_v) ** 2).sum() / n)


# --------------------------------------------------------------------------- NLL survival

LOGITS = [[0.3, -1.2, 0.8], [-0.5, 0.4, 1.5], [1.1, -0.7, -0.2]]
BINS = [1, 2, 0]
EVENTS = [1, 0, 1]


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_nll_survival_matches_hand_computation(alpha):
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    got = nll_survival_loss(logits, torch.tensor(BINS), torch.tensor(EVENTS, dtype=torch.float64),
                            alpha=alpha)
    assert _f(got) == pytest.approx(hand_nll(LOGITS, BINS, EVENTS, alpha), abs=1e-12)


def test_nll_survival_hand_values_cover_every_case():
    # Sanity on the fixture: last bin censored and last bin uncensored also match.
    logits = [[0.2, 0.1, -0.3], [0.9, -0.4, 0.6]]
    bins, events = [2, 2], [0, 1]
    got = nll_survival_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(bins),
                            torch.tensor(events, dtype=torch.float64), alpha=0.0)
    assert _f(got) == pytest.approx(hand_nll(logits, bins, events, 0.0), abs=1e-12)
    # alpha changes the value when there are uncensored and censored samples
    got_a = nll_survival_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(bins),
                              torch.tensor(events, dtype=torch.float64), alpha=0.4)
    assert _f(got_a) != pytest.approx(_f(got), abs=1e-6)


def test_nll_survival_float32_and_extreme_logits_are_finite():
    logits = torch.tensor([[40.0, -40.0, 30.0], [-50.0, -60.0, -70.0]], requires_grad=True)
    loss = nll_survival_loss(logits, torch.tensor([2, 1]), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_nll_survival_excludes_masked_samples():
    logits = torch.tensor(LOGITS + [[0.0, 0.0, 0.0]], dtype=torch.float64)
    # the masked sample has an out-of-range bin: it must never be gathered
    bins = torch.tensor(BINS + [99])
    events = torch.tensor(EVENTS + [1], dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])
    got = nll_survival_loss(logits, bins, events, mask, alpha=0.4)
    keep = [0, 2]
    want = hand_nll([LOGITS[i] for i in keep], [BINS[i] for i in keep], [EVENTS[i] for i in keep], 0.4)
    assert _f(got) == pytest.approx(want, abs=1e-12)


def test_nll_survival_all_masked_is_exact_zero_with_graph():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = nll_survival_loss(logits, torch.tensor([0, 1, 2]), torch.ones(3), torch.zeros(3, dtype=torch.bool))
    assert _f(loss) == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------- weighted CE

CE_LOGITS = [[1.0, -0.5, 0.2, 0.0], [0.3, 0.3, -1.0, 2.0], [-0.2, 1.7, 0.4, 0.1]]
CE_TARGET = [0, 3, 1]
CE_WEIGHT = [1.0, 4.15, 2.93, 2.43]


def test_weighted_cross_entropy_matches_hand_computation():
    got = weighted_cross_entropy(torch.tensor(CE_LOGITS, dtype=torch.float64), torch.tensor(CE_TARGET),
                                 weight=torch.tensor(CE_WEIGHT, dtype=torch.float64))
    assert _f(got) == pytest.approx(hand_weighted_ce(CE_LOGITS, CE_TARGET, CE_WEIGHT), abs=1e-12)
    # the weights matter (differs from the unweighted mean)
    unweighted = hand_weighted_ce(CE_LOGITS, CE_TARGET, [1.0] * 4)
    assert _f(got) != pytest.approx(unweighted, abs=1e-4)


def test_weighted_cross_entropy_respects_mask():
    logits = torch.tensor(CE_LOGITS + [[5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor(CE_TARGET + [-1])  # unknown label: would raise if it were used
    mask = torch.tensor([True, True, False, False])
    got = weighted_cross_entropy(logits, target, mask, torch.tensor(CE_WEIGHT, dtype=torch.float64))
    assert _f(got) == pytest.approx(hand_weighted_ce(CE_LOGITS[:2], CE_TARGET[:2], CE_WEIGHT), abs=1e-12)


def test_weighted_cross_entropy_all_masked_is_zero_with_graph():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = weighted_cross_entropy(logits, torch.tensor([-1, -1]), torch.zeros(2, dtype=torch.bool))
    assert _f(loss) == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------- relation map / consistency


def test_relation_map_rows_have_unit_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    r = relation_map(x)
    assert r.shape == (7, 7)
    torch.testing.assert_close(r.norm(dim=1), torch.ones(7, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(r, slow_relation(x), atol=1e-12, rtol=0)
    batched = relation_map(torch.randn(3, 6, 4, generator=g, dtype=torch.float64))
    assert batched.shape == (3, 6, 6)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(3, 6, dtype=torch.float64), atol=1e-12, rtol=0)


def test_consistency_zero_when_relations_match():
    g = torch.Generator().manual_seed(1)
    n, groups = 5, 4
    gene = torch.rand(n, 6, generator=g, dtype=torch.float64)
    grid = gene.unsqueeze(1).expand(n, groups, 6).clone()  # grid[:, j] = gene for every group j
    assert _f(consistency_loss(gene, grid)) == pytest.approx(0.0, abs=1e-12)
    # scaling one group's positions does not change its row-normalised relation map
    grid[:, 2] *= 3.0
    assert _f(consistency_loss(gene, grid)) == pytest.approx(0.0, abs=1e-12)


def test_consistency_positive_for_random_inputs():
    g = torch.Generator().manual_seed(2)
    gene = torch.randn(6, 8, generator=g)
    grid = torch.randn(6, 4, 10, generator=g)
    assert _f(consistency_loss(gene, grid)) > 1e-3


def test_consistency_invariant_to_batch_permutation():
    g = torch.Generator().manual_seed(3)
    gene = torch.randn(7, 8, generator=g, dtype=torch.float64)
    grid = torch.randn(7, 4, 18, generator=g, dtype=torch.float64)
    perm = torch.randperm(7, generator=g)
    a = consistency_loss(gene, grid)
    b = consistency_loss(gene[perm], grid[perm])
    assert _f(a) == pytest.approx(_f(b), abs=1e-6)


@pytest.mark.parametrize("n, groups", [(6, 4), (8, 8), (3, 5)])
def test_consistency_uses_per_group_sample_grouping_not_reference_bug(n, groups):
    g = torch.Generator().manual_seed(10 * n + groups)
    gene = torch.randn(n, 6, generator=g, dtype=torch.float64)
    grid = torch.randn(n, groups, 2 * 3 * 3, generator=g, dtype=torch.float64)
    got = _f(consistency_loss(gene, grid))
    correct = slow_consistency(gene, grid)
    buggy = buggy_reference_consistency(gene, grid)
    assert abs(correct - buggy) > 1e-3  # the case does tell the two groupings apart
    assert got == pytest.approx(correct, abs=1e-10)
    assert got != pytest.approx(buggy, abs=1e-4)


def test_consistency_buggy_grouping_would_not_be_zero_on_matching_relations():
    # With N == groups, the reference view makes each chunk one sample's groups: the matching case
    # (loss 0 when intended) would be non-zero under the bug, but is zero here.
    g = torch.Generator().manual_seed(4)
    n = groups = 4
    gene = torch.rand(n, 5, generator=g, dtype=torch.float64) + 0.1
    grid = gene.unsqueeze(1).expand(n, groups, 5).clone()
    assert buggy_reference_consistency(gene, grid) > 1e-3
    assert _f(consistency_loss(gene, grid)) == pytest.approx(0.0, abs=1e-12)


def test_consistency_gradient_reaches_gene_and_grid():
    g = torch.Generator().manual_seed(5)
    gene = torch.randn(5, 6, generator=g, requires_grad=True)
    grid = torch.randn(5, 3, 8, generator=g, requires_grad=True)
    consistency_loss(gene, grid).backward()
    assert gene.grad is not None and gene.grad.abs().sum() > 0
    assert grid.grad is not None and grid.grad.abs().sum() > 0


# --------------------------------------------------------------------------- multitask


def _batch(B: int, label_mask: dict | None = None) -> Batch:
    g = torch.Generator().manual_seed(7)
    return Batch(
        patches=torch.zeros(B, 2, 3),
        patch_mask=torch.ones(B, 2, dtype=torch.bool),
        genes_tumour=torch.zeros(B, 2),
        genes_micro=torch.zeros(B, 2),
        labels={
            "diagnosis": torch.tensor([0, 3, 1, 2, -1, 0])[:B],
            "grade": torch.tensor([2, 0, 1, 1, 2, 0])[:B],
            "survival_bin": torch.randint(0, 4, (B,), generator=g),
            "event": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])[:B],
            "survival_time": torch.arange(B, dtype=torch.float32) * 100 + 50,
        },
        label_mask=label_mask or {},
    )


def _output(B: int, with_consistency: bool) -> ModelOutput:
    g = torch.Generator().manual_seed(8)
    logits = {
        "diagnosis": torch.randn(B, 4, generator=g, requires_grad=True),
        "grade": torch.randn(B, 3, generator=g, requires_grad=True),
        "survival": torch.randn(B, 4, generator=g, requires_grad=True),
    }
    if not with_consistency:
        return ModelOutput(logits)
    genes = (torch.randn(B, 8, generator=g, requires_grad=True), torch.randn(B, 8, generator=g))
    grids = (torch.randn(B, 2, 18, generator=g, requires_grad=True), torch.randn(B, 2, 18, generator=g))
    return ModelOutput(logits, subspaces=None, genes=genes, grids=grids)


def test_multitask_loss_parts_and_total():
    B = 6
    mask = {"diagnosis": torch.tensor([True, True, True, True, False, True])}  # label -1 is masked
    batch = _batch(B, mask)
    out = _output(B, with_consistency=True)
    cfg = LossConfig(task_weights={"diagnosis": 2.0, "grade": 0.5}, consistency_weight=0.3,
                     survival_alpha=0.4)
    cw = {"diagnosis": torch.tensor([1.0, 4.15, 2.93, 2.43])}
    total, parts = multitask_loss(out, batch, cfg, cw)
    assert set(parts) == {"diagnosis", "grade", "survival", "consistency_tumour", "consistency_micro"}

    want = {
        "diagnosis": weighted_cross_entropy(out.logits["diagnosis"], batch.labels["diagnosis"],
                                            mask["diagnosis"], cw["diagnosis"]),
        "grade": weighted_cross_entropy(out.logits["grade"], batch.labels["grade"]),
        "survival": nll_survival_loss(out.logits["survival"], batch.labels["survival_bin"],
                                      batch.labels["event"], alpha=0.4),
        "consistency_tumour": consistency_loss(out.genes[0], out.grids[0]),
        "consistency_micro": consistency_loss(out.genes[1], out.grids[1]),
    }
    for k, v in want.items():
        assert parts[k] == pytest.approx(_f(v), rel=1e-6, abs=1e-7), k
    # the class weights were used (differs from the unweighted CE on the same samples)
    unweighted = weighted_cross_entropy(out.logits["diagnosis"], batch.labels["diagnosis"], mask["diagnosis"])
    assert parts["diagnosis"] != pytest.approx(_f(unweighted), abs=1e-4)
    # survival alpha was used
    alpha0 = nll_survival_loss(out.logits["survival"], batch.labels["survival_bin"], batch.labels["event"])
    assert parts["survival"] != pytest.approx(_f(alpha0), abs=1e-5)

    expected_total = (2.0 * parts["diagnosis"] + 0.5 * parts["grade"] + 1.0 * parts["survival"]
                      + 0.3 * (parts["consistency_tumour"] + parts["consistency_micro"]))
    assert _f(total) == pytest.approx(expected_total, rel=1e-6)
    total.backward()
    assert out.logits["diagnosis"].grad is not None
    assert out.genes[0].grad is not None and out.grids[0].grad is not None


def test_multitask_loss_task_weights_change_total():
    B = 4
    batch, out = _batch(B), _output(B, with_consistency=False)
    t1, p1 = multitask_loss(out, batch, LossConfig())
    t2, p2 = multitask_loss(out, batch, LossConfig(task_weights={"grade": 3.0}))
    assert p1 == pytest.approx(p2)
    assert _f(t1) == pytest.approx(sum(p1.values()), rel=1e-6)
    assert _f(t2 - t1) == pytest.approx(2.0 * p1["grade"], rel=1e-5)


def test_multitask_loss_no_consistency_without_genes():
    B = 4
    batch, out = _batch(B), _output(B, with_consistency=False)
    total, parts = multitask_loss(out, batch, LossConfig(consistency_weight=0.5))
    assert set(parts) == {"diagnosis", "grade", "survival"}
    assert _f(total) == pytest.approx(sum(parts.values()), rel=1e-6)


def test_multitask_loss_no_consistency_when_weight_zero():
    B = 4
    batch, out = _batch(B), _output(B, with_consistency=True)
    _, parts = multitask_loss(out, batch, LossConfig(consistency_weight=0.0))
    assert set(parts) == {"diagnosis", "grade", "survival"}


def test_multitask_loss_only_enabled_tasks():
    B = 4
    batch = _batch(B)
    full = _output(B, with_consistency=False)
    out = ModelOutput({"grade": full.logits["grade"]})
    total, parts = multitask_loss(out, batch, LossConfig(task_weights={"grade": 2.0}))
    assert set(parts) == {"grade"}
    assert _f(total) == pytest.approx(2.0 * parts["grade"], rel=1e-6)


# --------------------------------------------------------------------------- logit adjustment


def hand_offsets(site: list[float], pooled: list[float], tau: float) -> list[float]:
    """tau * (log((s + 1) / (S + C)) - log((p + 1) / (P + C))): add-one smoothed priors."""
    c, s_tot, p_tot = len(site), sum(site), sum(pooled)
    return [tau * (math.log((s + 1) / (s_tot + c)) - math.log((p + 1) / (p_tot + c))) for s, p in zip(site, pooled)]


def test_logit_adjustment_offsets_match_hand_computation():
    site, pooled, tau = [5, 0, 3, 12], [40, 10, 25, 25], 0.7
    got = logit_adjustment_offsets(site, pooled, tau)
    assert got.shape == (4,) and got.dtype == torch.float32
    assert got.tolist() == pytest.approx(hand_offsets(site, pooled, tau), rel=1e-6)
    # A class the site lacks: finite and the most negative offset, not -inf.
    assert math.isfinite(got[1]) and int(got.argmin()) == 1
    assert logit_adjustment_offsets(site, pooled, 2 * tau).tolist() == pytest.approx((2 * got).tolist(), rel=1e-6)
    assert logit_adjustment_offsets(site, pooled, 0.0).tolist() == [0.0] * 4


def test_a_site_with_the_pooled_prior_gets_no_offsets():
    assert logit_adjustment_offsets([7, 2, 5], [7, 2, 5], 1.3).tolist() == [0.0, 0.0, 0.0]  # a one-site federation
    assert logit_adjustment_offsets([4, 4, 4], [30, 30, 30], 1.0).tolist() == pytest.approx([0.0] * 3, abs=1e-7)
    # The priors compared are the smoothed ones: a small site with the pooled proportions is pulled
    # towards uniform by its +1s, so it gets small offsets of that sign (exactly as by hand).
    small = logit_adjustment_offsets([2, 4, 6], [20, 40, 60], 1.0)
    assert small.tolist() == pytest.approx(hand_offsets([2, 4, 6], [20, 40, 60], 1.0), rel=1e-6)
    assert small[0] > 0 > small[2]


@pytest.mark.parametrize("site, pooled", [([1, 2], [1, 2, 3]), ([1, -1, 2], [3, 3, 3]), ([[1, 2]], [[1, 2]])])
def test_logit_adjustment_offsets_refuse_bad_counts(site, pooled):
    with pytest.raises(ValueError, match="logit adjustment"):
        logit_adjustment_offsets(site, pooled, 1.0)


def test_multitask_loss_with_logit_offsets_is_cross_entropy_on_shifted_logits():
    B = 6
    mask = {"diagnosis": torch.tensor([True, True, True, True, False, True])}
    batch, out = _batch(B, mask), _output(B, with_consistency=False)
    raw = {k: v.detach().clone() for k, v in out.logits.items()}
    offsets = {"diagnosis": torch.tensor([0.5, -1.0, 0.0, 2.0]), "grade": torch.tensor([-0.3, 0.0, 0.3])}
    cw = {"diagnosis": torch.tensor(CE_WEIGHT)}
    total, parts = multitask_loss(out, batch, LossConfig(), cw, offsets)
    _, plain = multitask_loss(out, batch, LossConfig(), cw)

    def shifted(task, rows):
        return [[v + o for v, o in zip(raw[task][i].tolist(), offsets[task].tolist())] for i in rows]

    rows = [i for i in range(B) if mask["diagnosis"][i]]
    labels = {t: batch.labels[t].tolist() for t in ("diagnosis", "grade")}
    assert parts["diagnosis"] == pytest.approx(
        hand_weighted_ce(shifted("diagnosis", rows), [labels["diagnosis"][i] for i in rows], CE_WEIGHT), rel=1e-5)
    assert parts["grade"] == pytest.approx(hand_weighted_ce(shifted("grade", range(B)), labels["grade"], [1.0] * 3),
                                           rel=1e-5)
    assert parts["diagnosis"] != pytest.approx(plain["diagnosis"], rel=1e-3)  # the offsets were used
    assert parts["survival"] == plain["survival"]  # survival has no classes to adjust
    assert _f(total) == pytest.approx(sum(parts.values()), rel=1e-6)
    # Inside the loss only: the model's logits (its predictions) are untouched.
    assert all(torch.equal(out.logits[k].detach(), raw[k]) for k in raw)
