"""benchmarks/synthetic_choice.py: each model's protocol is chosen on validation, never on test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402
import synthetic_choice  # noqa: E402


def _row(val: float, test: float) -> dict:
    metrics = ("diagnosis.auc", "grade.auc", "survival.c_index")
    return {"values": {m: test for m in metrics}, "val_values": {m: val for m in metrics}, "best_round": 20}


def _write(results: Path, name: str, overrides: list[str], rows: dict[str, dict[str, tuple[float, float]]],
           family: str = "gene-conditioned", mode: str = "federated") -> None:
    """rows: model -> seed -> (validation, test)."""
    seeds: dict = {}
    for model, per_seed in rows.items():
        for seed, (val, test) in per_seed.items():
            seeds.setdefault(seed, {})[model] = {mode: _row(val, test)}
    res = {"setting": {"family": family, "overrides": overrides}, "seeds": seeds}
    (results / f"synthetic_quality_{name}_cpu.json").write_text(json.dumps(res))


@pytest.fixture
def results(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    return tmp_path


def test_each_model_gets_the_candidate_that_validates_best_whatever_its_test(results: Path) -> None:
    # smm validates better at lr 3e-3; concat validates better with the config although its
    # lr-3e-3 runs test higher: the choice must follow validation
    _write(results, "base", [], {"smm-pcgrad": {"0": (0.70, 0.70), "1": (0.72, 0.71)},
                                 "concat": {"0": (0.69, 0.60), "1": (0.69, 0.61)}})
    _write(results, "lr", ["train.lr=0.003"], {"smm-pcgrad": {"0": (0.80, 0.78), "1": (0.82, 0.80)},
                                               "concat": {"0": (0.65, 0.75), "1": (0.66, 0.76)}})
    _write(results, "central", [], {"smm-pcgrad": {"0": (0.9, 0.90), "1": (0.9, 0.88)},
                                    "concat": {"0": (0.7, 0.70), "1": (0.7, 0.72)}}, mode="centralized")
    assert synthetic_choice.main(["--family", "gene-conditioned", "--candidates", "base,lr",
                                  "--reference", "synthetic_quality_central"]) == 0
    out = json.loads((results / "synthetic_choice_gene-conditioned_federated_cpu.json").read_text())
    assert out["chosen"]["smm-pcgrad"]["candidate"] == "lr"
    assert out["chosen"]["smm-pcgrad"]["overrides"] == ["train.lr=0.003"]
    assert out["chosen"]["concat"]["candidate"] == "base"
    assert out["chosen"]["concat"]["validation_score"] == pytest.approx(0.69)
    margin = out["proposed_minus_baseline"]["federated"]["concat"]["diagnosis.auc"]
    assert margin["per_seed"] == pytest.approx([0.78 - 0.60, 0.80 - 0.61])
    gap = out["gaps"]["federated - centralized"]["smm-pcgrad"]["diagnosis.auc"]
    assert gap["per_seed"] == pytest.approx([0.78 - 0.90, 0.80 - 0.88])


def test_a_candidate_missing_a_seed_of_a_model_does_not_compete_for_it(results: Path) -> None:
    _write(results, "base", [], {"smm-pcgrad": {"0": (0.70, 0.70), "1": (0.72, 0.71)}})
    _write(results, "lr", ["train.lr=0.003"], {"smm-pcgrad": {"0": (0.99, 0.99)}, "snn": {"0": (0.6, 0.6)}})
    # seeds shared by both files: only 0; there lr is complete for smm and wins
    chosen = synthetic_choice.choose({n: json.loads((results / f"synthetic_quality_{n}_cpu.json").read_text())
                                      for n in ("base", "lr")}, "federated", ["0", "1"])
    assert chosen["smm-pcgrad"]["candidate"] == "base"  # lr lacks seed 1
    assert "snn" not in chosen


def test_bad_input_names_the_file_and_the_expectation(results: Path, capsys) -> None:
    _write(results, "base", [], {"smm-pcgrad": {"0": (0.7, 0.7)}}, family="additive")
    with pytest.raises(SystemExit):
        synthetic_choice.main(["--family", "gene-conditioned", "--candidates", "base"])
    assert "setting.family is 'additive', expected 'gene-conditioned'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synthetic_choice.main(["--family", "gene-conditioned", "--candidates", "nothere"])
    assert "synthetic_quality_nothere_cpu.json: no such result file" in capsys.readouterr().err


def test_the_reference_can_be_the_other_modes_own_choice(results: Path) -> None:
    for mode, (base, lr) in {"centralized": ((0.90, 0.88), (0.95, 0.91)), "federated": ((0.70, 0.70), (0.80, 0.78))}.items():
        _write(results, f"base-{mode}", [], {"smm-pcgrad": {"0": base}}, mode=mode)
        _write(results, f"lr-{mode}", ["train.lr=0.003"], {"smm-pcgrad": {"0": lr}}, mode=mode)
    synthetic_choice.main(["--family", "gene-conditioned", "--mode", "centralized",
                           "--candidates", "base-centralized,lr-centralized"])
    synthetic_choice.main(["--family", "gene-conditioned", "--candidates", "base-federated,lr-federated",
                           "--reference", "synthetic_choice_gene-conditioned_centralized"])
    out = json.loads((results / "synthetic_choice_gene-conditioned_federated_cpu.json").read_text())
    gap = out["gaps"]["federated - centralized"]["smm-pcgrad"]["diagnosis.auc"]
    assert gap["per_seed"] == pytest.approx([0.78 - 0.91])  # both at their own chosen protocol


def test_a_protocol_split_over_files_competes_as_one_candidate(results: Path) -> None:
    # one protocol run a seed at a time (--label s0, s1) and its baselines in a third file
    adam = ["federation.strategy=fedadam"]
    _write(results, "base", [], {"smm-pcgrad": {"0": (0.80, 0.80), "1": (0.70, 0.70)},
                                 "concat": {"0": (0.60, 0.60), "1": (0.60, 0.60)}})
    _write(results, "adam_s0", adam, {"smm-pcgrad": {"0": (0.78, 0.75)}})
    _write(results, "adam_s1", adam, {"smm-pcgrad": {"1": (0.76, 0.77)}})
    _write(results, "adam_b", adam, {"concat": {"0": (0.62, 0.50), "1": (0.64, 0.52)}})
    assert synthetic_choice.main(["--family", "gene-conditioned",
                                  "--candidates", "base,adam_s0+adam_s1+adam_b"]) == 0
    out = json.loads((results / "synthetic_choice_gene-conditioned_federated_cpu.json").read_text())
    assert out["setting"]["seeds"] == [0, 1]
    assert out["setting"]["candidates"]["adam_s0+adam_s1+adam_b"]["files"] == [
        f"synthetic_quality_{n}_cpu.json" for n in ("adam_s0", "adam_s1", "adam_b")]
    assert out["chosen"]["smm-pcgrad"]["candidate"] == "adam_s0+adam_s1+adam_b"
    assert out["chosen"]["smm-pcgrad"]["validation_score"] == pytest.approx(0.77)
    assert out["chosen"]["concat"]["candidate"] == "adam_s0+adam_s1+adam_b"
    margin = out["proposed_minus_baseline"]["federated"]["concat"]["diagnosis.auc"]
    assert margin["per_seed"] == pytest.approx([0.75 - 0.50, 0.77 - 0.52])


def test_files_joined_into_one_candidate_must_be_one_protocol_without_a_run_twice(results: Path, capsys) -> None:
    _write(results, "a", ["train.lr=0.003"], {"smm-pcgrad": {"0": (0.7, 0.7)}})
    _write(results, "b", ["train.lr=0.001"], {"smm-pcgrad": {"1": (0.7, 0.7)}})
    _write(results, "c", ["train.lr=0.003"], {"smm-pcgrad": {"0": (0.8, 0.8)}})
    with pytest.raises(SystemExit):
        synthetic_choice.main(["--family", "gene-conditioned", "--candidates", "a+b"])
    err = capsys.readouterr().err
    assert "synthetic_quality_b_cpu.json: setting.overrides is ['train.lr=0.001'], expected ['train.lr=0.003']" in err
    with pytest.raises(SystemExit):
        synthetic_choice.main(["--family", "gene-conditioned", "--candidates", "a+c"])
    assert "synthetic_quality_c_cpu.json: seed 0, smm-pcgrad, federated is also in one of" in capsys.readouterr().err
