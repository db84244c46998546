"""The site side of a federated round (client/local/round.py, client/app.py) on a synthetic cohort.

What must hold whatever the server does: the preflight reply holds aggregates only; a training
round changes the weights and reports finite metrics with the same keys everywhere; evaluation
statistics are sums, so adding the sites' equals the statistics of the pooled predictions; small
sites are suppressed; and no error that leaves a site names a path or a patient.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import (DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord,
                      RecordDict)
from torch.utils.data import DataLoader

import client.app as client_app
from client.site.collate import collate_patients
from client.local.round import (SharedGenomicsStats, SiteError, evaluate_round, load_site, preflight_summary, resolve_site_dir, risk_groups, train_round)
from smm_model.contract.packing import pack, unpack
from smm_model.contract.sites import simulation_site_dirs
from smm_model.contract.wire import LAYOUT, layout_key
from client.site.labels import SPLITS
from client.cohorts.synth import CohortSpec, write_cohort
from smm_model.config import ConfigError, ExperimentConfig
from smm_model.metrics.federated import c_index_counts, confusion_counts, km_counts, score_histograms
from smm_model.objectives.losses import multitask_loss
from smm_model.metrics.exact import risk_from_hazard_logits
from smm_model.nn.model import build_model
from smm_model.contract.protocol import (SURVIVAL_HIST_EDGES, EvalStats, SharedStats, SiteSummary, check_schemas,
                                derive_shared, metrics_from_eval)

from site_config import SMALL, make_cfg, two_threads  # noqa: F401  (two_threads: the module's autouse fixture)

SENTINEL = "PHI-SENTINEL-TCGA-XX-0000"
def yaml_text(cfg: ExperimentConfig) -> str:
    import yaml

    from smm_model.config import to_dict
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    d = CohortSpec()
    write_cohort(out, replace(d, sites=3, patients_per_site=16, features_only=True, seed=3,
                              features=replace(d.features, feature_dim=32)), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def cfg(cohort) -> ExperimentConfig:
    return make_cfg(cohort)


@pytest.fixture(scope="module")
def sites(cfg) -> list[Path]:
    return simulation_site_dirs(cfg.data)


@pytest.fixture(scope="module")
def summaries(sites, cfg) -> dict[str, SiteSummary]:
    return {d.name: preflight_summary(d, cfg) for d in sites}


@pytest.fixture(scope="module")
def shared(summaries, cfg) -> SharedStats:
    return derive_shared(list(summaries.values()), cfg)


@pytest.fixture(scope="module")
def init_state(cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}


@pytest.fixture(scope="module")
def trained(sites, cfg, shared, init_state):
    return train_round(sites[0], cfg, shared, init_state, lr=2e-3, local_epochs=2, server_round=1)


# ---------------------------------------------------------------------------------------------------------
# which folder
# ---------------------------------------------------------------------------------------------------------
def test_site_dir_from_node_config(cohort, cfg, sites):
    assert [d.name for d in sites] == ["site_1", "site_2", "site_3"]
    assert resolve_site_dir({"site-dir": str(sites[1])}, cfg) == sites[1]
    for k in range(3):
        assert resolve_site_dir({"partition-id": k, "num-partitions": 3}, cfg) == sites[k]
    with pytest.raises(ConfigError, match="num-supernodes"):
        resolve_site_dir({"partition-id": 0, "num-partitions": 2}, cfg)
    with pytest.raises(ConfigError, match="site-dir"):
        resolve_site_dir({}, cfg)
    explicit = make_cfg(cohort, "data.sites=[site_3, site_1]")
    assert simulation_site_dirs(explicit.data) == [sites[0], sites[2]]  # sorted, whatever the listed order


def test_site_label_is_only_what_the_site_chose_or_the_simulated_folder_name(sites):
    from client.local.round import site_label
    assert site_label({"site-dir": str(sites[0]), "site-name": " hospital-a "}, sites[0]) == "hospital-a"
    assert site_label({"site-dir": str(sites[0])}, sites[0]) is None  # a deployed folder's name stays local
    assert site_label({"partition-id": 1, "num-partitions": 3}, sites[1]) == "site_2"
    with pytest.raises(ConfigError, match="site-name"):
        site_label({"site-dir": str(sites[0]), "site-name": ""}, sites[0])


def test_patches_are_standardised_with_the_shared_statistics(cfg, sites):
    """The preflight's patch sums pool to the statistics of every training patch, and the dataset
    applies exactly (x - mean) / std to what it reads."""
    from client.site.folder import read_features
    summaries = [preflight_summary(d, cfg) for d in sites]
    shared = derive_shared(summaries, cfg)
    raw = []
    for d in sites:
        site = load_site(d, cfg)
        raw += [read_features(site.layout.feature_file(s))[0] for p in site.patients("train") for s in site.slides[p]]
    x = np.concatenate(raw).astype(np.float64)  # (all training patches, D)
    assert sum(s.patches["n"] for s in summaries) == len(x)
    np.testing.assert_allclose(shared.patch_mean, x.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(shared.patch_std, x.std(0, ddof=1), rtol=1e-7)
    site = load_site(sites[0], cfg)
    mean, std = shared.patch_norm()
    plain = site.dataset("val", grid_size=cfg.model.grid_size)
    normed = site.dataset("val", grid_size=cfg.model.grid_size, patch_norm=(mean, std))
    np.testing.assert_allclose(normed[0]["patches"], (plain[0]["patches"] - mean) / std, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# preflight
# ---------------------------------------------------------------------------------------------------------
def test_preflight_holds_aggregates_only(sites, cfg, summaries, cohort):
    for d in sites:
        s = summaries[d.name]
        text = s.to_json()
        ids = pd.read_csv(d / "clinical.csv", dtype=str)["patient_id"].tolist()
        slides = pd.read_csv(d / "slides.csv", dtype=str)["slide_id"].tolist()
        assert ids and slides
        for token in [*ids, *slides, str(d), str(cohort), d.name]:
            assert token not in text, f"{token!r} leaks into the preflight summary"
        assert SiteSummary.from_json(text) == s
        for key in ("encoder", "feature_dim", "gene_set", "genes_tumour", "genes_micro", "genomics_policy"):
            assert key in s.schema
        assert (s.schema["feature_dim"], s.schema["genes_tumour"], s.schema["genes_micro"]) == (32, 20, 30)
        clinical = pd.read_csv(d / "clinical.csv")
        for split in SPLITS:
            rec = s.splits[split]
            assert rec["patients"] == int((clinical["split"] == split).sum())
            assert len(rec["diagnosis"]) == 4 and len(rec["grade"]) == 3
            assert {"survival_labelled", "events"} <= set(rec)
        train = s.splits["train"]
        assert len(s.survival_hist_all) == len(s.survival_hist_events) == len(SURVIVAL_HIST_EDGES) - 1
        assert sum(s.survival_hist_all) == train["survival_labelled"]
        assert sum(s.survival_hist_events) == train["events"]
        geneset = pd.read_csv(d / "geneset.csv")
        assert s.genomics["features"] == geneset["feature"].tolist()
        assert set(s.genomics["count"]) == {train["patients"]}
    check_schemas(summaries, cfg)  # the server's check accepts them


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------
def test_train_round_changes_weights_and_reports_finite_metrics(sites, cfg, shared, init_state, summaries, trained):
    state, m, *_ = trained
    assert list(state) == list(init_state)
    assert all(state[k].shape == init_state[k].shape and torch.isfinite(state[k].float()).all() for k in state)
    assert any(not torch.equal(state[k], init_state[k]) for k in state)
    n_train = summaries["site_1"].splits["train"]["patients"]
    assert m["num-examples"] == n_train and n_train >= cfg.train.batch_size
    assert m["steps"] == 2 * (n_train // cfg.train.batch_size)  # local_steps=0: 2 epochs of full batches
    expected = {"num-examples", "train-loss", "steps", "seconds"} | {f"coord-{t}-{p}" for t in cfg.model.tasks
                                                             for p in ("tumour", "micro", "conflicts")}
    assert set(m) == expected
    assert all(np.isfinite(v) for v in m.values()) and m["seconds"] > 0
    assert all(isinstance(m[k], int) for k in m if k.startswith("coord-"))
    MetricRecord(m)  # Flower accepts it as it is
    # Same inputs, same round -> the same weights (seeded from train.seed and the round).
    again, *_ = train_round(sites[0], cfg, shared, init_state, lr=2e-3, local_epochs=2, server_round=1)
    assert all(torch.equal(again[k], state[k]) for k in state)
    prox, mp, *_ = train_round(sites[0], cfg, shared, init_state, lr=2e-3, local_epochs=1, proximal_mu=0.5,
                               server_round=1)
    assert np.isfinite(mp["train-loss"]) and any(not torch.equal(prox[k], init_state[k]) for k in prox)


# ---------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------
def _pooled_reference(sites, cfg, shared, state, split):
    """Per-patient outputs of every site, computed here independently of evaluate_round."""
    model = build_model(cfg.model)
    model.load_state_dict(state)
    model.eval()
    loss_cfg = replace(cfg.loss, consistency_weight=0.0)
    ref = {"n": 0, "loss": 0.0, "probs": {}, "target": {}, "cindex": np.zeros(4, np.int64), "surv": []}
    stats = SharedGenomicsStats(shared)
    for d in sites:
        site = load_site(d, cfg)
        ds = site.dataset(split, stats=stats, bin_edges=np.asarray(shared.survival_bin_edges),
                          grid_size=cfg.model.grid_size, patch_norm=shared.patch_norm())
        ref["n"] += len(ds)
        site_t, site_e, site_r = [], [], []
        with torch.no_grad():
            for batch in DataLoader(ds, batch_size=1, collate_fn=collate_patients):  # one patient per batch
                out = model(batch)
                ref["loss"] += float(multitask_loss(out, batch, loss_cfg)[0])
                for task, logits in out.logits.items():
                    if not bool(batch.task_mask(task)[0]):
                        continue
                    if task == "survival":
                        site_t.append(float(batch.labels["survival_time"][0]))
                        site_e.append(float(batch.labels["event"][0]))
                        site_r.append(float(risk_from_hazard_logits(logits)[0]))
                        surv = torch.cumprod(1 - torch.sigmoid(logits[0].double()), 0)
                        below = (surv < 0.5).nonzero()
                        group = int(below[0]) if len(below) else logits.shape[1] - 1
                        ref["surv"].append((site_t[-1], site_e[-1], group))
                    else:
                        ref["probs"].setdefault(task, []).append(torch.softmax(logits[0], 0).numpy())
                        ref["target"].setdefault(task, []).append(int(batch.labels[task][0]))
        ref["cindex"] += c_index_counts(site_t, site_e, site_r)  # pairs within a site only
    return ref


@pytest.mark.parametrize("split", ["val", "test"])
def test_site_statistics_add_up_to_the_pooled_ones(sites, cfg, shared, trained, split):
    state, *_ = trained
    per_site = [evaluate_round(d, cfg, shared, state, split) for d in sites]
    total = EvalStats.merge([EvalStats.from_record(MetricRecord(s.to_record())) for s in per_site])
    ref = _pooled_reference(sites, cfg, shared, state, split)
    assert total.n == ref["n"] > 0
    assert total.loss_sum == pytest.approx(ref["loss"], rel=1e-5)
    for task in ("diagnosis", "grade"):
        C = cfg.model.n_classes[task]
        y, p = np.asarray(ref["target"][task]), np.stack(ref["probs"][task])
        assert total.confusion[task] == confusion_counts(y, p.argmax(1), C).ravel().tolist()
        assert total.histograms[task] == score_histograms(y, p, C).ravel().tolist()
    assert total.cindex == ref["cindex"].tolist()
    t, e, g = (np.asarray(v) for v in zip(*ref["surv"]))
    assert total.km_groups == cfg.model.survival_bins
    assert total.km == km_counts(t, e, g, cfg.model.survival_bins, shared.km_grid).ravel().tolist()
    report = metrics_from_eval(total, cfg.model.n_classes)
    assert np.isfinite(report.values["loss"]) and np.isfinite(report.values["diagnosis.accuracy"])


def test_risk_group_is_the_predicted_median_bin():
    # S after each bin: 0.8, 0.4 -> bin 1; never below 0.5 -> last bin; below at once -> bin 0.
    h = np.array([[0.2, 0.5, 0.5], [0.1, 0.1, 0.1], [0.9, 0.1, 0.1]])
    assert risk_groups(np.log(h / (1 - h))).tolist() == [1, 2, 0]


def test_small_sites_are_suppressed(sites, cohort, shared, init_state):
    big = make_cfg(cohort, "federation.min_site_patients=1000")
    s = evaluate_round(sites[0], big, shared, init_state, "val")
    assert s.suppressed and s.n > 0 and s.loss_sum == 0.0
    assert s.confusion == {} and s.histograms == {} and s.cindex is None and s.km is None
    assert set(s.to_record()) == {"num-examples", "loss-sum", "suppressed", "km-groups"}
    exact = make_cfg(cohort, f"federation.min_site_patients={s.n}")
    assert not evaluate_round(sites[0], exact, shared, init_state, "val").suppressed


# ---------------------------------------------------------------------------------------------------------
# errors leave the site sanitized
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture()
def broken_cohort(cohort, tmp_path) -> Path:
    """A copy of the cohort whose site_2 has a patient named like a real barcode with a bad grade."""
    root = tmp_path / "broken cohort"  # a space, as paths at hospitals have
    shutil.copytree(cohort, root)
    path = root / "site_2" / "clinical.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[0, "patient_id"] = SENTINEL
    df.loc[0, "grade"] = "banana"
    df.to_csv(path, index=False)
    return root


def test_plain_functions_raise_sanitized_errors(broken_cohort, cfg, sites, shared, init_state):
    bad = broken_cohort / "site_2"
    with pytest.raises(SiteError) as ei:
        preflight_summary(bad, cfg)
    assert str(ei.value) == "E_DATA: SiteDataError"
    assert SENTINEL in str(ei.value.__cause__)  # the details stay available locally
    wrong = replace(shared, genomics_features=list(reversed(shared.genomics_features)))
    with pytest.raises(SiteError, match="^E_SCHEMA: ValueError$"):
        train_round(sites[0], cfg, wrong, init_state, 1e-3, 1)
    missing = {k: v for k, v in init_state.items() if not k.startswith("heads.")}
    with pytest.raises(SiteError, match="^E_MODEL: RuntimeError$"):
        evaluate_round(sites[0], cfg, shared, missing, "val")
    with pytest.raises(SiteError, match="^E_CONFIG: ValueError$"):
        train_round(sites[0], cfg, shared, init_state, float("nan"), 1)


def _message(message_type: str, content: RecordDict) -> Message:
    md = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                  created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
    return Message(content=content, metadata=md)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_handler_errors_carry_no_path_or_patient(broken_cohort, tmp_path, monkeypatch, capfd):
    cfg = make_cfg(broken_cohort)
    logs = tmp_path / "site-logs"
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(logs))
    msg = _message("query.preflight", RecordDict({"config": ConfigRecord({"experiment": yaml_text(cfg)})}))
    with pytest.raises(SiteError) as ei:  # simulation: partition 1 is site_2
        client_app.app(msg, _context({"partition-id": 1, "num-partitions": 3}))
    err = ei.value
    assert str(err) == "E_DATA: SiteDataError"
    assert err.__cause__ is None and err.__suppress_context__  # no chained detail travels with it
    out = capfd.readouterr()
    for text in (str(err), out.out, out.err):
        assert SENTINEL not in text and str(broken_cohort) not in text
    assert "E_DATA: SiteDataError" in out.err
    assert SENTINEL in (logs / "site_2.log").read_text()  # the site's own log has the details
    # Deployment: same sanitized error; the details go to the file the node_config names.
    log_file = tmp_path / "deploy.log"
    with pytest.raises(SiteError, match="^E_DATA: SiteDataError$"):
        client_app.app(msg, _context({"site-dir": str(broken_cohort / "site_2"), "log-file": str(log_file)}))
    assert SENTINEL in log_file.read_text()
    # A message without the shared statistics is a protocol error, named as such.
    train = _message("train", RecordDict({"config": ConfigRecord({"experiment": yaml_text(cfg), "server-round": 1,
                                                                  "lr": 0.001, "local-epochs": 1})}))
    with pytest.raises(SiteError, match="^E_PROTOCOL: KeyError$"):
        client_app.app(train, _context({"partition-id": 0, "num-partitions": 3}))


# ---------------------------------------------------------------------------------------------------------
# the handlers, end to end in-process
# ---------------------------------------------------------------------------------------------------------
def test_handlers_follow_the_message_contract(cfg, sites, init_state, tmp_path, monkeypatch):
    from server.federation.messages import (ARRAYS, CONFIG, EVALUATE, KEY_EXPERIMENT, KEY_LOCAL_EPOCHS, KEY_LOCAL_STEPS,
                                 KEY_LR, KEY_PROXIMAL_MU, KEY_ROUND, KEY_SHARED, KEY_SPLIT, METRICS, PREFLIGHT,
                                 SUMMARY, SUMMARY_JSON, TRAIN)
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(tmp_path))
    text = yaml_text(cfg)
    ctx = _context({"partition-id": 2, "num-partitions": 3})
    reply = client_app.app(_message(PREFLIGHT, RecordDict({CONFIG: ConfigRecord({KEY_EXPERIMENT: text})})), ctx)
    summary = SiteSummary.from_json(reply.content[SUMMARY][SUMMARY_JSON])
    assert summary == preflight_summary(sites[2], cfg, label=sites[2].name)  # simulation: the folder's name
    shared = derive_shared([summary], cfg)
    base = {KEY_EXPERIMENT: text, KEY_SHARED: shared.to_json(), KEY_ROUND: 1}
    flat, layout = pack({k: v.numpy() for k, v in init_state.items()})
    reply = client_app.app(_message(TRAIN, RecordDict({
        ARRAYS: ArrayRecord({d: Array(a) for d, a in flat.items()}),
        CONFIG: ConfigRecord({**base, KEY_LR: 0.001, KEY_LOCAL_EPOCHS: 1, KEY_LOCAL_STEPS: 3,
                              KEY_PROXIMAL_MU: 0.0, layout_key(ARRAYS): layout.to_json()})})), ctx)
    assert set(reply.content.array_records) == {ARRAYS} and set(reply.content.metric_records) == {METRICS}
    # Packed in the instruction's layout (one flat array per dtype), and says so.
    assert set(reply.content[ARRAYS]) == set(flat) and reply.content[LAYOUT][ARRAYS] == layout.digest
    assert reply.content[METRICS]["steps"] == 3  # local-steps wins over local-epochs
    assert client_app.OPTIMIZER_STATE_KEY not in ctx.state  # site_optimizer: fresh keeps nothing
    new_flat = {d: a.numpy() for d, a in reply.content[ARRAYS].items()}
    new = unpack(new_flat, layout)
    assert list(new) == list(init_state) and all(new[k].shape == tuple(init_state[k].shape) for k in new)
    assert not all(np.array_equal(new[k], init_state[k].numpy()) for k in new)  # it trained
    assert reply.content[METRICS]["num-examples"] == summary.splits["train"]["patients"]
    assert torch.get_num_threads() == 1  # simulation: held to federation.client_cpus
    reply = client_app.app(_message(EVALUATE, RecordDict({
        ARRAYS: ArrayRecord({d: Array(a) for d, a in new_flat.items()}),
        CONFIG: ConfigRecord({**base, KEY_SPLIT: "val", layout_key(ARRAYS): layout.to_json()})})), ctx)
    stats = EvalStats.from_record(reply.content[METRICS])
    assert stats.n == summary.splits["val"]["patients"] and not stats.suppressed
    assert set(stats.confusion) == {"diagnosis", "grade"} and stats.km_groups == cfg.model.survival_bins
    assert "train round 1" in (tmp_path / "site_3.log").read_text()
