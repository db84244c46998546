"""Reading run folders for the report: ``load_run`` turns one folder into a ``RunData``.

A run folder is what ``server.federation.loop`` (federated) and ``client.baselines.runfolder``
(centralized, local-only, evaluate) write: config.yaml, rounds.jsonl, final_metrics.json and, for a
local-only run, local_only.json naming its per-site runs. Reading is tolerant by design: the report is
written at the end of every run, including runs that stopped early or failed, and it must then say
what is missing rather than fail. Every field added to the format after the first release (``mode``,
``site_info``, ``wall_s``, ``bytes``, ``config_sha256``, pooled ``stats`` and ``km_grid``) is
optional and shown as ``NOT_RECORDED`` when absent. What is incomplete or went wrong is collected
as sentences in ``RunData.problems`` and ``RunData.events`` (``_check_run``), so every later stage
only reads them. For a federated run, ``RunData.participation`` says which configured site trained
in, validated and took part in what (``_participation``): a site that missed a round or the final
test is a problem, so the run is "complete" only when every configured site took part in everything. Only a folder that is not a run folder at all is refused, with ``ReportError``.

This module is the one place that knows the file layout; the sections, ``metrics.json`` and the
renderers see ``RunData`` only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smm_model.config import TASKS
from smm_model.contract.protocol import evaluation_round
from smm_model.contract.runfolder import (CONFIG_FILE, FAILURE_FILE, FINAL_FILE, LOCAL_ONLY_FILE, ROUNDS_FILE,
                                         read_rounds_file)

__all__ = ["NOT_RECORDED", "MODES", "ReportError", "RunData", "SiteParticipation", "Participation", "load_run",
           "label_runs", "fmt_sites", "fmt_rounds", "natural_key"]

#: What the report says for a field the run folder does not hold (an older or unfinished run).
NOT_RECORDED = "not recorded"
MODES = ("federated", "centralized", "local-only", "evaluate")


class ReportError(ValueError):
    """A folder cannot be reported on at all (not a folder, not a run folder)."""


@dataclass
class SiteParticipation:
    """One configured site's part in a federated run, from the records' site keys.

    ``trained``: aggregated rounds whose ``train.per_site`` holds the site; ``validated``: rounds
    whose model it validated (its key in ``val.per_site`` or ``val.suppressed``: a suppressed site
    took part, it only has too few patients to send numbers); ``missed_*``: the rounds it was
    expected in and is absent from; ``final_test``: whether it took part in the final test (None
    when the run recorded no final test, which is a problem of its own).
    """

    key: str
    trained: list[int]
    validated: list[int]
    missed_train: list[int]
    missed_val: list[int]
    final_test: bool | None

    @property
    def took_part_everywhere(self) -> bool:
        return not self.missed_train and not self.missed_val and self.final_test is not False


@dataclass
class Participation:
    """Which configured site took part in which step of a federated run, and whether the selected
    round was validated by the same sites as the rounds it was compared with.

    ``sites``: the configured sites (those accepted at preflight, else every site the records
    name; ``source`` says which); ``val_sites``/``val_patients``: per validated round, the sites
    that validated its model and the patients pooled; ``sampled_only``: with partial sampling
    (``fraction_train``/``fraction_evaluate`` below 1) a site is expected only where it was
    sampled; ``selection_warning``: set when the selected round's validation came from other
    sites than a round it was compared with (selection then compares different patients).
    """

    sites: list[str]
    source: str
    aggregated: list[int]
    val_sites: dict[int, list[str]]
    val_patients: dict[int, Any]
    per_site: dict[str, SiteParticipation]
    sampled_only: bool
    selection_warning: str | None = None


@dataclass
class RunData:
    """One run folder as read: raw records plus what is missing or went wrong.

    ``problems``: sentences saying what is incomplete or failed (missing files, rounds not recorded,
    skipped rounds); ``events``: things that happened and matter for reading the numbers (dropped or
    clamped updates, sites joining late, refused sites). ``local``: a local-only run's per-site runs.
    """

    path: Path
    mode: str
    config: dict[str, Any]
    config_sha256: str | None
    config_sha_source: str
    rounds: list[dict[str, Any]]
    final: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    local: dict[str, "RunData"] = field(default_factory=dict)
    local_summary: dict[str, Any] | None = None
    label: str = ""
    failure: dict[str, Any] | None = None  # failure.json: a federated run that failed, and why
    participation: Participation | None = None  # a federated run's sites per round (``_participation``)

    # -- convenience views (all tolerant of missing pieces)

    def section(self, name: str) -> dict[str, Any]:
        v = self.config.get(name)
        return v if isinstance(v, dict) else {}

    @property
    def name(self) -> str:
        return str((self.final or {}).get("run") or self.config.get("name") or (self.local_summary or {}).get("run")
                   or self.path.name)

    @property
    def tasks(self) -> list[str]:
        tasks = self.section("model").get("tasks")
        if isinstance(tasks, list) and tasks:
            return [t for t in tasks if t in TASKS]
        found = set()
        for rec in [self.test, *[r.get("val") for r in self.rounds]]:
            for k in ((rec or {}).get("global") or {}).get("values", {}):
                found.add(k.partition(".")[0])
        for child in self.local.values():
            found.update(child.tasks)
        return [t for t in TASKS if t in found]

    @property
    def rounds_configured(self) -> int | None:
        r = self.section("federation").get("rounds")
        return int(r) if isinstance(r, int) else None

    @property
    def training_rounds(self) -> list[dict[str, Any]]:
        return [r for r in self.rounds if int(r.get("round", 0)) >= 1]

    @property
    def skipped(self) -> list[int]:
        return [int(r["round"]) for r in self.rounds if r.get("status") == "skipped"]

    @property
    def missing_rounds(self) -> list[int]:
        have = {int(r["round"]) for r in self.rounds}
        last = max([*have, 0])
        return [r for r in range(0, last + 1) if r not in have]

    @property
    def test(self) -> dict[str, Any] | None:
        t = (self.final or {}).get("test")
        return t if isinstance(t, dict) else None

    @property
    def site_info(self) -> dict[str, Any]:
        """final_metrics.json's ``site_info`` (a local-only run: its site runs' merged)."""
        info = (self.final or {}).get("site_info")
        if not isinstance(info, dict):
            info = (self.failure or {}).get("site_info")
        if not isinstance(info, dict):
            info = {}
            for child in self.local.values():
                info.update(child.site_info)
        # in the order of their names (site_2 before site_10), not of node ids
        return dict(sorted(info.items(), key=lambda kv: natural_key(str((kv[1] or {}).get("label") or kv[0]))))

    @property
    def complete(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        """The run's status in one line: "complete" only when it finished and every configured site
        took part in every step; else FAILED (failure.json) or INCOMPLETE, with every problem."""
        return self.status_word + ("" if self.complete else ": " + "; ".join(self.problems))

    @property
    def status_word(self) -> str:
        return "complete" if self.complete else "FAILED" if self.failure is not None else "INCOMPLETE"

    @property
    def configured_sites(self) -> list[str] | None:
        """The sites accepted at preflight (final_metrics.json, else failure.json), as keys."""
        for rec in (self.final, self.failure):
            sites = (rec or {}).get("sites")
            if isinstance(sites, list):
                return [str(s) for s in sites]
        return None

    def site_name(self, key: Any) -> str:
        """Display name of a site key: its recorded label, else the key (node ids shortened)."""
        key = str(key)
        label = (self.site_info.get(key) or {}).get("label")
        if label:
            return str(label)
        if key.isdigit() and len(key) > 8:
            return f"node …{key[-6:]}"
        return key


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{path.name} cannot be read ({type(e).__name__}: {e}); it is left out")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} does not hold a JSON object; it is left out")
        return None
    return data


def _read_rounds(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The report's reading of ``rounds.jsonl``: lenient, each line left out said in ``problems``."""
    try:
        rounds = read_rounds_file(path)
    except OSError as e:
        problems.append(f"{path.name} cannot be read ({e.strerror}); no round is shown")
        return []
    problems.extend(rounds.problems())
    return rounds.by_round()


def _guess_mode(final: dict[str, Any] | None, rounds: list[dict[str, Any]], has_local: bool) -> str:
    if has_local:
        return "local-only"
    if final and final.get("mode") in MODES:
        return str(final["mode"])
    statuses = {r.get("status") for r in rounds}
    if "trained" in statuses:
        return "centralized"
    if final is not None and not rounds and final.get("split"):
        return "evaluate"
    return "federated"


def load_run(path: str | Path) -> RunData:
    """Read one run folder (federated, centralized, local-only parent or child, evaluate)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder")
    names = (CONFIG_FILE, ROUNDS_FILE, FINAL_FILE, LOCAL_ONLY_FILE, FAILURE_FILE)
    if not any((path / n).exists() for n in names):
        raise ReportError(f"{path}: not a run folder (none of {', '.join(names)})")
    problems: list[str] = []
    events: list[str] = []
    config: dict[str, Any] = {}
    sha, sha_source = None, NOT_RECORDED
    cfg_path = path / CONFIG_FILE
    if cfg_path.exists():
        try:
            raw = cfg_path.read_bytes()
            loaded = yaml.safe_load(raw.decode("utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
            sha, sha_source = hashlib.sha256(raw).hexdigest(), "sha256 of config.yaml, computed by the report"
        except (OSError, ValueError, yaml.YAMLError) as e:
            problems.append(f"config.yaml cannot be read ({type(e).__name__}); configuration not shown")
    final = _read_json(path / FINAL_FILE, problems)
    rounds = _read_rounds(path / ROUNDS_FILE, problems)
    local_summary = _read_json(path / LOCAL_ONLY_FILE, problems)
    failure = _read_json(path / FAILURE_FILE, problems) if final is None else None  # a finished resume supersedes it
    mode = _guess_mode(final, rounds, local_summary is not None)
    if final and isinstance(final.get("config_sha256"), str):
        recorded = final["config_sha256"]
        if sha is not None and recorded != sha:
            events.append("config_sha256 in final_metrics.json differs from the sha256 of config.yaml; the recorded "
                          "value is shown")
        sha, sha_source = recorded, "recorded by the run"
    run = RunData(path=path, mode=mode, config=config, config_sha256=sha, config_sha_source=sha_source,
                  rounds=rounds, final=final, problems=problems, events=events, local_summary=local_summary,
                  failure=failure)
    if local_summary is not None:
        sites = local_summary.get("sites") if isinstance(local_summary.get("sites"), dict) else {}
        for site, entry in sites.items():
            sub = path / str((entry or {}).get("run_dir") or Path("local") / site)
            try:
                run.local[str(site)] = load_run(sub)
            except ReportError as e:
                problems.append(f"local-only run of {site}: {e}")
                continue
            run.local[str(site)].label = f"local-only: {site}'s model"
            problems += [f"local-only run of {site}: {p}" for p in run.local[str(site)].problems]
        if not run.local:
            problems.append("local_only.json lists no readable per-site run")
    else:
        if mode == "federated":
            run.participation = _participation(run)
        _check_run(run)
    return run


def fmt_rounds(rounds: Sequence[int], word: bool = True) -> str:
    """Rounds as compact ranges: [3, 4] -> "rounds 3-4", [1, 3, 4] -> "rounds 1, 3-4", [2] -> "round 2"
    (without ``word``: "3-4", for table cells), so a run of many rounds still reads in one line."""
    nums = sorted(set(int(r) for r in rounds))
    spans: list[list[int]] = []
    for n in nums:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    if not nums:
        return "no round" if word else "none"
    return (("round " if len(nums) == 1 else "rounds ") if word else "") + text


def _keys(values: Any) -> list[str]:
    """Site keys of a record's list or mapping, as text (node ids are ints in lists, text in maps)."""
    return [str(k) for k in (values or [])]


def _participation(run: RunData) -> Participation:
    """Who took part in what: the configured sites against each round's train and validation
    records and the final test. A round is expected of every configured site (with partial
    sampling: of those sampled); a round not validated by design (``eval_every``) or skipped
    expects nothing."""
    configured, source = run.configured_sites, "the sites accepted at preflight"
    if configured is None and run.site_info:
        configured, source = list(run.site_info), "the sites in site_info"
    fed = run.section("federation")
    sampled_only = any(isinstance(fed.get(k), (int, float)) and fed[k] < 1
                       for k in ("fraction_train", "fraction_evaluate"))
    aggregated, val_sites, val_patients = [], {}, {}
    trained: dict[str, list[int]] = {}
    validated: dict[str, list[int]] = {}
    seen: list[str] = []
    expected_train: dict[int, list[str] | None] = {}
    expected_val: dict[int, list[str] | None] = {}
    for r in run.rounds:
        n = int(r["round"])
        train = r.get("train") or {}
        if r.get("status") == "aggregated":
            aggregated.append(n)
            keys = _keys(train.get("per_site"))
            for k in keys:
                trained.setdefault(k, []).append(n)
            expected_train[n] = _keys(train.get("sampled")) if sampled_only else None
            seen += [k for k in keys if k not in seen]
        val = r.get("val")
        if isinstance(val, dict):
            keys = _keys(val.get("per_site")) + [k for k in _keys(val.get("suppressed"))
                                                 if k not in _keys(val.get("per_site"))]
            val_sites[n], val_patients[n] = keys, val.get("patients")
            for k in keys:
                validated.setdefault(k, []).append(n)
            expected_val[n] = _keys(val.get("sampled")) if sampled_only else None
            seen += [k for k in keys if k not in seen]
    test = run.test
    tested = (_keys(test.get("per_site")) + _keys(test.get("suppressed"))) if test else []
    seen += [k for k in tested if k not in seen]
    if configured is None:
        configured, source = seen, "the sites the records name (the accepted sites are not recorded)"
    per_site = {}
    for k in configured:
        mt = [n for n, exp in expected_train.items() if n not in trained.get(k, []) and (exp is None or k in exp)]
        mv = [n for n, exp in expected_val.items() if n not in validated.get(k, []) and (exp is None or k in exp)]
        per_site[k] = SiteParticipation(k, trained.get(k, []), validated.get(k, []), mt, mv,
                                        (k in tested) if test is not None else None)
    part = Participation(sites=list(configured), source=source, aggregated=aggregated, val_sites=val_sites,
                         val_patients=val_patients, per_site=per_site, sampled_only=sampled_only)
    part.selection_warning = _selection_warning(run, part)
    return part


def _selection_warning(run: RunData, part: Participation) -> str | None:
    """Whether the selected round was validated by other sites than the rounds it was compared
    with (the validated training rounds; the initial model is measured, never selected)."""
    best = (run.final or {}).get("best_round")
    if not isinstance(best, int) or best not in part.val_sites:
        return None
    chosen = sorted(part.val_sites[best], key=natural_key)
    groups: dict[tuple[str, ...], list[int]] = {}
    for n, keys in part.val_sites.items():
        if n >= 1 and n != best and sorted(keys, key=natural_key) != chosen:
            groups.setdefault(tuple(sorted(keys, key=natural_key)), []).append(n)
    if not groups:
        return None

    def over(keys: Sequence[str], rounds: Sequence[int], only: str = "") -> str:
        pts = {part.val_patients.get(n) for n in rounds}
        patients = f"{pts.pop()} patients" if len(pts) == 1 else "patients " + "/".join(
            str(part.val_patients.get(n)) for n in rounds)
        return f"{fmt_sites(run, keys) if keys else 'no site'}{only} ({patients})"

    only = " only" if all(set(chosen) < set(g) for g in groups) else ""
    others = "; ".join(f"{fmt_rounds(rs)} {'was' if len(rs) == 1 else 'were'} validated by {over(keys, rs)}"
                       for keys, rs in groups.items())
    return (f"round {best} was selected on validation over {over(chosen, [best], only)}, while {others}: the "
            "selection compared validation values over different sites and patients, not like for like")


def fmt_sites(run: RunData, keys: Sequence[Any]) -> str:
    """Display names of sites, in natural order, comma-separated."""
    return ", ".join(sorted((run.site_name(k) for k in keys), key=natural_key))


def _check_run(run: RunData) -> None:
    """Fill ``problems`` and ``events`` from the records (a stopped run, skipped rounds, ...)."""
    p, ev = run.problems, run.events
    if run.mode != "evaluate":
        if run.failure is not None:
            f = run.failure
            last = f.get("last_checkpoint_round")
            p.append(f"the run failed ({f.get('error', 'error')}): {f.get('reason', 'no reason recorded')}; "
                     + (f"the last checkpoint is round {last}; resume the run to continue from it"
                        if last is not None else "no round was checkpointed; start the run again")
                     + "; there are no test results, only the rounds recorded so far")
        elif run.final is None:
            p.append("final_metrics.json is missing: the run did not finish (it was stopped, crashed or failed); "
                     "there are no test results, only the rounds recorded so far")
        if not run.rounds:
            p.append("rounds.jsonl is missing or empty: no round was recorded, so there are no learning curves")
        else:
            numbers = [int(r["round"]) for r in run.rounds]
            if run.missing_rounds:
                p.append(f"round(s) {', '.join(map(str, run.missing_rounds))} not recorded in rounds.jsonl")
            last = max(numbers)
            conf = run.rounds_configured
            if conf is not None and last < conf:
                p.append(f"only {last} of {conf} configured training rounds were recorded (the run stopped early)")
            every = int(run.section("federation").get("eval_every") or 1)  # validated every k-th round and the last
            for r in run.rounds:
                status = r.get("status")
                if status == "skipped":
                    p.append(f"round {r['round']} was skipped (no update aggregated): "
                             f"{r.get('skip_reason') or 'no reason recorded'}")
                elif status not in ("initial", "aggregated", "trained"):
                    p.append(f"round {r['round']} has status {status!r}")
                elif r.get("validation") == "pending" and not r.get("val"):
                    p.append(f"round {r['round']}'s model was never validated (its validation was to come with the "
                             "next message phase; the run stopped first)")
                elif (status != "initial" and not r.get("val")
                      and evaluation_round(int(r["round"]), conf or last, every)):
                    p.append(f"round {r['round']} has no validation record")
    if run.participation is not None:
        p.extend(_missed(run, run.participation))
    for r in run.rounds:
        train = r.get("train") or {}
        for d in train.get("dropped") or []:
            ev.append(f"round {r['round']}: the update of {run.site_name(d.get('node'))} was dropped "
                      f"({d.get('reason')})")
        for c in train.get("clamped") or []:
            ev.append(f"round {r['round']}: {run.site_name(c.get('node'))} claimed {c.get('claimed')} examples, "
                      f"{c.get('used')} were used for its weight")
        for d in (r.get("val") or {}).get("dropped") or []:
            ev.append(f"round {r['round']}: the validation reply of {run.site_name(d.get('node'))} was dropped "
                      f"({d.get('reason')})")
        if r.get("joined"):
            ev.append(f"round {r['round']}: {fmt_sites(run, r['joined'])} joined the federation")
    final = run.final or {}
    for site, why in (final.get("refused_sites") or (run.failure or {}).get("refused_sites") or {}).items():
        ev.append(f"{run.site_name(site)} was refused: {why}")
    for d in (run.test or {}).get("dropped") or []:
        ev.append(f"test: the reply of {run.site_name(d.get('node'))} was dropped ({d.get('reason')})")
    recorded_skips = final.get("skipped_rounds") or []
    if sorted(recorded_skips) != sorted(run.skipped) and run.rounds and run.final is not None:
        ev.append(f"final_metrics.json lists skipped rounds {recorded_skips}, rounds.jsonl {run.skipped}")


def _missed(run: RunData, part: Participation) -> list[str]:
    """One sentence per configured site that missed a step: "site_2 missed rounds 3-4 (training),
    the validation of rounds 2-4 and the final test"."""
    out = []
    for key, sp in part.per_site.items():
        what = []
        if sp.missed_train:
            what.append(f"{fmt_rounds(sp.missed_train)} (training)")
        if sp.missed_val:
            what.append(f"the validation of {fmt_rounds(sp.missed_val)}'s model" if len(sp.missed_val) == 1
                        else f"the validation of the models of {fmt_rounds(sp.missed_val)}")
        if sp.final_test is False:
            what.append("the final test")
        if what:
            joined = what[0] if len(what) == 1 else ", ".join(what[:-1]) + " and " + what[-1]
            out.append(f"{run.site_name(key)} missed {joined}")
    return out


def natural_key(name: str) -> list[tuple[int, Any]]:
    """Sort key putting site_2 before site_10 (node ids, all digits, sort numerically)."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", str(name)) if t]


def _short_path(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(path)


def label_runs(runs: Sequence[RunData]) -> None:
    """Set each run's ``label`` (mode and folder, numbered when two would read the same)."""
    seen: dict[str, int] = {}
    for run in runs:
        label = f"{run.mode}: {_short_path(run.path)}"
        seen[label] = seen.get(label, 0) + 1
        run.label = label if seen[label] == 1 else f"{label} ({seen[label]})"
