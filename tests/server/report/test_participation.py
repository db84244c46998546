"""What a coordinator reads after a fault: the report names every site that missed a round or the
final test, says "complete" only when every configured site took part, warns when the selected
round was validated by other sites than the rounds it was compared with, and opens with the
results and every warning, before any hash or version.

Run folders come from ``report_runs.write_run`` and are then edited into the one-phase records the
server writes (``server.federation.loop``: round r's model is validated by round r + 1's train
messages, so a site gone from round ``gone`` on also misses the validation of round ``gone - 1``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from report_runs import NODES, write_run
from server.report.build import METRICS_JSON, REPORT_MD, write_report
from server.report.load import fmt_rounds, load_run

GONE = NODES[1]  # site_2 (7 patients per split); site_3 (2 patients) is suppressed, site_1 has 9
ROUNDS = 4


def _md_sections(md: str) -> dict[str, str]:
    """report.md's numbered sections by title."""
    parts = re.split(r"^## \d+\. (.+)$", md, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _drop_site(rec: dict, key: str) -> None:
    """Take site ``key`` out of one evaluation record, as if it had not answered."""
    per_site = rec.get("per_site") or {}
    if key in per_site:
        rec["patients"] -= per_site.pop(key)["patients"]
    rec["sampled"] = [k for k in rec["sampled"] if str(k) != key]


def lose_site(run: Path, gone: int, key: str = GONE, *, finished: bool = True) -> None:
    """Edit run folder ``run`` so that site ``key`` is gone from round ``gone`` on: it trains in no
    later round, validates no model from round ``gone - 1`` on, misses the final test, and the last
    round (validated by fewer sites) is selected. ``finished=False``: the server died during the
    last round instead (its model never validated, no final test) and wrote failure.json."""
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    for r in rounds:
        if r["round"] >= gone and r["train"]:
            for field in ("per_site", "update_norms"):
                r["train"][field].pop(key, None)
            r["train"]["sampled"] = r["train"]["kept"] = [k for k in r["train"]["kept"] if str(k) != key]
        if r["round"] >= gone - 1 and r["val"]:
            _drop_site(r["val"], key)
    final = json.loads((run / "final_metrics.json").read_text())
    if finished:
        _drop_site(final["test"], key)
        final.update(best_round=ROUNDS, selection_value=rounds[-1]["val"]["global"]["values"]["loss"])
        (run / "final_metrics.json").write_text(json.dumps(final))
    else:
        rounds[-1].update(val=None, validation="pending")
        (run / "final_metrics.json").unlink()
        (run / "failure.json").write_text(json.dumps({
            "error": "NodeWaitTimeout", "reason": "1 site connected after waiting 300 s; federation.min_nodes is 2",
            "last_checkpoint_round": ROUNDS, "sites": final["sites"], "site_info": final["site_info"],
            "refused_sites": {}}))
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    """A finished run whose site_2 left after round 2 (min_nodes 1 let it go on) and its report."""
    run = tmp_path_factory.mktemp("gone") / "run"
    write_run(run, rounds=ROUNDS, seed=21, overrides=("federation.min_nodes=1",))
    lose_site(run, gone=3)
    write_report([run])
    return run, (run / REPORT_MD).read_text()


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    run = tmp_path_factory.mktemp("complete") / "run"
    write_run(run, rounds=3, seed=22)
    write_report([run])
    return run, (run / REPORT_MD).read_text()


def test_rounds_read_as_ranges():
    assert fmt_rounds([4, 3]) == "rounds 3-4" and fmt_rounds([2]) == "round 2"
    assert fmt_rounds([1, 3, 4, 5, 7]) == "rounds 1, 3-5, 7" and fmt_rounds([]) == "no round"
    assert fmt_rounds(range(1, 201), word=False) == "1-200" and fmt_rounds([], word=False) == "none"


def test_a_site_that_missed_rounds_and_the_final_test_makes_the_run_incomplete_and_is_named(faulted):
    run, md = faulted
    loaded = load_run(run)
    missed = "site_2 missed rounds 3-4 (training), the validation of the models of rounds 2-4 and the final test"
    assert not loaded.complete and loaded.problems == [missed]
    part = loaded.participation
    assert part is not None and part.sites == list(NODES) and part.aggregated == [1, 2, 3, 4]
    gone = part.per_site[GONE]
    assert (gone.trained, gone.validated, gone.missed_train, gone.missed_val, gone.final_test) == (
        [1, 2], [0, 1], [3, 4], [2, 3, 4], False)
    # site_3 is suppressed everywhere (2 patients < 3): it took part, it only sent no numbers.
    assert all(part.per_site[k].took_part_everywhere for k in (NODES[0], NODES[2]))
    # The status line under the title and the run summary say it; "complete" is not said.
    status = next(line for line in md.splitlines() if line.startswith("Status:"))
    assert status.startswith("Status: INCOMPLETE: ") and missed in status
    assert "Status: complete" not in md and f"| status | INCOMPLETE: {missed}" in md
    assert "site_2 did not take part in every round and the final test" in _md_sections(md)["Run summary"]
    results = _md_sections(md)["Results"]
    assert f"- {missed}" in results and "> **Status: INCOMPLETE: 1 problem(s), the first warnings below.**" in results
    assert "took part in every round" not in results
    assert "| site_2 | 1-2 of 1-4 | 0-1 of 0-4 | NO | training: 3-4; validation: 2-4; final test |" in results
    assert "| site_1 | 1-4 of 1-4 | 0-4 of 0-4 | yes | — |" in results
    assert "| site_3 | 1-4 of 1-4 | 0-4 of 0-4 | yes | — |" in results
    metrics = json.loads((run / METRICS_JSON).read_text())
    entry = metrics["runs"][0]
    assert entry["complete"] is False and entry["status"] == f"INCOMPLETE: {missed}"
    assert entry["participation"]["per_site"][GONE]["missed_train"] == [3, 4]
    assert entry["participation"]["per_site"][GONE]["final_test"] is False
    assert missed in metrics["warnings"]


def test_a_selection_over_fewer_sites_is_a_warning(faulted):
    run, md = faulted
    warning = load_run(run).participation.selection_warning
    # Round 4 (site_1 and the suppressed site_3: 9 patients) against round 1 (all three: 16); rounds 2
    # and 3 were validated by the same sites as round 4, and round 0 is never a candidate.
    assert warning is not None and warning.startswith(
        "round 4 was selected on validation over site_1, site_3 only (9 patients), while round 1 was validated "
        "by site_1, site_2, site_3 (16 patients)")
    results = _md_sections(md)["Results"]
    assert "- Round 4 was selected on validation over site_1, site_3 only (9 patients)" in results
    assert json.loads((run / METRICS_JSON).read_text())["runs"][0]["participation"]["selection_warning"] == warning


def test_a_complete_run_says_complete_and_warns_of_no_participation(complete):
    run, md = complete
    loaded = load_run(run)
    assert loaded.complete and loaded.status == "complete"
    assert all(sp.took_part_everywhere for sp in loaded.participation.per_site.values())
    assert loaded.participation.selection_warning is None
    results = _md_sections(md)["Results"]
    assert "Status: complete (every configured site took part in every round and the final test)." in results
    assert "missed" not in results.replace("| missed |", "") and "was selected on validation over" not in results
    assert "| site_2 | 1-3 of 1-3 | 0-3 of 0-3 | yes | — |" in results
    assert json.loads((run / METRICS_JSON).read_text())["runs"][0]["status"] == "complete"


@pytest.mark.parametrize("which", ["complete", "faulted"])
def test_the_report_opens_with_the_results_and_every_warning_before_any_hash_or_version(which, request):
    run, md = request.getfixturevalue(which)
    titles = re.findall(r"^## (?:\d+\. )?(.+)$", md, flags=re.M)
    assert titles[:2] == ["Contents", "Results"] and titles[-1] == "Provenance"
    results = _md_sections(md)["Results"]
    first_hash = min(md.index(s) for s in ("sha256", "fedsmm 0.1.0", "6a6ae0869ce0dfdd"))
    for warning in ("SYNTHETIC DATA", "random weights", "Small sites suppressed on the test split: site_3"):
        assert warning in results and md.index(warning) < first_hash
    assert "sha256" not in results and "fedsmm 0.1.0" not in results and "6a6ae0869ce0dfdd" not in results
    # The selected model's pooled test metrics come before any hash too.
    final = json.loads((run / "final_metrics.json").read_text())
    accuracy = f"{final['test']['global']['values']['diagnosis.accuracy']:.3f}"
    assert accuracy in results and md.index(accuracy) < first_hash
    # The provenance is last: the config's and the model's hashes, the versions, the data digests.
    provenance = _md_sections(md)["Provenance"]
    assert final["config_sha256"] in provenance and "fedsmm 0.1.0" in provenance and "6a6ae0869ce0dfdd" in provenance


def test_a_failed_run_names_the_sites_that_missed_rounds_and_the_reason(tmp_path):
    run = tmp_path / "run"
    write_run(run, rounds=ROUNDS, seed=23, overrides=("federation.min_nodes=1",))
    lose_site(run, gone=3, finished=False)
    loaded = load_run(run)
    assert loaded.status_word == "FAILED" and not loaded.complete
    assert "site_2 missed rounds 3-4 (training) and the validation of the models of rounds 2-3" in loaded.problems
    assert "round 4's model was never validated (its validation was to come with the next message phase; the run " \
           "stopped first)" in loaded.problems
    assert loaded.participation.per_site[GONE].final_test is None  # no final test at all: said once, not per site
    write_report([run])
    md = (run / REPORT_MD).read_text()
    results = _md_sections(md)["Results"]
    assert "Status: FAILED: the run failed (NodeWaitTimeout): 1 site connected after waiting 300 s" in md
    assert "> **Status: FAILED: 3 problem(s), the first warnings below.**" in results
    assert "took part in every round" not in results
    assert "resume the run to continue from it" in results and "site_2 missed rounds 3-4 (training)" in results
    assert "| site_2 | 1-2 of 1-4 | 0-1 of 0-3 | not recorded (no final test) | training: 3-4; validation: 2-3 |" \
        in results


def test_the_servers_selection_note_is_a_warning(tmp_path):
    run = tmp_path / "run"
    write_run(run, rounds=0, configured=1, seed=24)  # no rounds: the note needs the final record only
    final = json.loads((run / "final_metrics.json").read_text())
    note = "round 3 was selected over 1 of 2 sites' validation"
    (run / "final_metrics.json").write_text(json.dumps({**final, "selection_note": note}))
    write_report([run])
    results = _md_sections((run / REPORT_MD).read_text())["Results"]
    assert f"- Selection note recorded by the server: {note}" in results


def test_with_partial_sampling_a_site_is_expected_only_where_it_was_sampled(tmp_path):
    run = tmp_path / "run"
    write_run(run, rounds=ROUNDS, seed=25, overrides=("federation.fraction_train=0.67",))
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    rounds[3]["train"]["per_site"].pop(GONE)  # round 3: site_2 not sampled, so not missed ...
    rounds[3]["train"]["sampled"] = rounds[3]["train"]["kept"] = [int(NODES[0]), int(NODES[2])]
    rounds[2]["train"]["per_site"].pop(NODES[0])  # ... but site_1, sampled in round 2 and absent, missed it
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    loaded = load_run(run)
    assert loaded.participation.sampled_only
    assert loaded.participation.per_site[GONE].took_part_everywhere
    assert loaded.problems == ["site_1 missed round 2 (training)"]


def test_warnings_that_cannot_be_collected_still_leave_the_problems_and_a_report(tmp_path, monkeypatch):
    from server.report.sections import ReportBuilder

    def broken(self):
        raise KeyError("weights")

    monkeypatch.setattr(ReportBuilder, "_caveats", broken)
    run = tmp_path / "run"
    write_run(run, rounds=0, configured=2, seed=26, final=False)  # stopped before its first round
    write_report([run])
    metrics = json.loads((run / METRICS_JSON).read_text())
    assert metrics["report_errors"] and metrics["report_errors"][0].startswith("warnings: KeyError")
    assert metrics["warnings"][:-1] == metrics["runs"][0]["problems"] and metrics["warnings"][:-1]
    assert "could not be collected" in _md_sections((run / REPORT_MD).read_text())["Results"]
