"""Scale: how the cost grows with the number of sites and with the patches per slide.

Why: the other benchmarks measure one size (the demo federation, the reference's 2,500 patches).
Before a larger federation or bigger slides, one needs to know whether time and memory grow
linearly, and which process holds the memory.

(a) **Sites.** Simulated federations of 2, 4, 8 and 16 sites with the same data per site: for each
site count ``smm synth --out DIR --sites K --patients-per-site P --features-only --feature-dim 64
--split 0.6,0.2,0.2 --seed 0`` and then ``smm simulate configs/demo.yaml`` (the demo's ``smm``
model, spatial layout) with ``data.sites_root=DIR``, ``model.feature_dim=64``, ``federation.rounds=R``,
``federation.local_epochs=1``, ``federation.min_nodes=K`` and ``federation.min_site_patients=1``
(at this size a site's validation and test splits hold 2 to 5 patients, under the demo's small-cell
limit of 5, so every site would skip evaluation and the evaluate phase would carry no work). These
are the commands a user runs, in subprocesses. From the run folder's ``rounds.jsonl``: per round the
server's wait / train / aggregate / evaluate seconds, each site's own ``train_round`` seconds and the
bytes sent and received; medians over rounds 2..R (round 1 is the warm-up: the first training in
each Ray actor; round 0, the initial model's evaluation, and the final test are not rounds). Also the
command's whole wall time and, sampled every 0.5 s, the resident memory of every process the command
started: the descendants of its PID and every process carrying the environment tag
``FEDSMM_BENCH_TAG=<uuid>`` that they all inherit (Ray's daemons and workers start sessions of their
own and may be re-parented to init; the idea of ``federation_overhead.py``). Recorded: the peak of
the sum of RSS over those processes at one instant (it counts shared pages, such as the torch
libraries, once per process), the peak of the sum of PSS (shared pages split between the processes
that map them, so the sum is what the tree really occupies) and the largest single process. Ray runs
``floor(cores / federation.client_cpus)`` ClientApps at a time (2 on a 2-core machine), whatever
the number of sites, so more sites means more sites one after another, not more processes.

(b) **Patches per slide.** 500, 2,500 and 10,000 patches: one training step (forward, multi-task loss
with the consistency terms, backward, ``pcgrad`` coordination, Adam step) and one forward pass of the
``smm`` model at the reference setting of ``model_speed.py`` (batch 1, 1,024-dim features, hidden
128, 59 + 361 genes, diagnosis head, 2 torch threads), through ``model_speed.run_one``. The seed
layout views a bag on a square token map: ceil(sqrt(n))^2 tokens (529 for 500 patches, the bag tiled
over it; 2,500 and 10,000 exactly). Each setting runs in its own process, so its peak memory
(``ru_maxrss``) is its own. Position bias ``table`` at every size, ``exact`` up to 2,500 patches
(``--exact-max-patches``; the JSON says why 10,000 is left out).

(c) **References**: the headline numbers of ``results/model_speed_cpu.json``,
``extract_speed_cpu.json`` and ``federation_overhead_cpu.json``, read when this runs, so this result
stands beside them.

Results go to ``benchmarks/results/scale_<device>.json`` (``scale_quick_<device>.json`` with
``--quick``); a table is printed at the end. The machine may be shared: the load average before each
run is recorded (and, per patch setting, the process's CPU seconds against its wall time). Nothing
here is asserted on time.

    python benchmarks/scale.py           # sites 2,4,8,16 x 20 patients, 3 rounds; 500 / 2,500 / 10,000
                                         # patches, table + exact up to 2,500, 3 repetitions (not yet
                                         # measured; estimated from the quick runs: 6 to 15 minutes on 2 CPU cores)
    python benchmarks/scale.py --quick   # sites 2,4 x 12 patients, 2 rounds; 500 / 2,500 patches, table only,
                                         # 1 repetition (make bench): 2.8 and 3.9 minutes on 2 CPU cores
                                         # shared with other jobs (load average 3 to 8)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402
from quality import QUIET_ENV, BenchmarkError, median, smm, training_rounds  # noqa: E402

# -- (a) sites ------------------------------------------------------------------------------------
DEMO_CONFIG = "configs/demo.yaml"  # relative to the repository root (the commands run there)
SITES_FULL, SITES_QUICK = (2, 4, 8, 16), (2, 4)
PATIENTS_FULL, PATIENTS_QUICK = 20, 12  # per site, the same at every site count
ROUNDS_FULL, ROUNDS_QUICK = 3, 2
FIRST_MEASURED_ROUND = 2  # round 1 is the warm-up
SITE_FEATURE_DIM = 64  # features-only cohort: small features, so the sites' data stays small
SPLIT = "0.6,0.2,0.2"
SYNTH_SEED = 0
LOCAL_EPOCHS = 1
# The demo's small-cell limit (5) would suppress every site's 2-5 validation / test patients here.
EVAL_MIN_SITE_PATIENTS = 1
SIM_TIMEOUT_S = 1800.0  # `smm simulate --timeout`: it stops its own run after this
SYNTH_TIMEOUT_S = 600.0
SAMPLE_PERIOD_S = 0.5  # memory sampling period while a simulation runs
# PSS (smaps_rollup) costs some milliseconds per large process, RSS (statm) almost nothing: PSS is
# read every this many samples only (the sampler's own CPU time is recorded: a few % of one core).
PSS_EVERY_SAMPLES = 4
STOP_GRACE_S = 30.0  # SIGTERM -> SIGKILL; `smm simulate` itself allows its processes 10 s
TAG_ENV = "FEDSMM_BENCH_TAG"  # every process of one command inherits TAG_ENV=<uuid>

# -- (b) patches per slide ------------------------------------------------------------------------
PATCHES_FULL, PATCHES_QUICK = (500, 2_500, 10_000), (500, 2_500)
EXACT_MAX_PATCHES = 2_500  # largest bag timed with position_bias "exact" (default)
REPS_FULL, REPS_QUICK = 3, 1  # timed steps after one warm-up
THREADS = 2  # torch threads, as model_speed.py
BATCH = 1
STEP_TIMEOUT_S = 1800.0  # one patch setting's process
REFERENCE_PATCHES = 2_500

# -- (c) references -------------------------------------------------------------------------------
REFERENCE_FILES = {"model_speed": "model_speed_cpu.json", "extract_speed": "extract_speed_cpu.json",
                   "federation_overhead": "federation_overhead_cpu.json"}

_PAGE = os.sysconf("SC_PAGE_SIZE")
GB = 1e9


# --------------------------------------------------------------------------------------------- #
# processes: start one command, sample its memory, stop all of it
# --------------------------------------------------------------------------------------------- #
def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a live, non-zombie process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(b")") + 2:].split()
    return None if fields[0] == b"Z" else (int(fields[1]), int(fields[19]))


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _has_env(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False


def _role(pid: int) -> str:
    """Which part of a simulation a process is, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    args = " ".join(argv)
    for key, role in (("smm_model.cli", "smm command"), ("flower-superlink", "flower-superlink"),
                      ("flower-superexec", "flower-superexec"), ("flwr-simulation", "flwr-simulation (server)"),
                      ("ClientAppActor", "Ray ClientAppActor (sites)")):
        if key in args:
            return role
    if any(Path(a).name == "flwr" for a in argv[:2]):
        return "flwr CLI (log stream, status polls)"
    if any(k in args for k in ("ray::", "/ray/", "raylet", "gcs_server")):
        return "Ray daemons and workers"
    return "other"


def _rss(pid: int) -> int:
    """Resident set size in bytes (OSError once the process is gone)."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def _pss(pid: int) -> int | None:
    """Proportional set size in bytes, or None where smaps_rollup is unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tagged_pids(tag: str) -> dict[int, int]:
    """Live processes (not this one) with ``TAG_ENV=tag`` in their environment: pid -> start time."""
    needle = f"{TAG_ENV}={tag}".encode()
    out = {}
    for pid in _pids():
        if pid != os.getpid() and _has_env(pid, needle) and (s := _stat(pid)) is not None:
            out[pid] = s[1]
    return out


def tree_pids(root: int, tag: str, known: dict[tuple[int, int], bool] | None = None) -> dict[int, int]:
    """The root, its descendants and every process carrying the tag: pid -> start time.

    ``known`` caches, per (pid, start time), whether a process carries the tag (its environment as
    started does not change), so repeated calls read each process's environment once."""
    needle = f"{TAG_ENV}={tag}".encode()
    known = {} if known is None else known
    stats = {pid: s for pid in _pids() if (s := _stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    found: dict[int, int] = {}
    for pid, (ppid, start) in stats.items():
        children.setdefault(ppid, []).append(pid)
        key = (pid, start)
        if key not in known:
            known[key] = _has_env(pid, needle)
        if known[key]:
            found[pid] = start
    if root in stats:
        found[root] = stats[root][1]
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child in stats:
                found[child] = stats[child][1]
                stack.append(child)
    found.pop(os.getpid(), None)
    return found


class TreeMemory:
    """Samples, every ``period`` seconds in a thread, the RSS and PSS of every process of one command
    (``tree_pids``): the peak of their sums at one instant, the largest single process, and every
    process seen (so the teardown can check each one by PID and start time).

    Processes shorter than a period, and peaks between two samples, can be missed."""

    def __init__(self, root: int, tag: str, period: float = SAMPLE_PERIOD_S):
        self.root, self.tag, self.period = root, tag, period
        self.seen: dict[int, int] = {}  # pid -> start time
        self.roles: dict[tuple[int, int], str] = {}
        self._tagged: dict[tuple[int, int], bool] = {}
        self.samples = 0
        self.sampler_cpu_s = 0.0
        self.peak_rss = {"bytes": 0}
        self.peak_pss = {"bytes": 0}
        self.largest = {"bytes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def sample(self) -> None:
        c0 = time.thread_time()
        rss_sum, pss_sum, by_role = 0, 0, {}
        with_pss = self.samples % PSS_EVERY_SAMPLES == 0
        pss_ok = with_pss
        for pid, start in tree_pids(self.root, self.tag, self._tagged).items():
            try:
                rss = _rss(pid)
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
            pss = _pss(pid) if with_pss else None
            self.seen[pid] = start
            role = self.roles.get((pid, start), "other")
            if role in ("other", "Ray daemons and workers"):  # a Ray worker renames itself once it hosts an actor
                role = self.roles[(pid, start)] = _role(pid)
            rss_sum += rss
            pss_ok = pss_ok and pss is not None
            pss_sum += pss or 0
            r = by_role.setdefault(role, {"processes": 0, "rss_gb": 0.0})
            r["processes"] += 1
            r["rss_gb"] += rss / GB
            if rss > self.largest["bytes"]:
                self.largest = {"bytes": rss, "role": role, "at_s": time.monotonic() - self._t0}
        at = time.monotonic() - self._t0
        if rss_sum > self.peak_rss["bytes"]:
            self.peak_rss = {"bytes": rss_sum, "at_s": at, "processes": sum(r["processes"] for r in by_role.values()),
                             "by_role": by_role}
        if pss_ok and pss_sum > self.peak_pss["bytes"]:
            self.peak_pss = {"bytes": pss_sum, "at_s": at}
        self.samples += 1
        self.sampler_cpu_s += time.thread_time() - c0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)

    def report(self) -> dict:
        def gb(d: dict) -> dict:
            return {("gb" if k == "bytes" else k): (v / GB if k == "bytes" else v) for k, v in d.items()}
        return {"peak_total_rss": gb(self.peak_rss), "peak_total_pss": gb(self.peak_pss),
                "largest_process_rss": gb(self.largest), "processes_seen": len(self.seen),
                "samples": self.samples, "sample_period_s": self.period,
                "pss_period_s": self.period * PSS_EVERY_SAMPLES, "sampler_cpu_s": self.sampler_cpu_s}


def _alive(pids: dict[int, int]) -> list[int]:
    """Those of ``pids`` (pid -> start time) still running as the same process."""
    return sorted(p for p, start in pids.items() if (s := _stat(p)) is not None and s[1] == start)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_all(proc: subprocess.Popen, tag: str, seen: dict[int, int]) -> list[int]:
    """Stop a command and everything it started, by PID; returns PIDs still alive (empty when clean).

    The command first gets SIGTERM to its own process group (``smm simulate`` then tears its
    simulation down itself); then every process of it still running, by the tag or as seen by the
    sampler, gets SIGTERM, and after ``STOP_GRACE_S`` SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # own session: its group id is its PID
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    mine = {**seen, **tagged_pids(tag)}
    if proc.poll() is None:
        s = _stat(proc.pid)
        if s is not None:
            mine[proc.pid] = s[1]
    _signal(_alive(mine), signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _alive(mine) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal(_alive(mine), signal.SIGKILL)
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(0.5)
    return _alive({**mine, **tagged_pids(tag)})


@dataclass
class Finished:
    returncode: int
    wall_s: float
    memory: dict | None = None
    leftover: list[int] = field(default_factory=list)


def run_tracked(cmd: list[str], log: Path, *, timeout_s: float, memory: bool = False) -> Finished:
    """Run ``cmd`` from the repository root in its own session with a fresh environment tag,
    output to ``log``; optionally sample its whole process tree's memory. Whatever happens
    (failure, timeout, Ctrl-C), every process it started is stopped before this returns or raises.
    A non-zero exit status is returned, not raised; a timeout raises ``BenchmarkError``."""
    tag = uuid.uuid4().hex
    env = {**os.environ, **QUIET_ENV, TAG_ENV: tag,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    log.parent.mkdir(parents=True, exist_ok=True)
    meter = None
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if memory:
                meter = TreeMemory(proc.pid, tag)
                with meter:
                    rc = proc.wait(timeout=timeout_s)
            else:
                rc = proc.wait(timeout=timeout_s)
            wall = time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"`{' '.join(cmd)}` still running after {timeout_s:.0f} s; stopped. Log: {log}"
                                 ) from None
        finally:
            left = stop_all(proc, tag, meter.seen if meter else {})
            if left:
                print(f"WARNING: process(es) {left} of `{' '.join(cmd[:4])} ...` still alive after teardown",
                      file=sys.stderr)
    return Finished(rc, wall, meter.report() if meter else None, left)


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------------------- #
# (a) sites
# --------------------------------------------------------------------------------------------- #
def read_rounds(run_dir: Path) -> list[dict]:
    """Per training round from ``rounds.jsonl``: the server's phase seconds, the sites' own
    ``train_round`` seconds, bytes."""
    out = []
    for rec in training_rounds(run_dir):
        r = int(rec["round"])
        t = rec["timings"]
        site_s = [float(m["seconds"]) for m in rec["train"]["per_site"].values()]
        phases = {k: float(t.get(k, 0.0)) for k in ("wait", "train", "aggregate", "evaluate")}
        out.append({"round": r, **{f"{k}_s": v for k, v in phases.items()}, "round_s": sum(phases.values()),
                    "sites_trained": len(site_s), "site_train_round_s_median": statistics.median(site_s),
                    "site_train_round_s_max": max(site_s), "site_train_round_s_sum": sum(site_s),
                    # sites' own training seconds per second of train phase: how many ran at once
                    "sites_at_once": sum(site_s) / phases["train"] if phases["train"] > 0 else None,
                    "bytes_sent": int(rec["bytes"]["sent"]), "bytes_received": int(rec["bytes"]["received"])})
    return out


def split_counts(cohort: Path) -> dict[str, list[int]]:
    """Patients per split per site, from the sites' clinical.csv."""
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for site in sorted(cohort.glob("site_*"), key=lambda p: int(p.name.split("_")[1])):
        with (site / "clinical.csv").open(newline="") as f:
            splits = [row["split"] for row in csv.DictReader(f)]
        for k in out:
            out[k].append(splits.count(k))
    return out


def simulate_overrides(cohort: Path | str, sites: int | str, rounds: int) -> list[str]:
    return [f"data.sites_root={cohort}", f"model.feature_dim={SITE_FEATURE_DIM}", f"federation.rounds={rounds}",
            f"federation.local_epochs={LOCAL_EPOCHS}", f"federation.min_nodes={sites}",
            f"federation.min_site_patients={EVAL_MIN_SITE_PATIENTS}"]


def run_sites(sites: int, patients: int, rounds: int, base: Path) -> dict:
    """One site count: synthesise the cohort, simulate it with memory sampling, read the run."""
    cohort, run_dir = base / f"cohort-{sites}", base / f"run-{sites}"
    synth_s = smm(["synth", "--out", cohort, "--sites", sites, "--patients-per-site", patients, "--features-only",
                   "--feature-dim", SITE_FEATURE_DIM, "--split", SPLIT, "--seed", SYNTH_SEED],
                  base / f"synth-{sites}.log", timeout=SYNTH_TIMEOUT_S)
    cmd = [sys.executable, "-m", "smm_model.cli", "simulate", DEMO_CONFIG, "--run-dir", str(run_dir),
           "--timeout", f"{SIM_TIMEOUT_S:g}"]
    for o in simulate_overrides(cohort, sites, rounds):
        cmd += ["--set", o]
    log = base / f"simulate-{sites}.log"
    load0 = os.getloadavg()[0]
    done = run_tracked(cmd, log, timeout_s=SIM_TIMEOUT_S + 2 * STOP_GRACE_S, memory=True)
    if done.returncode != 0:
        raise BenchmarkError(f"`smm simulate` with {sites} sites exited {done.returncode}; log {log}:\n{_tail(log)}")
    per_round = read_rounds(run_dir)
    measured = [r for r in per_round if r["round"] >= FIRST_MEASURED_ROUND]
    if not measured:
        raise BenchmarkError(f"{run_dir}: no round >= {FIRST_MEASURED_ROUND} recorded")
    keys = [k for k in measured[0] if k not in ("round", "sites_trained")]
    summary = {k: median(r[k] for r in measured) for k in keys}
    summary["bytes_per_round"] = summary["bytes_sent"] + summary["bytes_received"]
    summary["bytes_per_round_per_site"] = summary["bytes_per_round"] / sites
    summary["round_s_per_site"] = summary["round_s"] / sites
    counts = split_counts(cohort)
    return {"sites": sites, "patients_per_site": patients, "patients_by_split": counts,
            "train_patients": sum(counts["train"]), "synth_s": synth_s, "command_wall_s": done.wall_s,
            "outside_rounds_s": done.wall_s - sum(r["round_s"] for r in per_round),
            "load_average_before": load0, "rounds_measured": [r["round"] for r in measured],
            "median": summary, "per_round": per_round, "memory": done.memory,
            "leftover_processes": len(done.leftover)}


# --------------------------------------------------------------------------------------------- #
# (b) patches per slide
# --------------------------------------------------------------------------------------------- #
def tokens_for(n_patches: int) -> int:
    """Tokens of the seed layout's square map for a bag of ``n_patches`` (as model_speed.run_one)."""
    return (math.isqrt(n_patches - 1) + 1) ** 2


def run_patches(mode: str, n: int, reps: int, device: str, base: Path) -> dict:
    """One (mode, patches) setting in its own process (its own ru_maxrss)."""
    out = base / f"step-{mode}-{n}.json"
    log = base / f"step-{mode}-{n}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-step", mode, str(n), "--reps", str(reps),
           "--device", device, "--json-out", str(out)]
    load0 = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = run_tracked(cmd, log, timeout_s=STEP_TIMEOUT_S)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # now includes the reaped step process
    if done.returncode != 0 or not out.is_file():
        raise BenchmarkError(f"{mode} at {n} patches exited {done.returncode}; log {log}:\n{_tail(log)}")
    r = json.loads(out.read_text())
    r.update({"patches": n, "tokens": tokens_for(n), "grid_size": math.isqrt(tokens_for(n)),
              "process_wall_s": done.wall_s, "load_average_before": load0,
              "process_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)})
    return r


def exact_skip_reason(n: int, exact_max: int, quick: bool, measured: list[dict]) -> str:
    """Why the exact mode was not timed at ``n`` patches, with a linear estimate where possible."""
    if quick:
        return "--quick times the table mode only"
    why = (f"above --exact-max-patches {exact_max}, to keep the run short: the exact mode evaluates the "
           "position-bias MLP on every query-key pair (tokens x key_grid^2 sampled keys x offset groups) in the "
           "forward pass and again in backward")
    done = [r for r in measured if r["mode"] == "exact"]
    if done:
        big = max(done, key=lambda r: r["tokens"])
        est = big["train_step_s_median"] * tokens_for(n) / big["tokens"]
        why += (f"; its cost grows linearly with the tokens, so about {est:.0f} s per step here (from this run's "
                f"{big['train_step_s_median']:.2f} s at {big['patches']:,} patches)")
    return why + f"; `--exact-max-patches {n}` measures it"


def one_step(mode: str, n: int, reps: int, device: str, json_out: Path) -> int:
    """Child process: ``model_speed.run_one`` at ``n`` patches, JSON to ``json_out``."""
    from model_speed import run_one

    json_out.write_text(json.dumps(run_one(mode, BATCH, reps, device, THREADS, n_patches=n)) + "\n")
    return 0


# --------------------------------------------------------------------------------------------- #
# (c) references
# --------------------------------------------------------------------------------------------- #
def references() -> dict:
    """Headline numbers of the other result files, read now (missing files or keys are said so)."""
    out: dict = {}
    for name, fname in REFERENCE_FILES.items():
        path = RESULTS / fname
        entry: dict = {"file": f"benchmarks/results/{fname}"}
        try:
            d = json.loads(path.read_text())
            entry.update({"date": d.get("date"), "commit": d.get("git_commit") or d.get("commit")})
            if name == "model_speed":
                entry["batch_1"] = {r["mode"]: {"train_step_s": r["train_step_s_median"],
                                                "forward_s": r["forward_s_median"], "peak_rss_gb": r["peak_rss_gb"]}
                                    for r in d["results"] if r.get("batch") == 1}
                entry["patches"] = d.get("setting", {}).get("patches")
            elif name == "extract_speed":
                s = d["summary"]
                entry["patches_per_s"] = {k: s.get(k) for k in ("plain_loop_patches_per_s", "null_best_patches_per_s",
                                                                "resnet50_bare_patches_per_s",
                                                                "resnet50_pipeline_best_patches_per_s")}
            else:
                entry["sites"] = d.get("setting", {}).get("cohort", {}).get("sites")
                for mode in ("simulation", "deployment"):
                    s = (d.get(mode) or {}).get("summary") or {}
                    entry[mode] = {"round_s": s.get("round_train_aggregate_evaluate_s"),
                                   "overhead_train_aggregate": s.get("overhead_train_aggregate"),
                                   "bytes_per_round_per_site": s.get("bytes_per_round_per_site")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            entry["missing"] = f"{type(e).__name__}: {e}"
        out[name] = entry
    return out


# --------------------------------------------------------------------------------------------- #
# the benchmark
# --------------------------------------------------------------------------------------------- #
def _uncommitted() -> list[str]:
    """Product files that differ from the commit (others may be editing the checkout)."""
    try:
        out = subprocess.check_output(["git", "diff", "--name-only", "HEAD", "--", "client", "server", "smm_model",
                                       "configs", "benchmarks/model_speed.py", "pyproject.toml"], cwd=ROOT, text=True)
    except (OSError, subprocess.CalledProcessError):
        return ["unknown"]
    return out.split()


def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def print_tables(result: dict) -> None:
    rows = result["results"]["sites"]
    if rows:
        base = rows[0]["median"]["round_s"]
        print(f"\n(a) sites: median of rounds {FIRST_MEASURED_ROUND}..{result['setting']['sites']['rounds']}, "
              f"{result['setting']['sites']['concurrent_clientapps']} ClientApps at a time")
        print("| sites | train patients | round (s) | x smallest | train | evaluate | aggregate | site train_round | "
              "sites at once | MB / round | command (s) | peak RSS sum (GB) | peak PSS sum (GB) | largest process "
              "(GB) | processes | load before |")
        print("|" + " --- |" * 16)
        for r in rows:
            m, mem = r["median"], r["memory"]
            big = mem["largest_process_rss"]
            print(f"| {r['sites']} | {r['train_patients']} | {m['round_s']:.2f} | {m['round_s'] / base:.1f}x | "
                  f"{m['train_s']:.2f} | {m['evaluate_s']:.2f} | {m['aggregate_s']:.3f} | "
                  f"{m['site_train_round_s_median']:.2f} | {_f(m['sites_at_once'], '.1f')} | "
                  f"{m['bytes_per_round'] / 1e6:.2f} | {r['command_wall_s']:.0f} | "
                  f"{mem['peak_total_rss']['gb']:.2f} | {_f(mem['peak_total_pss'].get('gb'))} | "
                  f"{big['gb']:.2f} ({big.get('role', '-')}) | {mem['peak_total_rss'].get('processes', '-')} | "
                  f"{r['load_average_before']:.1f} |")
    steps = result["results"]["patches"]
    if steps:
        ref = {r["mode"]: r["train_step_s_median"] for r in steps if r["patches"] == REFERENCE_PATCHES}
        print(f"\n(b) patches per slide: batch {BATCH}, {THREADS} threads, median of "
              f"{result['setting']['patches']['reps']} step(s) after a warm-up")
        print("| patches | tokens | position bias | forward (s) | train step (s) | x 2,500 | peak RSS (GB) | "
              "RSS after setup (GB) | load before |")
        print("|" + " --- |" * 9)
        for r in steps:
            rel = r["train_step_s_median"] / ref[r["mode"]] if r["mode"] in ref else None
            print(f"| {r['patches']:,} | {r['tokens']:,} | {r['mode']} | {r['forward_s_median']:.3f} | "
                  f"{r['train_step_s_median']:.3f} | {_f(rel)} | {r['peak_rss_gb']:.2f} | "
                  f"{r['rss_after_setup_gb']:.2f} | {r['load_average_before']:.1f} |")
        for s in result["results"]["patches_skipped"]:
            print(f"not run: {s['mode']} at {s['patches']:,} patches ({s['why']})")
    print("\n(c) references")
    refs = result["references"]
    ms = refs["model_speed"]
    if "missing" not in ms:
        print(f"  {ms['file']} ({ms['date']}, {ms['commit']}): batch 1 at {ms.get('patches')} patches: "
              + ", ".join(f"{k} step {v['train_step_s']:.3f} s, peak {v['peak_rss_gb']:.2f} GB"
                          for k, v in ms["batch_1"].items()))
    ex = refs["extract_speed"]
    if "missing" not in ex:
        p = ex["patches_per_s"]
        print(f"  {ex['file']} ({ex['date']}, {ex['commit']}): plain OpenSlide loop "
              f"{_f(p['plain_loop_patches_per_s'], '.0f')}, null encoder {_f(p['null_best_patches_per_s'], '.0f')}, "
              f"resnet50_trunc {_f(p['resnet50_pipeline_best_patches_per_s'], '.1f')} patches/s")
    fo = refs["federation_overhead"]
    if "missing" not in fo:
        print(f"  {fo['file']} ({fo['date']}, {fo['commit']}): {fo.get('sites')} sites, round "
              + ", ".join(f"{m} {_f(fo[m]['round_s'])} s (overhead {_f(fo[m]['overhead_train_aggregate'], '.0%')})"
                          for m in ("simulation", "deployment") if fo.get(m, {}).get("round_s") is not None))
    for name, e in refs.items():
        if "missing" in e:
            print(f"  {name}: {e['file']} not read ({e['missing']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"sites {SITES_QUICK} x {PATIENTS_QUICK} patients, {ROUNDS_QUICK} rounds; patches "
                         f"{PATCHES_QUICK}, table only, {REPS_QUICK} repetition (make bench)")
    ap.add_argument("--sites", type=int, nargs="+", help=f"site counts (default {SITES_FULL})")
    ap.add_argument("--patients", type=int, help=f"patients per site (default {PATIENTS_FULL})")
    ap.add_argument("--rounds", type=int, help=f"federated rounds (default {ROUNDS_FULL}; round 1 is the warm-up)")
    ap.add_argument("--patches", type=int, nargs="+", help=f"patches per slide (default {PATCHES_FULL})")
    ap.add_argument("--exact-max-patches", type=int, default=None, metavar="N",
                    help=f"also time position_bias 'exact' up to N patches (default {EXACT_MAX_PATCHES}; "
                         "0 = never; --quick: never)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sites", "patches"], help="leave out a part")
    ap.add_argument("--work", type=Path, metavar="DIR",
                    help="keep the cohorts, run folders and logs under DIR (default: a temporary folder, removed)")
    ap.add_argument("--one-step", nargs=2, metavar=("MODE", "PATCHES"), help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=None, help=f"timed train steps per patch setting (default "
                                                           f"{REPS_FULL}; --quick {REPS_QUICK})")
    ap.add_argument("--device", default="cpu", help="device of the patch steps (b), as model_speed.py's; it names "
                                                    "the result file (default cpu)")
    ap.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_step:  # child process: one patch setting
        return one_step(args.one_step[0], int(args.one_step[1]), args.reps or REPS_FULL, args.device, args.json_out)

    q = args.quick
    site_counts = args.sites or (SITES_QUICK if q else SITES_FULL)
    patients = args.patients or (PATIENTS_QUICK if q else PATIENTS_FULL)
    rounds = args.rounds or (ROUNDS_QUICK if q else ROUNDS_FULL)
    patch_counts = args.patches or (PATCHES_QUICK if q else PATCHES_FULL)
    reps = args.reps or (REPS_QUICK if q else REPS_FULL)
    exact_max = args.exact_max_patches if args.exact_max_patches is not None else (0 if q else EXACT_MAX_PATCHES)
    if rounds < FIRST_MEASURED_ROUND:
        ap.error(f"--rounds must be >= {FIRST_MEASURED_ROUND} (round 1 is the warm-up)")
    if min(site_counts) < 1 or min(patch_counts) < 1 or patients < 1 or reps < 1:
        ap.error("site counts, patients, patches and --reps must be positive")

    from smm_model.config import ExperimentConfig
    from smm_model.nn.model import build_model, count_parameters

    t_all = time.monotonic()
    cores = os.cpu_count() or 1
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix=f"scale-{datetime.now():%Y%m%d-%H%M%S}-", dir=args.work)).resolve()
    else:
        base = Path(tempfile.mkdtemp(prefix="fedsmm-scale-")).resolve()
    # The resolved demo config (validated; the sites' folders do not exist yet)
    cfg = ExperimentConfig.from_yaml_text((ROOT / DEMO_CONFIG).read_text(),
                                          [o for o in simulate_overrides(base, min(site_counts), rounds)
                                           if not o.startswith("data.sites_root")], source=DEMO_CONFIG)
    client_cpus = float(cfg.federation.client_cpus)
    concurrent = max(1, int(cores // client_cpus))
    params = count_parameters(build_model(cfg.model))
    modes = [("table", n) for n in patch_counts] + [("exact", n) for n in patch_counts if n <= exact_max]
    skipped = [{"mode": "exact", "patches": n} for n in patch_counts if n > exact_max]
    result = {
        "benchmark": "scale",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "git_commit": provenance.git_commit(),
        "uncommitted_changes": _uncommitted(),
        "machine": provenance.machine("flwr", "ray", "numpy"),
        "setting": {
            "sites": {
                "site_counts": list(site_counts), "patients_per_site": patients, "rounds": rounds,
                "rounds_measured_from": FIRST_MEASURED_ROUND,
                "synth": (f"smm synth --out DIR --sites K --patients-per-site {patients} --features-only "
                          f"--feature-dim {SITE_FEATURE_DIM} --split {SPLIT} --seed {SYNTH_SEED}"),
                "simulate": f"smm simulate {DEMO_CONFIG} --run-dir RUN --timeout {SIM_TIMEOUT_S:g} "
                            + " ".join(f"--set {o}" for o in simulate_overrides("DIR", "K", rounds)),
                "why_min_site_patients": "the demo's small-cell limit (5) is above these sites' 2-5 validation and "
                                         "test patients: every site would skip evaluation",
                "model": {"arch": cfg.model.arch, "layout": cfg.model.layout, "params": params,
                          "weight_bytes_float32": 4 * params},
                "batch_size": cfg.train.batch_size, "local_epochs": LOCAL_EPOCHS, "client_cpus": client_cpus,
                "client_gpus": float(cfg.federation.client_gpus), "train_device": cfg.train.device,
                "concurrent_clientapps": concurrent,
                "concurrency_note": (f"Ray runs floor(cores / client_cpus) = floor({cores} / {client_cpus:g}) = "
                                     f"{concurrent} ClientApps at a time whatever the number of sites: more sites run "
                                     "one after another in the same actors, so the process count stays flat"),
                "memory_note": (f"RSS sampled every {SAMPLE_PERIOD_S:g} s, PSS every "
                                f"{SAMPLE_PERIOD_S * PSS_EVERY_SAMPLES:g} s, over the command's process tree "
                                "(descendants of its PID and "
                                f"every process with {TAG_ENV}=<uuid> in its environment); the RSS sum counts shared "
                                "pages (torch's libraries, Ray's object store) once per process, the PSS sum splits "
                                "them, so it is the tree's real footprint; peaks shorter than a sampling period can "
                                "be missed; this benchmark's own process is not counted"),
                "round_s": "wait + train + aggregate + evaluate of rounds.jsonl (the checkpoint write is not in it)",
                "sites_at_once": "sum of the sites' train_round seconds / train phase seconds",
                "outside_rounds_s": "command wall time minus rounds 1..R: start (SuperLink, Ray), round 0, final "
                                    "test, report, teardown",
            },
            "patches": {"patch_counts": list(patch_counts), "device": args.device, "batch": BATCH,
                        "threads": THREADS, "reps": reps,
                        "warmup": 1, "feature_dim": 1024, "hidden": 128, "genes": [59, 361], "task": "diagnosis",
                        "loss": "CE + 0.5 consistency x 2", "coordination": "pcgrad", "optimizer": "Adam",
                        "layout": "seed: ceil(sqrt(n))^2 tokens on a square map, a smaller bag tiled over it",
                        "via": "benchmarks/model_speed.py run_one(n_patches=...), one process per setting",
                        "peak": "ru_maxrss of that process, in model_speed.py's unit (KiB / 1e6)"},
        },
        "load_average": {"start": os.getloadavg()},
        "results": {"sites": [], "patches": [], "patches_skipped": skipped},
    }
    print(f"scale: {'quick' if q else 'full'}; sites {list(site_counts)} x {patients} patients, {rounds} rounds "
          f"({params:,} parameters, {concurrent} ClientApps at a time); patches {list(patch_counts)}; "
          f"{cores} cores, load average {os.getloadavg()[0]:.2f}; work folder {base}", flush=True)
    leftover = 0
    try:
        if "sites" not in args.skip:
            for k in site_counts:
                r = run_sites(k, patients, rounds, base)
                leftover += r["leftover_processes"]
                result["results"]["sites"].append(r)
                m, mem = r["median"], r["memory"]
                print(f"  {k:2d} sites: round {m['round_s']:.2f} s (train {m['train_s']:.2f}, evaluate "
                      f"{m['evaluate_s']:.2f}), command {r['command_wall_s']:.0f} s, peak RSS sum "
                      f"{mem['peak_total_rss']['gb']:.2f} GB, PSS sum {_f(mem['peak_total_pss'].get('gb'))} GB",
                      flush=True)
        if "patches" not in args.skip:
            for mode, n in modes:
                r = run_patches(mode, n, reps, args.device, base)
                result["results"]["patches"].append(r)
                print(f"  {mode:5s} {n:6,d} patches: forward {r['forward_s_median']:.3f} s, train step "
                      f"{r['train_step_s_median']:.3f} s, peak {r['peak_rss_gb']:.2f} GB", flush=True)
    finally:
        if args.work:
            print(f"kept {base}")
        else:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    for s in skipped:
        s["why"] = exact_skip_reason(s["patches"], exact_max, q, result["results"]["patches"])
    result["references"] = references()
    result["load_average"]["end"] = os.getloadavg()
    result["leftover_processes"] = leftover
    result["total_s"] = time.monotonic() - t_all
    print_tables(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{'scale_quick' if q else 'scale'}_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ntotal {result['total_s']:.0f} s; wrote {path}")
    if leftover:
        print(f"WARNING: {leftover} process(es) left running after teardown", file=sys.stderr)
    return 1 if leftover else 0


def _sigterm_to_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)  # so every `finally` teardown runs
    try:
        sys.exit(main())
    except BenchmarkError as e:
        print(f"scale: {e}", file=sys.stderr)
        sys.exit(1)
