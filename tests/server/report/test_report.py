"""``smm report``: the evaluation report renders from run folders and says what it cannot show.

Run folders come from ``report_runs`` (real statistics functions on random predictions, every field
of the run-folder contract, in milliseconds); each report is rendered once per module and shared.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from report_runs import NODES, SITE_NAMES, site_stats, write_local_only, write_run
import server.report.build as report
from server.report.build import (CLASS_NAMES, FIGURES_DIR, METRICS_JSON, REPORT_HTML, REPORT_MD, ReportError, km_lifelines,
                           write_report)
from server.report.plots import roc_points
from smm_model.metrics.federated import (SCORE_BINS, auc_from_histograms, km_counts, km_from_counts, logrank_from_counts,
                                 score_histograms)

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = Path("/usr/bin/chromium")
#: Figures each section of a complete federated report with the newer fields holds.
FIGURES = {"results": 0, "curves": 5, "test": 0, "classification": 4, "survival": 1, "coordination": 1, "summary": 0,
           "limits": 0, "provenance": 0}


def _sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([a-z]+)">(.*?)</section>', html, flags=re.S))


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r'src="data:[^"]+"', "", html)))


def _strict_json(path: Path):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A complete federated run (three sites, the last one suppressed) and its report."""
    root = tmp_path_factory.mktemp("fed")
    final = write_run(root / "run", seed=1)
    html = write_report([root / "run"])
    return root / "run", final, html


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The federated run beside a centralized and a local-only run, written to --out."""
    root = tmp_path_factory.mktemp("cmp")
    write_run(root / "fed", seed=2)
    cen = write_run(root / "cen", mode="centralized", seed=3)
    write_local_only(root / "loc")
    html = write_report([root / "fed", root / "cen", root / "loc"], root / "out")
    return root, cen, html


# --- a complete run -------------------------------------------------------------------------------------

def test_report_renders_every_section_and_figure(fed):
    run, _final, html_path = fed
    assert html_path == run / REPORT_HTML
    html = html_path.read_text()
    sections = _sections(html)
    assert list(sections) == list(FIGURES)
    for sid, n in FIGURES.items():
        assert sections[sid].count("<img ") == n, sid
    for fig_id in ("train-loss", "val-loss", "val-diagnosis", "val-grade", "val-survival", "confusion-diagnosis",
                   "roc-diagnosis", "confusion-grade", "roc-grade", "km", "coordination"):
        assert f'id="fig-{fig_id}"' in html
        png = (run / FIGURES_DIR / f"{fig_id}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for img in re.findall(r'src="data:image/png;base64,([^"]+)"', html):  # every embedded figure decodes
        assert base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'href="#limits"' in html and "<nav" in html  # table of contents
    assert "@media print" in html
    metrics = _strict_json(run / METRICS_JSON)
    assert metrics["report_errors"] == []
    assert sorted(metrics["files"]["figures"]) == sorted(f"{FIGURES_DIR}/{p.name}" for p in
                                                        (run / FIGURES_DIR).glob("*.png"))


def test_html_is_self_contained(fed):
    html = fed[2].read_text()
    for needle in ("http://", "https://", 'src="//', "<script", "<link", "@import", "url(", "<iframe"):
        assert needle not in html, needle
    srcs = re.findall(r'\ssrc="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert '<meta charset="utf-8">' in html


def test_markdown_links_the_same_figures(fed):
    run = fed[0]
    md = (run / REPORT_MD).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == sum(FIGURES.values())
    assert all((run / link).is_file() for link in links)
    for title in ("Results", "Learning curves", "Final test results", "Run summary", "What these numbers cannot say",
                  "Provenance"):
        assert f". {title}" in md


def test_metrics_json_equals_the_final_metrics(fed):
    run, final, _ = fed
    metrics = _strict_json(run / METRICS_JSON)
    entry = metrics["runs"][0]
    test, recorded = entry["test"], final["test"]
    assert test["global"]["values"] == recorded["global"]["values"]
    assert test["global"]["reasons"] == recorded["global"]["reasons"]
    assert test["per_site"] == recorded["per_site"]
    assert test["patients"] == recorded["patients"] and test["suppressed"] == recorded["suppressed"]
    assert "stats" not in test["global"]
    assert entry["selection"]["best_round"] == final["best_round"]
    assert entry["wall_s"] == final["wall_s"] and entry["bytes"] == final["bytes"]
    assert entry["config_sha256"] == final["config_sha256"] and entry["complete"] is True
    assert entry["mode"] == "federated" and entry["tasks"] == ["diagnosis", "grade", "survival"]
    # Curves are the recorded per-round values.
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert entry["curves"]["val_global"]["loss"] == [r["val"]["global"]["values"]["loss"] for r in rounds]
    # What the report derived from the pooled statistics agrees with the recorded metrics.
    stats = recorded["global"]["stats"]
    assert np.array(metrics["derived"]["diagnosis"]["confusion"]).ravel().tolist() == stats["diagnosis-confusion"]
    p = metrics["derived"]["survival"]["logrank_lifelines"]["p"]
    assert p == pytest.approx(recorded["global"]["values"]["survival.logrank_p"], rel=1e-9)
    aucs = [a for a in metrics["derived"]["grade"]["auc_per_class"] if a is not None]
    assert np.mean(aucs) == pytest.approx(recorded["global"]["values"]["grade.auc"], abs=1e-12)


def test_report_names_what_the_numbers_cannot_say(fed):
    html = fed[2].read_text()
    limits = _text(_sections(html)["limits"])
    assert "site_3" in limits and "suppressed" in limits.lower()  # 2 test patients < min_site_patients
    assert "within-site C-index" in limits
    assert "SYNTHETIC DATA" in limits and "random weights" in limits
    summary = _text(_sections(html)["summary"])
    assert "site_1" in summary and "42.5 s" in summary and "1.2 MiB" in summary and "not recorded" not in summary
    provenance = _text(_sections(html)["provenance"])
    assert "site_1" in provenance and "6a6ae0869ce0dfdd" in provenance  # site labels and data digests
    assert "fedsmm 0.1.0" in provenance and "not recorded" not in provenance
    # The same caveats open the report, in its warnings.
    results = _text(_sections(html)["results"])
    assert "SYNTHETIC DATA" in results and "random weights" in results and "site_3" in results
    test = _text(_sections(html)["test"])
    assert "all sites pooled" in test and "site_1" in test and "suppressed" in test


def test_a_run_that_allowed_label_features_says_its_inputs_may_encode_the_labels(fed, tmp_path):
    assert "INPUTS MAY ENCODE THE LABELS" not in fed[2].read_text()  # the default run has no such caveat
    run = tmp_path / "run"  # no rounds: the caveat needs only the config, and the report stays fast
    write_run(run, rounds=0, configured=1, seed=7, overrides=("data.allow_label_features=true",))
    limits = _text(_sections(write_report([run]).read_text())["limits"])
    assert "INPUTS MAY ENCODE THE LABELS" in limits and "data.allow_label_features: true" in limits
    assert "IDH mutation" in limits and "CDKN2A/B homozygous deletion" in limits


# --- comparisons ----------------------------------------------------------------------------------------

def test_comparing_run_folders(compared):
    root, cen, html_path = compared
    assert html_path == root / "out" / REPORT_HTML and not (root / "fed" / REPORT_HTML).exists()
    html = html_path.read_text()
    metrics = _strict_json(root / "out" / METRICS_JSON)
    assert [r["mode"] for r in metrics["runs"]] == ["federated", "centralized", "local-only"]
    assert metrics["runs"][1]["test"]["global"]["values"] == cen["test"]["global"]["values"]
    assert sorted(metrics["runs"][2]["local"]) == list(SITE_NAMES)
    assert metrics["report_errors"] == []
    test = _sections(html)["test"]
    assert test.count("<table>") == 3  # one per task
    # Scopes line up by site label: site_1's row of every run sits in the site_1 block.
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td>", test.split("</table>")[0])
    site1 = [label for scope, label in rows if scope == "site_1"]
    assert any(label.startswith("federated") for label in site1)
    assert any(label.startswith("centralized") for label in site1)
    assert "local-only: site_1&#x27;s own model" in site1
    pooled = [label for scope, label in rows if scope == "all sites pooled"]
    assert len([p for p in pooled if "all sites&#x27; test splits" in p]) == 3
    cen_site1 = next(v for k, v in cen["test"]["per_site"].items() if k == "site_1")
    assert f"{cen_site1['values']['diagnosis.accuracy']:.3f}" in test
    # Results open with the pooled rows side by side and the gaps: this run minus the centralized run, minus the
    # best and the mean local-only model (each local model on all sites' test splits), per metric.
    results = _sections(html)["results"]
    fed_acc = json.loads((root / "fed" / "final_metrics.json").read_text())["test"]["global"]["values"][
        "diagnosis.accuracy"]
    local = [json.loads((root / "loc" / "local" / s / "final_metrics.json").read_text())["all_sites_test"]["global"][
        "values"]["diagnosis.accuracy"] for s in SITE_NAMES]
    gaps = re.findall(r"<tr><td>gap: ([^<]*)</td><td></td><td class=\"num\">([^<]*)</td>",
                      results.split("</table>")[0])
    assert [(label.split(":")[0].split(" (")[0].split(" [")[0], v) for label, v in gaps] == [
        ("minus centralized", f"{fed_acc - cen['test']['global']['values']['diagnosis.accuracy']:+.3f}"),
        ("minus the best local-only model", f"{fed_acc - max(local):+.3f}"),
        ("minus the local-only mean", f"{fed_acc - sum(local) / len(local):+.3f}")]
    # The local-only models were tested on all three sites (none suppressed), this run on two: said in a note.
    assert "was tested on other patients" in results
    # The compared runs appear as dashed curves: their labels are in the summary table header.
    assert "centralized: cmp" in _text(_sections(html)["summary"]) or "centralized:" in html


# --- incomplete and older run folders -------------------------------------------------------------------

def test_a_stopped_run_with_a_skipped_round_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, rounds=3, configured=5, skip=(2,), final=False, torn_last_line=True, seed=4)
    from smm_model.cli import main as smm

    assert smm(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (tmp_path / "rep" / REPORT_HTML).read_text()
    text = _text(html)
    assert "INCOMPLETE" in text
    assert "final_metrics.json is missing" in text
    assert "round 2 was skipped (no update aggregated): E_TOO_FEW_REPLIES" in text
    assert "only 2 of 5 configured training rounds were recorded" in text  # round 3 was torn
    assert "the last line of rounds.jsonl is incomplete" in text
    assert "NOT RECORDED" in _text(_sections(html)["curves"])  # rounds 3..5 in the rounds table
    assert "No test results" in _text(_sections(html)["test"])
    metrics = _strict_json(tmp_path / "rep" / METRICS_JSON)
    entry = metrics["runs"][0]
    assert entry["complete"] is False and entry["test"] is None and entry["rounds"]["skipped"] == [2]
    assert metrics["report_errors"] == []
    assert _sections(html)["curves"].count("<img ") == 5  # curves still drawn from the rounds there are


def _rewrite_val(run: Path, dst: Path, drop: int) -> Path:
    """A copy of run folder ``run`` whose round ``drop`` lost its validation record."""
    dst.mkdir()
    for name in ("config.yaml", "final_metrics.json"):
        (dst / name).write_text((run / name).read_text())
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert rounds[drop]["round"] == drop and rounds[drop]["val"]
    rounds[drop]["val"] = None
    (dst / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    return dst


def test_rounds_that_eval_every_skips_are_not_missing_validations(tmp_path):
    run = tmp_path / "every2"
    final = write_run(run, rounds=5, overrides=("federation.eval_every=2",), seed=8)
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    # Validated: every 2nd round and the last (and the initial model), as server.federation.loop does.
    assert [r["round"] for r in rounds if r["val"]] == [0, 2, 4, 5]
    assert final["best_round"] in (2, 4, 5)
    loaded = report.load_run(run)
    assert loaded.problems == [] and loaded.complete
    assert not [p for p in loaded.problems if "has no validation record" in p]
    html = write_report([run]).read_text()
    assert "INCOMPLETE" not in _text(html) and "has no validation record" not in html
    assert _strict_json(run / METRICS_JSON)["runs"][0]["complete"] is True
    # A validation missing on a round that eval_every evaluates (4, and the last, 5) is still a problem.
    for drop in (4, 5):
        broken = report.load_run(_rewrite_val(run, tmp_path / f"no-val-{drop}", drop))
        assert broken.problems == [f"round {drop} has no validation record"] and not broken.complete
    # With eval_every 1 (the default) every round is an evaluation round.
    every1 = tmp_path / "every1"
    write_run(every1, rounds=3, seed=9)
    assert report.load_run(every1).problems == []
    assert report.load_run(_rewrite_val(every1, tmp_path / "every1-no-val", 1)).problems == [
        "round 1 has no validation record"]


def test_an_older_run_folder_renders_with_not_recorded(tmp_path):
    run = tmp_path / "old"
    final = write_run(run, new_fields=False, seed=5)
    html = write_report([run]).read_text()
    sections = _sections(html)
    assert "not recorded" in _text(sections["classification"]) and "<img " not in sections["classification"]
    assert "not recorded" in _text(sections["survival"]) and "<img " not in sections["survival"]
    summary = _text(sections["summary"])
    assert "no mode recorded; inferred" in summary and "node …441519" in summary
    assert "sha256 of config.yaml, computed by the report" in _text(sections["provenance"])
    assert "data digests: not recorded" in _text(sections["provenance"])
    assert "not recorded" in _text(sections["limits"])
    metrics = _strict_json(run / METRICS_JSON)
    assert metrics["runs"][0]["test"]["global"]["values"] == final["test"]["global"]["values"]
    assert metrics["report_errors"] == []


@pytest.mark.parametrize("damage", ["final_not_json", "config_not_yaml", "rounds_garbage", "all_suppressed",
                                    "evaluate_only"])
def test_damaged_or_partial_run_folders_still_render(tmp_path, damage):
    run = tmp_path / "run"  # no rounds and no pooled statistics: nothing to draw, so the test stays fast
    write_run(run, rounds=0, configured=2, seed=6, sizes=(1, 2) if damage == "all_suppressed" else (9, 7, 2),
              new_fields=False)
    (run / "rounds.jsonl").unlink()
    if damage == "final_not_json":
        (run / "final_metrics.json").write_text('{"test": {"global": ')
    elif damage == "config_not_yaml":
        (run / "config.yaml").write_text("model: [unclosed\n")
    elif damage == "rounds_garbage":
        (run / "rounds.jsonl").write_text('not json\n[1, 2]\n{"round": "x"}\n{"round": 0, "status": "init')
    elif damage == "evaluate_only":  # smm evaluate writes final_metrics.json only
        (run / "config.yaml").unlink()
        final = json.loads((run / "final_metrics.json").read_text())
        (run / "final_metrics.json").write_text(json.dumps({**final, "mode": "evaluate", "split": "test"}))
    html = write_report([run]).read_text()
    metrics = _strict_json(run / METRICS_JSON)
    assert metrics["report_errors"] == []
    assert list(_sections(html)) == list(FIGURES)
    problems = " ".join(metrics["runs"][0]["problems"])
    expected = {"final_not_json": "final_metrics.json cannot be read", "config_not_yaml": "config.yaml cannot be read",
                "rounds_garbage": "rounds.jsonl line 1 is not a round record", "all_suppressed": "",
                "evaluate_only": ""}[damage]
    assert expected in problems and (expected == "" or expected in _text(html))
    if damage == "rounds_garbage":
        assert "the last line of rounds.jsonl is incomplete" in problems and "line 3 is not a round" in problems
    if damage == "evaluate_only":
        assert metrics["runs"][0]["mode"] == "evaluate" and not problems
        assert "No rounds recorded" in _text(_sections(html)["curves"])
    if damage == "all_suppressed":
        assert "Small sites suppressed on the test split" in _text(html)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(ReportError, match="not a run folder"):
        write_report([tmp_path])
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


# --- the statistics behind the figures ------------------------------------------------------------------

def test_km_and_logrank_with_lifelines_equal_the_counts_based_values():
    rng = np.random.default_rng(11)
    grid = np.arange(0.0, 1830.0, 30.0)
    for n, G in ((60, 4), (25, 3), (12, 2)):
        time = rng.uniform(0, 1800, size=n).round()
        time[:3] = time[3]  # ties, and events and censorings at one time
        event = rng.random(n) < 0.6
        group = rng.integers(0, G, size=n)
        counts = km_counts(time, event, group, G, grid)
        res = km_lifelines(counts, grid)
        used = counts[:, 1, 0] > 0
        np.testing.assert_allclose(res.survival[used], km_from_counts(counts)[used], atol=1e-12)
        chi2, p, df = logrank_from_counts(counts)
        assert res.chi2 == pytest.approx(chi2, rel=1e-9) and res.p == pytest.approx(p, rel=1e-9) and res.df == df
    one_group = km_counts([10, 20], [1, 0], [0, 0], 2, grid)
    assert np.isnan(km_lifelines(one_group, grid).p) and np.isnan(logrank_from_counts(one_group)[1])


def test_roc_curves_from_histograms_have_the_recorded_auc():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=80)
    logits = rng.normal(size=(80, 4))
    logits[np.arange(80), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    hist = score_histograms(y, probs, 4)
    auc = auc_from_histograms(hist)
    for c in range(4):
        fpr, tpr = roc_points(hist[c, 0], hist[c, 1])
        assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and len(fpr) == SCORE_BINS + 1
        assert np.trapezoid(tpr, fpr) == pytest.approx(auc.values[f"auc_class_{c}"], abs=1e-12)


def test_the_fixture_follows_the_eval_contract():
    """The hand-made records carry what server.federation.loop's records carry (guards the tests' own input)."""
    rng = np.random.default_rng(0)
    rec = site_stats(rng, 10, 0.5).to_record()
    assert {"num-examples", "loss-sum", "suppressed", "km-groups", "diagnosis-confusion", "diagnosis-hist",
            "grade-confusion", "grade-hist", "survival-cindex", "survival-km"} <= set(rec)
    assert len(rec["diagnosis-hist"]) == 4 * 2 * SCORE_BINS and len(rec["grade-confusion"]) == 9
    assert NODES[0].isdigit()


# --- headless Chromium ----------------------------------------------------------------------------------

@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium (/usr/bin/chromium, Debian package "
                                                   "`chromium`) is not installed")
def test_the_report_loads_in_headless_chromium(fed, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report_render
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = report_render.check_report(fed[2], tmp_path, chromium=str(CHROMIUM), height=1600,
                                        expected_figures=FIGURES)
    assert result["ok"], result["failures"]
    assert result["console_messages"] == [] and result["page_requests"] == []
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The check does catch what it looks for: a script error, an external stylesheet and image.
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.invalid/x.css"></head>'
                   '<body><img src="https://cdn.invalid/a.png"><script>console.error("boom")</script></body></html>')
    result = report_render.check_report(bad, tmp_path / "bad", chromium=str(CHROMIUM), height=600)
    assert not result["ok"] and result["console_messages"] and len(result["page_requests"]) == 2

