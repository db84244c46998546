"""Tests for smm_model.config: defaults, validation messages, overrides, round trip."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from smm_model.config import (
    ConfigError,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    to_dict,
)

SRC = "cfg.yaml"


def load(text: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    return ExperimentConfig.from_yaml_text(text, overrides, source=SRC)


def assert_fails(text: str, *fragments: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load(text, overrides)
    msg = str(info.value)
    assert SRC in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- defaults


def test_defaults_are_the_reference_setting():
    cfg = ExperimentConfig()
    m, loss, t = cfg.model, cfg.loss, cfg.train
    assert m.hidden_dim == 128
    assert m.n_patches == 2500 and m.grid_size == 50 and m.layout == "seed"
    assert m.key_grid == 12
    assert m.heads == 8 and m.dim_head == 64 and m.offset_groups == 8
    assert m.offset_scale == 4.0
    assert m.feature_dim == 1024 and m.genes_tumour == 59 and m.genes_micro == 361
    assert m.snn_hidden == (64, 48, 32)
    assert m.survival_bins == 4
    assert m.arch == "smm" and set(m.tasks) == {"diagnosis", "grade", "survival"}
    assert m.n_classes == {"diagnosis": 4, "grade": 3, "survival": 4}
    assert t.optimizer == "adam" and t.lr == 1e-3 and t.weight_decay == 0.1
    assert t.epochs == 20 and t.batch_size == 8 and t.seed == 42 and t.min_lr == 0.0
    assert t.coordination == "pcgrad"
    assert loss.consistency_weight == 0.5 and loss.survival_alpha == 0.0
    assert loss.task_weight("diagnosis") == 1.0


def test_empty_yaml_gives_defaults():
    assert load("") == ExperimentConfig()
    assert load("# only a comment\n") == ExperimentConfig()


def test_yaml_values_are_applied():
    cfg = load("name: run1\nmodel:\n  tasks: [grade]\n  hidden_dim: 64\n"
               "loss:\n  consistency_weight: 1\ntrain:\n  lr: 0.0005\n  coordination: seed\n")
    assert cfg.name == "run1"
    assert cfg.model.tasks == ("grade",) and cfg.model.hidden_dim == 64
    assert cfg.model.n_classes == {"grade": 3}
    assert cfg.loss.consistency_weight == 1.0 and isinstance(cfg.loss.consistency_weight, float)
    assert cfg.train.lr == 0.0005 and cfg.train.coordination == "seed"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("text, field", [
    ("model:\n  hidden_dim: -1\n", "model.hidden_dim"),
    ("model:\n  heads: 0\n", "model.heads"),
    ("model:\n  feature_dim: -5\n", "model.feature_dim"),
    ("model:\n  survival_bins: 0\n", "model.survival_bins"),
    ("model:\n  snn_hidden: [64, -1]\n", "model.snn_hidden"),
    ("train:\n  epochs: -3\n", "train.epochs"),
    ("train:\n  batch_size: 0\n", "train.batch_size"),
    ("train:\n  lr: 0\n", "train.lr"),
    ("train:\n  weight_decay: -0.1\n", "train.weight_decay"),
])
def test_non_positive_sizes_fail_naming_the_field(text, field):
    assert_fails(text, field)


def test_grid_that_cannot_hold_the_patches():
    msg = assert_fails("model:\n  layout: seed\n  n_patches: 2500\n  grid_size: 40\n", "model.grid_size")
    assert "grid_size 50" in msg  # suggests the fitting side


def test_spatial_layout_does_not_tie_grid_to_n_patches():
    cfg = load("model:\n  layout: spatial\n  n_patches: 2500\n  grid_size: 40\n")
    assert cfg.model.grid_size == 40


def test_unknown_task():
    assert_fails("model:\n  tasks: [diagnosis, staging]\n", "model.tasks", "staging")


def test_empty_and_duplicate_tasks():
    assert_fails("model:\n  tasks: []\n", "model.tasks")
    assert_fails("model:\n  tasks: [grade, grade]\n", "model.tasks")


def test_unknown_key_is_named():
    msg = assert_fails("model:\n  hiden_dim: 64\n", "hiden_dim")
    assert "model" in msg
    assert_fails("trian:\n  lr: 0.1\n", "trian")


@pytest.mark.parametrize("text, field", [
    ('train:\n  lr: "fast"\n', "train.lr"),
    ("train:\n  epochs: 2.5\n", "train.epochs"),
    ("model:\n  tasks: grade\n", "model.tasks"),
    ("model: 3\n", "model"),
    ("train:\n  drop_last: 1\n", "train.drop_last"),
    ("model:\n  gene_queries: no\n", "model.gene_queries"),  # YAML 1.2: 'no' is a string, not false
    ("name: 5\n", "name"),
])
def test_wrong_type_fails_naming_the_field(text, field):
    assert_fails(text, field)


@pytest.mark.parametrize("text, field", [
    ("model:\n  hidden_dim: true\n", "model.hidden_dim"),
    ("train:\n  epochs: false\n", "train.epochs"),
    # fields where true (1) / false (0) would pass the range check: only the type check catches them
    ("train:\n  seed: true\n", "train.seed"),
    ("train:\n  num_workers: false\n", "train.num_workers"),
    ("model:\n  survival_bins: true\n", "model.survival_bins"),
    ("train:\n  lr: true\n", "train.lr"),
    ("train:\n  weight_decay: false\n", "train.weight_decay"),
])
def test_bool_is_not_a_number(text, field):
    msg = assert_fails(text, field)
    assert "expected an integer" in msg or "expected a number" in msg


def test_heads_must_be_multiple_of_offset_groups():
    assert_fails("model:\n  heads: 12\n  offset_groups: 8\n", "model.heads", "offset_groups")


def test_hidden_dim_must_divide_by_offset_groups():
    assert_fails("model:\n  hidden_dim: 100\n", "model.hidden_dim", "offset_groups")


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_survival_alpha_out_of_range(alpha):
    assert_fails(f"loss:\n  survival_alpha: {alpha}\n", "loss.survival_alpha")


def test_survival_alpha_bounds_accepted():
    assert load("loss:\n  survival_alpha: 1\n").loss.survival_alpha == 1.0
    assert load("loss:\n  survival_alpha: 0.15\n").loss.survival_alpha == 0.15


def test_unknown_coordination_mode():
    assert_fails("train:\n  coordination: reflect\n", "train.coordination", "reflect")


def test_other_enumerations_checked():
    assert_fails("model:\n  arch: transmil\n", "model.arch")
    assert_fails("model:\n  layout: random\n", "model.layout")
    assert_fails("train:\n  optimizer: rmsprop\n", "train.optimizer")
    assert_fails("train:\n  device: tpu\n", "train.device")


def test_invalid_yaml_and_non_mapping_top_level():
    assert_fails("model: [unclosed\n")
    assert_fails("- a\n- b\n", "mapping")


def test_dataclasses_validate_on_direct_construction():
    with pytest.raises(ConfigError, match="model.hidden_dim"):
        ModelConfig(hidden_dim=0)
    with pytest.raises(ConfigError, match="train.coordination"):
        TrainConfig(coordination="magic")
    with pytest.raises(ConfigError, match="loss.consistency_weight"):
        LossConfig(consistency_weight=-1.0)
    with pytest.raises(ConfigError, match="loss.task_weights"):
        LossConfig(task_weights={"staging": 1.0})
    with pytest.raises(ConfigError, match=r"loss\.task_weights\.grade"):
        LossConfig(task_weights={"grade": -1.0})
    assert LossConfig(task_weights={"grade": 2.0}).task_weight("grade") == 2.0


# --------------------------------------------------------------------------- overrides


def test_overrides_apply():
    cfg = load("model:\n  hidden_dim: 128\n", ["model.hidden_dim=64", "train.epochs=3"])
    assert cfg.model.hidden_dim == 64
    assert cfg.train.epochs == 3
    assert isinstance(cfg.train.epochs, int)


def test_override_creates_missing_sections_and_parses_yaml_values():
    cfg = load("", ["train.coordination=seed", "model.tasks=[diagnosis, survival]", "train.lr=0.01"])
    assert cfg.train.coordination == "seed"
    assert cfg.model.tasks == ("diagnosis", "survival")
    assert cfg.train.lr == 0.01


def test_override_values_are_validated():
    assert_fails("", "model.hidden_dim", overrides=("model.hidden_dim=-4",))
    assert_fails("", "hiden_dim", overrides=("model.hiden_dim=64",))


@pytest.mark.parametrize("override, field, fragment", [
    ("federation.local_steps=-1", "federation.local_steps", ">= 0"),
    ("federation.site_optimizer=keep", "federation.site_optimizer", "'keep'"),
    ("federation.eval_every=0", "federation.eval_every", "positive"),
    ("federation.server_lr=0", "federation.server_lr", "> 0"),
    ("federation.server_momentum=-0.1", "federation.server_momentum", "[0, 1)"),
    ("federation.server_momentum=1.0", "federation.server_momentum", "[0, 1)"),
    ("federation.server_momentum=0.9", "federation.server_momentum", "FedAvgM's; federation.strategy is 'fedavg'"),
    ("train.logit_adjustment=-0.5", "train.logit_adjustment", ">= 0"),
    ("federation.selection_metric=loss+diagnosis.auc", "federation.selection_metric", "joined by '+'"),
])
def test_federation_protocol_settings_are_validated(override, field, fragment):
    assert_fails("", field, fragment, overrides=(override,))


def test_federation_protocol_defaults_and_accepted_values():
    f, t = ExperimentConfig().federation, ExperimentConfig().train
    assert (f.local_steps, f.site_optimizer, f.eval_every, f.server_lr, f.server_momentum) == (0, "fresh", 1, None, 0.0)
    assert t.logit_adjustment == 0.0
    cfg = load("federation:\n  strategy: fedavgm\n  server_momentum: 0.9\n  server_lr: null\n  local_steps: 12\n"
               "  site_optimizer: persist\n  eval_every: 5\n"
               "  selection_metric: diagnosis.macro_f1+survival.c_index\ntrain:\n  logit_adjustment: 1\n")
    f = cfg.federation
    assert (f.strategy, f.server_momentum, f.server_lr, f.local_steps, f.site_optimizer, f.eval_every) == (
        "fedavgm", 0.9, None, 12, "persist", 5)
    assert cfg.train.logit_adjustment == 1.0 and isinstance(cfg.train.logit_adjustment, float)
    assert load(yaml.safe_dump(to_dict(cfg))) == cfg  # null server_lr survives the round trip


@pytest.mark.parametrize("bad", ["model.hidden_dim", "=64", "model..hidden_dim=64", "model.hidden_dim=[1,",
                                 "name.sub=1"])
def test_bad_override_syntax_raises(bad):
    with pytest.raises(ConfigError):
        load("name: x\n", [bad])


def test_apply_overrides_does_not_mutate_input():
    raw = {"model": {"hidden_dim": 128}}
    out = apply_overrides(raw, ["model.hidden_dim=64"])
    assert raw == {"model": {"hidden_dim": 128}}
    assert out == {"model": {"hidden_dim": 64}}


# --------------------------------------------------------------------------- round trip

NON_DEFAULT = ExperimentConfig(
    name="fed-site-a",
    model=ModelConfig(tasks=("grade", "survival"), hidden_dim=64, heads=16, offset_groups=8,
                      layout="spatial", grid_size=32, key_grid=8, snn_hidden=(32, 16)),
    loss=LossConfig(consistency_weight=0.0, survival_alpha=0.15),
    train=TrainConfig(lr=2.5e-5, epochs=3, coordination="seed", drop_last=False, device="cpu"),
)
WITH_TASK_WEIGHTS = dataclasses.replace(
    NON_DEFAULT, loss=LossConfig(task_weights={"grade": 2.0, "survival": 0.25}, survival_alpha=0.15))


# --------------------------------------------------------------------------- YAML round trip and scalars

@pytest.mark.parametrize("cfg", [ExperimentConfig(), NON_DEFAULT, WITH_TASK_WEIGHTS],
                         ids=["default", "non_default", "task_weights"])
def test_round_trip_through_yaml(cfg):
    d = to_dict(cfg)
    assert isinstance(d["model"]["tasks"], list)  # the plain form really is plain
    assert set(d) == {f.name for f in dataclasses.fields(ExperimentConfig)}
    back = ExperimentConfig.from_yaml_text(yaml.safe_dump(d), source=SRC)
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)


def test_task_weights_from_yaml():
    cfg = load("loss:\n  task_weights: {grade: 2}\n")
    assert cfg.loss.task_weight("grade") == 2.0 and isinstance(cfg.loss.task_weight("grade"), float)
    assert cfg.loss.task_weight("diagnosis") == 1.0


def test_task_weights_validated_from_yaml():
    assert_fails("loss:\n  task_weights: {staging: 1.0}\n", "loss.task_weights")


@pytest.mark.parametrize("text, overrides", [("train:\n  coordination: off\n", ()),
                                             ("", ("train.coordination=off",))], ids=["yaml", "override"])
def test_coordination_off_unquoted(text, overrides):
    assert load(text, overrides).train.coordination == "off"


def test_coordination_off_quoted_works():
    assert load('train:\n  coordination: "off"\n').train.coordination == "off"


def test_exponent_notation_float_is_accepted():
    assert load("train:\n  lr: 1e-3\n").train.lr == 1e-3
    assert load("", ["train.lr=1e-4"]).train.lr == 1e-4
