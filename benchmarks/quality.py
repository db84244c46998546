"""Shared parts of the benchmarks that drive ``smm`` commands and read their run folders
(``tcga_quality.py``, ``synthetic_quality.py``; ``scale.py`` and ``federation_overhead.py`` use the
command runner and the round reader).

Each benchmark drives the ``smm`` commands a user runs (``smm centralized``, ``smm centralized
--local-only``, ``smm simulate``) in subprocesses and reads their run folders afterwards, so a
benchmark number is what a user of the same command would get, not a figure from a special path.

Local-only runs are summarised by pooling each site's own test statistics (confusion matrices,
score histograms, within-site C-index pair counts: additive, the same way the federation pools
sites) and computing the metrics from the sum, so all three training modes are read on the same
patients with the same estimator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402

from server.ops.simulate import FLOWER_ENV  # noqa: E402
from smm_model.contract.runfolder import FINAL_FILE, LOCAL_ONLY_FILE, ROUNDS_FILE, read_rounds_file  # noqa: E402

#: Flower and Ray settings every federated subprocess gets (their home: server.ops.simulate)
QUIET_ENV = FLOWER_ENV

#: (task, metric) pairs the paper's tables report, in table order
CLASSIFICATION_METRICS = ("auc", "accuracy", "macro_f1")
PAPER_METRICS: tuple[str, ...] = tuple(f"{t}.{m}" for t in ("diagnosis", "grade") for m in CLASSIFICATION_METRICS
                                       ) + ("survival.c_index",)


class BenchmarkError(RuntimeError):
    """A run the benchmark needs failed; the message names the command and its log."""


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the ``finally`` below, which stops the child's process group


def smm(args: Sequence[str], log: Path, *, timeout: float = 7200.0) -> float:
    """Run ``smm ARGS`` with output to ``log``; return its wall time in seconds, raise on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **QUIET_ENV}
    cmd = [sys.executable, "-m", "smm_model.cli", *map(str, args)]
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    t0 = time.perf_counter()
    with log.open("w") as out:
        # Own process group, stopped with everything under it if this benchmark is interrupted or
        # times out (a federation leaves a SuperLink, Ray and ClientApps behind otherwise).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise BenchmarkError(f"`smm {' '.join(map(str, args))}` exited {proc.returncode}; log {log}:\n{tail}")
    return wall


def load_final(run_dir: Path) -> dict[str, Any]:
    path = run_dir / FINAL_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{path}: cannot read the run's final metrics ({e})") from e


def test_values(run_dir: Path) -> dict[str, float]:
    """The pooled test metrics of a centralized or federated run folder."""
    final = load_final(run_dir)
    return {k: float(v) for k, v in final["test"]["global"]["values"].items() if v is not None}


def round_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run folder's ``rounds.jsonl`` (round 0, the initial evaluation, included),
    read strictly: a benchmark measures finished runs, so an unreadable file, a torn last line or
    a line that is not a round record is an error naming the file."""
    path = run_dir / ROUNDS_FILE
    try:
        rounds = read_rounds_file(path)
        if rounds.torn:
            raise ValueError(f"{path}: the last line is incomplete (the run stopped while writing it)")
        return rounds.strict()
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"{path}: cannot read the run's rounds ({e})") from e


def selected_validation(run_dir: Path) -> dict[str, Any]:
    """The selected round and its pooled validation metrics (``rounds.jsonl``): what the run's
    ``selection_metric`` chose on, and what a protocol is chosen on (never the test patients)."""
    best = load_final(run_dir)["best_round"]
    for rec in round_records(run_dir):
        if rec.get("round") == best and rec.get("val"):
            return {"round": best, "values": {k: float(v) for k, v in rec["val"]["global"]["values"].items()
                                              if v is not None}}
    raise BenchmarkError(f"{run_dir / 'rounds.jsonl'}: no validation record for the selected round {best}")


def training_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The training rounds of a run folder's ``rounds.jsonl`` (round 0, the initial model's
    evaluation, left out). A round that was not aggregated has no timings to measure, so it is an
    error naming the round and its reason, not a gap in a median."""
    path = run_dir / ROUNDS_FILE
    out = []
    for rec in round_records(run_dir):
        r = int(rec["round"])
        if r == 0:
            continue
        if rec.get("status") != "aggregated":
            raise BenchmarkError(f"{path}: round {r} was {rec.get('status')} ({rec.get('skip_reason')})")
        out.append(rec)
    return out


def median(xs: Iterable[float | None]) -> float | None:
    """Median of the values that exist (None where a run did not measure one)."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pooled_local_values(local_root: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Local-only (``RUN_DIR`` of ``smm centralized --local-only``): every site's model on its own
    test split, statistics summed over sites, metrics computed from the sum. Also returns, per
    site, its own test metrics and patient count (sites below ``min_site_patients`` are suppressed
    and counted as such)."""
    from smm_model.config import ExperimentConfig
    from smm_model.contract.protocol import EvalStats, metrics_from_eval

    table = json.loads((local_root / "local_only.json").read_text())
    parts, per_site, n_classes = [], {}, None
    for site, row in sorted(table["sites"].items()):
        run_dir = local_root / row["run_dir"]
        final = load_final(run_dir)
        if n_classes is None:
            cfg = ExperimentConfig.from_yaml_text((run_dir / "config.yaml").read_text(), source=str(run_dir))
            n_classes = cfg.model.n_classes
        glob = final["test"]["global"]
        per_site[site] = {"patients": final["test"]["patients"], "values": glob["values"]}
        if glob.get("stats") and final["test"]["patients"]:
            # Each site's Kaplan-Meier counts lie on its own time grid (its own preprocessing), so
            # they do not add up: the pooled local-only row has no log-rank test.
            parts.append(dataclasses.replace(EvalStats.from_record(glob["stats"]), km=None, km_groups=0))
    if not parts:
        raise BenchmarkError(f"{local_root}: no site has test statistics")
    report = metrics_from_eval(EvalStats.merge(parts), n_classes)
    values = {k: float(v) for k, v in report.to_dict()["values"].items() if v is not None}
    return values, per_site


def run_mode(mode: str, config: Path, run_dir: Path, sets: Sequence[str], log: Path, clean: bool = True
             ) -> dict[str, Any]:
    """One training run the way a user starts it: ``centralized``, ``local-only`` or a federation
    (``smm simulate``; the strategy is whatever ``sets`` and the config say). Returns the pooled test
    ``values``, the command's ``wall_s`` and, where there is one, the selected round."""
    if mode == "centralized":
        args = ["centralized", config, "--run-dir", run_dir]
    elif mode == "local-only":
        args = ["centralized", config, "--run-dir", run_dir, "--local-only"]
    elif mode == "federated":
        args = ["simulate", config, "--run-dir", run_dir]
    else:
        raise ValueError(f"unknown mode {mode!r}; expected centralized, local-only or federated")
    for s in sets:
        args += ["--set", s]
    wall = smm(args, log)
    return mode_result(mode, run_dir, wall, clean)


#: Settings of the server's aggregation, which pooled training (``smm centralized``, also
#: ``--local-only``) never reads: a pooled run that differs from the wanted one only in these is the
#: same run.
AGGREGATION_ONLY = ("strategy", "server_lr", "server_momentum", "server_beta_1", "server_beta_2", "server_tau")


def run_or_reuse(mode: str, config: Path, run_dir: Path, sets: Sequence[str], log: Path, clean: bool = True
                 ) -> dict[str, Any]:
    """``run_mode``, unless ``run_dir`` already holds that run finished (``finished``), whose result
    is read instead: a stopped benchmark continues. A run folder that is not that run (interrupted,
    or of another config) is removed and run again."""
    if finished(mode, run_dir, config, sets):
        return mode_result(mode, run_dir, None, clean)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return run_mode(mode, config, run_dir, sets, log, clean)


def finished(mode: str, run_dir: Path, config: Path, sets: Sequence[str]) -> bool:
    """Whether ``run_dir`` holds a finished run of ``mode`` (its last file, written atomically) with
    the same resolved configuration as ``config`` plus ``sets`` would give (so a work folder kept
    from a --quick run or an older config is not taken for this one). For pooled modes the
    federation's aggregation settings (``AGGREGATION_ONLY``) are left out of the comparison."""
    import yaml

    from smm_model.config import ConfigError, ExperimentConfig
    from smm_model.contract.protocol import config_text

    if not (run_dir / (LOCAL_ONLY_FILE if mode == "local-only" else FINAL_FILE)).is_file():
        return False
    want = config_text(ExperimentConfig.from_yaml_text(config.read_text(), [str(s) for s in sets], source=str(config)))
    path = run_dir / "config.yaml"
    if not path.is_file():
        return False
    try:  # read like the run would be: a key added since the run was made takes its default
        saved = config_text(ExperimentConfig.from_yaml_text(path.read_text(), source=str(path)))
    except ConfigError:
        return False
    if mode == "federated":
        return saved == want

    def pooled_part(text: str) -> dict:
        cfg = yaml.safe_load(text)
        for key in AGGREGATION_ONLY:
            cfg.get("federation", {}).pop(key, None)
        return cfg

    return pooled_part(saved) == pooled_part(want)


def mode_result(mode: str, run_dir: Path, wall: float | None, clean: bool = True) -> dict[str, Any]:
    """What ``run_mode`` returns, read from a finished run folder (``wall``: the command's time, or
    None for a run found finished in a work folder, whose own ``wall_s`` is then used). ``clean``:
    refuse a run that skipped a round or dropped a reply (``require_clean``); off only where such
    losses are the measured outcome (a protocol that diverges, ``protocol_choice.py``)."""
    if mode == "local-only":
        values, per_site = pooled_local_values(run_dir)
        return {"values": values, "per_site": per_site, "wall_s": None if wall is None else round(wall, 1)}
    final = load_final(run_dir)
    if clean:
        require_clean(run_dir, final)
    wall = final.get("wall_s") if wall is None else wall
    return {"values": test_values(run_dir), "wall_s": None if wall is None else round(float(wall), 1),
            "best_round": final["best_round"], "test_patients": final["test"]["patients"],
            "val_values": selected_validation(run_dir)["values"]}


def require_clean(run_dir: Path, final: Mapping[str, Any]) -> None:
    """A benchmark number comes only from a run in which every round was aggregated, no site's
    reply was dropped and the test split was evaluated: a run that lost sites to an error (for
    example its data changing under it) still finishes, and would otherwise be recorded as a
    result of the protocol."""
    if not final["test"].get("patients"):
        raise BenchmarkError(f"{run_dir}: the final test covers no patients ({final['test'].get('reason')})")
    path = run_dir / ROUNDS_FILE
    for rec in round_records(run_dir):
        if int(rec.get("round", 0)) == 0:
            continue
        dropped = [*(rec.get("train") or {}).get("dropped", []), *(rec.get("val") or {}).get("dropped", [])]
        if rec.get("status") not in ("aggregated", "trained") or dropped:
            raise BenchmarkError(f"{path}: round {rec.get('round')} was {rec.get('status')} with "
                                 f"{len(dropped)} dropped repl(y/ies); a benchmark run must be clean")


def print_row(prefix: str, row: Mapping[str, Any]) -> None:
    v = row["values"]
    wall = "reused" if row.get("wall_s") is None else f"{row['wall_s']:5.0f} s"  # a finished run read back
    print(f"{prefix} ({wall}): "
          + ", ".join(f"{m} {v.get(m, float('nan')):.3f}" for m in PAPER_METRICS), flush=True)


def mean_sd(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation over folds (or seeds), NaN-free values only (no sd from one)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def differences(a: Sequence[Mapping[str, float]], b: Sequence[Mapping[str, float]], per: str = "per_fold",
                metrics: Sequence[str] = PAPER_METRICS) -> dict[str, dict[str, Any]]:
    """Per metric (default: the paper's): ``a[k] - b[k]`` for paired runs k (same fold or cohort),
    listed under ``per`` and summarised as mean ± sd; a paired difference is what a fold-to-fold
    spread hides."""
    res = {}
    for m in metrics:
        d = [x.get(m, float("nan")) - y.get(m, float("nan")) for x, y in zip(a, b, strict=True)]
        res[m] = {per: d, **mean_sd(d)}
    return res


def summarise(per_fold: Mapping[str, Sequence[Mapping[str, float]]], metrics: Sequence[str]
              ) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """``{mode: [values of fold k]}`` -> ``{mode: {metric: {mean, sd, n}}}``."""
    return {mode: {m: mean_sd([f.get(m, float("nan")) for f in folds]) for m in metrics}
            for mode, folds in per_fold.items()}


def fmt(cell: Mapping[str, Any], scale: float = 100.0) -> str:
    if cell.get("mean") is None:
        return "n/a"
    if cell.get("sd") is None:  # a single fold or seed
        return f"{cell['mean'] * scale:.1f}"
    return f"{cell['mean'] * scale:.1f} ± {cell['sd'] * scale:.1f}"


def markdown_table(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str],
                   extra_rows: Mapping[str, Mapping[str, float]] | None = None, label: str = "mode") -> str:
    """Rows (modes or models), metrics as columns, mean ± sd in percent (the paper's convention)."""
    head = f"| {label} | " + " | ".join(metrics) + " |"
    lines = [head, "|" + " --- |" * (len(metrics) + 1)]
    for mode, cells in summary.items():
        lines.append(f"| {mode} | " + " | ".join(fmt(cells[m]) for m in metrics) + " |")
    for name, row in (extra_rows or {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{row[m]:.1f}" if m in row else "–" for m in metrics) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def work_folder(work: Path | None, prefix: str) -> Iterator[Path]:
    """``--work DIR`` (created, kept with its run folders and reports) or a temporary folder that is
    removed afterwards, also on errors."""
    if work is not None:
        work = work.resolve()
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def result_header(benchmark: str, script: str, argv: Sequence[str] | None, t0: float) -> dict[str, Any]:
    """What every results file starts with: the benchmark, when, the command, the commit, the
    machine and versions, and the wall time since ``t0`` (``time.perf_counter()``)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/" + " ".join([Path(script).name, *args]),
            "commit": provenance.git_commit(), "machine": provenance.machine("flwr", "numpy", "sklearn"),
            "wall_s": round(time.perf_counter() - t0, 1)}


def write_result(payload: Mapping[str, Any], quick: bool) -> Path:
    """``results/<benchmark>[_quick]_<cpu|gpu>.json``, written atomically: a quick run never
    overwrites the full result."""
    device = "gpu" if "gpu" in payload["machine"] else "cpu"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{payload['benchmark']}{'_quick' if quick else ''}_{device}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
