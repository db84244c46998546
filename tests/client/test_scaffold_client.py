"""SCAFFOLD's site side (``client.federated.train_round`` with ``control`` / ``site_control``;
``client.train.train_epochs`` with ``grad_correction`` / ``grad_mean``) on a synthetic site.

What must hold: the correction c - c_i is all that SCAFFOLD changes in a step (c = c_i trains
bit-identically to no SCAFFOLD, c != c_i does not); control variates that do not fit the model are a
protocol error; the site's new c_i has the model's parameters' names and shapes and is the mean of
the uncorrected gradients: with one step on one batch of every training patient, the gradient of
the training loss at the global weights, computed here by hand; with plain SGD and K steps,
SCAFFOLD's option II identity c_i - c + (x - y) / (K lr).
"""

from __future__ import annotations

import pytest
import torch
from test_federated_client import _two_threads, make_cfg  # noqa: F401  (the module's autouse fixture)
from test_local_steps import cohort, setting  # noqa: F401  (fixtures: three sites of 2, 6 and 16 patients)

from client.collate import collate_patients
from client.federated import SiteError, _dataset, load_site, train_round
from client.train import step_batches
from smm_model.losses import multitask_loss
from smm_model.model import build_model

LR = 2e-3
#: No randomness left in a step but the seeded batch order: no dropout, no gradient coordination.
DETERMINISTIC = ("model.dropout=0.0", "model.attn_dropout=0.0", "train.coordination=off")


def parameter_shapes(cfg) -> dict[str, tuple[int, ...]]:
    return {k: tuple(p.shape) for k, p in build_model(cfg.model).named_parameters()}


def random_control(cfg, seed: int, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in parameter_shapes(cfg).items()}


def same(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_correction_is_all_scaffold_changes(setting):
    cfg, sites, shared, init = setting
    site = sites[1]
    plain, m_plain, _, none = train_round(site, cfg, shared, init, LR, 1, server_round=1, local_steps=3)
    assert none is None  # no control sent: no SCAFFOLD, no control variate back
    c = random_control(cfg, 1)
    equal, m_equal, _, control = train_round(site, cfg, shared, init, LR, 1, server_round=1, local_steps=3,
                                             control=c, site_control={k: v.clone() for k, v in c.items()})
    assert same(plain, equal) and m_equal["train-loss"] == m_plain["train-loss"]  # c - c_i = 0: bit-identical
    assert control is not None
    # A zero c with no site control of its own (the first round) is no correction either.
    zero = {k: torch.zeros_like(v) for k, v in c.items()}
    assert same(plain, train_round(site, cfg, shared, init, LR, 1, server_round=1, local_steps=3, control=zero)[0])
    # c != c_i moves the weights elsewhere; c alone (the site's first round: c_i = 0) too.
    corrected, *_ = train_round(site, cfg, shared, init, LR, 1, server_round=1, local_steps=3, control=c,
                                site_control=random_control(cfg, 2))
    first, *_ = train_round(site, cfg, shared, init, LR, 1, server_round=1, local_steps=3, control=c)
    for other in (corrected, first):
        assert not same(plain, other) and list(other) == list(plain)
    assert not same(corrected, first)


@pytest.mark.parametrize("which, bad", [
    ("control", "shape"), ("control", "missing"), ("control", "extra"), ("control", "empty"),
    ("site_control", "shape"), ("site_control", "missing")])
def test_control_variates_that_do_not_fit_the_model_are_a_protocol_error(setting, which, bad):
    cfg, sites, shared, init = setting
    c, first = random_control(cfg, 1), next(iter(parameter_shapes(cfg)))
    broken = dict(c)
    if bad == "shape":
        broken[first] = torch.zeros(broken[first].numel() + 1)
    elif bad == "missing":
        del broken[first]
    elif bad == "extra":
        broken["extra.weight"] = torch.zeros(3)
    else:
        broken = {}
    kw = {"control": broken, "site_control": c} if which == "control" else {"control": c, "site_control": broken}
    with pytest.raises(SiteError, match="^E_PROTOCOL: ValueError$"):
        train_round(sites[1], cfg, shared, init, LR, 1, server_round=1, local_steps=1, **kw)


def test_the_new_control_variate_is_the_gradient_at_the_global_weights(setting, cohort):
    _, sites, shared, init = setting
    site_dir = sites[1]  # 6 training patients: one batch of exactly all of them
    n = 6
    cfg = make_cfg(cohort, *DETERMINISTIC, f"train.batch_size={n}")
    c, c_i = random_control(cfg, 3), random_control(cfg, 4)
    _, m, _, control = train_round(site_dir, cfg, shared, init, LR, 1, server_round=5, local_steps=1, control=c,
                                   site_control=c_i)
    assert m["steps"] == 1 and m["num-examples"] == n
    assert {k: tuple(v.shape) for k, v in control.items()} == parameter_shapes(cfg)
    assert list(control) == list(parameter_shapes(cfg))  # parameters only, no buffers, in the model's order
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in control.values())

    # By hand: the same batch (train_round's seeded step_batches over the training patients), the
    # loss at the global weights, its gradient.
    ds = _dataset(load_site(site_dir, cfg), cfg, shared, "train")
    ds.set_epoch(5)
    assert len(ds) == n
    (order,) = step_batches(len(ds), 1, n, torch.Generator().manual_seed(cfg.train.seed + 5))
    assert sorted(order) == list(range(n))
    batch = collate_patients([ds[i] for i in order])
    model = build_model(cfg.model)
    model.load_state_dict(init)
    model.train()
    weights = {t: torch.tensor(w, dtype=torch.float32) for t, w in shared.class_weights.items()
               if t in cfg.model.tasks}
    loss, _ = multitask_loss(model(batch), batch, cfg.loss, weights)
    assert loss.item() == pytest.approx(m["train-loss"], rel=1e-5)
    grads = dict(zip(dict(model.named_parameters()), torch.autograd.grad(loss, list(model.parameters()),
                                                                          allow_unused=True)))
    for k, g in grads.items():
        expect = torch.zeros_like(control[k]) if g is None else g
        torch.testing.assert_close(control[k], expect, rtol=1e-4, atol=1e-6, msg=k)
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0
    # Not c or c_i, and not the corrected gradient g + c - c_i.
    k = max(grads, key=lambda name: 0.0 if grads[name] is None else float(grads[name].abs().max()))
    assert not torch.allclose(control[k], grads[k] + c[k] - c_i[k], rtol=1e-4, atol=1e-6)


def test_with_plain_sgd_the_new_control_variate_is_scaffolds_option_ii(setting, cohort):
    """For plain SGD the mean gradient equals c_i - c + (x - y) / (K lr) (Karimireddy et al., eq. 4)."""
    _, sites, shared, init = setting
    cfg = make_cfg(cohort, "train.optimizer=sgd", "train.momentum=0.0", "train.weight_decay=0.0",
                   "train.grad_clip=0.0")
    steps, lr = 4, 0.05
    c, c_i = random_control(cfg, 5), random_control(cfg, 6)
    new, _, _, control = train_round(sites[2], cfg, shared, init, lr, 1, server_round=2, local_steps=steps,
                                     control=c, site_control=c_i)
    for k in control:
        option_ii = c_i[k] - c[k] + (init[k] - new[k]) / (steps * lr)
        torch.testing.assert_close(control[k], option_ii, rtol=1e-3, atol=2e-5, msg=k)
    moved = max(float((init[k] - new[k]).abs().max()) for k in control)
    assert moved > 1e-3
