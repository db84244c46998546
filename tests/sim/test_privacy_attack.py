"""An honest-but-curious server against a small site: with the default disclosure policy it singles
out no patient; with the policy switched off the same attack succeeds (so the test can fail).

The federation is real (``server.federation.loop`` driving ``client.app.app`` in process, three
sites of 30 patients, about 12 of them training patients). The server records every reply of every
site over the whole run (preflight summaries, every round's training metrics, every validation and
the final test evaluation) and attacks site 1:

* **Survival times.** From the preflight survival histogram (events and censored on its time
  grid) and any Kaplan-Meier counts (events and exits per predicted risk group), every released
  cell holding fewer than k patients singles them out: the attacker reads their survival time as
  the cell's time. A patient is re-identified if such a cell lies within 30 days of the patient's
  true survival time (``RESOLUTION_DAYS``).
* **Small cells.** Every count cell that was sent, and every cell the attacker can derive from
  them (censored = all - events; a confusion row's suppressed total = the class count from the
  preflight minus the released cells; the patients leaving a risk group's risk set at each time),
  must be 0 or at least k, for every round, and the label totals must not change between rounds
  (a change would be a difference isolating patients).

Also: a sentinel patient id and a sentinel file path raised inside a site's exception reach
nothing the server receives, logs or writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sim_cohort import SMALL, write_features_cohort
from test_contract_inprocess import InProcessFlower

import client.app as client_app
import client.local.round as site_round
from server.federation.loop import run_federation
from smm_model.config import ExperimentConfig
from smm_model.contract import wire
from smm_model.contract.protocol import SURVIVAL_HIST_EDGES, EvalStats, SharedStats, SiteSummary
from smm_model.metrics.federated import SCORE_BINS

K = 5
RESOLUTION_DAYS = 30.0
SITE = 100  # node id of site_1 in InProcessFlower
#: 30 patients a site: about 12 training patients (the small site of the attack) and validation and
#: test splits large enough (9) to be evaluated at k = 5, so their statistics are attacked too.
SPLIT = (0.4, 0.3, 0.3)
SENTINEL_ID = "TCGA-SENTINEL-0042"
SENTINEL_PATH = "/secret/hospital/slides/TCGA-SENTINEL-0042.svs"


class Recording(InProcessFlower):
    """The transport as a curious server sees it: every reply kept."""

    def __init__(self, n_sites: int) -> None:
        super().__init__(n_sites)
        self.replies: list[tuple[str, dict, object]] = []  # (message type, instruction config, reply)

    def send(self, instructions):
        out = super().send(instructions)
        for ins, rep in zip(instructions, out):
            self.replies.append((ins.message_type, dict(ins.config), rep))
        return out


def run(tmp_path: Path, min_cell: int) -> tuple[Recording, Path, Path]:
    cohort = write_features_cohort(tmp_path / "cohort", patients=30, seed=11, split=SPLIT)
    cfg = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}", f"privacy.min_cell={min_cell}",
                                               "federation.min_site_patients=1"])
    transport = Recording(3)
    run_federation(transport, cfg, tmp_path / "run", poll_s=0.01)
    return transport, cohort, tmp_path / "run"


def site_replies(t: Recording, node: int = SITE):
    """(preflight summary, [(split, round, EvalStats)], [train metrics], the KM time grid) of one site."""
    summary, evals, trains, grid = None, [], [], None
    for kind, config, rep in t.replies:
        if rep.node_id != node or rep.error:
            continue
        if kind == wire.PREFLIGHT:
            summary = SiteSummary.from_json(rep.records[wire.SUMMARY][wire.SUMMARY_JSON])
        elif kind == wire.EVALUATE:
            evals.append((config[wire.KEY_SPLIT], config.get(wire.KEY_ROUND), EvalStats.from_record(rep.metrics)))
            grid = np.asarray(SharedStats.from_json(config[wire.KEY_SHARED]).km_grid)
        elif kind == wire.TRAIN:
            trains.append(rep.metrics)
            # Every record the reply holds is read: a new kind of record must be added here.
            assert set(rep.records) <= {wire.VALIDATION}, set(rep.records)
            if wire.VALIDATION in rep.records:  # the received model's validation, on the way (one phase a round)
                evals.append((config[wire.KEY_VALIDATE], config.get(wire.KEY_ROUND),
                              EvalStats.from_record(rep.records[wire.VALIDATION])))
                grid = np.asarray(SharedStats.from_json(config[wire.KEY_SHARED]).km_grid)
    assert summary is not None and evals and trains and grid is not None
    assert any(kind == wire.TRAIN and wire.VALIDATION in rep.records for kind, _, rep in t.replies)
    return summary, evals, trains, grid


def true_training_times(cohort: Path) -> np.ndarray:
    df = pd.read_csv(cohort / "site_1" / "clinical.csv")
    return df.loc[df["split"] == "train", "survival_days"].dropna().to_numpy(dtype=float)


def singled_out_times(summary: SiteSummary, evals, km_grid) -> list[float]:
    """Times the attacker attributes to fewer than K patients."""
    out = []
    events = np.asarray(summary.survival_hist_events)
    censored = np.asarray(summary.survival_hist_all) - events
    centers = (SURVIVAL_HIST_EDGES[:-1] + SURVIVAL_HIST_EDGES[1:]) / 2
    for row in (events, censored):
        out += [float(centers[i]) for i in np.flatnonzero((row > 0) & (row < K))]
    for _split, _rnd, ev in evals:
        if ev.km is None or not ev.km_groups:
            continue
        km = np.asarray(ev.km).reshape(ev.km_groups, 2, -1)
        at_risk = km[:, 1]
        leaving = at_risk - np.concatenate([at_risk[:, 1:], np.zeros((ev.km_groups, 1), dtype=int)], axis=1)
        for row in (*km[:, 0], *(leaving - km[:, 0])):
            out += [float(km_grid[i]) for i in np.flatnonzero((row > 0) & (row < K))]
    return out


def reidentified(times: np.ndarray, guesses: list[float]) -> int:
    return int(sum(any(abs(t - g) <= RESOLUTION_DAYS for g in guesses) for t in times))


def small_cells(summary: SiteSummary, evals) -> list[str]:
    """Every sent or derivable count cell between 1 and K - 1, named."""
    bad = []

    def check(name, values):
        v = np.asarray(values).ravel()
        if np.any((v > 0) & (v < K)):
            bad.append(name)

    for split, rec in summary.splits.items():
        check(f"{split}.patients", [rec["patients"]])
        for task in ("diagnosis", "grade"):
            check(f"{split}.{task}", [*rec[task], rec[f"{task}_unknown"]])
        check(f"{split}.survival", [rec["events"], rec["survival_labelled"] - rec["events"],
                                    rec["patients"] - rec["survival_labelled"]])
    ev_hist = np.asarray(summary.survival_hist_events)
    check("survival_hist.events", ev_hist)
    check("survival_hist.censored", np.asarray(summary.survival_hist_all) - ev_hist)
    totals: dict[tuple[str, str], list[int]] = {}
    for split, rnd, ev in evals:
        if ev.suppressed:
            continue
        for task, flat in ev.confusion.items():
            C = int(round(len(flat) ** 0.5))
            rows = np.asarray(flat).reshape(C, C)
            check(f"{split} round {rnd} {task} confusion", rows)
            known = summary.splits[split][task]  # the class counts: row totals the server knows
            for c in range(C):
                if known[c]:
                    check(f"{split} round {rnd} {task} confusion row {c} hidden", [known[c] - rows[c].sum()])
        for task, flat in ev.histograms.items():
            h = np.asarray(flat).reshape(-1, 2, SCORE_BINS)
            check(f"{split} round {rnd} {task} score histograms", h)
            totals.setdefault((split, task), []).append(int(h[:, 0].sum()))
        for name in ev.site_values:  # a site's own accuracy or F1 would give back its suppressed cells
            if not name.endswith(".auc"):
                bad.append(f"{split} round {rnd} site value {name}")
        if ev.km is not None and ev.km_groups:
            km = np.asarray(ev.km).reshape(ev.km_groups, 2, -1)
            at_risk = km[:, 1]
            leaving = at_risk - np.concatenate([at_risk[:, 1:], np.zeros((ev.km_groups, 1), dtype=int)], axis=1)
            check(f"{split} round {rnd} km events", km[:, 0])
            check(f"{split} round {rnd} km censored", leaving - km[:, 0])
            check(f"{split} round {rnd} km group sizes", at_risk[:, 0])
    for (split, task), seq in totals.items():  # label totals are the same every round: no difference to read
        if len(set(seq)) > 1:
            bad.append(f"{split} {task}: positives change between rounds {seq}")
    return bad


def test_curious_server_singles_out_no_patient_with_the_default_policy(tmp_path):
    t, cohort, run_dir = run(tmp_path, min_cell=K)
    summary, evals, trains, grid = site_replies(t)
    times = true_training_times(cohort)
    assert 10 <= len(times) <= 14  # the small site the attack is about
    guesses = singled_out_times(summary, evals, grid)
    assert reidentified(times, guesses) == 0, guesses
    assert small_cells(summary, evals) == []
    assert all(m["num-examples"] >= K for m in trains)
    assert any(not ev.suppressed for split, _, ev in evals if split == "val")  # evaluations were attacked too
    assert any(not ev.suppressed for split, _, ev in evals if split == "test")
    assert summary.disclosure["min_cell"] == K and summary.disclosure["coarsened"]


def test_the_same_attack_succeeds_with_the_policy_off(tmp_path):
    """The check that the attack is real: with min_cell 1 the preflight histogram alone gives most
    training patients' survival times to within 30 days, and small cells are everywhere."""
    t, cohort, run_dir = run(tmp_path, min_cell=1)
    summary, evals, _, grid = site_replies(t)
    times = true_training_times(cohort)
    guesses = singled_out_times(summary, evals, grid)
    assert reidentified(times, guesses) >= len(times) // 2
    assert small_cells(summary, evals)


def test_a_sentinel_raised_inside_a_site_reaches_nothing_the_server_keeps(tmp_path, monkeypatch, caplog):
    """A site whose evaluation raises with a patient id and a path in the message: the server gets
    a code, and neither string is in any reply, log record or run-folder file."""
    cohort = write_features_cohort(tmp_path / "cohort", patients=18, seed=11)
    monkeypatch.setenv(client_app.LOG_DIR_ENV, str(tmp_path / "site-logs"))
    real = site_round.evaluate_dataset

    def leaky(ds, *a, **kw):
        raise FileNotFoundError(f"{SENTINEL_PATH}: slide of {SENTINEL_ID} is missing")

    monkeypatch.setattr(site_round, "evaluate_dataset", leaky)
    cfg = ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={cohort}", "federation.rounds=1",
                                               "federation.min_nodes=1"])
    t = Recording(3)
    caplog.set_level(logging.DEBUG, logger="fedsmm")
    # Every evaluation raises, and validation rides on the train messages (one phase per round):
    # no round aggregates and the run fails, recording why (failure.json), with codes only.
    with pytest.raises(RuntimeError, match="no round aggregated"):
        run_federation(t, cfg, tmp_path / "run", poll_s=0.01)
    assert (tmp_path / "run" / "failure.json").is_file()
    monkeypatch.setattr(site_round, "evaluate_dataset", real)
    seen = [repr(rep) for _, _, rep in t.replies] + [r.getMessage() for r in caplog.records]
    seen += [p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*") if p.is_file()
             and p.suffix in (".json", ".jsonl", ".log", ".yaml", ".txt")]
    assert any("E_" in s for s in seen)
    for s in seen:
        assert SENTINEL_ID not in s and SENTINEL_PATH not in s
    assert t.reasons and all(SENTINEL_ID not in r for r in t.reasons)  # not even Flower's error text has it
    site_log = "".join(p.read_text() for p in (tmp_path / "site-logs").rglob("*") if p.is_file())
    assert SENTINEL_ID in site_log  # it was raised, and the site's own log keeps it
