"""The quality benchmarks' shared parts (benchmarks/quality.py): pooling local-only runs, summaries,
and the command runner's failure path."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from lifelines.utils import concordance_index
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402

from smm_model.config import ExperimentConfig, to_dict  # noqa: E402
from smm_model.metrics.federated import c_index_counts, confusion_counts, km_counts, score_histograms  # noqa: E402
from smm_model.contract.protocol import EvalStats  # noqa: E402

C = 4  # diagnosis classes


def _site_predictions(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    y = rng.integers(0, C, n)
    logits = rng.normal(0, 1, (n, C)) + 1.5 * np.eye(C)[y]  # informative, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    time_ = rng.uniform(1, 100, n)
    event = rng.random(n) < 0.6
    risk = -time_ + rng.normal(0, 30, n)
    return {"y": y, "probs": probs, "time": time_, "event": event, "risk": risk}


def _write_local_run(root: Path, site: str, p: dict[str, np.ndarray], km_grid: np.ndarray,
                     cfg: ExperimentConfig) -> None:
    """A run folder as `smm centralized --local-only` writes one, with real statistics."""
    stats = EvalStats(n=len(p["y"]), loss_sum=1.0 * len(p["y"]))
    stats.confusion["diagnosis"] = confusion_counts(p["y"], p["probs"].argmax(1), C).ravel().tolist()
    stats.histograms["diagnosis"] = score_histograms(p["y"], p["probs"], C).ravel().tolist()
    stats.cindex = c_index_counts(p["time"], p["event"], p["risk"]).tolist()
    groups = np.digitize(p["risk"], np.quantile(p["risk"], [0.25, 0.5, 0.75]))
    stats.km = km_counts(p["time"], p["event"], groups, 4, km_grid).ravel().tolist()  # a grid of its own
    stats.km_groups = 4
    run = root / "local" / site
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    final = {"test": {"patients": len(p["y"]), "global": {"values": {"diagnosis.accuracy": 0.0}, "reasons": {},
                                                          "stats": stats.to_record()}}}
    (run / "final_metrics.json").write_text(json.dumps(final))


def test_pooled_local_values_match_metrics_on_the_concatenated_predictions(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_yaml_text("model: {arch: snn, tasks: [diagnosis, survival]}")
    rng = np.random.default_rng(0)
    sites = {"a": _site_predictions(rng, 60), "b": _site_predictions(rng, 45)}
    grids = {"a": np.linspace(0, 100, 7), "b": np.linspace(0, 100, 11)}  # local preprocessing: own KM grids
    for name, p in sites.items():
        _write_local_run(tmp_path, name, p, grids[name], cfg)
    table = {"sites": {name: {"run_dir": f"local/{name}"} for name in sites}}
    (tmp_path / "local_only.json").write_text(json.dumps(table))

    values, per_site = quality.pooled_local_values(tmp_path)

    y = np.concatenate([p["y"] for p in sites.values()])
    probs = np.concatenate([p["probs"] for p in sites.values()])
    assert values["diagnosis.accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert values["diagnosis.macro_f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    # histogram AUC: scores sharing one of the bins count as ties
    assert values["diagnosis.auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=0.01)
    # within-site C-index: pairs are compared inside a site only, so it is the comparable-pair weighted
    # mean of the sites' own C-indices
    comp = {n: c_index_counts(p["time"], p["event"], p["risk"])[3] for n, p in sites.items()}
    own = {n: concordance_index(p["time"], -p["risk"], p["event"]) for n, p in sites.items()}
    expected = sum(own[n] * comp[n] for n in sites) / sum(comp.values())
    assert values["survival.c_index"] == pytest.approx(expected, abs=1e-9)
    assert "survival.logrank_p" not in values  # KM counts on different grids are not pooled
    assert set(per_site) == {"a", "b"} and per_site["b"]["patients"] == 45


def test_pooled_local_values_without_statistics_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "local_only.json").write_text(json.dumps({"sites": {}}))
    with pytest.raises(quality.BenchmarkError, match="no site has test statistics"):
        quality.pooled_local_values(tmp_path)


def test_summaries_are_mean_and_sample_sd_ignoring_missing_values() -> None:
    folds = [{"m": 0.8}, {"m": 0.9}, {"m": float("nan")}, {"m": 0.7}]
    cell = quality.summarise({"centralized": folds}, ["m"])["centralized"]["m"]
    assert cell["n"] == 3
    assert cell["mean"] == pytest.approx(0.8)
    assert cell["sd"] == pytest.approx(statistics.stdev([0.8, 0.9, 0.7]))
    assert quality.mean_sd([]) == {"mean": None, "sd": None, "n": 0}
    assert quality.mean_sd([0.5]) == {"mean": 0.5, "sd": None, "n": 1}
    assert quality.fmt(quality.mean_sd([0.5])) == "50.0"
    table = quality.markdown_table({"centralized": {"m": cell}}, ["m"], {"published": {"m": 75.99}})
    assert "| centralized | 80.0 ± 10.0 |" in table and "| published | 76.0 |" in table


def test_differences_are_paired_per_run() -> None:
    fed = [{"diagnosis.auc": 0.90}, {"diagnosis.auc": 0.80}]
    central = [{"diagnosis.auc": 0.95}, {"diagnosis.auc": 0.90}]
    d = quality.differences(fed, central)["diagnosis.auc"]
    assert d["per_fold"] == pytest.approx([-0.05, -0.10])
    assert d["mean"] == pytest.approx(-0.075) and d["sd"] == pytest.approx(statistics.stdev([-0.05, -0.10]))
    assert quality.differences(fed, central)["grade.auc"]["n"] == 0  # missing metric: no number, not 0
    with pytest.raises(ValueError):
        quality.differences(fed, central[:1])  # runs must pair up


def test_a_failing_command_raises_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "config.log"
    with pytest.raises(quality.BenchmarkError, match=r"(?s)exited 2.*cannot read"):
        quality.smm(["config", tmp_path / "missing.yaml"], log)
    assert "cannot read" in log.read_text()


def _rounds_file(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")


def test_training_rounds_skip_the_initial_evaluation_and_refuse_a_skipped_round(tmp_path: Path) -> None:
    ok = [{"round": 0, "status": "evaluated"}, {"round": 1, "status": "aggregated", "timings": {"train": 1.0}},
          {"round": 2, "status": "aggregated", "timings": {"train": 2.0}}]
    _rounds_file(tmp_path / "ok", ok)
    assert [r["round"] for r in quality.training_rounds(tmp_path / "ok")] == [1, 2]
    _rounds_file(tmp_path / "skipped", ok + [{"round": 3, "status": "skipped", "skip_reason": "too few sites"}])
    with pytest.raises(quality.BenchmarkError, match="round 3 was skipped \\(too few sites\\)"):
        quality.training_rounds(tmp_path / "skipped")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "rounds.jsonl").write_text('{"round": 1, "stat')
    with pytest.raises(quality.BenchmarkError, match="cannot read the run's rounds"):
        quality.training_rounds(tmp_path / "torn")


def test_median_ignores_missing_measurements() -> None:
    assert quality.median([3.0, None, 1.0, 2.0]) == 2.0
    assert quality.median([None]) is None


def test_a_finished_run_counts_only_with_the_same_resolved_config(tmp_path: Path) -> None:
    """``finished``: the run's last file is there and its config.yaml is the one ``config`` plus
    ``sets`` resolve to (a work folder from a --quick run or an older config is run again)."""
    from smm_model.contract.protocol import config_text

    config = tmp_path / "bench.yaml"
    config.write_text("model: {arch: snn, tasks: [diagnosis, survival]}\nfederation: {rounds: 4}\n")
    sets = ["data.sites_root=/work/sites/fold0", "train.lr=0.0007"]  # not the default lr
    run = tmp_path / "fed"
    run.mkdir()
    assert not quality.finished("federated", run, config, sets)  # nothing there
    (run / "config.yaml").write_text(config_text(ExperimentConfig.from_yaml_text(config.read_text(), sets)))
    assert not quality.finished("federated", run, config, sets)  # no final_metrics.json: interrupted
    (run / "final_metrics.json").write_text("{}")
    assert quality.finished("federated", run, config, sets)
    assert quality.finished("centralized", run, config, sets)
    assert quality.finished("federated", run, config, sets[::-1])  # the resolved config is compared
    assert not quality.finished("federated", run, config, [*sets, "federation.rounds=1"])  # a --quick run
    assert not quality.finished("federated", run, config, sets[:1])
    assert not quality.finished("local-only", run, config, sets)  # local-only's last file is local_only.json
    (run / "local_only.json").write_text("{}")
    assert quality.finished("local-only", run, config, sets)
    config.write_text("model: {arch: snn, tasks: [diagnosis, survival]}\nfederation: {rounds: 5}\n")
    assert not quality.finished("federated", run, config, sets)  # the committed config changed
    config.write_text("model: {arch: snn, tasks: [diagnosis, survival]}\nfederation: {rounds: 4}\n")
    assert quality.finished("federated", run, config, sets)
    # A run made before a config key existed: its config.yaml lacks the key, which takes its default.
    saved = (run / "config.yaml").read_text()
    assert "survival_reads_tasks: false" in saved
    (run / "config.yaml").write_text(saved.replace("  survival_reads_tasks: false\n", ""))
    assert quality.finished("federated", run, config, sets)
    assert not quality.finished("federated", run, config, [*sets, "model.survival_reads_tasks=true"])
    (run / "config.yaml").write_text("model: {arch: nope}\n")  # unreadable as a config: run again
    assert not quality.finished("federated", run, config, sets)
    (run / "config.yaml").unlink()
    assert not quality.finished("federated", run, config, sets)


def test_a_pooled_run_ignores_only_the_servers_aggregation_settings(tmp_path: Path) -> None:
    """A centralized run never reads ``federation.strategy`` or the server's optimizer: changing
    them in the config leaves a finished pooled run valid, but not a federated one, and anything
    pooled training reads (its rounds, its learning rate) still counts."""
    from smm_model.contract.protocol import config_text

    config = tmp_path / "bench.yaml"
    config.write_text("model: {arch: snn, tasks: [diagnosis, survival]}\nfederation: {rounds: 4, strategy: fedavg}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_text(ExperimentConfig.from_yaml_text(config.read_text(), [])))
    (run / "final_metrics.json").write_text("{}")
    moved = ["federation.strategy=fedavgm", "federation.server_momentum=0.9"]
    assert quality.finished("centralized", run, config, moved)
    assert not quality.finished("federated", run, config, moved)
    assert not quality.finished("centralized", run, config, ["train.lr=0.003"])
    assert not quality.finished("centralized", run, config, ["federation.rounds=5"])


def test_a_run_that_lost_a_round_or_a_reply_or_its_test_is_not_a_result(tmp_path: Path) -> None:
    """``require_clean``: a run whose sites failed part of the time still finishes; its numbers are
    not the protocol's, so ``mode_result`` refuses them (and says which round)."""
    final = {"test": {"patients": 150}}
    good = [{"round": 0, "status": "initial"}, {"round": 1, "status": "aggregated", "train": {"dropped": []},
                                                 "val": {"dropped": []}},
            {"round": 2, "status": "trained"}]
    _rounds_file(tmp_path / "ok", good)
    quality.require_clean(tmp_path / "ok", final)
    _rounds_file(tmp_path / "skip", good + [{"round": 3, "status": "skipped", "train": {"dropped": [7]}}])
    with pytest.raises(quality.BenchmarkError, match="round 3 was skipped with 1 dropped"):
        quality.require_clean(tmp_path / "skip", final)
    _rounds_file(tmp_path / "val", good + [{"round": 3, "status": "aggregated", "val": {"dropped": [5, 6]}}])
    with pytest.raises(quality.BenchmarkError, match="round 3 was aggregated with 2 dropped"):
        quality.require_clean(tmp_path / "val", final)
    with pytest.raises(quality.BenchmarkError, match="final test covers no patients"):
        quality.require_clean(tmp_path / "ok", {"test": {"patients": 0, "reason": "no site answered"}})


def test_tcga_quality_refuses_a_candidate_config_that_is_not_there(tmp_path: Path, capsys) -> None:
    import tcga_quality

    with pytest.raises(SystemExit) as exit_info:
        tcga_quality.main(["--config", str(tmp_path / "missing.yaml"), "--work", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing was built for it


@pytest.mark.parametrize(("argv", "message"), [
    (["--set", "train.lr=0.01"], "--set and --tag go together"),
    (["--label", "a/b"], "--tag and --label take letters, digits, - and _"),
    (["--variants", "smm-pcgrad,smm-typo"], "unknown variants ['smm-typo']"),
])
def test_synthetic_quality_refuses_bad_arguments_before_building_anything(tmp_path: Path, capsys, argv, message
                                                                          ) -> None:
    import synthetic_quality

    with pytest.raises(SystemExit) as exit_info:
        synthetic_quality.main([*argv, "--work", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_synthetic_quality_has_a_default_cohort_size_for_every_family() -> None:
    import synthetic_quality

    assert set(synthetic_quality.PATIENTS_PER_SITE) == set(synthetic_quality.FAMILIES)
    # the interaction family needs the larger cohort (the docstring of PATIENTS_PER_SITE)
    assert synthetic_quality.PATIENTS_PER_SITE["gene-conditioned"] > synthetic_quality.PATIENTS_PER_SITE["additive"]


def test_synthetic_quality_local_steps_keep_one_pass_a_round_on_larger_sites() -> None:
    import synthetic_quality

    cfg = yaml.safe_load(synthetic_quality.CONFIG.read_text())
    batch, steps = cfg["train"]["batch_size"], cfg["federation"]["local_steps"]
    assert synthetic_quality.local_steps(100) == steps  # the recorded additive runs keep their protocol
    assert synthetic_quality.local_steps(40) == steps  # never fewer than the config's
    assert synthetic_quality.local_steps(300) == -(-180 // batch)  # 180 training patients: one pass


def test_synthetic_quality_local_steps_follow_an_override() -> None:
    # a diagnostic protocol's --set federation.local_steps=N is what runs and what is recorded
    import synthetic_quality

    assert synthetic_quality.local_steps(300, ("train.lr=0.003", "federation.local_steps=4")) == 4
    assert synthetic_quality.local_steps(300, ("federation.local_steps=4", "federation.local_steps=8")) == 8
    assert synthetic_quality.local_steps(300, ("train.lr=0.003",)) == synthetic_quality.local_steps(300)


def test_synthetic_quality_ceiling_is_the_true_risks_c_index_on_the_test_patients(tmp_path: Path) -> None:
    import pandas as pd
    from dataclasses import replace

    import synthetic_quality
    from client.cohorts.synth import CohortSpec, log_hazard, write_cohort

    out = tmp_path / "sites"
    write_cohort(out, replace(CohortSpec(), sites=1, patients_per_site=60, seed=3, features_only=True),
                 log=lambda *_: None)
    truth = pd.read_csv(out / "truth.csv").set_index("patient_id")
    clinical = pd.read_csv(out / "site_1" / "clinical.csv")
    test = clinical[(clinical["split"] == "test") & clinical["survival_days"].notna()]
    t = truth.loc[test["patient_id"]]
    risk = log_hazard(t["grade_true"].to_numpy(), t["diagnosis"].to_numpy(), t["proliferation"].to_numpy(),
                      t["immune"].to_numpy())
    want = concordance_index(test["survival_days"], -risk, test["event"])  # one site: every pair is within-site
    got = synthetic_quality.true_risk_c_index(out)
    assert got == pytest.approx(want)
    assert 0.5 < got < 1.0


@pytest.mark.parametrize("one_site", [False, True])
def test_synthetic_quality_scores_a_control_federation_on_every_one_of_its_site_folders(
        tmp_path: Path, monkeypatch, one_site: bool) -> None:
    """The IID control's and the one-site control's folders are not named site_k; the exact test
    must still evaluate the selected model on every test patient of the deal, not on none."""
    from dataclasses import replace

    import synthetic_quality
    from client.cohorts.cohort import deal_site_folders
    from client.cohorts.synth import CohortSpec, write_cohort

    cohort, dealt = tmp_path / "sites", tmp_path / "dealt"
    write_cohort(cohort, replace(CohortSpec(), sites=3, patients_per_site=12, seed=1, features_only=True),
                 log=lambda *_: None)
    deal_site_folders(cohort, dealt, seed=0, one_site=one_site)
    want = sorted(p for p in dealt.iterdir() if (p / "clinical.csv").is_file())
    assert want and not any(p.name.startswith("site_") for p in want)
    run = tmp_path / "run"
    run.mkdir()
    (run / synthetic_quality.MODEL_FILE).write_bytes(b"model")
    calls = []
    monkeypatch.setattr(synthetic_quality.quality, "smm", lambda args, log: calls.append(args))
    monkeypatch.setattr(synthetic_quality.quality, "test_values", lambda out: {"diagnosis.auc": 0.5})
    assert synthetic_quality._exact_test(run, dealt) == {"diagnosis.auc": 0.5}
    (args,) = calls
    assert args[0] == "evaluate" and [Path(a) for a in args[2:2 + len(want)]] == want
    assert args[2 + len(want)] == "--out"
