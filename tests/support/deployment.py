"""The deployment tier's federation (tests/deployment/): ``server.ops.loopback`` on synthetic sites.

``Processes`` (the ``deployment`` fixture) starts every process in its own session with a private
FLWR_HOME and stops all of it by PID, also on failure; ``Federation`` is a
``LoopbackFederation`` (TLS, ``--enable-supernode-auth``, SQLite state, registered keys, one
``flower-supernode`` per site) over synthetic site folders (``sim_cohort.write_features_cohort``)
that submits a staged copy of this checkout's app (``server.ops.simulate.stage_app``: the FAB the
processes install holds this checkout's packages) with a config baked into each run folder. The
fault helpers (``send_signal``, ``kill``, the SuperLink's restart, finding the ServerApp and
ClientApp processes) act on PIDs this harness started or found in its own FLWR_HOMEs only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.ops.loopback import CONNECTION as CONN
from server.ops.loopback import LoopbackFederation, Processes, cmdline, poll
from server.ops.simulate import dump_config, resolve_config, stage_app, write_run_config
from sim_cohort import SMALL, write_features_cohort

__all__ = ["CONN", "Processes", "Federation", "cmdline", "poll", "read_rounds", "round_record", "record_figures"]

ROOT = Path(__file__).resolve().parents[2]


def check_checkout() -> None:
    """The harness, and through the FAB the ServerApp and ClientApps, must run this checkout's code
    (an editable install of another checkout would otherwise win in this process)."""
    import server

    where = Path(server.__file__).resolve()
    if ROOT not in where.parents:
        raise AssertionError(f"`server` is imported from {where}, not from {ROOT}: run with PYTHONPATH={ROOT}")


class Federation(LoopbackFederation):
    """A loopback federation of ``sites`` synthetic sites of ``patients`` each.

    ``overrides``: config overrides on top of ``sim_cohort.SMALL`` (baked into each run's
    ``config.yaml``); ``keys``: key pairs made (default one per site).
    """

    def __init__(self, dep: Processes, base: Path, sites: int, overrides: Sequence[str] = (), patients: int = 24,
                 keys: int | None = None):
        check_checkout()
        cohort = write_features_cohort(base / "cohort", sites=sites, patients=patients)
        folders = sorted(p.resolve() for p in cohort.iterdir() if (p / "clinical.csv").is_file())
        assert len(folders) == sites, folders
        super().__init__(dep, base, folders, keys=keys)
        self.dep = dep
        yaml_in = base / "dep.yaml"
        yaml_in.write_text(f"name: dep-test\ndata:\n  sites_root: {cohort.resolve()}\n")
        self.cfg = resolve_config(yaml_in, [*SMALL, *overrides])
        self.config_text = dump_config(self.cfg)
        self.app: Path | None = None

    def run_dir(self, name: str) -> Path:
        d = (self.base / name).resolve()
        d.mkdir(exist_ok=True)
        if not (d / "config.yaml").exists():
            (d / "config.yaml").write_text(self.config_text)
        return d

    def submit(self, run_dir: Path, resume: bool = False) -> int:
        """``flwr run`` of the staged app for ``run_dir`` (its ``config.yaml``); the run id."""
        if self.app is None:
            self.app = stage_app(ROOT, self.base / "app")
        rc = write_run_config(self.base / f"run-config-{run_dir.name}-{int(resume)}.toml", {
            "config-path": str(run_dir / "config.yaml"), "overrides": "", "run-dir": str(run_dir),
            "resume": resume})
        return self.submit_app(self.app, rc)


def read_rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


def round_record(run_dir: Path, r: int) -> dict | None:
    """Round ``r``'s record in ``rounds.jsonl`` once it is written (None before)."""
    return next((rec for rec in read_rounds(run_dir) if rec.get("round") == r), None)


#: Set to a JSON path (benchmarks/results/reliability.json) to record the fault tests' figures there.
RESULTS_ENV = "SMM_RELIABILITY_RESULTS"


def _provenance():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import provenance
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return provenance


def _tree_state() -> str:
    """The checkout's commit now (at import: the code the session's tests run), ``+changes`` when
    tracked files differ from it."""
    commit = _provenance().git_commit()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("+changes" if dirty else "")


SESSION_COMMIT = _tree_state()


def record_figures(scenario: str, figures: dict[str, Any]) -> Path | None:
    """Merge one scenario's measured figures into the file ``$SMM_RELIABILITY_RESULTS`` names, each
    scenario with the date, the commit its session ran and the command; nothing when it is unset."""
    target = os.environ.get(RESULTS_ENV)
    if not target:
        return None
    provenance = _provenance()
    path = Path(target)
    data = json.loads(path.read_text()) if path.exists() else {}
    run = {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "commit": SESSION_COMMIT,
           "command": f"{RESULTS_ENV}={target} OMP_NUM_THREADS=1 python -m pytest {' '.join(sys.argv[1:])}"}
    data.update({"benchmark": "reliability", "machine": provenance.machine("flwr"), **run})
    data.setdefault("scenarios", {})[scenario] = {**figures, **run}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
