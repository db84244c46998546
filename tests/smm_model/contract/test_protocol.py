"""Preflight summaries -> shared statistics, and evaluation statistics -> global metrics."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from smm_model.config import ConfigError, ExperimentConfig
from smm_model.metrics.federated import c_index_counts, confusion_counts, km_counts, score_histograms
from smm_model.contract.protocol import (PROTOCOL_VERSION, SURVIVAL_HIST_EDGES, EvalStats, SchemaMismatch, SharedStats, SiteSummary,
                                check_schemas, derive_shared, evaluation_round, metrics_from_eval,
                                selection_lower_is_better, selection_terms, selection_value)
from smm_model.contract.stats import GenomicsStats

CFG = ExperimentConfig.from_yaml_text("", ["model.genes_tumour=2", "model.genes_micro=1", "model.feature_dim=8"])
LOGIT_ADJUSTED = ExperimentConfig.from_yaml_text("", ["model.genes_tumour=2", "model.genes_micro=1",
                                                      "model.feature_dim=8", "train.logit_adjustment=1.0"])


def summary(rng, n=50, dim=8, gene_set="abc", train_counts=None):
    x = rng.normal(0, 1, (n, 3))
    t = rng.exponential(600, n)
    e = rng.random(n) < 0.6
    prng = np.random.default_rng(1000 * n + dim)  # its own stream: the draws above stay as they were
    p = prng.normal(prng.normal(0, 5, dim), prng.uniform(0.5, 20, dim), (7 * n, dim))  # (patches, dim)
    return SiteSummary(
        patches={"n": len(p), "sum": p.sum(0).tolist(), "sum_sq": (p * p).sum(0).tolist()},
        schema={"encoder": "resnet50_trunc", "feature_dim": dim, "gene_set": gene_set, "genes_tumour": 2,
                "genes_micro": 1, "genomics_policy": "error"},
        splits={"train": {"patients": n, "diagnosis": train_counts or [20, 5, 15, 10], "grade": [10, 10, 30],
                          "survival_labelled": n, "events": int(e.sum())}},
        genomics=GenomicsStats(("g1", "g2", "g3"), np.full(3, n), x.sum(0), (x * x).sum(0)).to_dict(),
        survival_hist_events=np.histogram(t[e], SURVIVAL_HIST_EDGES)[0].tolist(),
        survival_hist_all=np.histogram(t, SURVIVAL_HIST_EDGES)[0].tolist()), x, t, e, p


def test_shared_stats_equal_pooled_statistics():
    rng = np.random.default_rng(0)
    sites = [summary(rng, n) for n in (40, 70, 55)]
    shared = derive_shared([s for s, *_ in sites], CFG)
    x = np.concatenate([x for _, x, _, _, _ in sites])
    np.testing.assert_allclose(shared.genomics_mean, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(shared.genomics_std, x.std(0), atol=1e-12)
    t = np.concatenate([t[e] for _, _, t, e, _ in sites])
    # Quantile edges from the summed 10-day histograms: within one bin of the pooled quantiles.
    np.testing.assert_allclose(shared.survival_bin_edges, np.quantile(t, [0.25, 0.5, 0.75]), atol=10.0)
    assert shared.class_weights["diagnosis"] == [1.0, 4.0, 20 / 15, 2.0]
    # The pooled training class counts (the reference prior of the sites' logit adjustment) are
    # sent only when train.logit_adjustment is on; everything else is the same either way.
    assert shared.class_counts is None
    adjusted = derive_shared([s for s, *_ in sites], LOGIT_ADJUSTED)
    assert adjusted.class_counts == {"diagnosis": [60.0, 15.0, 45.0, 30.0], "grade": [30.0, 30.0, 90.0]}
    assert replace(adjusted, class_counts=None) == shared
    assert SharedStats.from_json(adjusted.to_json()) == adjusted
    assert shared.km_grid[0] == 0.0 and shared.km_grid[-1] >= max(t)
    patches = np.concatenate([p for *_, p in sites])  # every site's training patches, pooled
    np.testing.assert_allclose(shared.patch_mean, patches.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(shared.patch_std, patches.std(0, ddof=1), rtol=1e-8)
    assert SharedStats.from_json(shared.to_json()) == shared
    # The same sites in another order give bit-identical statistics.
    assert derive_shared([s for s, *_ in sites[::-1]], CFG) == shared


def test_messages_of_another_protocol_version_are_refused():
    """Protocol 2 (SCAFFOLD corrections, local steps, class counts): a site or server of protocol 1
    is told so rather than misread."""
    assert PROTOCOL_VERSION == 2
    rng = np.random.default_rng(3)
    site, *_ = summary(rng)
    shared = derive_shared([site], LOGIT_ADJUSTED)
    assert site.version == shared.version == PROTOCOL_VERSION
    for obj, cls, what in ((site, SiteSummary, "site summary"), (shared, SharedStats, "shared stats")):
        d = json.loads(obj.to_json())
        assert d["version"] == 2 and cls.from_json(json.dumps(d)) == obj
        for old in (1, None):
            d["version"] = old
            with pytest.raises(ValueError, match=f"^{what} protocol version {old}, expected 2$"):
                cls.from_json(json.dumps(d))


def test_schema_mismatch_names_site_and_field():
    rng = np.random.default_rng(1)
    a, *_ = summary(rng)
    b, *_ = summary(rng, dim=16)
    c, *_ = summary(rng, gene_set="other")
    with pytest.raises(SchemaMismatch, match="site b: feature_dim is 16"):
        check_schemas({"a": a, "b": b}, CFG)
    with pytest.raises(SchemaMismatch, match="site c: gene_set is 'other', site a has 'abc'"):
        check_schemas({"a": a, "c": c}, CFG)
    check_schemas({"a": a}, CFG)
    assert SiteSummary.from_json(a.to_json()) == a


def test_eval_stats_sum_to_pooled_metrics():
    rng = np.random.default_rng(2)
    grid = np.arange(0, 3000, 30.0)
    per_site, pooled = [], {"y": [], "p": [], "t": [], "e": [], "r": [], "g": []}
    for n in (30, 45):
        y = rng.integers(0, 4, n)
        p = rng.dirichlet(np.ones(4), n)
        t, e, r, g = rng.exponential(600, n), rng.random(n) < 0.6, rng.normal(0, 1, n), rng.integers(0, 2, n)
        s = EvalStats(n=n, loss_sum=float(n), confusion={"diagnosis": confusion_counts(y, p.argmax(1), 4).ravel().tolist()},
                      histograms={"diagnosis": score_histograms(y, p, 4).ravel().tolist()},
                      cindex=c_index_counts(t, e, r).tolist(), km=km_counts(t, e, g, 2, grid).ravel().tolist(),
                      km_groups=2)
        per_site.append(EvalStats.from_record(s.to_record()))
        for k, v in zip("yptreg", (y, p, t, e, r, g)):
            pooled[k].append(v)
    small = EvalStats(n=3, suppressed=True)
    total = EvalStats.merge(per_site + [small])
    assert total.n == 75
    m = metrics_from_eval(total, {"diagnosis": 4}).values
    y, p = np.concatenate(pooled["y"]), np.concatenate(pooled["p"])
    assert m["diagnosis.accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert m["loss"] == pytest.approx(1.0)
    assert 0 <= m["survival.c_index"] <= 1 and 0 <= m["survival.logrank_p"] <= 1
    assert metrics_from_eval(small, {"diagnosis": 4}).reasons["loss"]


def test_patch_standardisation_is_off_for_genomics_only_runs_and_when_disabled():
    rng = np.random.default_rng(3)
    sites = [summary(rng, n)[0] for n in (30, 40)]
    for over in (["model.arch=snn"], ["data.patch_norm=none"]):
        cfg = ExperimentConfig.from_yaml_text("", ["model.genes_tumour=2", "model.genes_micro=1",
                                                   "model.feature_dim=8", *over])
        shared = derive_shared(sites, cfg)
        assert shared.patch_mean is None and shared.patch_norm() is None
    for s in sites:
        s.patches = None
    with pytest.raises(ValueError, match="no site sent patch statistics"):
        derive_shared(sites, CFG)


def test_a_constant_feature_dimension_is_centred_not_blown_up():
    from smm_model.contract.protocol import PATCH_STD_FLOOR, merge_patch_stats
    p = np.random.default_rng(4).normal(0, 2, (500, 4))
    p[:, 2] = 7.0  # a dimension every site sees as constant
    mean, std = merge_patch_stats([{"n": 500, "sum": p.sum(0).tolist(), "sum_sq": (p * p).sum(0).tolist()}])
    assert mean[2] == pytest.approx(7.0)
    assert std[2] >= PATCH_STD_FLOOR * np.median(p.std(0, ddof=1)) * 0.99
    with pytest.raises(ValueError, match="fewer than 2"):
        merge_patch_stats([{"n": 1, "sum": [0.0], "sum_sq": [0.0]}])


# --- model selection and evaluation rounds ----------------------------------------------------------------

def selecting(metric: str, *extra: str) -> ExperimentConfig:
    return ExperimentConfig.from_yaml_text("", [f"federation.selection_metric={metric}", *extra])


VALUES = {"loss": 3.0, "diagnosis.macro_f1": 0.5, "grade.macro_f1": 0.25, "survival.c_index": 0.75,
          "survival.logrank_p": 0.01}


def test_a_selection_mean_is_the_mean_of_its_terms():
    cfg = selecting("diagnosis.macro_f1+grade.macro_f1+survival.c_index")
    assert selection_terms(cfg) == ["diagnosis.macro_f1", "grade.macro_f1", "survival.c_index"]
    assert not selection_lower_is_better(cfg)
    assert selection_value(VALUES, cfg) == pytest.approx((0.5 + 0.25 + 0.75) / 3)
    assert selection_value(VALUES, selecting("grade.macro_f1+diagnosis.macro_f1")) == pytest.approx(0.375)
    # One metric alone is itself; loss-like ones stay lower-is-better.
    for metric, lower in (("loss", True), ("survival.logrank_p", True), ("survival.c_index", False)):
        assert selection_terms(selecting(metric)) == [metric]
        assert selection_value(VALUES, selecting(metric)) == VALUES[metric]
        assert selection_lower_is_better(selecting(metric)) is lower


@pytest.mark.parametrize("broken", [None, float("nan"), float("inf"), "missing"])
def test_a_round_missing_any_term_cannot_be_compared(broken):
    cfg = selecting("diagnosis.macro_f1+survival.c_index")
    values = dict(VALUES)
    if broken == "missing":
        del values["survival.c_index"]
    else:
        values["survival.c_index"] = broken
    assert selection_value(values, cfg) is None
    assert selection_value(values, selecting("diagnosis.macro_f1")) == 0.5  # the other term alone is fine


@pytest.mark.parametrize("metric, extra, message", [
    ("diagnosis.auc+grade.kappa", (), "unknown metric 'kappa' for grade"),
    ("diagnosis.auc+survival.logrank_p", (), "a mean of metrics takes higher-is-better ones only; "
                                             "'survival.logrank_p' is not"),
    ("diagnosis.auc+grade.auc+diagnosis.auc", (), "'diagnosis.auc+grade.auc+diagnosis.auc' lists a metric twice"),
    ("diagnosis.auc+grade.auc", ("model.tasks=[diagnosis]",), "'grade.auc' names task 'grade'"),
])
def test_bad_selection_means_are_config_errors(metric, extra, message):
    cfg = selecting(metric, *extra)  # parses: the terms are checked against the run's tasks
    for check in (selection_terms, selection_lower_is_better, lambda c: selection_value(VALUES, c)):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check(cfg)


def test_loss_cannot_enter_a_mean():
    for metric in ("loss+diagnosis.auc", "diagnosis.auc+loss"):
        with pytest.raises(ConfigError, match="federation.selection_metric"):
            selecting(metric)


@pytest.mark.parametrize("rounds, every, validated", [(7, 3, [3, 6, 7]), (4, 2, [2, 4]), (4, 1, [1, 2, 3, 4]),
                                                       (3, 10, [3]), (1, 5, [1])])
def test_evaluation_rounds_are_every_kth_and_the_last(rounds, every, validated):
    assert [r for r in range(1, rounds + 1) if evaluation_round(r, rounds, every)] == validated
