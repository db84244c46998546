"""The local trainer on a small synthetic task with signal planted in both modalities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from client.site.collate import collate_patients
from client.cohorts.synthetic import SynthSpec, synthetic_patients
from client.local.train import (evaluate, load_optimizer_state, make_optimizer, optimizer_state_arrays, resolve_device,
                          train_epochs)
from smm_model.config import ExperimentConfig
from smm_model.objectives.losses import multitask_loss
from smm_model.nn.model import build_model

SPEC = SynthSpec(feature_dim=24, genes_tumour=10, genes_micro=14, min_patches=20, max_patches=60)
SMALL = ["model.feature_dim=24", "model.genes_tumour=10", "model.genes_micro=14", "model.hidden_dim=24",
         "model.heads=4", "model.dim_head=8", "model.offset_groups=4", "model.grid_size=8",
         "model.n_patches=64", "model.key_grid=4", "model.bias_table_size=33", "model.snn_hidden=[16]",
         "train.batch_size=8", "train.weight_decay=0.0001", "train.lr=0.002"]


def config(*extra: str) -> ExperimentConfig:
    return ExperimentConfig.from_yaml_text("", [*SMALL, *extra])


@pytest.fixture(scope="module")
def data():
    train = synthetic_patients(128, SPEC, seed=11)
    test = synthetic_patients(96, SPEC, seed=12)
    return train, test


def loaders(train, test, batch_size=8):
    g = torch.Generator().manual_seed(0)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate_patients,
                       drop_last=True, generator=g),
            DataLoader(test, batch_size=32, collate_fn=collate_patients))


def test_training_reduces_loss_and_beats_chance(data):
    torch.manual_seed(0)
    cfg = config("train.epochs=6")
    model = build_model(cfg.model)
    tr, te = loaders(*data)
    before = evaluate(model, te)
    logs = train_epochs(model, tr, cfg)
    after = evaluate(model, te)
    assert logs[-1].loss < 0.8 * logs[0].loss
    # Held-out patients, drawn with another seed: clearly better than chance on every task.
    y = np.array([it["labels"]["diagnosis"] for it in data[1]])
    majority = np.bincount(y).max() / len(y)
    assert after["diagnosis"].values["accuracy"] > majority + 0.15
    assert after["diagnosis"].values["auc"] > 0.8
    assert after["grade"].values["auc"] > 0.75
    assert after["survival"].values["c_index"] > 0.6
    assert after["diagnosis"].values["auc"] > before["diagnosis"].values["auc"]
    # Coordination ran and recorded what it did: only conflicting rows change, one half per step.
    for log in logs:
        for task, rec in log.coordination.items():
            assert rec["tumour"] + rec["micro"] <= rec["conflicts"]
    assert sum(log.coordination["diagnosis"]["tumour"] + log.coordination["diagnosis"]["micro"]
               for log in logs) > 0


def test_spatial_layout_learns(data):
    torch.manual_seed(0)
    cfg = config("model.layout=spatial", "model.tasks=[diagnosis]", "train.epochs=4")
    model = build_model(cfg.model)
    tr, te = loaders(*data)
    logs = train_epochs(model, tr, cfg)
    assert logs[-1].loss < logs[0].loss
    assert evaluate(model, te)["diagnosis"].values["auc"] > 0.8


@pytest.mark.parametrize("arch", ["snn", "abmil", "concat"])
def test_baselines_train_through_the_same_trainer(data, arch):
    torch.manual_seed(0)
    cfg = config(f"model.arch={arch}", "model.tasks=[diagnosis]", "train.epochs=4")
    model = build_model(cfg.model)
    tr, te = loaders(*data)
    logs = train_epochs(model, tr, cfg)
    assert logs[-1].loss < logs[0].loss
    assert logs[-1].coordination == {}  # baselines have no split heads
    assert evaluate(model, te)["diagnosis"].values["auc"] > 0.7


def test_table_and_exact_position_bias_learn_the_same_curve(data):
    """Same seed, same data order: the interpolated table tracks the exact bias over training."""
    curves = {}
    for mode in ("table", "exact"):
        torch.manual_seed(3)
        cfg = config(f"model.position_bias={mode}", "model.tasks=[diagnosis]", "train.epochs=3",
                     "model.attn_dropout=0.0", "model.dropout=0.0")
        model = build_model(cfg.model)
        tr, _ = loaders(*data)
        curves[mode] = np.array([log.loss for log in train_epochs(model, tr, cfg)])
    assert curves["table"][-1] < curves["table"][0]
    np.testing.assert_allclose(curves["table"], curves["exact"], rtol=0.03)


def test_fedprox_term_keeps_weights_near_the_global_model(data):
    tr, _ = loaders(*data)
    drift = {}
    for mu in (0.0, 100.0):
        torch.manual_seed(0)
        cfg = config("model.arch=snn", "model.tasks=[diagnosis]", "train.epochs=2", f"train.proximal_mu={mu}")
        model = build_model(cfg.model)
        start = [p.detach().clone() for p in model.parameters()]
        train_epochs(model, tr, cfg, global_params=start)
        drift[mu] = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start))
    assert drift[100.0] < 0.2 * drift[0.0]


def test_cosine_schedule_and_epoch_log(data):
    tr, _ = loaders(*data)
    torch.manual_seed(0)
    cfg = config("model.arch=snn", "model.tasks=[grade]", "train.epochs=4", "train.lr=0.01")
    logs = train_epochs(build_model(cfg.model), tr, cfg)
    lrs = [log.lr for log in logs]
    expected = [0.01 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert all(log.examples == 128 and log.steps == 16 for log in logs)


def test_empty_loader_is_a_clear_error():
    cfg = config("model.arch=snn", "train.epochs=1")
    with pytest.raises(ValueError, match="no batch"):
        train_epochs(build_model(cfg.model), [], cfg)


def test_device_auto_is_cpu_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA"):
        resolve_device("cuda")


# --- the optimizer state a site keeps between rounds (federation.site_optimizer: persist) -------------------

def _step(model, optimizer, batch, cfg) -> None:
    optimizer.zero_grad(set_to_none=True)
    multitask_loss(model(batch), batch, cfg.loss)[0].backward()
    optimizer.step()


def _trained_optimizer(data, cfg, steps: int = 3):
    """A model and its optimizer after ``steps`` steps, and the next batch."""
    tr, _ = loaders(*data)
    batches = iter(tr)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = make_optimizer(model, cfg.train)
    for _ in range(steps):
        _step(model, optimizer, next(batches), cfg)
    return model, optimizer, next(batches)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizer_state_round_trip_continues_like_an_uninterrupted_optimizer(data, optimizer):
    cfg = config("model.arch=snn", "model.tasks=[diagnosis, grade]", "model.dropout=0.0",
                 f"train.optimizer={optimizer}")
    model, opt, batch = _trained_optimizer(data, cfg)
    arrays = optimizer_state_arrays(opt)
    kept = {k: v.clone() for k, v in arrays.items()}
    n_params = len(list(model.parameters()))
    names = {"adam": {"step", "exp_avg", "exp_avg_sq"}, "adamw": {"step", "exp_avg", "exp_avg_sq"},
             "sgd": {"momentum_buffer"}}[optimizer]
    assert set(arrays) == {f"{i}.{name}" for i in range(n_params) for name in names}
    assert all(v.device.type == "cpu" for v in arrays.values())
    if optimizer != "sgd":
        assert {float(v) for k, v in arrays.items() if k.endswith(".step")} == {3.0}
    # Next round the site builds a new model and optimizer from the weights it has, and loads the state.
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    clone = build_model(cfg.model)
    clone.load_state_dict(saved)
    opt2 = make_optimizer(clone, cfg.train)
    load_optimizer_state(opt2, arrays)
    st1, st2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert set(st1) == set(st2)
    assert all(torch.equal(st1[i][k], st2[i][k]) for i in st1 for k in st1[i])
    _step(model, opt, batch, cfg)
    _step(clone, opt2, batch, cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))
    # Without the state the same step lands elsewhere: the comparison above can fail.
    fresh = build_model(cfg.model)
    fresh.load_state_dict(saved)
    _step(fresh, make_optimizer(fresh, cfg.train), batch, cfg)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    # Neither optimizer stepped the arrays in place (the source's state, nor the one that loaded
    # them): a round rerun from the same kept state is the same round.
    assert all(torch.equal(arrays[k], kept[k]) for k in kept)


def test_an_optimizer_state_of_another_shape_is_refused(data):
    cfg = config("model.arch=snn", "model.tasks=[diagnosis]", "model.dropout=0.0")
    model, opt, _ = _trained_optimizer(data, cfg, steps=1)
    arrays = optimizer_state_arrays(opt)
    n_params = len(list(model.parameters()))

    def target():
        return make_optimizer(build_model(cfg.model), cfg.train)

    with pytest.raises(ValueError, match=f"unexpected entry '{n_params}.exp_avg'"):
        load_optimizer_state(target(), {**arrays, f"{n_params}.exp_avg": torch.zeros(3)})
    for bad in ("x.exp_avg", "0", "0."):
        with pytest.raises(ValueError, match="unexpected entry"):
            load_optimizer_state(target(), {**arrays, bad: torch.zeros(1)})
    wrong = dict(arrays)
    wrong["0.exp_avg"] = torch.zeros(*arrays["0.exp_avg"].shape, 2)
    with pytest.raises(ValueError, match=r"0.exp_avg has shape"):
        load_optimizer_state(target(), wrong)
    other = config("model.arch=snn", "model.tasks=[diagnosis]", "model.snn_hidden=[12]", "model.hidden_dim=20")
    with pytest.raises(ValueError, match="has shape"):
        load_optimizer_state(make_optimizer(build_model(other.model), other.train), arrays)
    load_optimizer_state(target(), arrays)  # the right model takes it


def test_precision_auto_is_fp32_on_cpu_and_bf16_autocast_trains(data):
    """``train.precision``: auto leaves a CPU run in fp32 (bit-identical to fp32); bf16 runs the
    forward under autocast (here on the CPU, which supports it) and still learns, with every loss
    and output back in fp32."""
    from client.local.train import autocast_dtype, forward
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    runs = {}
    for precision in ("auto", "fp32", "bf16"):
        tr, te = loaders(*data)  # the same shuffling for each run
        torch.manual_seed(0)
        cfg = config("model.layout=spatial", "model.tasks=[diagnosis,survival]", "train.epochs=3",
                     f"train.precision={precision}")
        model = build_model(cfg.model)
        logs = train_epochs(model, tr, cfg)
        runs[precision] = (logs, [p.detach().clone() for p in model.parameters()], model)
    assert [lg.precision for lg in runs["auto"][0]] == ["fp32"] * 3
    assert [lg.precision for lg in runs["bf16"][0]] == ["bfloat16"] * 3
    for a, b in zip(runs["auto"][1], runs["fp32"][1]):
        assert torch.equal(a, b)
    model = runs["bf16"][2]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    batch = next(iter(te))
    out = forward(model, batch, torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in out.logits.values())
    assert runs["bf16"][0][-1].loss < runs["bf16"][0][0].loss
    after = evaluate(model, te, amp=torch.bfloat16)
    assert after["diagnosis"].values["auc"] > 0.8


def test_bf16_with_dp_is_a_config_error():
    from smm_model.config import ConfigError
    with pytest.raises(ConfigError, match="train.precision"):
        config("train.precision=bf16", "privacy.dp=true", "privacy.dp_noise_multiplier=1.0")
    with pytest.raises(ConfigError, match="train.precision"):
        config("train.precision=fp16")
