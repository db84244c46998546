"""The centralized baseline, local-only runs and local evaluation (client/baselines/centralized.py,
client/baselines/evaluate.py, client/baselines/runfolder.py) on a tiny synthetic cohort.

What must hold: a centralized run leaves the same run folder as a federated run (checked by running
both: the site side may not import the server, so the formats are compared here, where both can be
imported); training lowers the loss; ``smm evaluate`` on the run's model.pt reproduces the run's own
test metrics; a site whose schema differs is refused, naming the folder and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import client.app as client_app
import client.baselines.runfolder as rf
from client.baselines.centralized import run_centralized
from client.baselines.evaluate import evaluate_sites, load_model_file
from smm_model.contract.sites import simulation_site_dirs
from sim_cohort import SMALL, write_features_cohort
from site_config import two_threads  # noqa: F401  (the module's autouse fixture)
from smm_model.cli import main as smm
from smm_model.config import ExperimentConfig

FAST = [*SMALL, "data.max_patches=64", "federation.rounds=2", "federation.local_epochs=2"]




@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_features_cohort(tmp_path_factory.mktemp("cohort"), patients=14)


def cfg_for(cohort: Path, *extra: str) -> ExperimentConfig:
    return ExperimentConfig.from_yaml_text("", [*FAST, f"data.sites_root={cohort}", *extra])


def sites_of(cfg: ExperimentConfig) -> dict[str, Path]:
    dirs = simulation_site_dirs(cfg.data)
    return dict(zip(rf.site_names(dirs), dirs))


@pytest.fixture(scope="module")
def central(cohort, tmp_path_factory) -> Path:
    cfg = cfg_for(cohort)
    run_dir = tmp_path_factory.mktemp("central") / "run"
    run_centralized(cfg, sites_of(cfg), run_dir, say=lambda _m: None)
    return run_dir


def same_metrics(a: dict, b: dict) -> bool:
    """Equal global metric reports up to float summation order (sites' sums added in another order)."""
    if a["reasons"] != b["reasons"] or set(a["values"]) != set(b["values"]):
        return False

    def value(v):  # an in-memory NaN is what a run folder's JSON holds as null
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v
    return all((x is None and y is None) or (x is not None and y is not None and x == pytest.approx(y, rel=1e-6))
               for x, y in ((value(a["values"][k]), value(b["values"][k])) for k in a["values"]))


def rounds_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / rf.ROUNDS_FILE).read_text().splitlines()]


def test_centralized_writes_the_federated_run_folder_format(cohort, central, tmp_path, monkeypatch):
    from server.federation import loop
    from smm_model.contract.runfolder import CHECKPOINT_DIR
    from test_contract_inprocess import InProcessFlower

    cfg = cfg_for(cohort)
    assert (central / rf.CONFIG_FILE).read_text() == loop.resolved_config_text(cfg)

    # A (one-round) federated run of the same cohort through the real ClientApp.
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(tmp_path / "site-logs"))
    fcfg = cfg_for(cohort, "federation.rounds=1", "federation.local_epochs=1")
    fed_dir = tmp_path / "fed"
    loop.run_federation(InProcessFlower(3), fcfg, fed_dir, poll_s=0.01)
    fed_final = json.loads((fed_dir / rf.FINAL_FILE).read_text())
    ours = json.loads((central / rf.FINAL_FILE).read_text())
    assert set(fed_final) == set(rf.FINAL_KEYS) | set(rf.FEDERATED_KEYS)
    assert set(rf.FINAL_KEYS) <= set(ours) and ours["mode"] == "centralized"
    assert set(ours["site_info"]) == {"site_1", "site_2", "site_3"}
    assert sorted(i["label"] for i in fed_final["site_info"].values()) == ["site_1", "site_2", "site_3"]
    assert all(i["synthetic"] and len(i["data_digest"]) == 64 for i in fed_final["site_info"].values())
    assert {i["data_digest"] for i in fed_final["site_info"].values()} == \
        {i["data_digest"] for i in ours["site_info"].values()}  # the same files, seen by both runs
    assert set(ours["test"]) == set(fed_final["test"])
    assert ours["test"]["split"] == "test" and set(ours["test"]["per_site"]) == {"site_1", "site_2", "site_3"}
    site = next(iter(fed_final["test"]["per_site"].values()))
    assert set(ours["test"]["per_site"]["site_1"]) == set(site)
    assert set(ours["test"]["global"]["values"]) == set(fed_final["test"]["global"]["values"])
    assert ours["notes"]["survival.c_index"] == fed_final["notes"]["survival.c_index"]
    fed_rounds, our_rounds = rounds_of(fed_dir), rounds_of(central)
    common = {"round", "status", "lr", "timings", "train", "val", "selection"}
    assert all(common <= set(r) for r in fed_rounds + our_rounds)
    assert set(our_rounds[1]["val"]) == set(fed_rounds[1]["val"])
    # Round 0 is the same initial model with the same shared preprocessing: the same val metrics.
    assert same_metrics(our_rounds[0]["val"]["global"], fed_rounds[0]["val"]["global"])
    fed_model = torch.load(fed_dir / rf.MODEL_FILE, weights_only=True)
    our_model = torch.load(central / rf.MODEL_FILE, weights_only=True)
    assert set(fed_model) == set(our_model)
    assert fed_model["schema"] == our_model["schema"] and fed_model["shared"] == our_model["shared"]
    assert fed_model["model_config"] == our_model["model_config"]
    # smm evaluate reads a server checkpoint too.
    ck = load_model_file(fed_dir / CHECKPOINT_DIR / "round_0001.pt")
    out = evaluate_sites(ck, list(sites_of(cfg).values()), tmp_path / "ev-ck", "val")
    assert same_metrics(out["test"]["global"], fed_rounds[1]["val"]["global"])


def test_centralized_training_lowers_the_loss(central):
    rounds = rounds_of(central)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["status"] == "initial" and rounds[1]["train"]["aggregate"]["num-examples"] > 0
    assert rounds[-1]["val"]["global"]["values"]["loss"] < rounds[0]["val"]["global"]["values"]["loss"]
    losses = [x for r in rounds[1:] for x in r["train"]["epoch_losses"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    final = json.loads((central / rf.FINAL_FILE).read_text())
    assert final["epochs"] == 4 and final["best_round"] in (1, 2) and final["test"]["patients"] > 0


def test_centralized_validates_every_kth_round_and_selects_by_a_metric_mean(cohort, tmp_path):
    metric = "diagnosis.macro_f1+grade.macro_f1"
    cfg = cfg_for(cohort, "federation.rounds=3", "federation.local_epochs=1", "federation.eval_every=2",
                  f"federation.selection_metric={metric}")
    final = run_centralized(cfg, sites_of(cfg), tmp_path / "run", say=lambda _m: None)
    rounds = rounds_of(tmp_path / "run")
    assert [r["val"] is not None for r in rounds] == [True, False, True, True]
    assert rounds[1]["selection"] == {"metric": metric, "value": None, "best_round": None, "best_value": None}
    value = {r["round"]: (r["val"]["global"]["values"]["diagnosis.macro_f1"]
                          + r["val"]["global"]["values"]["grade.macro_f1"]) / 2 for r in rounds[2:]}
    for r in rounds[2:]:
        assert r["selection"]["value"] == pytest.approx(value[r["round"]])
    best = max(value, key=value.get)  # higher is better; the first of equals is kept
    assert final["best_round"] == best and final["selection_value"] == pytest.approx(value[best])
    assert not final["lower_is_better"]


def test_evaluate_reproduces_the_runs_test_metrics(cohort, central, tmp_path, capsys):
    final = json.loads((central / rf.FINAL_FILE).read_text())
    sites = [str(p) for p in sites_of(cfg_for(cohort)).values()]
    assert smm(["evaluate", str(central / rf.MODEL_FILE), *sites, "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / rf.FINAL_FILE).read_text())
    assert set(rf.FINAL_KEYS) <= set(ev) and ev["mode"] == "evaluate"
    # The same statistics (equal up to float reduction order, which torch's thread count may change).
    assert same_metrics(ev["test"]["global"], final["test"]["global"])
    assert set(ev["test"]["per_site"]) == set(final["test"]["per_site"])
    for name, site in final["test"]["per_site"].items():
        assert ev["test"]["per_site"][name]["patients"] == site["patients"]
        assert same_metrics(ev["test"]["per_site"][name], site)
    assert ev["best_round"] == final["best_round"]
    out = capsys.readouterr().out
    assert "patients at 3 site(s)" in out and "site_1" not in out  # aggregates only
    # --split all covers every patient of a site.
    assert smm(["evaluate", str(central / rf.MODEL_FILE), sites[0], "--split", "all",
                "--out", str(tmp_path / "ev-all")]) == 0
    ev_all = json.loads((tmp_path / "ev-all" / rf.FINAL_FILE).read_text())
    n_test = final["test"]["per_site"]["site_1"]["patients"]
    assert ev_all["test"]["patients"] > n_test and ev_all["split"] == "all"


def test_evaluate_a_dp_model_on_sites_whose_budget_is_spent(cohort, central, tmp_path):
    """Evaluation spends no privacy budget: a model whose config has privacy.dp on is evaluated on
    sites whose ledgers hold more than the budget (measured: smm evaluate refused every site of
    the DP benchmark's epsilon-8 run with E_PRIVACY_BUDGET)."""
    import dataclasses
    import shutil

    from client.local.ledger import PrivacyLedger
    from client.local.round import ledger_file

    sites = tmp_path / "sites"
    shutil.copytree(cohort, sites)
    site_dirs = [sites / p.name for p in sites_of(cfg_for(cohort)).values()]
    model = load_model_file(central / rf.MODEL_FILE)
    priv = dataclasses.replace(model.cfg.privacy, dp=True, dp_epsilon_budget=1.0, dp_noise_multiplier=1.0)
    model.cfg = dataclasses.replace(model.cfg, privacy=priv)
    for d in site_dirs:
        ledger = PrivacyLedger.open(ledger_file(d))
        ledger.reserve("earlier", 1, 0.5, 1.0, 50, priv.dp_delta, budget=1e9)
        assert ledger.epsilon(priv.dp_delta) > priv.dp_epsilon_budget
    out = evaluate_sites(model, site_dirs, tmp_path / "ev", "test")
    assert out["test"]["patients"] > 0 and not out.get("problems")


def test_a_model_file_from_before_a_model_key_existed_still_loads(central, tmp_path):
    """A model.pt written before model.survival_reads_tasks existed (neither its model_config nor its
    stored config names it) loads with the key's default; a model_config that really differs from
    the stored config is still refused."""
    import torch

    from client.baselines.evaluate import ModelFileError

    payload = torch.load(central / rf.MODEL_FILE, map_location="cpu", weights_only=True)
    assert payload["model_config"]["survival_reads_tasks"] is False
    del payload["model_config"]["survival_reads_tasks"]
    text = payload["config"]
    payload["config"] = "\n".join(line for line in text.splitlines() if "survival_reads_tasks" not in line)
    assert payload["config"] != text
    torch.save(payload, tmp_path / "old.pt")
    model = load_model_file(tmp_path / "old.pt")
    assert model.cfg.model.survival_reads_tasks is False
    payload["model_config"]["hidden_dim"] *= 2
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="model_config differs"):
        load_model_file(tmp_path / "bad.pt")


def test_evaluate_refuses_a_site_with_another_feature_dim(cohort, central, tmp_path, capsys):
    other = write_features_cohort(tmp_path / "other", sites=1, patients=6, feature_dim=16)
    bad = other / "site_1"
    good = str(sites_of(cfg_for(cohort))["site_2"])
    assert smm(["evaluate", str(central / rf.MODEL_FILE), good, str(bad), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "feature_dim" in err and "16" in err and "32" in err
    assert not (tmp_path / "ev" / rf.FINAL_FILE).exists()
    assert smm(["evaluate", str(tmp_path / "nope.pt"), good]) == 2


def test_local_only_writes_a_run_folder_per_site(cohort, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": "tiny"}))
    sets = [x for s in [*FAST, f"data.sites_root={cohort}", "federation.rounds=1", "federation.local_epochs=1"]
            for x in ("--set", s)]
    run = tmp_path / "loc"
    assert smm(["centralized", str(cfg_file), "--local-only", "--run-dir", str(run), *sets]) == 0
    summary = json.loads((run / "local_only.json").read_text())
    assert set(summary["sites"]) == {"site_1", "site_2", "site_3"}
    for name, row in summary["sites"].items():
        d = run / "local" / name
        for f in (rf.CONFIG_FILE, rf.ROUNDS_FILE, rf.FINAL_FILE, rf.MODEL_FILE):
            assert (d / f).is_file()
        final = json.loads((d / rf.FINAL_FILE).read_text())
        assert final["mode"] == "local-only" and final["training_sites"] == [name]
        assert set(final["test"]["per_site"]) | set(final["test"]["suppressed"]) == {name}
        assert set(final["all_sites_test"]["per_site"]) == {"site_1", "site_2", "site_3"}
        assert row["all_sites_test"]["patients"] > row["own_test"]["patients"]
        assert math.isfinite(row["own_test"]["values"]["loss"])
    # The same folder is not reused by a second run.
    assert smm(["centralized", str(cfg_file), "--local-only", "--run-dir", str(run), *sets]) == 2
