"""The site's privacy ledger (``client.local.ledger``): history on disk, epsilon recomputed from it.

What must hold: the ledger's epsilon equals a fresh Opacus accountant's on the stored history,
across restarts (every read from disk) and for either accountant; rounds compose (five rounds
spend more than one, and exactly what one accountant over all their steps says); a round that
would pass the budget is refused with the file untouched; a corrupt file is an error naming it,
never an empty ledger.
"""

from __future__ import annotations

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from client.local.ledger import (LEDGER_FORMAT, BudgetExceeded, LedgerError, PrivacyLedger, epsilon_of,
                                 mechanisms)

DELTA = 1e-5
#: The issue's setting: sigma 1, q 1/8, one expected pass (8 steps) per round, 5 rounds.
SIGMA, Q, STEPS, ROUNDS = 1.0, 1 / 8, 8, 5


def offline(entries, kind: str = "rdp") -> float:
    """epsilon by a fresh Opacus accountant fed the stored entries one by one (no merging)."""
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    acc.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    return float(acc.get_epsilon(delta=DELTA))


def stored(path) -> list[dict]:
    doc = json.loads(path.read_text())
    assert doc["format"] == LEDGER_FORMAT
    return doc["entries"]


def test_epsilon_is_recomputed_from_the_stored_history_across_restarts(tmp_path):
    path = tmp_path / "site" / "privacy-ledger.json"
    assert PrivacyLedger.open(path).epsilon(DELTA) == 0.0 and not path.exists()
    seen = []
    for rnd in range(1, ROUNDS + 1):
        ledger = PrivacyLedger.open(path)  # a new process every round: only the file carries over
        entry = ledger.reserve("run-a", rnd, SIGMA, Q, STEPS, DELTA, budget=50.0)
        reopened = PrivacyLedger.open(path)
        eps = reopened.epsilon(DELTA)
        assert eps == pytest.approx(offline(stored(path)), rel=1e-9)
        assert entry.epsilon_after == pytest.approx(eps, rel=1e-9)
        assert [(e.run, e.round) for e in reopened.history] == [("run-a", r) for r in range(1, rnd + 1)]
        seen.append(eps)
    assert all(a < b for a, b in zip(seen, seen[1:]))  # never reset by a new round
    # Composition: five rounds spend what one accountant over all 40 steps says, far more than one round.
    one_round = epsilon_of([(SIGMA, Q, STEPS)], DELTA)
    assert one_round == pytest.approx(3.79, abs=0.01)  # the per-round accountant
    assert seen[-1] == pytest.approx(6.59, abs=0.01)  # the true total
    assert seen[-1] == pytest.approx(epsilon_of([(SIGMA, Q, STEPS * ROUNDS)], DELTA), rel=1e-9)
    assert seen[-1] > 1.5 * one_round


def test_the_prv_accountant_reads_the_same_history(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, accountant="prv")
    ledger.reserve("run-a", 1, SIGMA, Q, STEPS, DELTA, budget=50.0)
    ledger.reserve("run-a", 2, 1.5, 0.25, 4, DELTA, budget=50.0)
    eps = PrivacyLedger.open(path, accountant="prv").epsilon(DELTA)
    assert eps == pytest.approx(offline(stored(path), "prv"), rel=1e-3)
    # The file holds mechanisms, not an accountant's state: another accountant reads it as well.
    assert PrivacyLedger.open(path, accountant="rdp").epsilon(DELTA) == pytest.approx(offline(stored(path)), rel=1e-9)
    with pytest.raises(ValueError, match="dp_accountant"):
        PrivacyLedger.open(path, accountant="gdp")


def test_merging_equal_mechanisms_does_not_change_epsilon():
    hist = [(1.0, 0.125, 8), (2.0, 0.5, 3), (1.0, 0.125, 8)]
    assert mechanisms(hist) == [(1.0, 0.125, 16), (2.0, 0.5, 3)]
    acc = RDPAccountant()
    acc.history = hist
    assert epsilon_of(hist, DELTA) == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)
    assert epsilon_of([(0.0, 0.5, 1)], DELTA) == float("inf")


def test_would_spend_writes_nothing_and_matches_the_reservation(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    ledger.reserve("r", 1, SIGMA, Q, STEPS, DELTA, budget=50.0)
    before = path.read_bytes()
    planned = ledger.would_spend(2.0, 0.25, 10, DELTA)
    assert path.read_bytes() == before and len(ledger.history) == 1
    assert ledger.reserve("r", 2, 2.0, 0.25, 10, DELTA, budget=50.0).epsilon_after == pytest.approx(planned, rel=1e-9)
    assert ledger.steps == STEPS + 10


def test_the_budget_gate_refuses_and_leaves_the_file_unchanged(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    ledger.reserve("r", 1, SIGMA, Q, STEPS, DELTA, budget=4.5)  # 3.79
    before = path.read_bytes()
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve("r", 2, SIGMA, Q, STEPS, DELTA, budget=4.5)  # would be about 4.70
    msg = str(info.value)
    assert "dp_epsilon_budget=4.5" in msg and "3.793" in msg and "4.697" in msg and str(path) in msg
    assert path.read_bytes() == before
    assert len(PrivacyLedger.open(path).history) == 1 and len(ledger.history) == 1
    # A round with no noise never fits any budget.
    with pytest.raises(BudgetExceeded):
        ledger.reserve("r", 2, 0.0, Q, 1, DELTA, budget=1e9)
    assert path.read_bytes() == before


def test_two_writers_at_one_site_both_count(tmp_path):
    path = tmp_path / "ledger.json"
    a, b = PrivacyLedger.open(path), PrivacyLedger.open(path)  # both opened before either wrote
    a.reserve("run-a", 1, SIGMA, Q, STEPS, DELTA, budget=50.0)
    b.reserve("run-b", 1, SIGMA, Q, STEPS, DELTA, budget=50.0)  # re-reads under the lock: sees run-a
    assert [e["run"] for e in stored(path)] == ["run-a", "run-b"]
    assert b.epsilon(DELTA) == pytest.approx(epsilon_of([(SIGMA, Q, 2 * STEPS)], DELTA), rel=1e-9)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('{"format": "something-else", "version": 1, "entries": []}', "not a fedsmm-privacy-ledger"),
    ('{"format": "fedsmm-privacy-ledger", "version": 99, "entries": []}', "version 99"),
    ('{"format": "fedsmm-privacy-ledger", "version": 1, "entries": {}}', "'entries' must be a list"),
    ('{"format": "fedsmm-privacy-ledger", "version": 1, "entries": [{"run": "r", "round": 1, '
     '"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -3}]}', "entry 0: .*steps"),
    ('{"format": "fedsmm-privacy-ledger", "version": 1, "entries": [{"run": "r", "round": 1, '
     '"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 3}]}', "entry 0: .*sample_rate"),
    ('{"format": "fedsmm-privacy-ledger", "version": 1, "entries": [{"run": "r"}]}', "entry 0"),
])
def test_a_corrupt_ledger_is_an_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(LedgerError, match=match) as info:
        PrivacyLedger.open(path)
    assert str(path) in str(info.value)
    assert path.read_text() == content  # never rewritten


def test_an_unreadable_ledger_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "ledger.json"
    path.mkdir()  # a folder where the file should be
    with pytest.raises(LedgerError, match="cannot be read") as info:
        PrivacyLedger.open(path)
    assert str(path) in str(info.value)


def test_bad_mechanisms_are_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path)
    for args in ((1.0, 0.0, 3), (1.0, 0.5, 0), (-1.0, 0.5, 3), (1.0, 0.5, 2.5)):
        with pytest.raises(ValueError):
            ledger.reserve("r", 1, *args, DELTA, budget=10.0)
    with pytest.raises(ValueError, match="dp_epsilon_budget"):
        ledger.reserve("r", 1, 1.0, 0.5, 3, DELTA, budget=0.0)
    assert not path.exists()
