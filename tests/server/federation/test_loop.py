"""The server workflow end to end over an in-process transport: run folder, resume, schema refusal,
suppression, output privacy and skipped rounds (cases C2, G6, H2, B5/H4, D6/B4 of the fault test plan,
../shared/docs/reliability.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from server_fakes import SENTINEL, Crash, FakeSite, FakeTransport, config, sites

import server.federation.loop as loop
from server.runs.checkpoint import load_checkpoint, load_latest
from server.federation.loop import RunDirInUse, initial_weights, resolved_config_text, round_lr, run_federation, sample_nodes
from server.federation.messages import EVALUATE, PREFLIGHT, TRAIN, arrays_nbytes
from smm_model.config import ConfigError, ExperimentConfig, ModelConfig, from_dict, to_dict
from smm_model.contract.runfolder import ROUNDS_FILE, read_rounds_file
from smm_model.nn.model import build_model


def read_rounds(run_dir):
    """Strict: every line of a finished run's rounds.jsonl is a complete round record."""
    rounds = read_rounds_file(run_dir / ROUNDS_FILE)
    assert not rounds.torn
    return rounds.strict()


def without_timings(records):
    return [{k: v for k, v in r.items() if k != "timings"} for r in records]


def test_a_run_writes_its_folder_and_follows_the_message_contract(tmp_path):
    cfg = config("federation.rounds=3", "train.min_lr=0.0005", "train.proximal_mu=0.01", "federation.local_epochs=2")
    run = tmp_path / "run"
    transport = FakeTransport(sites(3))
    final = run_federation(transport, cfg, run)

    assert (run / "config.yaml").read_text() == resolved_config_text(cfg)
    rounds = read_rounds(run)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[0]["status"] == "initial" and rounds[0]["train"] is None
    nbytes = arrays_nbytes(initial_weights(cfg))
    for r in rounds[1:]:
        assert r["status"] == "aggregated" and r["skip_reason"] is None
        assert r["lr"] == pytest.approx(round_lr(cfg.train, 3, r["round"]))
        # One message phase per round: round r's model is validated by round r + 1's train
        # messages, the last round's by one evaluate phase after it.
        last = r["round"] == 3
        assert set(r["timings"]) == {"wait", "train", "aggregate", *(["evaluate"] if last else [])}
        assert "validation" not in r  # none left pending
        t = r["train"]
        assert t["sampled"] == t["kept"] == [11, 12, 13] and t["dropped"] == [] and t["clamped"] == []
        assert set(t["per_site"]) == {"11", "12", "13"}
        assert set(t["per_site"]["12"]) == {"num-examples", "train-loss", "seconds", "coord-diagnosis-tumour",
                                            "coord-diagnosis-micro", "coord-diagnosis-conflicts"}
        assert t["per_site"]["12"]["num-examples"] == 40 and t["per_site"]["12"]["coord-diagnosis-conflicts"] == 2
        assert set(t["update_norms"]) == {"11", "12", "13"} and t["norm_outliers"] == []
        assert r["bytes"] == {"sent": (6 if last else 3) * nbytes, "received": 3 * nbytes}  # + 3 evaluate after the last
        v = r["val"]
        assert v["split"] == "val" and v["patients"] == 60 and set(v["per_site"]) == {"11", "12", "13"}
        assert v["suppressed"] == [] and v["dropped"] == []
        assert {"loss", "diagnosis.accuracy", "grade.macro_f1", "survival.c_index"} <= set(v["global"]["values"])
    assert rounds[1]["lr"] == cfg.train.lr
    losses = [r["val"]["global"]["values"]["loss"] for r in rounds]
    assert losses[3] < losses[1] < losses[0]  # the sites pull the model towards their data
    assert rounds[3]["selection"] == {"metric": "loss", "value": losses[3], "best_round": 3, "best_value": losses[3]}

    saved = json.loads((run / "final_metrics.json").read_text())
    assert saved == json.loads(json.dumps(final))
    assert final["best_round"] == 3 and final["selection_metric"] == "loss" and final["lower_is_better"]
    assert final["sites"] == [11, 12, 13] and final["refused_sites"] == {} and final["skipped_rounds"] == []
    assert final["test"]["split"] == "test" and set(final["test"]["per_site"]) == {"11", "12", "13"}
    assert "within-site" in final["notes"]["survival.c_index"]

    model = torch.load(run / "model.pt", weights_only=True)
    assert model["round"] == 3 and model["model_config"] == to_dict(cfg.model)
    assert model["schema"]["feature_dim"] == 24 and model["schema"]["gene_set"] == "demo-v1"
    net = build_model(from_dict(ModelConfig, model["model_config"]))
    net.load_state_dict(model["weights"], strict=True)
    last = load_checkpoint(run, 3).weights
    assert all(np.array_equal(model["weights"][k].numpy(), last[k]) for k in last)

    # The contract the ClientApp implements.
    kinds = [(i.message_type, frozenset(i.config)) for i in transport.sent]
    assert kinds[0] == (PREFLIGHT, frozenset({"experiment"}))
    assert (TRAIN, frozenset({"experiment", "shared", "server-round", "lr", "local-epochs", "local-steps",
                              "proximal-mu", "validate"})) in kinds
    assert (EVALUATE, frozenset({"experiment", "shared", "server-round", "split"})) in kinds
    train = [i for i in transport.sent if i.message_type == TRAIN]
    assert {i.config["validate"] for i in train} == {"val"}  # rounds 0, 1, 2's models, validated on the way
    vals = [i for i in transport.sent if i.message_type == EVALUATE and i.config["split"] == "val"]
    assert [(i.node_id, i.config["server-round"]) for i in vals] == [(11, 3), (12, 3), (13, 3)]  # the last round's
    assert {i.config["local-epochs"] for i in train} == {2} and {i.config["proximal-mu"] for i in train} == {0.01}
    assert {i.config["local-steps"] for i in train} == {0}  # federation.local_steps: 0 = local_epochs
    assert [i.config["server-round"] for i in train] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    tests = [i for i in transport.sent if i.message_type == EVALUATE and i.config["split"] == "test"]
    assert [i.node_id for i in tests] == [11, 12, 13] and {i.config["server-round"] for i in tests} == {3}
    assert yaml.safe_load(train[0].config["experiment"]) == to_dict(cfg)
    assert ExperimentConfig.from_yaml_text(train[0].config["experiment"]) == cfg  # the sites' parser agrees


def test_cosine_lr_and_seeded_sampler():
    cfg = config("train.lr=0.01", "train.min_lr=0.001")
    assert round_lr(cfg.train, 4, 1) == 0.01
    assert round_lr(cfg.train, 4, 3) == pytest.approx(0.001 + 0.009 * 0.5)
    a = [sample_nodes(__import__("random").Random(5), [4, 1, 3, 2, 5], 0.4, 2) for _ in range(2)]
    assert a[0] == a[1] and len(a[0]) == 2 and a[0] == sorted(a[0])
    assert sample_nodes(__import__("random").Random(5), [3, 1], 0.1, 2) == [1, 3]


RESUME_CFG = ("federation.rounds=4", "federation.strategy=fedadam", "federation.fraction_train=0.67",
              "federation.fraction_evaluate=0.67", "federation.server_lr=0.05")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    final = run_federation(FakeTransport(sites(3)), config(*RESUME_CFG), run)
    return run, final


def assert_same_run(a, b):
    assert without_timings(read_rounds(a)) == without_timings(read_rounds(b))
    wa, wb = load_checkpoint(a, 4).weights, load_checkpoint(b, 4).weights
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)  # bitwise
    ma, mb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(ma["weights"][k], mb["weights"][k]) for k in ma["weights"])
    fa, fb = (json.loads((d / "final_metrics.json").read_text()) for d in (a, b))
    fa.pop("model"), fb.pop("model")  # model.pt bytes embed nothing run-specific but pickling ids; weights compared
    for f in (fa, fb):  # how long this process ran and whether it resumed: the only intended differences
        f.pop("wall_s"), f.pop("resumed_after_round")
    assert fa == fb


def test_resume_after_a_crash_continues_bit_exactly(tmp_path, uninterrupted):
    """Killed while sending round 3; the resumed run numbers rounds 0..4 once and ends with the
    uninterrupted run's weights, bit for bit (FedAdam moments, sampler and RNG states restored)."""
    cfg = config(*RESUME_CFG)
    run = tmp_path / "run"
    crash = FakeTransport(sites(3), crash=lambda i: i.message_type == TRAIN and i.config["server-round"] == 3)
    with pytest.raises(Crash):
        run_federation(crash, cfg, run)
    assert [r["round"] for r in read_rounds(run)] == [0, 1, 2] and load_latest(run).round == 2
    run_federation(FakeTransport(sites(3)), cfg, run, resume=True)
    assert [r["round"] for r in read_rounds(run)] == [0, 1, 2, 3, 4]
    assert_same_run(uninterrupted[0], run)


def test_sites_lost_between_rounds_fail_the_run_with_a_record_the_report_reads_and_resume_finishes_it(
        tmp_path, uninterrupted):
    """Every site gone after round 2 (below min_nodes): the run fails after waiting
    wait_for_nodes_s (a fake clock here), writes failure.json (the reason, the last checkpoint, the
    sites by name) and the report says FAILED with the reason; the checkpoint is intact and a
    resume with the sites back ends with the uninterrupted run's weights and removes the failure
    record."""
    from server.report.build import write_report
    from smm_model.contract.runfolder import FAILURE_FILE

    cfg = config(*RESUME_CFG)
    run = tmp_path / "run"
    now = [0.0]

    def sleep(s):
        now[0] += s

    def connected():  # gone once round 2's record is written (3 lines: rounds 0, 1, 2)
        path = run / "rounds.jsonl"
        return [] if path.exists() and len(path.read_text().splitlines()) >= 3 else [11, 12, 13]

    with pytest.raises(loop.NodeWaitTimeout):
        run_federation(FakeTransport(sites(3), connected=connected), cfg, run, clock=lambda: now[0], sleep=sleep)
    assert now[0] >= cfg.federation.wait_for_nodes_s
    failure = json.loads((run / FAILURE_FILE).read_text())
    assert failure["error"] == "NodeWaitTimeout" and failure["last_checkpoint_round"] == 2
    assert "min_nodes" in failure["reason"] or "sites" in failure["reason"]
    assert failure["sites"] == [11, 12, 13] and set(failure["site_info"]) == {"11", "12", "13"}
    assert load_latest(run).round == 2
    html = write_report([run]).read_text()
    assert "FAILED" in html and failure["reason"][:40] in html and "last checkpoint is round 2" in html
    assert all(f"fake-{n}" in html for n in (11, 12, 13))  # sites by their names, not node ids
    run_federation(FakeTransport(sites(3)), cfg, run, resume=True)
    assert not (run / FAILURE_FILE).exists()
    assert_same_run(uninterrupted[0], run)


def test_resume_after_a_crash_between_log_line_and_checkpoint(tmp_path, uninterrupted, monkeypatch):
    """Round 3's line was appended but its checkpoint never written: the line is dropped and redone."""
    cfg = config(*RESUME_CFG)
    run = tmp_path / "run"
    real = loop.save_checkpoint

    def dies_at_round_3(run_dir, state, **kw):
        if state.round == 3:
            raise Crash("killed before the round 3 checkpoint")
        return real(run_dir, state, **kw)

    monkeypatch.setattr(loop, "save_checkpoint", dies_at_round_3)
    with pytest.raises(Crash):
        run_federation(FakeTransport(sites(3)), cfg, run)
    monkeypatch.undo()
    assert [r["round"] for r in read_rounds(run)] == [0, 1, 2, 3] and load_latest(run).round == 2
    with open(run / "rounds.jsonl", "a") as f:  # and a torn half line from the moment of the kill
        f.write('{"round": 4, "stat')
    run_federation(FakeTransport(sites(3)), cfg, run, resume=True)
    assert [r["round"] for r in read_rounds(run)] == [0, 1, 2, 3, 4]
    assert_same_run(uninterrupted[0], run)


def test_resume_continues_fedavgm_momentum_bit_exactly(tmp_path):
    """FedAvgM's momentum buffer (one array per parameter) goes through the checkpoint."""
    cfg = config("federation.rounds=4", "federation.strategy=fedavgm", "federation.server_momentum=0.9",
                 "federation.server_lr=0.8")
    whole = tmp_path / "whole"
    run_federation(FakeTransport(sites(3)), cfg, whole)
    run = tmp_path / "run"
    crash = FakeTransport(sites(3), crash=lambda i: i.message_type == TRAIN and i.config["server-round"] == 3)
    with pytest.raises(Crash):
        run_federation(crash, cfg, run)
    saved = load_latest(run)
    assert saved.round == 2 and saved.strategy_state["class"] == "FedAvgM"
    momentum = saved.strategy_state["momentum_vector"]
    assert {k: m.shape for k, m in momentum.items()} == {k: w.shape for k, w in saved.weights.items()}
    run_federation(FakeTransport(sites(3)), cfg, run, resume=True)
    assert_same_run(whole, run)


def test_eval_every_selects_among_the_validated_rounds_only(tmp_path):
    """Sites that overshoot their targets (step 2.5) make every round worse than the one before.
    Validated every round, round 1 is selected; validated every 2nd round and the last, round 2
    is: round 1 has no validation to be compared by."""
    overshoot = {str(n): {"step": 2.5} for n in (11, 12, 13)}
    every = run_federation(FakeTransport(sites(3, **overshoot)), config("federation.rounds=3"), tmp_path / "every")
    assert every["best_round"] == 1
    transport = FakeTransport(sites(3, **overshoot))
    run = tmp_path / "k2"
    final = run_federation(transport, config("federation.rounds=3", "federation.eval_every=2"), run)
    rounds = read_rounds(run)
    assert [r["val"] is not None for r in rounds] == [True, False, True, True]
    assert rounds[1]["selection"] == {"metric": "loss", "value": None, "best_round": None, "best_value": None}
    assert "evaluate" not in rounds[1]["timings"]
    nbytes = arrays_nbytes(initial_weights(config()))
    # Validation rides on the next round's train messages (rounds 0 and 2's models), the last
    # round's model gets one evaluate phase.
    assert [r["bytes"]["sent"] for r in rounds[1:]] == [3 * nbytes, 3 * nbytes, 6 * nbytes]
    train = [i for i in transport.sent if i.message_type == TRAIN]
    assert [(i.config["server-round"], i.config.get("validate")) for i in train][::3] == [(1, "val"), (2, None),
                                                                                           (3, "val")]
    losses = {r["round"]: r["val"]["global"]["values"]["loss"] for r in rounds[2:]}
    assert losses[2] < losses[3] and final["best_round"] == 2 and final["selection_value"] == losses[2]
    evals = [i for i in transport.sent if i.message_type == EVALUATE]
    assert [i.config["server-round"] for i in evals if i.config["split"] == "val"] == [3] * 3
    tests = [i for i in evals if i.config["split"] == "test"]
    assert {i.config["server-round"] for i in tests} == {2}
    assert all(np.array_equal(tests[0].arrays[k], load_checkpoint(run, 2).weights[k]) for k in tests[0].arrays)
    # Validating less often changes what is measured, not what is trained.
    a, b = load_checkpoint(run, 3).weights, load_checkpoint(tmp_path / "every", 3).weights
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_finished_run_resumed_only_redoes_the_final_evaluation(tmp_path):
    cfg = config("federation.rounds=2")
    run = tmp_path / "run"
    first = run_federation(FakeTransport(sites(2)), cfg, run)
    transport = FakeTransport(sites(2))
    again = run_federation(transport, cfg, run, resume=True)
    assert {i.message_type for i in transport.sent} == {PREFLIGHT, EVALUATE}
    assert [r["round"] for r in read_rounds(run)] == [0, 1, 2]
    assert again["test"] == first["test"]


def test_resume_refuses_a_different_model_and_fresh_runs_refuse_a_used_folder(tmp_path):
    run = tmp_path / "run"
    run_federation(FakeTransport(sites(2)), config("federation.rounds=1"), run)
    with pytest.raises(RunDirInUse, match="already holds a run"):
        run_federation(FakeTransport(sites(2)), config("federation.rounds=1"), run)
    with pytest.raises(ConfigError, match=r"model.hidden_dim"):
        run_federation(FakeTransport(sites(2)), config("federation.rounds=2", "model.hidden_dim=32"), run, resume=True)
    # resume with nothing to resume starts a new run
    final = run_federation(FakeTransport(sites(2)), config("federation.rounds=1"), tmp_path / "new", resume=True)
    assert final["best_round"] == 1


def test_schema_mismatch_refuses_the_site_naming_site_and_field(tmp_path, server_logs):
    ss = sites(4, **{"13": {"schema": {"feature_dim": 16}}, "14": {"schema": {"gene_set": "other"}}})
    transport = FakeTransport(ss)
    final = run_federation(transport, config("federation.rounds=1"), tmp_path / "run")
    assert final["sites"] == [11, 12]
    assert final["refused_sites"] == {"13": "site 13: feature_dim is 16, the run expects 24",
                                      "14": "site 14: gene_set is 'other', site 11 has 'demo-v1'"}
    assert "refused site 13: site 13: feature_dim is 16" in server_logs.text
    assert {i.node_id for i in transport.sent if i.message_type != PREFLIGHT} == {11, 12}


def test_a_site_that_connects_later_is_preflighted_and_joins(tmp_path):
    """A new site, or a restarted SuperNode with a new node id, joins from the next round if it
    matches the run; one that does not is refused and never sampled."""
    transport = FakeTransport(sites(4, **{"14": {"schema": {"gene_set": "other"}}}))
    transport.connected = lambda: [11, 12] + ([13, 14] if any(i.message_type == TRAIN for i in transport.sent) else [])
    final = run_federation(transport, config("federation.rounds=2"), tmp_path / "run")
    rounds = read_rounds(tmp_path / "run")
    assert rounds[1]["joined"] == [] and rounds[1]["train"]["sampled"] == [11, 12]
    assert rounds[2]["joined"] == [13] and rounds[2]["train"]["sampled"] == [11, 12, 13]
    assert [i.node_id for i in transport.sent if i.message_type == PREFLIGHT] == [11, 12, 13, 14]
    assert final["sites"] == [11, 12, 13] and set(final["test"]["per_site"]) == {"11", "12", "13"}
    assert final["refused_sites"] == {"14": "site 14: gene_set is 'other', site 11 has 'demo-v1'"}


def test_too_many_refusals_fail_the_run_with_the_reasons(tmp_path):
    ss = sites(2, **{"12": {"schema": {"genes_micro": 99}}})
    with pytest.raises(RuntimeError, match=r"only 1 of 2 connected sites passed preflight.*"
                                           r"site 12: genes_micro is 99, the run expects 14"):
        run_federation(FakeTransport(ss), config(), tmp_path / "run")


def test_small_sites_are_suppressed_from_per_site_and_global_metrics(tmp_path):
    ss = sites(4, **{"13": {"eval_patients": 3}, "14": {"eval_patients": 4, "honest_suppression": False}})
    final = run_federation(FakeTransport(ss), config("federation.rounds=1"), tmp_path / "run")
    for ev in (read_rounds(tmp_path / "run")[1]["val"], final["test"]):
        assert ev["suppressed"] == [13, 14] and set(ev["per_site"]) == {"11", "12"} and ev["patients"] == 40
        per = [ev["per_site"][s]["values"]["loss"] for s in ("11", "12")]
        assert ev["global"]["values"]["loss"] == pytest.approx(sum(per) / 2)  # 20 patients each
    assert final["suppressed_sites"] == [13, 14]
    for r in read_rounds(tmp_path / "run"):  # no per-site evaluation numbers for them, in any round
        assert set(r["val"]["per_site"]) == {"11", "12"}


def test_nothing_a_site_says_except_aggregates_reaches_logs_or_files(tmp_path, server_logs):
    """Sites raising with a PHI sentinel, a metric key carrying it, garbage summaries."""
    ss = {11: FakeSite(11, train_fault=lambda r: "error" if r == 2 else None),
          12: FakeSite(12, train_fault="phi_metric_key"),
          13: FakeSite(13, eval_fault=lambda r: "error" if r == 1 else None),
          14: FakeSite(14, preflight_fault="error"),
          15: FakeSite(15, preflight_fault="garbage"),
          16: FakeSite(16, eval_fault="bad_lengths")}
    run = tmp_path / "run"
    final = run_federation(FakeTransport(ss), config("federation.rounds=2"), run)
    rounds = read_rounds(run)
    assert {"node": 11, "reason": "E_CLIENT_ERROR"} in rounds[2]["train"]["dropped"]
    # Site 13's evaluation fails in the message of round 1, which validates the initial model on
    # the way (one phase per round): that round's model validation and its training both miss it.
    assert {"node": 13, "reason": "E_CLIENT_ERROR"} in rounds[0]["val"]["dropped"]
    assert {"node": 13, "reason": "E_CLIENT_ERROR"} in rounds[1]["train"]["dropped"]
    assert {"node": 16, "reason": "E_BAD_METRICS"} in rounds[1]["val"]["dropped"]
    assert final["refused_sites"] == {"14": "site 14: preflight failed (E_CLIENT_ERROR)",
                                      "15": "site 15: preflight failed (E_BAD_SUMMARY)"}
    for name in ("rounds.jsonl", "final_metrics.json", "server.log", "config.yaml"):
        assert SENTINEL not in (run / name).read_text(), name
    assert SENTINEL.encode() not in (run / "model.pt").read_bytes()
    assert SENTINEL not in server_logs.text
    assert "node 11: E_CLIENT_ERROR" in server_logs.text


def test_a_round_without_usable_replies_is_skipped_and_the_model_kept(tmp_path):
    ss = {n: FakeSite(n, train_fault=lambda r: "nan" if r == 2 else None) for n in (11, 12)}
    run = tmp_path / "run"
    final = run_federation(FakeTransport(ss), config("federation.rounds=3"), run)
    r2 = read_rounds(run)[2]
    assert r2["status"] == "skipped" and r2["skip_reason"] == "E_TOO_FEW_REPLIES" and r2["val"] is None
    assert r2["train"]["dropped"] == [{"node": 11, "reason": "E_NONFINITE"}, {"node": 12, "reason": "E_NONFINITE"}]
    w1, w2 = load_checkpoint(run, 1).weights, load_checkpoint(run, 2).weights
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert all(np.isfinite(v).all() for v in load_checkpoint(run, 3).weights.values())
    assert final["skipped_rounds"] == [2] and final["best_round"] == 3


def test_a_run_where_no_round_aggregates_fails(tmp_path):
    ss = {n: FakeSite(n, train_fault="error") for n in (11, 12)}
    with pytest.raises(RuntimeError, match="no round aggregated any update"):
        run_federation(FakeTransport(ss), config("federation.rounds=2"), tmp_path / "run")


def test_selection_metric_must_name_an_enabled_task_and_known_metric(tmp_path):
    with pytest.raises(ConfigError, match="federation.selection_metric: 'grade.auc' names task 'grade'"):
        run_federation(FakeTransport(sites(2)),
                       config("model.tasks=[diagnosis]", "federation.selection_metric=grade.auc"), tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown metric 'f2' for diagnosis"):
        run_federation(FakeTransport(sites(2)), config("federation.selection_metric=diagnosis.f2"), tmp_path / "b")


def test_higher_is_better_selection_picks_the_best_round(tmp_path):
    final = run_federation(FakeTransport(sites(2)), config("federation.rounds=3",
                                                           "federation.selection_metric=survival.c_index"),
                           tmp_path / "run")
    values = [r["val"]["global"]["values"]["survival.c_index"] for r in read_rounds(tmp_path / "run")[1:]]
    assert final["selection_value"] == max(values) and not final["lower_is_better"]
    assert final["best_round"] == 1 + values.index(max(values))
    assert math.isfinite(final["test"]["global"]["values"]["survival.c_index"])


def test_a_skipped_last_round_still_validates_the_newest_weights(tmp_path):
    """rounds=4, eval_every=2: round 3 is aggregated but not validated; round 4 is skipped (every
    site fails). The newest weights (round 3's) are then validated under round 4, whose checkpoint
    holds them, so selection can still choose the final model."""
    fail_4 = {str(n): {"train_fault": (lambda r: "error" if r == 4 else None)} for n in (11, 12, 13)}
    run = tmp_path / "run"
    final = run_federation(FakeTransport(sites(3, **fail_4)), config("federation.rounds=4", "federation.eval_every=2"),
                           run)
    rounds = read_rounds(run)
    assert [r["status"] for r in rounds] == ["initial", "aggregated", "aggregated", "aggregated", "skipped"]
    assert [r["val"] is not None for r in rounds] == [True, False, True, False, True]
    w3, w4 = load_checkpoint(run, 3).weights, load_checkpoint(run, 4).weights
    assert all(np.array_equal(w3[k], w4[k]) for k in w3)  # round 4's checkpoint is round 3's weights
    assert final["best_round"] in (2, 4) and final["skipped_rounds"] == [4]
    # With validation every round nothing changes: a skipped round is never validated.
    every = tmp_path / "every"
    run_federation(FakeTransport(sites(3, **fail_4)), config("federation.rounds=4"), every)
    assert [r["val"] is not None for r in read_rounds(every)] == [True, True, True, True, False]


def test_rounds_validated_by_fewer_sites_are_not_compared_with_rounds_over_all_of_them(tmp_path):
    """A site lost from round 3 on: round 2's model (validated with round 3's messages) and round
    3's are validated by two sites, with a lower loss than round 1's over three (the lost site's
    target is the farthest). Selection keeps round 1 and the final record says why."""
    dead = lambda r: "error" if r >= 3 else None  # noqa: E731
    run = tmp_path / "run"
    final = run_federation(FakeTransport(sites(3, **{"13": {"train_fault": dead, "eval_fault": dead}})),
                           config("federation.rounds=3"), run)
    rounds = read_rounds(run)
    count = {r["round"]: len(r["val"]["per_site"]) + len(r["val"]["suppressed"]) for r in rounds}
    assert count == {0: 3, 1: 3, 2: 2, 3: 2}
    loss = {r["round"]: r["val"]["global"]["values"]["loss"] for r in rounds}
    assert min(loss[2], loss[3]) < loss[1]  # compared on values alone, a two-site round would win
    assert final["best_round"] == 1 and final["selection_value"] == loss[1]
    assert "round(s) 2, 3 were validated by fewer sites than round 1 (2, 2 against 3)" in final["selection_note"]
    # Without the lost site every round is compared over the same two sites again.
    healthy = run_federation(FakeTransport(sites(2)), config("federation.rounds=3"), tmp_path / "two")
    assert healthy["selection_note"] is None


def test_sites_that_do_not_train_validate_in_the_same_message_phase(tmp_path):
    """fraction_train 0.5 of four sites: the other two get an evaluate message in the same phase
    (one send per round), so every round's model is validated by all four."""
    transport = FakeTransport(sites(4))
    run = tmp_path / "run"
    final = run_federation(transport, config("federation.rounds=3", "federation.fraction_train=0.5"), run)
    rounds = read_rounds(run)
    assert [len(r["val"]["per_site"]) for r in rounds] == [4, 4, 4, 4]
    round_phases = [ph for ph in transport.phases if any(t == TRAIN for _, t in ph)]
    assert len(round_phases) == 3
    for ph in round_phases:
        kinds = dict(ph)
        assert sorted(kinds) == [11, 12, 13, 14]
        assert sorted(kinds.values()) == [EVALUATE, EVALUATE, TRAIN, TRAIN]
    val_only = [i for i in transport.sent if i.message_type == EVALUATE and i.config["split"] == "val"]
    # evaluate messages of round r's phase carry the model of round r - 1 under that round's number;
    # the last round's model is validated after it, by all four
    assert [i.config["server-round"] for i in val_only] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert final["selection_note"] is None
