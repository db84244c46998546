"""A site's local work per round counted in optimizer steps (``federation.local_steps``,
``client.local.train.step_batches``) and the label-skew offsets of its loss (``train.logit_adjustment``),
through ``client.local.round.train_round`` on sites of different sizes.

What must hold: ``step_batches`` gives exactly ``steps`` full batches from reshuffled passes (no
patient twice before every patient was seen, when the site holds a batch); every site then takes
exactly ``local_steps`` steps whatever its size, where epochs give a big site more steps than a
small one; the optimizer state a round returns counts those steps.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch
from site_config import make_cfg, two_threads  # noqa: F401  (two_threads: the module's autouse fixture)

from client.local.round import SiteError, preflight_summary, train_round

from smm_model.contract.sites import simulation_site_dirs
from client.cohorts.synth import CohortSpec, write_cohort
from client.local.train import step_batches
from smm_model.nn.model import build_model
from smm_model.contract.protocol import derive_shared

#: Training patients kept per site (the rest move to the test split): below one batch, between
#: one and two, and every one the synthetic site has.
KEEP = {"site_1": 2, "site_2": 6, "site_3": None}


# --- step_batches ---------------------------------------------------------------------------------------

def _passes_are_permutations(flat: list[int], n: int) -> None:
    """Consecutive runs of ``n`` indices are permutations of range(n); the last partial run has no repeat."""
    full = len(flat) // n
    for k in range(full):
        assert sorted(flat[k * n:(k + 1) * n]) == list(range(n)), k
    tail = flat[full * n:]
    assert len(set(tail)) == len(tail)


@pytest.mark.parametrize("n, steps, batch", [(10, 7, 4), (8, 4, 4), (13, 1, 4), (5, 9, 5), (1, 3, 1)])
def test_step_batches_are_full_batches_from_reshuffled_passes(n, steps, batch):
    batches = step_batches(n, steps, batch, torch.Generator().manual_seed(0))
    assert len(batches) == steps and all(len(b) == batch for b in batches)
    flat = [i for b in batches for i in b]
    assert all(isinstance(i, int) and 0 <= i < n for i in flat)
    _passes_are_permutations(flat, n)
    assert all(len(set(b)) == batch for b in batches)  # n >= batch: no patient twice in a batch
    assert step_batches(n, steps, batch, torch.Generator().manual_seed(0)) == batches  # seeded: repeatable


@pytest.mark.parametrize("n, steps, batch", [(3, 5, 4), (1, 2, 4), (2, 3, 8)])
def test_a_site_smaller_than_a_batch_repeats_patients_within_a_batch(n, steps, batch):
    batches = step_batches(n, steps, batch, torch.Generator().manual_seed(1))
    assert len(batches) == steps and all(len(b) == batch for b in batches)
    flat = [i for b in batches for i in b]
    assert set(flat) == set(range(n))
    _passes_are_permutations(flat, n)
    assert all(len(set(b)) < batch for b in batches)


def test_each_pass_is_reshuffled_and_the_generator_decides():
    flat = [i for b in step_batches(10, 10, 4, torch.Generator().manual_seed(0)) for i in b]
    passes = [tuple(flat[k * 10:(k + 1) * 10]) for k in range(4)]
    assert len(set(passes)) == 4  # a new permutation each pass, not one order repeated
    a = step_batches(20, 6, 4, torch.Generator().manual_seed(0))
    assert a != step_batches(20, 6, 4, torch.Generator().manual_seed(1))
    for bad in ((0, 3, 4), (5, 0, 4), (5, 3, 0)):
        with pytest.raises(ValueError, match="step_batches"):
            step_batches(*bad, torch.Generator())


# --- train_round on sites of different sizes ------------------------------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    d = CohortSpec()
    write_cohort(out, replace(d, sites=3, patients_per_site=16, features_only=True, seed=3,
                              features=replace(d.features, feature_dim=32)), log=lambda *_: None)
    for name, keep in KEEP.items():
        if keep is None:
            continue
        path = out / name / "clinical.csv"
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        df.loc[df.index[df["split"] == "train"][keep:], "split"] = "test"
        df.to_csv(path, index=False)
    return out


@pytest.fixture(scope="module")
def setting(cohort):
    cfg = make_cfg(cohort)
    sites = simulation_site_dirs(cfg.data)
    shared = derive_shared([preflight_summary(d, cfg) for d in sites], cfg)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}
    return cfg, sites, shared, init


def _changed(new, init) -> bool:
    return any(not torch.equal(new[k], init[k]) for k in init)


def test_every_site_takes_local_steps_whatever_its_size(setting):
    cfg, sites, shared, init = setting
    bs = cfg.train.batch_size
    sizes, by_epoch = {}, {}
    for d in sites:
        new, m, opt, *_ = train_round(d, cfg, shared, init, lr=2e-3, local_epochs=3, server_round=1, local_steps=5)
        assert m["steps"] == 5, d.name  # local_steps wins over local_epochs
        assert _changed(new, init), d.name
        assert list(new) == list(init)
        # The optimizer state the round hands back counts those steps (Adam's per-parameter step).
        step_counts = {float(v) for k, v in opt.items() if k.endswith(".step")}
        assert step_counts == {5.0}, d.name
        sizes[d.name] = m["num-examples"]
        _, m_epochs, *_ = train_round(d, cfg, shared, init, lr=2e-3, local_epochs=1, server_round=1)
        by_epoch[d.name] = m_epochs["steps"]
    assert sizes["site_1"] == 2 < bs < sizes["site_2"] == 6 < sizes["site_3"]
    # Epochs: the step count follows the size (drop_last; a site below one batch trains on one).
    assert by_epoch == {name: max(1, n // bs) for name, n in sizes.items()}
    assert len(set(by_epoch.values())) > 1


def test_a_round_with_local_steps_is_repeatable_and_continues_a_given_optimizer_state(setting):
    cfg, sites, shared, init = setting
    a, _, opt, *_ = train_round(sites[1], cfg, shared, init, 2e-3, 1, server_round=1, local_steps=3)
    b, *_ = train_round(sites[1], cfg, shared, init, 2e-3, 1, server_round=1, local_steps=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cont, _, opt2, *_ = train_round(sites[1], cfg, shared, a, 2e-3, 1, server_round=2, local_steps=3,
                                    optimizer_state=opt)
    rerun, *_ = train_round(sites[1], cfg, shared, a, 2e-3, 1, server_round=2, local_steps=3,
                            optimizer_state=opt)
    assert all(torch.equal(cont[k], rerun[k]) for k in cont)  # the given state is read, not stepped in place
    fresh, _, opt3, *_ = train_round(sites[1], cfg, shared, a, 2e-3, 1, server_round=2, local_steps=3)
    assert {float(v) for k, v in opt2.items() if k.endswith(".step")} == {6.0}
    assert {float(v) for k, v in opt3.items() if k.endswith(".step")} == {3.0}
    assert _changed(cont, fresh)  # the kept moments change the update
    with pytest.raises(SiteError, match="^E_CONFIG: ValueError$"):
        train_round(sites[1], cfg, shared, init, 2e-3, 1, local_steps=-1)


def test_logit_adjustment_enters_the_local_loss_only_when_set(setting, cohort):
    cfg, sites, shared, init = setting
    plain, *_ = train_round(sites[1], cfg, shared, init, 2e-3, 1, server_round=1, local_steps=2)
    off, *_ = train_round(sites[1], make_cfg(cohort, "train.logit_adjustment=0.0"), shared, init, 2e-3, 1,
                          server_round=1, local_steps=2)
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    tau = make_cfg(cohort, "train.logit_adjustment=1.0")
    # The server sends the pooled class counts only when the run adjusts logits (protocol 2).
    assert shared.class_counts is None
    shared_tau = derive_shared([preflight_summary(d, tau) for d in sites], tau)
    assert shared_tau.class_counts and replace(shared_tau, class_counts=None) == shared
    adjusted, m, *_ = train_round(sites[1], tau, shared_tau, init, 2e-3, 1, server_round=1, local_steps=2)
    assert _changed(adjusted, plain) and m["steps"] == 2
    # Counts sent to a run without logit adjustment change nothing.
    counted, *_ = train_round(sites[1], cfg, shared_tau, init, 2e-3, 1, server_round=1, local_steps=2)
    assert not _changed(counted, plain)
    # The offsets need the pooled class counts of the shared statistics: refused without them.
    with pytest.raises(SiteError, match="^E_SCHEMA: ValueError$"):
        train_round(sites[1], tau, shared, init, 2e-3, 1, local_steps=2)
