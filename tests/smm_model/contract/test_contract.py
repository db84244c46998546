"""The site-server contract (smm_model/contract): the one home both sides read.

What is checked here is what a copy used to be tested for: that both sides *use* the contract (no
side keeps a private copy of a wire key, a file name or the class rule), and the contract's own
behaviour (atomic, durable writes; one clock for run folders).
"""

from __future__ import annotations

import ast
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from smm_model.contract import atomic, classes, runfolder, wire

ROOT = Path(__file__).resolve().parents[3]


def _string_constants(path: Path) -> set[str]:
    """Every string literal in a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


#: The wire names no other vocabulary shares (a hyphen or a dot); the plain words (``train``,
#: ``arrays``, ``split``) are also run-record keys and log labels, so a literal scan cannot tell them apart.
WIRE_NAMES = {v for k, v in vars(wire).items() if k.isupper() and isinstance(v, str) and ("-" in v or "." in v)}


@pytest.mark.parametrize("module", ["client/app.py", "server/app.py", "server/federation/loop.py",
                                    "server/aggregation/strategy.py", "server/aggregation/guard.py"])
def test_the_message_adapters_spell_no_wire_name_themselves(module):
    """A wire key written out as a literal in an adapter is a second copy of the contract."""
    assert {"server-round", "local-steps", "num-examples", "query.preflight"} <= WIRE_NAMES
    literals = _string_constants(ROOT / module)
    assert not (literals & WIRE_NAMES), f"{module} spells {sorted(literals & WIRE_NAMES)}; use smm_model.contract.wire"


@pytest.mark.parametrize("module", ["server/report/load.py", "server/report/build.py", "server/runs/runlog.py", "server/runs/checkpoint.py",
                                    "server/federation/loop.py", "server/ops/simulate.py", "client/baselines/runfolder.py",
                                    "client/baselines/centralized.py", "client/baselines/evaluate.py"])
def test_run_folder_names_come_from_the_contract(module):
    names = {runfolder.CONFIG_FILE, runfolder.ROUNDS_FILE, runfolder.FINAL_FILE, runfolder.MODEL_FILE,
             runfolder.LOCAL_ONLY_FILE, runfolder.MODEL_FORMAT, runfolder.CHECKPOINT_FORMAT}
    literals = _string_constants(ROOT / module)
    assert not (literals & names), f"{module} spells {sorted(literals & names)}; use smm_model.contract.runfolder"


def test_default_run_folders_use_one_clock():
    """Whatever the local time zone, a run folder's stamp is UTC (folders sort by start time)."""
    t = datetime(2026, 3, 1, 23, 30, 5, tzinfo=timezone(timedelta(hours=-5)))
    assert runfolder.default_run_dir("demo", now=t) == Path("runs/demo-20260302-043005")
    assert runfolder.default_run_dir("demo", "local", now=t) == Path("runs/demo-local-20260302-043005")
    assert runfolder.default_run_dir("demo").parent == runfolder.RUNS_DIR


def test_atomic_path_fsyncs_before_the_rename_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "features.h5"
    target.parent.mkdir()
    target.write_text("old")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").exists() else str(fd))
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["features.h5"]
    with atomic.atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not synced  # nothing is synced while the writer still writes
    assert target.read_text() == "new"
    assert any(s.endswith(".tmp") for s in synced), synced  # the data, before the rename
    assert str(target.parent) in synced  # and the folder, after it
    mode = target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_the_who2021_rule_on_its_defining_cases():
    nan = float("nan")
    #        idh  codel cdkn grade -> class
    cases = [(0, nan, nan, 4, 0), (0, 1, 1, 2, 0), (1, 1, nan, 2, 3), (1, 0, 1, 2, 1), (1, 0, 0, 4, 1),
             (1, 0, 0, 3, 2), (1, 0, 0, 2, 2), (nan, 0, 0, 2, -1), (1, nan, 0, 2, -1), (1, 0, nan, 2, -1),
             (1, 0, nan, 4, 1), (1, 0, 0, nan, -1)]
    got = classes.who2021_diagnosis(*zip(*[c[:4] for c in cases]))
    assert got.tolist() == [c[4] for c in cases]
    assert len(classes.DIAGNOSES) == len(classes.DIAGNOSIS_KEYS) == len(classes.DIAGNOSIS_SHORT) == 4
    assert classes.grade_index([2, 3, 4, nan, 1]).tolist() == [0, 1, 2, -1, -1]


def test_rounds_file_reader_leaves_out_a_torn_line_and_names_bad_ones(tmp_path):
    """One reader of rounds.jsonl for the resume, the report and the benchmarks."""
    from smm_model.contract.runfolder import read_rounds_file

    path = tmp_path / "rounds.jsonl"
    assert read_rounds_file(path).records == []  # no file yet: no rounds
    path.write_text('{"round": 0}\n{"round": 1, "v": 1}\nnot json\n[1, 2]\n{"round": true}\n{"round": 1, "v": 2}\n'
                    '{"round": 2}')
    rounds = read_rounds_file(path)
    assert [r["round"] for r in rounds.records] == [0, 1, 1]
    assert rounds.torn and rounds.bad_lines == [3, 4, 5]
    assert [(r["round"], r.get("v")) for r in rounds.by_round()] == [(0, None), (1, 2)]
    assert any("line 3 is not a round record" in p for p in rounds.problems())
    assert any("last line of rounds.jsonl is incomplete" in p for p in rounds.problems())
    with pytest.raises(ValueError, match=r"rounds.jsonl: line 3 is not a valid round record"):
        rounds.strict()
    path.write_text('{"round": 0}\n{"round": 1}\n')
    clean = read_rounds_file(path)
    assert not clean.torn and clean.strict() == [{"round": 0}, {"round": 1}]


def test_selection_keeps_the_best_finite_round_and_says_when_it_falls_back():
    """The one selection rule of federated and pooled runs."""
    from smm_model.contract.selection import Selection

    higher = Selection("diagnosis.auc", lower_is_better=False)
    assert [higher.offer(r, v) for r, v in [(1, 0.6), (2, None), (3, 0.7), (4, 0.7), (5, 0.65)]] == [
        True, False, True, False, False]  # a tie keeps the earlier round
    assert (higher.best_round, higher.best_value) == (3, 0.7) and higher.chosen(5) == (3, None)
    assert higher.record(0.65) == {"metric": "diagnosis.auc", "value": 0.65, "best_round": 3, "best_value": 0.7}
    lower = Selection("multitask.loss", lower_is_better=True)
    assert [lower.offer(r, v) for r, v in [(1, 2.0), (2, 1.5), (3, 1.7)]] == [True, True, False]
    none = Selection("diagnosis.auc", lower_is_better=False)
    none.offer(1, None)
    round_, note = none.chosen(4, "aggregated round")
    assert round_ == 4 and "no round had a finite validation diagnosis.auc; the last aggregated round (4)" in note


def test_final_record_has_the_contract_keys_and_refuses_new_ones():
    from smm_model.config import ExperimentConfig
    from smm_model.contract.runfolder import FEDERATED_KEYS, FINAL_KEYS
    from smm_model.contract.selection import Selection, final_record

    cfg = ExperimentConfig()
    sel = Selection.for_config(cfg, best_round=2, best_value=0.5)
    common = dict(mode="federated", cfg=cfg, rounds=3, selection=sel, best_round=2, note=None,
                  test={"suppressed": []}, sites=[1, 2], model_file="model.pt", model_sha256="ab", wall_s=1.0,
                  config_text="x", site_info={})
    rec = final_record(**common, strategy="fedavg", bytes={"sent": 1, "received": 2}, resumed_after_round=None)
    assert tuple(rec) == FINAL_KEYS + FEDERATED_KEYS and rec["selection_value"] == 0.5
    with pytest.raises(ValueError, match=r"unknown keys \['surprise'\]"):
        final_record(**common, surprise=1)
