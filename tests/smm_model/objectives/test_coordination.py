"""Tests for smm_model.objectives.coordination: the projection rules, the decision direction, the C-index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index as lifelines_ci

from smm_model.nn.batch import Batch
from smm_model.objectives.coordination import batch_c_index, coordinate_gradients, project_conflicting
from smm_model.nn.layers import SplitHead

# --------------------------------------------------------------------------- helpers


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _numpy_pcgrad(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = (x @ y) / (y @ y) * y
    return x - p


def _numpy_seed(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = (x @ y) / (y @ y) * y
    d = x - 2 * p
    return np.linalg.norm(x - p) * d / np.linalg.norm(d)


def _mixed_rows() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Rows 0, 2, 4 conflict (x.y < 0); row 1 agrees; row 3 is orthogonal; row 5 has x = 0."""
    y = torch.tensor([[1.0, 0.5, -0.2, 0.3],
                      [0.4, -1.0, 0.7, 0.2],
                      [-0.3, 0.8, 1.1, -0.6],
                      [1.0, 0.0, 0.0, 0.0],
                      [0.2, 0.2, -0.9, 1.4],
                      [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    x = torch.tensor([[-0.8, 0.3, 0.9, -0.1],
                      [0.5, -0.7, 0.2, 0.9],
                      [0.6, -0.4, 0.1, 0.7],
                      [0.0, 2.0, -1.0, 0.5],
                      [-0.3, 1.0, 0.8, -0.6],
                      [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    conflict = np.array([True, False, True, False, True, False])
    assert np.array_equal(((x * y).sum(1) < 0).numpy(), conflict)
    return x, y, conflict


# --------------------------------------------------------------------------- project_conflicting


@pytest.mark.parametrize("mode", ["pcgrad", "seed", "off"])
def test_no_conflict_no_change(mode):
    y = torch.tensor([[1.0, 0.0, 2.0], [0.5, -0.5, 0.1]])
    x = torch.tensor([[0.3, 5.0, 0.1], [0.0, 0.0, 0.0]])  # cos > 0 and a zero row
    new, changed = project_conflicting(x, y, mode)
    assert torch.equal(new, x)
    assert changed.dtype == torch.bool and not bool(changed.any())


def test_pcgrad_vectorised_matches_numpy_and_is_orthogonal():
    x, y, conflict = _mixed_rows()
    new, changed = project_conflicting(x, y, "pcgrad")
    assert np.array_equal(changed.numpy(), conflict)
    for c in range(x.shape[0]):
        if conflict[c]:
            np.testing.assert_allclose(new[c].numpy(), _numpy_pcgrad(x[c].numpy(), y[c].numpy()),
                                       rtol=0, atol=1e-12)
            assert abs(float(_cos(new[c], y[c]))) < 1e-5
        else:
            assert torch.equal(new[c], x[c])


def test_pcgrad_float32_rows_are_orthogonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g)
    y = torch.randn(16, 64, generator=g)
    new, changed = project_conflicting(x, y, "pcgrad")
    assert 0 < int(changed.sum()) < 16
    assert (_cos(new[changed], y[changed]).abs() < 1e-5).all()
    assert torch.equal(new[~changed], x[~changed])


def test_seed_mode_matches_numpy_reflection_with_pcgrad_norm():
    x, y, conflict = _mixed_rows()
    new, changed = project_conflicting(x, y, "seed")
    pc, _ = project_conflicting(x, y, "pcgrad")
    assert np.array_equal(changed.numpy(), conflict)
    for c in range(x.shape[0]):
        if conflict[c]:
            np.testing.assert_allclose(new[c].numpy(), _numpy_seed(x[c].numpy(), y[c].numpy()),
                                       rtol=0, atol=1e-12)
            assert float(new[c].norm()) == pytest.approx(float(pc[c].norm()), rel=1e-12)
            assert float((new[c] * y[c]).sum()) > 0  # now agrees with y
            # it is not the plain projection
            assert not torch.allclose(new[c], pc[c])
        else:
            assert torch.equal(new[c], x[c])


def test_off_mode_is_identity_even_with_conflicts():
    x, y, _ = _mixed_rows()
    new, changed = project_conflicting(x, y, "off")
    assert torch.equal(new, x)
    assert not bool(changed.any())


def test_unknown_mode_raises():
    x, y, _ = _mixed_rows()
    with pytest.raises(ValueError, match="unknown coordination mode"):
        project_conflicting(x, y, "reflect")


# --------------------------------------------------------------------------- batch_c_index


def _brute_c(time, event, risk):
    num = den = 0.0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            if time[i] < time[j]:
                den += 1
                num += 1.0 if risk[i] > risk[j] else (0.5 if risk[i] == risk[j] else 0.0)
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_batch_c_index_matches_lifelines(seed):
    rng = np.random.default_rng(seed)
    n = 12 + seed
    time = rng.permutation(np.arange(1, n + 1) * 37.5)  # no tied times
    event = rng.integers(0, 2, size=n)
    event[0] = 1
    event[np.argmax(time)] = 0  # keep a pair comparable and exercise censoring at the end
    risk = rng.integers(0, 5, size=n).astype(float) if seed % 2 else rng.normal(size=n)  # ties too
    got = batch_c_index(torch.tensor(time), torch.tensor(event, dtype=torch.float64), torch.tensor(risk))
    assert got is not None
    want = lifelines_ci(time, -risk, event)
    assert float(got) == pytest.approx(want, abs=1e-12)
    assert float(got) == pytest.approx(_brute_c(time, event, risk), abs=1e-12)


def test_batch_c_index_perfect_and_reversed():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0])
    risk = -time  # shorter time, higher risk
    assert float(batch_c_index(time, event, risk)) == 1.0
    assert float(batch_c_index(time, event, -risk)) == 0.0


def test_batch_c_index_none_without_comparable_pair():
    time = torch.tensor([5.0, 3.0, 9.0])
    assert batch_c_index(time, torch.zeros(3), torch.tensor([0.1, 0.2, 0.3])) is None  # all censored
    # only the longest time has an event: nothing is comparable
    assert batch_c_index(time, torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.1, 0.2, 0.3])) is None
    assert batch_c_index(torch.tensor([2.0]), torch.ones(1), torch.tensor([0.5])) is None


# --------------------------------------------------------------------------- coordinate_gradients

H = 4  # half width of the heads


def _batch(labels: dict, label_mask: dict | None = None) -> Batch:
    B = next(iter(labels.values())).shape[0]
    return Batch(
        patches=torch.zeros(B, 1, 1),
        patch_mask=torch.ones(B, 1, dtype=torch.bool),
        genes_tumour=torch.zeros(B, 1),
        genes_micro=torch.zeros(B, 1),
        labels=labels,
        label_mask=label_mask or {},
    )


def _grad_with_conflicts(C: int) -> tuple[torch.Tensor, list[bool]]:
    """A (C, 2H) grad whose rows alternate conflicting / agreeing halves (row 0 conflicts)."""
    g = torch.Generator().manual_seed(123)
    grad = torch.zeros(C, 2 * H)
    conflict = []
    for c in range(C):
        gt = torch.randn(H, generator=g)
        ge = torch.randn(H, generator=g)
        want_conflict = c % 2 == 0
        if ((gt @ ge) < 0) != want_conflict:
            ge = -ge
        grad[c, :H], grad[c, H:] = gt, ge
        conflict.append(want_conflict)
    return grad, conflict


def _classification_head(C: int, confident: str) -> tuple[SplitHead, torch.Tensor, torch.Tensor, Batch, list[bool]]:
    """Features and weights such that the ``confident`` half puts high probability on the truth and
    the other half is exactly uniform (zero weights)."""
    B = 6
    y = torch.arange(B) % C
    head = SplitHead(H, C)
    f_sharp = torch.zeros(B, H)
    f_sharp[torch.arange(B), y] = 1.0  # one-hot of the label in the first C features
    w_sharp = torch.zeros(C, H)
    w_sharp[torch.arange(C), torch.arange(C)] = 8.0
    f_flat = torch.randn(B, H, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        head.bias.zero_()
        if confident == "tumour":
            head.weight[:, :H], head.weight[:, H:] = w_sharp, 0.0
            f_t, f_e = f_sharp, f_flat
        else:
            head.weight[:, :H], head.weight[:, H:] = 0.0, w_sharp
            f_t, f_e = f_flat, f_sharp
    grad, conflict = _grad_with_conflicts(C)
    head.weight.grad = grad.clone()
    head.bias.grad = torch.randn(C)
    return head, f_t, f_e, _batch({"diagnosis": y}), conflict


@pytest.mark.parametrize("confident, weaker", [("tumour", "micro"), ("micro", "tumour")])
def test_less_confident_half_gives_way(confident, weaker):
    head, f_t, f_e, batch, conflict = _classification_head(4, confident)
    before = head.weight.grad.clone()
    bias_before = head.bias.grad.clone()
    stats = coordinate_gradients({"diagnosis": head}, (f_t, f_e), batch, "pcgrad")
    after = head.weight.grad
    n_conf = sum(conflict)
    assert stats["diagnosis"] == {"conflicts": n_conf, confident: 0, weaker: n_conf, "skipped": 0}

    strong = slice(0, H) if confident == "tumour" else slice(H, 2 * H)
    weak = slice(H, 2 * H) if confident == "tumour" else slice(0, H)
    assert torch.equal(after[:, strong], before[:, strong])  # bit-exact
    assert torch.equal(head.bias.grad, bias_before)
    for c, is_conf in enumerate(conflict):
        if is_conf:
            assert not torch.equal(after[c, weak], before[c, weak])
            assert abs(float(_cos(after[c, weak], after[c, strong]))) < 1e-5
            want = _numpy_pcgrad(before[c, weak].double().numpy(), before[c, strong].double().numpy())
            np.testing.assert_allclose(after[c, weak].numpy(), want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(after[c, weak], before[c, weak])


def test_seed_mode_through_coordinate_gradients():
    head, f_t, f_e, batch, conflict = _classification_head(4, "tumour")
    before = head.weight.grad.clone()
    stats = coordinate_gradients({"diagnosis": head}, (f_t, f_e), batch, "seed")
    assert stats["diagnosis"]["micro"] == sum(conflict)
    after = head.weight.grad
    assert torch.equal(after[:, :H], before[:, :H])
    for c, is_conf in enumerate(conflict):
        if is_conf:
            want = _numpy_seed(before[c, H:].double().numpy(), before[c, :H].double().numpy())
            np.testing.assert_allclose(after[c, H:].numpy(), want, rtol=0, atol=1e-6)
            assert float((after[c, H:] * after[c, :H]).sum()) > 0


def test_decision_uses_only_labelled_samples():
    # Labelled samples: tumour half is confident. Masked samples (label -1, which would crash a
    # gather) are many and would make the micro half look better if they were counted.
    head, f_t, f_e, batch, conflict = _classification_head(4, "tumour")
    extra = 10
    f_t2 = torch.cat([f_t, torch.zeros(extra, H)])
    f_e2 = torch.cat([f_e, torch.zeros(extra, H)])
    y2 = torch.cat([batch.labels["diagnosis"], torch.full((extra,), -1)])
    mask = torch.cat([torch.ones(6, dtype=torch.bool), torch.zeros(extra, dtype=torch.bool)])
    b2 = _batch({"diagnosis": y2}, {"diagnosis": mask})
    stats = coordinate_gradients({"diagnosis": head}, (f_t2, f_e2), b2, "pcgrad")
    assert stats["diagnosis"]["micro"] == sum(conflict) and stats["diagnosis"]["tumour"] == 0


def test_mode_off_leaves_grad_unchanged():
    head, f_t, f_e, batch, conflict = _classification_head(4, "tumour")
    before = head.weight.grad.clone()
    stats = coordinate_gradients({"diagnosis": head}, (f_t, f_e), batch, "off")
    assert torch.equal(head.weight.grad, before)
    assert stats["diagnosis"]["tumour"] == stats["diagnosis"]["micro"] == 0


def test_all_masked_head_is_unchanged():
    head, f_t, f_e, batch, _ = _classification_head(4, "tumour")
    before = head.weight.grad.clone()
    b2 = _batch(batch.labels, {"diagnosis": torch.zeros(6, dtype=torch.bool)})
    stats = coordinate_gradients({"diagnosis": head}, (f_t, f_e), b2, "pcgrad")
    assert torch.equal(head.weight.grad, before)
    assert stats["diagnosis"]["skipped"] == 1
    assert stats["diagnosis"]["tumour"] == stats["diagnosis"]["micro"] == 0


def test_head_without_grad_is_skipped():
    head, f_t, f_e, batch, _ = _classification_head(4, "tumour")
    head.weight.grad = None
    stats = coordinate_gradients({"diagnosis": head}, (f_t, f_e), batch, "pcgrad")
    assert head.weight.grad is None and stats["diagnosis"]["skipped"] == 1


def test_deterministic():
    results = []
    for _ in range(2):
        head, f_t, f_e, batch, _ = _classification_head(3, "micro")
        with torch.no_grad():  # a less clear-cut decision: add noise to both halves
            head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
        stats = coordinate_gradients({"diagnosis": head}, (f_t, f_e), batch, "pcgrad")
        results.append((head.weight.grad.clone(), stats))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def _reference_decision(head: SplitHead, f_t, f_e, y) -> str:
    """Independent float64 computation of which half is less confident."""
    W = head.weight.detach().double()
    b = head.bias.detach().double() / 2
    out_t = f_t.double() @ W[:, :H].T + b
    out_e = f_e.double() @ W[:, H:].T + b
    s_t = torch.softmax(out_t, 1)[torch.arange(len(y)), y].sum()
    s_e = torch.softmax(out_e, 1)[torch.arange(len(y)), y].sum()
    return "tumour" if s_t < s_e else "micro"


@pytest.mark.parametrize("seed", range(6))
def test_decision_matches_reference_with_bias(seed):
    g = torch.Generator().manual_seed(seed)
    C, B = 3, 8
    head = SplitHead(H, C)
    with torch.no_grad():
        head.weight.copy_(torch.randn(C, 2 * H, generator=g))
        head.bias.copy_(3 * torch.randn(C, generator=g))
    f_t, f_e = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    grad, conflict = _grad_with_conflicts(C)
    head.weight.grad = grad.clone()
    stats = coordinate_gradients({"grade": head}, (f_t, f_e), _batch({"grade": y}), "pcgrad")
    weaker = _reference_decision(head, f_t, f_e, y)
    other = "micro" if weaker == "tumour" else "tumour"
    assert stats["grade"][weaker] == sum(conflict) and stats["grade"][other] == 0
    strong = slice(0, H) if other == "tumour" else slice(H, 2 * H)
    assert torch.equal(head.weight.grad[:, strong], grad[:, strong])


# --------------------------------------------------------------------------- survival head


def _survival_setup(events: torch.Tensor, concordant: str):
    """The ``concordant`` half's partial risk orders the patients perfectly (C = 1), the other
    half's reversely (C = 0)."""
    B, T = events.shape[0], 4
    time = torch.tensor([120.0, 40.0, 300.0, 75.0, 510.0, 220.0])[:B]
    head = SplitHead(H, T)
    w = torch.zeros(T, H)
    w[:, 0] = 1.0  # every bin's logit = feature 0
    with torch.no_grad():
        head.weight[:, :H], head.weight[:, H:] = w, w
        head.bias.zero_()
    good = torch.zeros(B, H)
    good[:, 0] = -time / 100  # shorter time -> larger hazard -> larger risk
    bad = -good
    f_t, f_e = (good, bad) if concordant == "tumour" else (bad, good)
    grad, conflict = _grad_with_conflicts(T)
    head.weight.grad = grad.clone()
    batch = _batch({"survival_time": time, "event": events,
                    "survival_bin": torch.zeros(B, dtype=torch.long)})
    return head, f_t, f_e, batch, conflict


@pytest.mark.parametrize("concordant, weaker", [("tumour", "micro"), ("micro", "tumour")])
def test_survival_confidence_is_partial_c_index(concordant, weaker):
    events = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    head, f_t, f_e, batch, conflict = _survival_setup(events, concordant)
    before = head.weight.grad.clone()
    stats = coordinate_gradients({"survival": head}, (f_t, f_e), batch, "pcgrad")
    assert stats["survival"] == {"conflicts": sum(conflict), concordant: 0, weaker: sum(conflict),
                                 "skipped": 0}
    strong = slice(0, H) if concordant == "tumour" else slice(H, 2 * H)
    weak = slice(H, 2 * H) if concordant == "tumour" else slice(0, H)
    assert torch.equal(head.weight.grad[:, strong], before[:, strong])
    for c, is_conf in enumerate(conflict):
        if is_conf:
            assert abs(float(_cos(head.weight.grad[c, weak], before[c, strong]))) < 1e-5


def test_survival_all_censored_is_skipped():
    head, f_t, f_e, batch, conflict = _survival_setup(torch.zeros(6), "tumour")
    before = head.weight.grad.clone()
    stats = coordinate_gradients({"survival": head}, (f_t, f_e), batch, "pcgrad")
    assert stats["survival"]["skipped"] == 1
    assert stats["survival"]["tumour"] == stats["survival"]["micro"] == 0
    assert stats["survival"]["conflicts"] == sum(conflict)
    assert torch.equal(head.weight.grad, before)


def test_several_heads_decide_independently_in_one_call():
    # Shared subspaces and batch: the tumour half wins on diagnosis (features 0..2), the micro half
    # on survival (feature 3), so each head must change the other half.
    B, C, T = 6, 3, 4
    y = torch.arange(B) % C
    time = torch.tensor([120.0, 40.0, 300.0, 75.0, 510.0, 220.0])
    events = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    f_t = torch.zeros(B, H)
    f_t[torch.arange(B), y] = 1.0
    f_t[:, 3] = time / 100  # reversed risk order for survival
    f_e = torch.randn(B, H, generator=torch.Generator().manual_seed(4))
    f_e[:, 3] = -time / 100  # correct risk order
    diag, surv = SplitHead(H, C), SplitHead(H, T)
    with torch.no_grad():
        diag.weight.zero_()
        diag.bias.zero_()
        diag.weight[torch.arange(C), torch.arange(C)] = 8.0  # tumour half only
        surv.weight.zero_()
        surv.bias.zero_()
        surv.weight[:, 3] = 1.0
        surv.weight[:, H + 3] = 1.0
    g_diag, c_diag = _grad_with_conflicts(C)
    g_surv, c_surv = _grad_with_conflicts(T)
    diag.weight.grad, surv.weight.grad = g_diag.clone(), g_surv.clone()
    batch = _batch({"diagnosis": y, "survival_time": time, "event": events,
                    "survival_bin": torch.zeros(B, dtype=torch.long)})
    stats = coordinate_gradients({"diagnosis": diag, "survival": surv}, (f_t, f_e), batch, "pcgrad")
    assert stats["diagnosis"] == {"conflicts": sum(c_diag), "tumour": 0, "micro": sum(c_diag), "skipped": 0}
    assert stats["survival"] == {"conflicts": sum(c_surv), "tumour": sum(c_surv), "micro": 0, "skipped": 0}
    assert torch.equal(diag.weight.grad[:, :H], g_diag[:, :H])
    assert torch.equal(surv.weight.grad[:, H:], g_surv[:, H:])
