"""Patient-level DP-SGD in the local trainer (``client.local.dp``) and its per-patient loss.

What must hold: the per-patient gradients of the loop are each patient's own gradient, for every
arch, and add up to the gradient of the batch's summed per-patient loss (so the loss couples no
patients and padding changes nothing); a DP step without noise and with a large clip is a plain SGD
step on sum_i L_i / (q n); with a clip each patient contributes at most C; an empty Poisson draw is
a noise-only step that is accounted; the sampler is repeatable and includes each patient about q
of the time; settings DP cannot honour are refused before anything trains, and the ledger reserves
a round's steps before its first step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from site_config import SMALL
from torch import nn

from client.cohorts.synthetic import SynthSpec, synthetic_patients
from client.local.dp import (DPRecord, calibrate_noise, check_dp_config, check_dp_model, dp_train_steps,
                             per_sample_gradients, plan_steps, poisson_batches)
from client.local.ledger import BudgetExceeded, PrivacyLedger, epsilon_of
from client.site.collate import collate_patients
from smm_model.config import ConfigError, ExperimentConfig, PrivacyConfig
from smm_model.nn.model import build_model
from smm_model.objectives.coordination import project_conflicting
from smm_model.objectives.losses import consistency_loss, multitask_loss, per_patient_loss

SPEC = SynthSpec(feature_dim=32, genes_tumour=20, genes_micro=30, min_patches=10, max_patches=30)
#: Deterministic forward passes (no dropout), so two computations of one gradient can be compared.
NO_DROPOUT = ("model.dropout=0.0", "model.attn_dropout=0.0")
#: SMALL with a 4 x 4 token map and 3 x 3 sampled keys: every layer still there, a pass a few ms.
TINY = ("model.grid_size=4", "model.n_patches=16", "model.key_grid=3")
#: model.arch and model variants: every arch, and SMM's two layouts and two position biases.
VARIANTS = {
    "smm-spatial-table": ("model.arch=smm",),
    "smm-spatial-exact": ("model.arch=smm", "model.position_bias=exact"),
    "smm-seed-table": ("model.arch=smm", "model.layout=seed"),
    "snn": ("model.arch=snn",),
    "abmil": ("model.arch=abmil",),
    "concat": ("model.arch=concat",),
    "smm-survival-link": ("model.arch=smm", "model.survival_reads_tasks=true"),
}
DP_ON = ("privacy.dp=true", "privacy.dp_noise_multiplier=1.0")
TOL = dict(rtol=1e-4, atol=1e-6)


def config(*extra: str) -> ExperimentConfig:
    return ExperimentConfig.from_yaml_text("", [*SMALL, *TINY, *NO_DROPOUT, *extra])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for the module, restored after: DP passes are one patient each, ops too small
    for a second thread to help, and on a busy 2-core machine two threads made them several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def patients():
    items = synthetic_patients(12, SPEC, seed=3)
    # Unknown labels for some tasks, so masking is exercised.
    items[1]["label_mask"] = {**items[1]["label_mask"], "grade": False}
    items[1]["labels"] = {**items[1]["labels"], "grade": None}
    items[4]["label_mask"] = {**items[4]["label_mask"], "survival": False}
    items[4]["labels"] = {**items[4]["labels"], "survival_bin": None, "survival_time": None, "event": None}
    return items


WEIGHTS = {"diagnosis": torch.tensor([1.0, 2.0, 3.0, 1.5]), "grade": torch.tensor([2.0, 1.0, 1.0])}
OFFSETS = {"diagnosis": torch.tensor([0.1, -0.2, 0.0, 0.3])}


def sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# --- the per-patient loss --------------------------------------------------------------------------------

def test_per_patient_loss_does_not_depend_on_the_other_patients(patients):
    torch.manual_seed(0)
    cfg = config()
    model = build_model(cfg.model).eval()
    batch = collate_patients(patients[:6])
    with torch.no_grad():
        out = model(batch)
        whole, parts = per_patient_loss(out, batch, cfg.loss, WEIGHTS, OFFSETS)
        assert whole.shape == (6,) and all(v.shape == (6,) for v in parts.values())
        for i in range(6):
            one = collate_patients([patients[i]])
            alone, _ = per_patient_loss(model(one), one, cfg.loss, WEIGHTS, OFFSETS)
            torch.testing.assert_close(alone[0], whole[i], **TOL)
    assert parts["grade"][1] == 0 and parts["survival"][4] == 0  # unlabelled: an exact 0
    # The documented definition: sum_t w_t * class_weight[y] * CE(logits + offset) ...
    y = batch.labels["diagnosis"]
    ce = nn.functional.cross_entropy(out.logits["diagnosis"] + OFFSETS["diagnosis"], y, reduction="none")
    torch.testing.assert_close(parts["diagnosis"], WEIGHTS["diagnosis"][y] * ce)


def test_per_patient_loss_averages_to_multitask_loss_without_weights_or_consistency(patients):
    torch.manual_seed(0)
    cfg = config("loss.consistency_weight=0.0", "loss.task_weights={diagnosis: 2.0}")
    model = build_model(cfg.model).eval()
    batch = collate_patients([patients[i] for i in (0, 2, 3, 5)])  # every label known
    with torch.no_grad():
        out = model(batch)
        per, _ = per_patient_loss(out, batch, cfg.loss)
        total, _ = multitask_loss(out, batch, cfg.loss)
    torch.testing.assert_close(per.mean(), total, **TOL)


def test_the_consistency_term_of_one_patient_is_a_constant_so_dp_drops_it():
    torch.manual_seed(0)
    gene = torch.rand(1, 16, requires_grad=True)  # (1, H), non-negative like the SNN's output
    grid = torch.randn(1, 4, 18, requires_grad=True)  # (1, g, 2 K^2)
    loss = consistency_loss(gene, grid)
    loss.backward()
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert float(gene.grad.abs().max()) < 1e-6 and float(grid.grad.abs().max()) < 1e-6
    assert any("consistency" in n for n in check_dp_config(config(*DP_ON)))


# --- (1) per-patient gradients ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loop_gradients_are_each_patients_own_and_add_up_to_the_batch_gradient(patients, variant):
    torch.manual_seed(0)
    cfg = config(*VARIANTS[variant])
    model = build_model(cfg.model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    items = patients[:5]
    grads, losses, _ = per_sample_gradients(model, items, cfg, params, device=torch.device("cpu"),
                                            class_weights=WEIGHTS, logit_offsets=OFFSETS)
    assert [g.shape for g in grads] == [(5, *p.shape) for p in params]
    for i, item in enumerate(items):  # independently: a fresh one-patient batch and .backward()
        model.zero_grad(set_to_none=True)
        one = collate_patients([item])
        loss, _ = per_patient_loss(model(one), one, cfg.loss, WEIGHTS, OFFSETS)
        loss.sum().backward()
        own = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        torch.testing.assert_close(flat(g[i] for g in grads), flat(own), **TOL)
        torch.testing.assert_close(losses[i], loss[0].detach())
    # The padded batch in one pass: its summed per-patient loss has the summed per-patient gradient.
    model.zero_grad(set_to_none=True)
    batch = collate_patients(items)
    loss, _ = per_patient_loss(model(batch), batch, cfg.loss, WEIGHTS, OFFSETS)
    loss.sum().backward()
    batched = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    torch.testing.assert_close(flat(g.sum(0) for g in grads), flat(batched), rtol=1e-4, atol=1e-5)
    # Patients differ, so these are not one gradient repeated.
    assert not torch.allclose(flat(g[0] for g in grads), flat(g[1] for g in grads))


# --- (2) a DP step against plain SGD, and clipping ------------------------------------------------------

@pytest.mark.parametrize("variant", ["smm-spatial-table", "concat"])
def test_noiseless_unclipped_dp_step_is_sgd_on_summed_losses_over_expected_batch(patients, variant):
    torch.manual_seed(0)
    cfg = config(*VARIANTS[variant], *DP_ON, "privacy.dp_max_grad_norm=1e6", "train.coordination=off")
    ds, q = patients[:8], 0.5
    model = build_model(cfg.model)
    ref = copy.deepcopy(model)
    drawn = poisson_batches(len(ds), 1, q, torch.Generator().manual_seed(5))[0]
    assert len(drawn) >= 2
    logs, rec = dp_train_steps(model, ds, cfg, steps=1, sample_rate=q, noise_multiplier=0.0,
                               generator=torch.Generator().manual_seed(5), device=torch.device("cpu"),
                               optimizer=sgd(model), class_weights=WEIGHTS, logit_offsets=OFFSETS)
    assert isinstance(rec, DPRecord) and rec.examples == len(drawn) and rec.expected_batch_size == q * len(ds)
    # Reference: plain SGD on sum_i L_i / (q n) over the same patients, each in its own pass.
    opt = sgd(ref)
    opt.zero_grad()
    ref.train()
    for i in drawn:
        one = collate_patients([ds[i]])
        loss, _ = per_patient_loss(ref(one), one, cfg.loss, WEIGHTS, OFFSETS)
        (loss.sum() / (q * len(ds))).backward()
    opt.step()
    torch.testing.assert_close(flat(model.parameters()), flat(ref.parameters()), rtol=1e-5, atol=1e-6)
    assert logs[0].steps == 1 and logs[0].coordination == {} and math.isfinite(logs[0].loss)


def test_clipped_contributions_have_norm_at_most_c(patients):
    torch.manual_seed(0)
    C, LR = 1e-2, 100.0
    cfg = config(*DP_ON, f"privacy.dp_max_grad_norm={C}", "train.coordination=off")
    ds = patients[:4]
    model = build_model(cfg.model)
    before = flat(model.parameters()).detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    grads, _, _ = per_sample_gradients(model.train(), ds, cfg, params, device=torch.device("cpu"))
    per = torch.stack([flat(g[i] for g in grads) for i in range(len(ds))])  # (B, P)
    norms = per.norm(dim=1)
    assert bool((norms > 10 * C).all())  # the clip is active for every patient
    expected = (per * (C / norms).clamp(max=1.0).unsqueeze(1)).sum(0) / len(ds)  # q = 1: E = n
    # q = 1: every patient in the one step, no noise, SGD: the update is -lr sum clip(g_i) / n (a large
    # lr keeps the update well above float32 rounding of the weights).
    dp_train_steps(model, ds, cfg, steps=1, sample_rate=1.0, noise_multiplier=0.0,
                   generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), optimizer=sgd(model, LR))
    update = (before - flat(model.parameters()).detach()) / LR
    torch.testing.assert_close(update, expected, rtol=1e-3, atol=1e-7 / LR * 10)
    assert float(update.norm()) <= C * (1 + 1e-3)
    # One patient alone: its contribution is exactly at the clip.
    one = build_model(cfg.model)
    b1 = flat(one.parameters()).detach().clone()
    dp_train_steps(one, ds[:1], cfg, steps=1, sample_rate=1.0, noise_multiplier=0.0,
                   generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), optimizer=sgd(one, LR))
    assert float((b1 - flat(one.parameters()).detach()).norm()) / LR == pytest.approx(C, rel=1e-3)


def test_noise_has_the_configured_scale(patients):
    torch.manual_seed(0)
    C, sigma, q = 0.5, 2.0, 1.0
    cfg = config("model.arch=concat", *DP_ON, f"privacy.dp_max_grad_norm={C}")
    ds = patients[:4]
    model = build_model(cfg.model)
    clean = copy.deepcopy(model)
    kw = dict(steps=1, sample_rate=q, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    dp_train_steps(model, ds, cfg, noise_multiplier=sigma, optimizer=sgd(model, 1.0),
                   noise_generator=torch.Generator().manual_seed(1), **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    dp_train_steps(clean, ds, cfg, noise_multiplier=0.0, optimizer=sgd(clean, 1.0), **kw)
    noise = (flat(clean.parameters()) - flat(model.parameters())).detach()  # (P,) = N(0, sigma^2 C^2) / (q n)
    assert noise.numel() > 5000  # enough draws for a 5% check on the standard deviation
    assert float(noise.std()) == pytest.approx(sigma * C / (q * len(ds)), rel=0.05)


def test_proximal_gradient_is_added_after_the_noise(patients):
    torch.manual_seed(0)
    mu = 0.3
    cfg = config("model.arch=snn", *DP_ON, "privacy.dp_max_grad_norm=1e6", f"train.proximal_mu={mu}")
    ds = patients[:4]
    model = build_model(cfg.model)
    plain = copy.deepcopy(model)
    anchor = [p.detach() + 1.0 for p in model.parameters()]  # w - w_g = -1 everywhere
    kw = dict(steps=1, sample_rate=1.0, noise_multiplier=0.0, device=torch.device("cpu"))
    dp_train_steps(model, ds, cfg, generator=torch.Generator().manual_seed(0), optimizer=sgd(model, 1.0),
                   global_params=anchor, **kw)
    dp_train_steps(plain, ds, cfg, generator=torch.Generator().manual_seed(0), optimizer=sgd(plain, 1.0), **kw)
    torch.testing.assert_close(flat(model.parameters()) - flat(plain.parameters()),
                               torch.full_like(flat(plain.parameters()), mu))


def test_coordination_under_dp_acts_on_the_noised_gradient_only(patients):
    """One SGD step (lr 1) with and without coordination, same draws and noise: only the split heads
    differ, and the coordinated heads are exactly the symmetric rule applied to the privatized
    gradient the uncoordinated run stepped on (so coordination has an effect, and it and its counts
    are post-processing of the noised gradient: no confidence or other batch quantity is read)."""
    cfg_on = config(*DP_ON, "train.coordination=pcgrad")
    cfg_off = config(*DP_ON, "train.coordination=off")
    assert any("symmetric" in n for n in check_dp_config(cfg_on))
    torch.manual_seed(0)
    start = build_model(cfg_on.model)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    runs = []
    for model, cfg in ((a, cfg_on), (b, cfg_off)):
        logs, _ = dp_train_steps(model, patients[:8], cfg, steps=1, sample_rate=0.5, noise_multiplier=1.0,
                                 generator=torch.Generator().manual_seed(2),
                                 noise_generator=torch.Generator().manual_seed(3),
                                 device=torch.device("cpu"), optimizer=sgd(model, 1.0))
        runs.append(logs)
    heads = {f"heads.{t}.weight" for t in start.split_heads()}
    p0, pa, pb = (dict(m.named_parameters()) for m in (start, a, b))
    for name in p0:
        if name not in heads:
            torch.testing.assert_close(pa[name], pb[name])
    changed = 0
    for name in heads:
        g = (p0[name] - pb[name]).detach()  # (C, 2H): the privatized gradient of the uncoordinated step
        H = g.shape[1] // 2
        new_t, ct = project_conflicting(g[:, :H], g[:, H:], "pcgrad")
        new_e, ce = project_conflicting(g[:, H:], g[:, :H], "pcgrad")
        torch.testing.assert_close(pa[name], p0[name] - torch.cat([new_t, new_e], dim=1), **TOL)
        changed += int(ct.sum())
    coord = runs[0][0].coordination
    assert changed > 0 and sum(c["conflicts"] for c in coord.values()) == changed
    assert all(c["tumour"] == c["micro"] == c["conflicts"] for c in coord.values()) and runs[1][0].coordination == {}
    # Parameters are left plain (no per-sample attributes behind).
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in a.parameters())


# --- (5) empty draws --------------------------------------------------------------------------------------

def test_an_empty_draw_is_a_noise_only_step_that_is_accounted(patients, tmp_path):
    cfg = config("model.arch=snn", *DP_ON)
    ds, q, steps = patients[:3], 1e-4, 3
    assert all(not b for b in poisson_batches(len(ds), steps, q, torch.Generator().manual_seed(0)))
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = flat(model.parameters()).detach().clone()
    logs, rec = dp_train_steps(model, ds, cfg, steps=steps, sample_rate=q, noise_multiplier=1.0,
                               generator=torch.Generator().manual_seed(0),
                               noise_generator=torch.Generator().manual_seed(1),
                               device=torch.device("cpu"), optimizer=sgd(model), ledger=ledger, run="r", server_round=1)
    assert rec.empty_draws == steps and rec.steps == steps and rec.examples == 0
    assert logs[0].examples == 0 and math.isnan(logs[0].loss)
    assert not torch.equal(before, flat(model.parameters()))  # the noise moved the weights
    assert [e.mechanism for e in PrivacyLedger.open(tmp_path / "ledger.json").history] == [(1.0, q, steps)]
    assert rec.epsilon == pytest.approx(epsilon_of([(1.0, q, steps)], cfg.privacy.dp_delta)) and rec.epsilon > 0
    # Without noise an empty step changes nothing (SGD without momentum or weight decay).
    still = build_model(cfg.model)
    b2 = flat(still.parameters()).detach().clone()
    dp_train_steps(still, ds, cfg, steps=steps, sample_rate=q, noise_multiplier=0.0,
                   generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), optimizer=sgd(still))
    assert torch.equal(b2, flat(still.parameters()))


# --- (6) the sampler --------------------------------------------------------------------------------------

def test_poisson_sampler_is_deterministic_and_includes_each_patient_about_q_of_the_time():
    n, steps, q = 40, 2000, 0.2
    a = poisson_batches(n, steps, q, torch.Generator().manual_seed(7))
    assert a == poisson_batches(n, steps, q, torch.Generator().manual_seed(7))
    assert a != poisson_batches(n, steps, q, torch.Generator().manual_seed(8))
    assert all(b == sorted(set(b)) and all(0 <= i < n for i in b) for b in a)  # no patient twice in a draw
    counts = torch.zeros(n)
    for b in a:
        counts[b] += 1
    freq = counts / steps
    sd = math.sqrt(q * (1 - q) / steps)
    assert float((freq - q).abs().max()) < 5 * sd
    sizes = torch.tensor([len(b) for b in a], dtype=torch.float)
    assert float(sizes.mean()) == pytest.approx(q * n, rel=0.05)  # the batch size varies, its mean is q n
    assert float(sizes.std()) > 1.0
    for bad in ((0, 3, 0.5), (5, 0, 0.5), (5, 3, 0.0), (5, 3, 1.5)):
        with pytest.raises(ValueError, match="poisson_batches"):
            poisson_batches(*bad, torch.Generator())


# --- refused before training, and reserve-before-train -----------------------------------------------------

def test_scaffold_and_batchnorm_are_refused():
    with pytest.raises(ConfigError, match="federation.strategy"):
        check_dp_config(config(*DP_ON, "federation.strategy=scaffold"))
    assert check_dp_config(config("federation.strategy=scaffold")) == ()  # DP off: nothing to check

    class WithBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

    with pytest.raises(ConfigError, match="BatchNorm"):
        check_dp_model(WithBN())


def test_a_spent_budget_refuses_the_round_before_training_and_leaves_the_ledger_unchanged(patients, tmp_path):
    cfg = config("model.arch=snn", *DP_ON, "privacy.dp_epsilon_budget=1.0")
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    ledger.reserve("earlier", 1, 1.0, 0.5, 3, cfg.privacy.dp_delta, budget=100.0)
    assert ledger.epsilon(cfg.privacy.dp_delta) > 1.0
    text = path.read_bytes()
    model = build_model(cfg.model)
    before = flat(model.parameters()).detach().clone()
    with pytest.raises(BudgetExceeded, match="dp_epsilon_budget=1"):
        dp_train_steps(model, patients[:4], cfg, steps=2, sample_rate=0.5, noise_multiplier=1.0,
                       generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), optimizer=sgd(model),
                       ledger=ledger, run="next", server_round=2)
    assert path.read_bytes() == text
    assert torch.equal(before, flat(model.parameters()))
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


def test_steps_are_reserved_before_the_first_step(patients, tmp_path):
    class Broken(list):
        def __getitem__(self, i):
            raise OSError("feature file unreadable")

    cfg = config("model.arch=snn", *DP_ON, "privacy.dp_epsilon_budget=100.0")
    ledger = PrivacyLedger.open(tmp_path / "ledger.json")
    model = build_model(cfg.model)
    with pytest.raises(OSError, match="unreadable"):
        dp_train_steps(model, Broken(patients[:4]), cfg, steps=5, sample_rate=1.0, noise_multiplier=1.0,
                       generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), optimizer=sgd(model),
                       ledger=ledger, run="crash", server_round=3)
    hist = PrivacyLedger.open(tmp_path / "ledger.json").history
    assert [(e.run, e.round, e.steps) for e in hist] == [("crash", 3, 5)]
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


# --- planning and calibration -----------------------------------------------------------------------------

def test_plan_steps_and_noise_calibration():
    cfg = config()  # batch_size 4
    assert plan_steps(cfg, 20, local_epochs=2) == (0.2, 10)
    assert plan_steps(cfg, 20, local_steps=7) == (0.2, 7)
    assert plan_steps(cfg, 2, local_epochs=1) == (1.0, 1)
    with pytest.raises(ValueError):
        plan_steps(cfg, 0)
    assert calibrate_noise(PrivacyConfig(dp=True, dp_noise_multiplier=0.7), 0.1, 10, 3) == 0.7
    target = PrivacyConfig(dp=True, dp_target_epsilon=2.0)
    sigma = calibrate_noise(target, 0.1, 50, 3)
    eps = epsilon_of([(sigma, 0.1, 150)], target.dp_delta, "rdp")
    assert 2.0 - 0.05 < eps <= 2.0
    assert epsilon_of([(sigma, 0.1, 50)], target.dp_delta) < eps  # calibrated over all rounds, not one
    with pytest.raises(ConfigError, match="dp_target_epsilon"):
        calibrate_noise(PrivacyConfig(dp=True, dp_target_epsilon=1e-9), 1.0, 10_000, 100)
