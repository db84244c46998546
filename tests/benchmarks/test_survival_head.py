"""The survival-head diagnostic (benchmarks/survival_head.py): the within-site C-index it computes,
its Cox fits on validation patients only, and its head score against a real run's own C-index."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import survival_head as sh  # noqa: E402

from client.cohorts.synth import CohortSpec, write_cohort  # noqa: E402
from sim_cohort import train_bench_run  # noqa: E402

SPEC = replace(CohortSpec(), sites=2, patients_per_site=30, seed=7, features_only=True, layout_scale=28,
               family="gene-conditioned", split=(0.5, 0.25, 0.25))


def _site(name: str, time, event, head, grade_probs) -> sh.SiteOutputs:
    g = np.asarray(grade_probs, dtype=float)
    n = len(time)
    diag = np.full((n, 4), 0.25)
    return sh.SiteOutputs(name, np.asarray(time, float), np.asarray(event, float), np.asarray(head, float),
                          {"diagnosis": diag, "grade": g})


def test_c_index_compares_patients_within_a_site_only():
    # Within each site the risk orders deaths perfectly; across the sites it is reversed.
    a = _site("a", [10, 20, 30], [1, 1, 1], [3.0, 2.0, 1.0], np.eye(3))
    b = _site("b", [100, 200, 300], [1, 1, 1], [30.0, 20.0, 10.0], np.eye(3))
    assert sh.within_site_c_index([a, b], lambda s: s.head) == 1.0
    assert sh.within_site_c_index([a, b], lambda s: -s.head) == 0.0
    # expected grade: grade 4 (class 2) dies first
    grades = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float)
    c = _site("c", [10, 20, 30], [1, 1, 1], [0, 0, 0], grades)
    assert sh.within_site_c_index([c], lambda s: s.probs["grade"] @ sh.GRADES) == 1.0


def test_the_cox_fit_learns_the_sign_from_the_patients_it_is_given():
    rng = np.random.default_rng(0)

    def cohort(sign: float, name: str) -> sh.SiteOutputs:
        p4 = rng.uniform(0, 1, 80)  # probability of grade 4
        grade = np.column_stack([(1 - p4) / 2, (1 - p4) / 2, p4])
        time = np.exp(-sign * 3 * p4 + rng.normal(0, 0.3, 80)) * 100
        return _site(name, time, np.ones(80), np.zeros(80), grade)

    harmful, protective = [cohort(1.0, "s1"), cohort(1.0, "s2")], [cohort(-1.0, "s1"), cohort(-1.0, "s2")]
    for fit_on, score_on, high in ((harmful, harmful, True), (protective, harmful, False)):
        c = sh.within_site_c_index(score_on, sh.fit_cox(fit_on, sh.class_covariates))
        assert (c > 0.8) if high else (c < 0.2)


def test_class_covariates_drop_one_redundant_class_per_task():
    s = _site("a", [1, 2], [1, 0], [0, 0], [[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    assert list(sh.class_covariates(s).columns) == ["diagnosis_1", "diagnosis_2", "diagnosis_3", "grade_1", "grade_2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("survhead")
    cohort = root / "sites"
    write_cohort(cohort, SPEC, log=lambda *_: None)
    return train_bench_run(cohort, root / "run", "concat", rounds=2)


def test_the_head_score_is_the_runs_own_test_c_index(run: Path):
    res = sh.diagnose(run)
    final = json.loads((run / "final_metrics.json").read_text())
    assert res["head"] == pytest.approx(final["test"]["global"]["values"]["survival.c_index"], abs=1e-9)
    assert res["test_patients"] > 0
    for k in sh.SCORES:
        assert 0.0 <= res[k] <= 1.0, k


def test_a_model_without_the_grade_task_is_refused_by_name(run: Path, tmp_path: Path):
    import torch
    import yaml
    payload = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    cfg = yaml.safe_load(payload["config"])
    cfg["model"]["tasks"] = ["diagnosis", "survival"]
    payload["config"] = yaml.safe_dump(cfg)
    payload.pop("model_config", None)
    out = tmp_path / "nograde"
    out.mkdir()
    torch.save(payload, out / "model.pt")
    with pytest.raises(ValueError, match=r"nograde: the model has no grade task"):
        sh.diagnose(out)
