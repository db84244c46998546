"""SCAFFOLD's site side (``client.local.round.train_round`` with ``control``, the correction
d = c - c_i the server sends; ``client.local.train.train_epochs`` with ``grad_correction`` / ``grad_mean``)
on a synthetic site. The site keeps no control variate of its own: d is all it gets.

What must hold: d is all that SCAFFOLD changes in a step (d = 0 trains bit-identically to no
SCAFFOLD, d != 0 does not); a correction that does not fit the model's parameters is a protocol
error; the site's new c_i has the model's parameters' names and shapes and is the mean of the
uncorrected gradients (not gradient + d): with one step on one batch of every training patient, the
gradient of the training loss at the global weights, computed here by hand; with plain SGD and K
steps, SCAFFOLD's option II identity c_i - c + (x - y) / (K lr), i.e. (x - y) / (K lr) - d.
"""

from __future__ import annotations

import pytest
import torch
from site_config import make_cfg, two_threads  # noqa: F401  (two_threads: the module's autouse fixture)
from test_local_steps import cohort, setting  # noqa: F401  (fixtures: three sites of 2, 6 and 16 patients)

from client.site.collate import collate_patients
from client.local.round import SiteError, split_dataset, load_site, train_round
from client.local.train import step_batches
from smm_model.objectives.losses import multitask_loss
from smm_model.nn.model import build_model

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
    assert none is None  # no correction sent: no SCAFFOLD, no control variate back
    d = random_control(cfg, 1)
    # A zero correction (round 1: c = 0 and no c_i yet; or c = c_i) is no correction: bit-identical.
    zero = {k: torch.zeros_like(v) for k, v in d.items()}
    equal, m_equal, _, control = train_round(site, cfg, shared, init, LR, 1, server_round=1, local_steps=3,
                                             control=zero)
    assert same(plain, equal) and m_equal["train-loss"] == m_plain["train-loss"]
    assert control is not None and list(control) == list(parameter_shapes(cfg))
    # A non-zero correction moves the weights elsewhere, and another one elsewhere again.
    kept = {k: v.clone() for k, v in d.items()}
    corrected, m_corrected, *_ = train_round(site, cfg, shared, init, LR, 1, server_round=1, local_steps=3,
                                             control=d)
    assert same(d, kept)  # the received correction is read, not changed in place
    other, *_ = train_round(site, cfg, shared, init, LR, 1, server_round=1, local_steps=3,
                            control=random_control(cfg, 2))
    for moved in (corrected, other):
        assert not same(plain, moved) and list(moved) == list(plain)
    assert not same(corrected, other)
    # The same correction again: the same weights (the site holds nothing between rounds).
    assert same(corrected, train_round(site, cfg, shared, init, LR, 1, server_round=1, local_steps=3, control=d)[0])
    assert m_corrected["steps"] == m_plain["steps"] == 3


@pytest.mark.parametrize("bad", ["shape", "missing", "extra", "empty"])
def test_a_correction_that_does_not_fit_the_model_is_a_protocol_error(setting, bad):
    cfg, sites, shared, init = setting
    d, first = random_control(cfg, 1), next(iter(parameter_shapes(cfg)))
    broken = dict(d)
    if bad == "shape":
        broken[first] = torch.zeros(broken[first].numel() + 1)
    elif bad == "missing":
        del broken[first]
    elif bad == "extra":
        broken["extra.weight"] = torch.zeros(3)
    else:  # an empty record is not "no SCAFFOLD" (that is no "control" record at all): refused too
        broken = {}
    with pytest.raises(SiteError, match="^E_PROTOCOL: ValueError$"):
        train_round(sites[1], cfg, shared, init, LR, 1, server_round=1, local_steps=1, control=broken)


def test_the_new_control_variate_is_the_gradient_at_the_global_weights(setting, cohort):
    _, sites, shared, init = setting
    site_dir = sites[1]  # 6 training patients: one batch of exactly all of them
    n = 6
    cfg = make_cfg(cohort, *DETERMINISTIC, f"train.batch_size={n}")
    d = random_control(cfg, 3)
    _, m, _, control = train_round(site_dir, cfg, shared, init, LR, 1, server_round=5, local_steps=1, control=d)
    assert m["steps"] == 1 and m["num-examples"] == n
    assert {k: tuple(v.shape) for k, v in control.items()} == parameter_shapes(cfg)
    assert list(control) == list(parameter_shapes(cfg))  # parameters only, no buffers, in the model's order
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in control.values())

    # By hand: the same batch (train_round's seeded step_batches over the training patients), the
    # loss at the global weights, its gradient.
    ds = split_dataset(load_site(site_dir, cfg), cfg, shared, "train")
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
    # The raw gradient: not the correction, and not the corrected gradient g + d the step used.
    k = max(grads, key=lambda name: 0.0 if grads[name] is None else float(grads[name].abs().max()))
    assert not torch.allclose(control[k], grads[k] + d[k], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(control[k], d[k], rtol=1e-4, atol=1e-6)
    # The same with no correction: the gradient at the global weights does not depend on d.
    _, _, _, uncorrected = train_round(site_dir, cfg, shared, init, LR, 1, server_round=5, local_steps=1,
                                       control={k: torch.zeros_like(v) for k, v in d.items()})
    assert same(control, uncorrected)


def test_with_plain_sgd_the_new_control_variate_is_scaffolds_option_ii(setting, cohort):
    """Plain SGD, K steps of y -= lr (g_k + d) from x with d = c - c_i: the mean gradient is
    (x - y) / (K lr) - d, SCAFFOLD's option II c_i - c + (x - y) / (K lr) (Karimireddy et al., eq. 4)."""
    _, sites, shared, init = setting
    cfg = make_cfg(cohort, "train.optimizer=sgd", "train.momentum=0.0", "train.weight_decay=0.0",
                   "train.grad_clip=0.0")
    steps, lr = 4, 0.05
    c, c_i = random_control(cfg, 5), random_control(cfg, 6)
    d = {k: c[k] - c_i[k] for k in c}  # what the server sends this site
    new, _, _, control = train_round(sites[2], cfg, shared, init, lr, 1, server_round=2, local_steps=steps,
                                     control=d)
    for k in control:
        option_ii = (init[k] - new[k]) / (steps * lr) - d[k]
        torch.testing.assert_close(control[k], option_ii, rtol=1e-3, atol=2e-5, msg=k)
        torch.testing.assert_close(control[k], c_i[k] - c[k] + (init[k] - new[k]) / (steps * lr),
                                   rtol=1e-3, atol=2e-5, msg=k)
    moved = max(float((init[k] - new[k]).abs().max()) for k in control)
    assert moved > 1e-3
