"""Federation overhead: a simulated and a deployed round against the same local training done directly.

A fixed synthetic workload at the demo size: ``client.cohorts.synth.write_cohort`` writes a features-only
cohort of the shape ``make demo`` builds (3 sites x 60 patients, the patch grid of 1,024-px slides,
a 60/15/25 train/val/test split, 1,024-dim features, 20 + 30 genes) into a temporary folder, and
every run below uses ``configs/demo.yaml`` (its model,
local epochs, batch size, optimiser) with ``data.sites_root`` pointing there, ``federation.rounds``
set to the benchmark's round count and ``federation.min_nodes`` to the number of sites (so a
SuperNode that connects a moment late cannot start the run without it; with fraction 1.0 every
round trains all sites either way). It measures:

1. **direct**: the same rounds without Flower. Each site's ``client.local.round.train_round`` (load
   the site, build the dataset and model, ``client.local.train.train_epochs``, copy the weights out) and
   ``evaluate_round`` on "val" run in worker processes of a ``ProcessPoolExecutor`` with the
   concurrency and torch threads of the federation compared with: the simulation's (Ray runs
   ``floor(cores / federation.client_cpus)`` ClientApps at a time, each with ``client_cpus``
   threads) or the deployment's (every site at once, ``--deployment-threads`` each). Same shared
   statistics (the sites' preflight summaries through ``derive_shared``), same initial weights,
   same per-round learning rate, weights averaged between rounds. It runs right before and right
   after each federated run (the machine may be shared; both runs count in the medians).
   Measured: the wall time from handing the sites their work until the last one is done (the
   makespan), per site the ``train_round`` seconds and the part inside ``train_epochs``;
2. **simulation**: ``smm simulate`` (``server.ops.simulate.Simulation``: its own SuperLink, Ray,
   every process stopped) on that cohort;
3. **deployment**: a loopback deployment as ``tests/deployment`` runs it: ``smm certs``, one
   ``flower-superlink`` with TLS, SuperNode authentication and SQLite state, the keys registered,
   one ``flower-supernode`` per site with its own FLWR_HOME and ``site-dir``, ``flwr run`` of a
   staged copy of the app. The sites share this machine, so each SuperNode's ClientApps get
   ``cores // sites`` torch threads (at least 1; ``OMP_NUM_THREADS``), as the simulation's sites
   get ``client_cpus``; ``--deployment-threads 0`` leaves torch's default, as a SuperNode alone on
   its own machine would run. Every process is stopped by PID afterwards, also on errors.

A round is one message phase (issue 14): the train message makes each site first validate the model
it received (the previous round's global model), then train; its ``seconds`` hold both. Runs of
older commits had a separate evaluate phase per round; the overhead "with evaluation" compares
either kind with the direct training + evaluation.

From each run folder: ``rounds.jsonl`` (per round ``timings`` wait/train/aggregate/evaluate, each
site's own ``seconds``, ``bytes`` sent/received), the ``server.log`` time stamps of the round lines
(the whole round, checkpoint included) and each site's log (when its training started and ended,
so the train phase splits into dispatch, the sites' work and collecting the replies). While a
federated run is going, every process it started (found by an environment tag they inherit) has
its CPU time sampled once a second, per Flower component, next to the whole machine's. Round 1
is the warm-up (first training step of each worker / actor / ClientApp process) and is left out
of the medians; so are round 0 (the initial model, validated by round 1's messages), the last
round's own validation phase and the final test evaluation.

Overhead = (federated round wall time - the direct local work of that round) / federated round
wall time, with the round as ``train + aggregate`` against the direct training makespan, and as
``train + aggregate + evaluate`` against the direct training + evaluation makespans. A second
figure needs no baseline from another moment: the train phase beyond the makespan of the sites'
own ``train_round`` seconds in the same round, plus aggregation, as a share of ``train +
aggregate``. Results go to ``benchmarks/results/federation_overhead_<device>.json``.

    python benchmarks/federation_overhead.py            # 4 rounds (11 to 15 minutes on 2 CPU cores)
    python benchmarks/federation_overhead.py --quick    # 2 rounds (7 to 10 minutes; make bench)
    python benchmarks/federation_overhead.py --skip simulation --local-steps 60   # ~20 s of local work a round
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402
from quality import median, training_rounds  # noqa: E402

# Worker processes of the direct baseline start like `spawn` and re-import this module: everything
# heavy (torch, the project) is imported inside functions.

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_SPLIT = (0.6, 0.15, 0.25)  # `make demo`'s smm synth --split
# The targets (issue 14), on the whole round against the direct local work (validation + training):
# under 10 % simulated and 50 % deployed at the demo size, and under 20 % deployed with about 20 s
# of local work per site and round (``--local-steps 60``).
TARGETS = {"simulation": 0.10, "deployment": 0.50}
TARGETS_LONG_ROUND = {"simulation": 0.10, "deployment": 0.20}
LONG_ROUND_STEPS = 60
CONN = "bench"
# The line that ends round N ("round N/ROUNDS: ..."; round 0's: the initial model written).
_ROUND_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO fedsmm\.server: round (\d+)/\d+:")


# --------------------------------------------------------------------------------------------- #
# direct baseline (worker side)
# --------------------------------------------------------------------------------------------- #
_W: dict = {}


def _worker_init(threads: int | None) -> None:
    """A worker: torch threads as in the federation compared with, and a timer around the trainer."""
    import torch

    import client.local.round as fed

    if threads:
        torch.set_num_threads(int(threads))
    inner = fed.train_epochs

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            _W["trainer_s"] = time.perf_counter() - t0

    fed.train_epochs = timed  # this worker process only: train_round calls it through the module


def _worker_cfg(text: str):
    from smm_model.config import ExperimentConfig

    if _W.get("cfg_text") != text:
        _W["cfg_text"], _W["cfg"] = text, ExperimentConfig.from_yaml_text(text, source="benchmark config")
    return _W["cfg"]


def _warm(_: int) -> int:
    import torch  # noqa: F401

    import client.local.round  # noqa: F401

    time.sleep(0.5)  # hold this worker so the next warm-up goes to another one
    return os.getpid()


def _site_train(site: str, cfg_text: str, shared_json: str, weights: dict, lr: float, epochs: int,
                rnd: int) -> tuple[dict, dict]:
    import torch

    from client.local.round import train_round
    from smm_model.contract.protocol import SharedStats

    cfg = _worker_cfg(cfg_text)
    shared = SharedStats.from_json(shared_json)
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    # local_steps as the server sends it (KEY_LOCAL_STEPS): 0 = ``epochs`` passes instead
    new, metrics, *_ = train_round(site, cfg, shared, state, lr, epochs, server_round=rnd,
                                   local_steps=int(cfg.federation.local_steps))
    return ({k: v.numpy() for k, v in new.items()},
            {"seconds": float(metrics["seconds"]), "trainer_s": float(_W.get("trainer_s", float("nan"))),
             "num_examples": int(metrics["num-examples"]), "pid": os.getpid(),
             "threads": torch.get_num_threads()})


def _site_eval(site: str, cfg_text: str, shared_json: str, weights: dict, split: str) -> dict:
    import torch

    from client.local.round import evaluate_round
    from smm_model.contract.protocol import SharedStats

    cfg = _worker_cfg(cfg_text)
    t0 = time.perf_counter()
    stats = evaluate_round(site, cfg, SharedStats.from_json(shared_json),
                           {k: torch.from_numpy(v) for k, v in weights.items()}, split)
    return {"seconds": time.perf_counter() - t0, "n": int(stats.n), "pid": os.getpid()}


# --------------------------------------------------------------------------------------------- #
# direct baseline (driver)
# --------------------------------------------------------------------------------------------- #
def shared_stats(cfg, sites: list[Path]) -> str:
    """The federation's shared statistics, derived the way the server does from site summaries."""
    from client.local.round import preflight_summary
    from smm_model.contract.protocol import derive_shared

    return derive_shared([preflight_summary(s, cfg) for s in sites], cfg).to_json()


def run_direct(cfg, sites: list[Path], workers: int, threads: int | None, rounds: int) -> dict:
    """The federation's rounds without Flower: per round, every site's train_round in ``workers``
    processes (makespan timed here), weights averaged by training patients, then evaluate_round
    on "val" the same way."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    from server.federation.loop import initial_weights
    from smm_model.contract.protocol import config_text, round_lr

    text = config_text(cfg)
    shared = shared_stats(cfg, sites)
    weights = initial_weights(cfg)
    out: list[dict] = []
    t_start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as ex:
        list(ex.map(_warm, range(workers)))
        for r in range(1, rounds + 1):
            lr = round_lr(cfg.train, rounds, r)
            t0 = time.perf_counter()
            futs = [ex.submit(_site_train, str(s), text, shared, weights, lr, cfg.federation.local_epochs, r)
                    for s in sites]
            res = [f.result() for f in futs]
            train_s = time.perf_counter() - t0
            n = np.array([m["num_examples"] for _, m in res], dtype=np.float64)
            t0 = time.perf_counter()
            weights = {k: sum(w[k].astype(np.float64) * (ni / n.sum()) for (w, _), ni in zip(res, n))
                       .astype(weights[k].dtype) for k in weights}
            aggregate_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            evs = [f.result() for f in [ex.submit(_site_eval, str(s), text, shared, weights, "val") for s in sites]]
            evaluate_s = time.perf_counter() - t0
            out.append({"round": r, "train_s": train_s, "aggregate_s": aggregate_s, "evaluate_s": evaluate_s,
                        "per_site": {s.name: m for s, (_, m) in zip(sites, res)},
                        "eval_per_site": {s.name: e for s, e in zip(sites, evs)}})
            print(f"  direct round {r}: train {train_s:.2f} s (sites "
                  + ", ".join(f"{m['seconds']:.2f}" for _, m in res) + f"), evaluate {evaluate_s:.2f} s", flush=True)
    return {"workers": workers, "threads": threads or "torch default", "rounds": out,
            "total_s": time.perf_counter() - t_start}


# --------------------------------------------------------------------------------------------- #
# run folders
# --------------------------------------------------------------------------------------------- #
def makespan(times: list[float], workers: int) -> float:
    """Shortest wall time for these jobs on ``workers`` identical workers (exhaustive; few sites)."""
    if workers >= len(times):
        return max(times, default=0.0)
    best = float("inf")
    for assign in itertools.product(range(workers), repeat=len(times)):
        loads = [0.0] * workers
        for t, w in zip(times, assign):
            loads[w] += t
        best = min(best, max(loads))
    return best


def read_run(run_dir: Path, workers: int) -> list[dict]:
    """Per training round: the server's phase timings, the whole round from server.log, the sites'
    own seconds and their makespan on ``workers``, bytes."""
    stamps = round_stamps(run_dir)
    out = []
    recs = training_rounds(run_dir)
    # One message phase per round: only the last round's record has an evaluate phase (its model's
    # validation, once per run); it is kept apart so that the medians are per-round costs.
    single_phase = len(recs) > 1 and not any("evaluate" in rec["timings"] for rec in recs[:-1])
    for rec in recs:
        r = int(rec["round"])
        t = dict(rec["timings"])
        last_validation = t.pop("evaluate", None) if single_phase and rec is recs[-1] else None
        site_s = [float(m["seconds"]) for m in rec["train"]["per_site"].values()]
        out.append({"round": r, "wait_s": t.get("wait", 0.0), "train_s": t["train"], "aggregate_s": t["aggregate"],
                    "evaluate_s": t.get("evaluate", 0.0),
                    "round_s": (stamps[r] - stamps[r - 1]) if r in stamps and r - 1 in stamps else None,
                    "site_seconds": site_s, "site_makespan_s": makespan(site_s, workers),
                    "sites": len(site_s), "bytes_sent": rec["bytes"]["sent"],
                    "bytes_received": rec["bytes"]["received"],
                    **({"last_validation_phase_s": last_validation} if last_validation is not None else {})})
    return out


def summarise(fed_rounds: list[dict], direct: dict, first: int, timeline: list[dict] | None = None) -> dict:
    """Medians over rounds >= ``first`` and the overhead fractions against the direct baseline."""
    fr = [r for r in fed_rounds if r["round"] >= first]
    fr_all = fed_rounds
    dr = [r for r in direct["rounds"] if r["round"] >= first]
    med = lambda rows, key: median(r[key] for r in rows)  # noqa: E731
    train, agg, ev = med(fr, "train_s"), med(fr, "aggregate_s"), med(fr, "evaluate_s")
    d_train, d_eval = med(dr, "train_s"), med(dr, "evaluate_s")
    d_site = median(m["seconds"] for r in dr for m in r["per_site"].values())
    d_trainer = median(m["trainer_s"] for r in dr for m in r["per_site"].values())
    d_sum = median(sum(m["seconds"] for m in r["per_site"].values()) for r in dr)
    f_site = median(s for r in fr for s in r["site_seconds"])
    round_ta = median(r["train_s"] + r["aggregate_s"] for r in fr)
    round_tae = median(r["train_s"] + r["aggregate_s"] + r["evaluate_s"] for r in fr)
    whole = med(fr, "round_s")
    n_sites = fr[0]["sites"] if fr else 0
    s = {
        "rounds_measured": [r["round"] for r in fr],
        "round_train_aggregate_s": round_ta,
        "round_train_aggregate_evaluate_s": round_tae,
        "round_whole_s": whole,
        "train_s": train, "aggregate_s": agg, "evaluate_s": ev,
        "wait_s": med(fr, "wait_s"),
        "site_train_round_s_in_federation": f_site,
        "site_makespan_in_federation_s": med(fr, "site_makespan_s"),
        "direct_train_makespan_s": d_train,
        "direct_evaluate_makespan_s": d_eval,
        "direct_site_train_round_s": d_site,
        "direct_site_trainer_s": d_trainer,
        "direct_sum_of_sites_s": d_sum,
        "bytes_per_round_per_site": {"sent": median(r["bytes_sent"] / r["sites"] for r in fr),
                                     "received": median(r["bytes_received"] / r["sites"] for r in fr)},
        "sites": n_sites,
    }
    if round_ta and d_train is not None:
        s["overhead_train_aggregate"] = (round_ta - d_train) / round_ta
        s["overhead_train_aggregate_evaluate"] = (round_tae - d_train - d_eval) / round_tae
        if whole:
            s["overhead_whole_round"] = (whole - d_train - d_eval) / whole
        # where the train phase's extra time goes: messaging/dispatch (train phase beyond the sites'
        # own train_round makespan) and slower sites (their own makespan beyond the direct one)
        s["train_phase_messaging_s"] = train - s["site_makespan_in_federation_s"]
        # the same without the direct baseline (immune to the machine's load changing between the
        # runs): the train phase beyond the sites' own makespan, plus aggregation
        s["overhead_messaging_share"] = (s["train_phase_messaging_s"] + agg) / round_ta
        # one message phase per round (no evaluate phase in the measured rounds): the sites' seconds
        # hold validation and training, against the direct training + evaluation
        single_phase = not any(r["evaluate_s"] for r in fr_all)
        s["single_phase"] = single_phase
        s["train_phase_slower_sites_s"] = s["site_makespan_in_federation_s"] - d_train - (d_eval if single_phase else 0.0)
        s["evaluate_extra_s"] = ev - d_eval
        s["checkpoint_and_other_s"] = (whole - (s["wait_s"] or 0.0) - round_tae) if whole else None
    for when, run in direct.get("runs", {}).items():
        s[f"direct_train_makespan_s_{when}"] = median(r["train_s"] for r in run["rounds"] if r["round"] >= first)
    tl = [r for r in (timeline or []) if r["round"] >= first]
    for key in ("dispatch_s", "dispatch_max_s", "collect_s", "eval_last_site_done_s", "eval_collect_s"):
        s[f"timeline_{key}"] = median(r.get(key) for r in tl)
    return s


# --------------------------------------------------------------------------------------------- #
# where the time goes: CPU per Flower component, and each site's dispatch / collect latency
# --------------------------------------------------------------------------------------------- #
TAG_ENV = "FEDSMM_BENCH_RUN"  # set for the duration of one federated run; every process it starts inherits it
_CLK = os.sysconf("SC_CLK_TCK")


def _role(args: str) -> str:
    for key, role in (("flower-superlink", "flower-superlink"), ("flower-supernode", "flower-supernode"),
                      ("flower-superexec", "flower-superexec"), ("flwr-serverapp", "flwr-serverapp (our server)"),
                      ("flwr-clientapp", "flwr-clientapp (our sites)"),
                      ("flwr-simulation", "flwr-simulation (our server)"),
                      ("ClientAppActor", "Ray ClientAppActor (our sites)")):
        if key in args:
            return role
    if "ray" in args or "gcs_server" in args or "raylet" in args:
        return "Ray daemons and workers"
    if "/flwr " in args + " " or args.split()[1:2] and args.split()[1].endswith("/flwr"):
        return "flwr CLI (run / ls / log)"
    return "other"


def _machine_busy_s() -> float:
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / _CLK  # all but idle and iowait


class CpuMeter:
    """Samples, every ``period`` seconds in a thread, the CPU time of every process carrying
    ``TAG_ENV=tag`` (each process's largest value seen, so a short-lived process counts up to its
    last sample), and the whole machine's busy time: what our run used, per component, and what
    everyone else on the machine used meanwhile."""

    def __init__(self, tag: str, period: float = 1.0):
        import threading

        self.needle = f"{TAG_ENV}={tag}".encode()
        self.period = period
        self.seen: dict[tuple[int, int], tuple[str, float]] = {}  # (pid, start) -> (role, cpu s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if self.needle not in (d / "environ").read_bytes().split(b"\0"):
                    continue
                stat = (d / "stat").read_text()
                args = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()
            cpu = (int(f[11]) + int(f[12])) / _CLK  # utime + stime (children counted on their own)
            key = (int(d.name), int(f[19]))
            role, before = self.seen.get(key, ("other", 0.0))
            now = _role(args)  # a Ray worker renames itself once it hosts an actor: keep the most specific
            if role in ("other", "Ray daemons and workers"):
                role = now
            self.seen[key] = (role, max(cpu, before))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def __enter__(self) -> "CpuMeter":
        self.t0, self.busy0 = time.monotonic(), _machine_busy_s()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.wall = time.monotonic() - self.t0
        self.machine_busy = _machine_busy_s() - self.busy0

    def report(self) -> dict:
        roles: dict[str, dict] = {}
        for role, cpu in self.seen.values():
            r = roles.setdefault(role, {"processes": 0, "cpu_s": 0.0})
            r["processes"] += 1
            r["cpu_s"] += cpu
        ours = sum(r["cpu_s"] for r in roles.values())
        return {"wall_s": self.wall, "machine_busy_cpu_s": self.machine_busy, "ours_cpu_s": ours,
                "others_cpu_s": max(0.0, self.machine_busy - ours),
                "machine_cores_busy_mean": self.machine_busy / self.wall if self.wall else None,
                "by_component": dict(sorted(roles.items(), key=lambda kv: -kv[1]["cpu_s"]))}


_SITE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO (train|evaluate) round (\d+)"
                        r"(?: on (\w+))?:.*?(?:, ([\d.]+) s)?$")


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def round_stamps(run_dir: Path) -> dict[int, float]:
    """Round -> time stamp of the server.log line that ends it (the first such line per round)."""
    stamps: dict[int, float] = {}
    for line in (run_dir / "server.log").read_text(errors="replace").splitlines():
        m = _ROUND_LINE.match(line)
        if m:
            stamps.setdefault(int(m[2]), _stamp(m[1]))
    return stamps


def site_timeline(site_logs: list[Path], run_dir: Path) -> list[dict]:
    """Per round, from the server's round lines and each site's own log (time stamps of one clock):
    ``dispatch_s``, median over sites of (site's train_round start - train phase start), i.e. the
    server sending, the site picking the message up and starting its ClientApp; ``collect_s``,
    from the last site's train_round end to the end of the server's train phase (reply sent, server
    pulling it); and the same for the federated evaluation (site end only: ``eval_last_site_done_s``
    after the evaluate phase started, against its phase length)."""
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    rounds = {int(rec["round"]): rec for rec in records}
    stamps = round_stamps(run_dir)
    train: dict[int, list[tuple[float, float]]] = {}
    evals: dict[int, list[float]] = {}
    for path in site_logs:
        for line in path.read_text(errors="replace").splitlines():
            m = _SITE_LINE.match(line)
            if not m:
                continue
            r = int(m[3])
            if m[2] == "train" and m[5]:
                end = _stamp(m[1])
                train.setdefault(r, []).append((end - float(m[5]), end))
            elif m[2] == "evaluate" and m[4] == "val":
                evals.setdefault(r, []).append(_stamp(m[1]))
    out = []
    for r, rec in sorted(rounds.items()):
        if r == 0 or r - 1 not in stamps or r not in train:
            continue
        t = rec["timings"]
        start = stamps[r - 1] + t.get("wait", 0.0)
        end = start + t["train"]
        row = {"round": r, "dispatch_s": statistics.median(s - start for s, _ in train[r]),
               "dispatch_max_s": max(s - start for s, _ in train[r]),
               "collect_s": end - max(e for _, e in train[r])}
        if r in evals and "evaluate" in t:
            ev_start = end + t["aggregate"]
            row["eval_last_site_done_s"] = max(evals[r]) - ev_start
            row["eval_collect_s"] = ev_start + t["evaluate"] - max(evals[r])
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------- #
# simulation
# --------------------------------------------------------------------------------------------- #
def run_simulation(cfg, run_dir: Path, log_path: Path, timeout_s: float) -> dict:
    from server.ops.simulate import CONNECTION, Simulation, count_sites

    class Sim(Simulation):
        def wait(self) -> str:  # also keep `flwr ls` of the finished run (traffic, compute time)
            status = super().wait()
            try:
                res = self._flwr("ls", CONNECTION, "--run-id", str(self.run_id), "--format", "json", timeout=60.0)
                self.ls = self._json(res.stdout)
            except (ValueError, OSError, subprocess.SubprocessError):
                self.ls = None
            return status

    with log_path.open("w") as echo:
        sim = Sim(cfg, run_dir, timeout_s=timeout_s, echo=echo)
        status = sim.run(count_sites(cfg.data))
    if status != "finished:completed":
        raise RuntimeError(f"simulation ended {status!r}; see {log_path} and {run_dir}")
    return {"status": status, "timings": sim.timings, "flwr_ls": getattr(sim, "ls", None)}


# --------------------------------------------------------------------------------------------- #
# deployment
# --------------------------------------------------------------------------------------------- #
def thread_env(threads: int | None) -> dict[str, str]:
    """Environment that caps torch's intra-op threads in the SuperNodes' ClientApp processes (they
    inherit it through flower-superexec); none for torch's default."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


def clientapp_start_s(threads: int | None, reps: int = 3) -> float:
    """Median seconds for a fresh Python process to import the ClientApp (torch, flwr, the project):
    what every message costs a SuperNode before the handler runs (Flower starts one
    ``flwr-clientapp`` process per message)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.app"], cwd=ROOT, check=True,
                       env={**os.environ, **thread_env(threads), "PYTHONPATH": str(ROOT)})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_deployment(cfg, sites: list[Path], base: Path, run_dir: Path, timeout_s: float,
                   threads: int | None) -> dict:
    """The run on a loopback deployment (``server.ops.loopback``: a SuperLink with TLS, SuperNode
    authentication and SQLite state, the keys registered, one ``flower-supernode`` per site), timed
    in its steps; every process is stopped by PID afterwards and the leftovers counted."""
    from server.ops.flwr_cli import cli_json
    from server.ops.loopback import LoopbackFederation, Processes
    from server.ops.simulate import dump_config, stage_app, write_run_config

    timings: dict[str, float] = {}
    t_start = time.monotonic()
    procs = Processes(base)
    try:
        fed = LoopbackFederation(procs, base, sites, supernode_env=thread_env(threads), connection=CONN)
        run_dir.mkdir(parents=True)
        config = run_dir / "config.yaml"
        config.write_text(dump_config(cfg))
        run_config = write_run_config(base / "run-config.toml", {
            "config-path": str(config.resolve()), "overrides": "", "run-dir": str(run_dir.resolve()),
            "resume": False})

        fed.start_superlink()
        t0 = time.monotonic()
        for k in range(1, len(sites) + 1):
            fed.register(k)
        timings["register_s"] = time.monotonic() - t0
        for k in range(1, len(sites) + 1):
            fed.start_supernode(k)

        app = stage_app(ROOT, base / "app")
        t0 = time.monotonic()
        run_id = fed.submit_app(app, run_config)
        timings["submit_s"] = time.monotonic() - t0
        # The run folder's final metrics are free to watch; `flwr ls` only now and then: each call is
        # a Python process of a few CPU-seconds that would compete with the run on a small machine.
        status = fed.wait_finished(run_id, timeout_s, every_s=30.0, watch=tuple(procs.procs),
                                   done=lambda: (run_dir / "final_metrics.json").exists())
        timings["run_s"] = time.monotonic() - t0
        if status != "finished:completed":
            raise RuntimeError(f"deployed run {run_id} status {status!r}\n{fed.diagnostics(run_id, ['supernode-1'])}")
        try:
            ls = cli_json(fed.flwr("ls", CONN, "--run-id", str(run_id), "--format", "json", timeout=60).stdout)
        except ValueError:
            ls = None
        return {"status": status, "run_id": str(run_id), "timings": timings, "flwr_ls": ls, "tls": True,
                "supernode_auth": True, "clientapp_threads": threads or "torch default"}
    finally:
        t0 = time.monotonic()
        left = procs.stop()
        timings["stop_s"] = time.monotonic() - t0
        timings["total_s"] = time.monotonic() - t_start
        if left:
            print(f"WARNING: deployment processes {left} still alive after teardown", file=sys.stderr)
        timings["leftover_processes"] = len(left)


# --------------------------------------------------------------------------------------------- #
# the benchmark
# --------------------------------------------------------------------------------------------- #
def _flower_processes() -> list[str]:
    """Every Flower / Ray process on the machine (`ps`), ours or anyone's."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    pat = re.compile(r"flower|superexec|flwr|raylet")
    return [line.strip()[:160] for line in out.splitlines()[1:]
            if pat.search(line) and "federation_overhead" not in line and "ps -eo" not in line]


def _uncommitted() -> list[str]:
    """Product files that differ from the commit (others may be editing the checkout)."""
    try:
        out = subprocess.check_output(["git", "diff", "--name-only", "HEAD", "--", "client", "server", "smm_model",
                                       "configs", "pyproject.toml"], cwd=ROOT, text=True)
    except (OSError, subprocess.CalledProcessError):
        return ["unknown"]
    return out.split()


def _fmt(x, unit: str = "", pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f} %" if pct else f"{x:.2f}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds (round 2 measured)")
    ap.add_argument("--rounds", type=int, default=4, help="federated rounds (default 4; round 1 is warm-up)")
    ap.add_argument("--patients", type=int, default=60, help="patients per site (demo: 60)")
    ap.add_argument("--slide-size", type=int, default=1024, help="synthetic slide side in px (demo: 1024)")
    ap.add_argument("--sites", type=int, default=3, help="sites (demo: 3)")
    ap.add_argument("--local-steps", type=int, default=None, metavar="N",
                    help=f"optimizer steps per site and round (demo: configs/demo.yaml's 9); {LONG_ROUND_STEPS} "
                         "gives about 20 s of local work a round, where the deployed target is 20 %%")
    ap.add_argument("--skip", nargs="*", default=[], choices=["simulation", "deployment"],
                    help="leave out a federated mode (and its direct baseline)")
    ap.add_argument("--deployment-threads", type=int, default=None, metavar="N",
                    help="torch threads of each SuperNode's ClientApp (OMP_NUM_THREADS) and of the deployment's "
                         "direct baseline; default cores // sites (at least 1): the sites share this one "
                         "machine; 0 = torch's default, as a SuperNode on its own machine runs")
    ap.add_argument("--timeout", type=float, default=900.0, help="per federated run, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (run folders, logs)")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    if rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is the warm-up)")
    first = 2

    import numpy as np
    import torch

    from server.app import pack_record
    from smm_model.contract.sites import simulation_site_dirs
    from client.cohorts.synth import CohortSpec, write_cohort
    from client.local.train import resolve_device
    from server.federation.loop import initial_weights
    from server.ops.simulate import FLOWER_ENV, pids_with_env, resolve_config
    from smm_model.nn.model import build_model, count_parameters
    from smm_model.contract.protocol import config_text

    for k, v in FLOWER_ENV.items():
        os.environ[k] = v  # also set by server.ops.simulate.flwr_env for every process started
    default_threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    t_all = time.monotonic()
    before = set(_flower_processes())
    tmp = Path(tempfile.mkdtemp(prefix="fedsmm-bench-"))
    result: dict = {}
    try:
        # -- the workload -----------------------------------------------------------------------
        cohort = tmp / "cohort"
        d = CohortSpec()
        t0 = time.monotonic()
        spec = dataclasses.replace(d, sites=args.sites, patients_per_site=args.patients, features_only=True, seed=5,
                                   slide_size=args.slide_size, split=DEMO_SPLIT,
                                   features=dataclasses.replace(d.features, feature_dim=1024))
        write_cohort(cohort, spec, log=lambda *_: None)
        synth_s = time.monotonic() - t0
        overrides = [f"data.sites_root={cohort}", f"federation.rounds={rounds}",
                     f"federation.min_nodes={args.sites}"]
        if args.local_steps is not None:
            overrides.append(f"federation.local_steps={args.local_steps}")
        targets = TARGETS_LONG_ROUND if (args.local_steps or 0) >= LONG_ROUND_STEPS else TARGETS
        cfg = resolve_config(DEMO_CONFIG, overrides)
        sites = simulation_site_dirs(cfg.data)
        summary = json.loads((cohort / "cohort.json").read_text()) if (cohort / "cohort.json").exists() else {}
        patches = [s.get("n_patches") for s in summary.get("sites", [])]
        from client.local.round import load_site
        train_patients = [len(load_site(s, cfg).patients("train")) for s in sites]
        w = initial_weights(cfg)
        weight_bytes = int(sum(v.nbytes for v in w.values()))
        record_bytes = int(pack_record(w).record.count_bytes())  # as the ServerApp sends it: one flat array per dtype
        # every train / evaluate message also carries the resolved config and the shared statistics
        # as text (a ConfigRecord), which rounds.jsonl's array byte counts leave out
        config_bytes = len(config_text(cfg).encode()) + len(shared_stats(cfg, simulation_site_dirs(cfg.data)).encode())
        client_cpus = max(1, int(cfg.federation.client_cpus))
        sim_workers = max(1, min(len(sites), cores // client_cpus))
        device = resolve_device(cfg.train.device).type
        print(f"workload: {len(sites)} sites x {args.patients} patients ({train_patients} training), demo model "
              f"({count_parameters(build_model(cfg.model)):,} parameters, {weight_bytes:,} weight bytes), "
              f"{rounds} rounds x {cfg.federation.local_epochs} local epochs; {cores} cores; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        modes = [m for m in ("simulation", "deployment") if m not in args.skip]
        result = {
            "benchmark": "federation_overhead",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/federation_overhead.py " + " ".join(sys.argv[1:]),
            "git_commit": provenance.git_commit(),
            "uncommitted_changes": _uncommitted(),
            "machine": provenance.machine("flwr", "ray", "numpy"),
            "setting": {"config": "configs/demo.yaml", "overrides": [o if not o.startswith("data.sites_root")
                                                                      else "data.sites_root=<temporary cohort>"
                                                                      for o in overrides],
                        "cohort": {"sites": len(sites), "patients_per_site": args.patients, "feature_dim": 1024,
                                   "genes": [cfg.model.genes_tumour, cfg.model.genes_micro],
                                   "slide_size": args.slide_size, "split": list(DEMO_SPLIT),
                                   "train_patients_per_site": train_patients,
                                   "patches_per_site": patches,
                                   "features_only": True, "seed": 5, "synth_s": synth_s},
                        "params": count_parameters(build_model(cfg.model)),
                        "local_epochs": cfg.federation.local_epochs, "batch_size": cfg.train.batch_size,
                        "rounds": rounds, "rounds_measured_from": first, "device": device,
                        "client_cpus": client_cpus, "torch_default_threads": default_threads,
                        "model_weight_bytes": weight_bytes, "model_arrayrecord_bytes": record_bytes,
                        "config_text_bytes_per_message": config_bytes},
            "load_average": {"start": os.getloadavg()},
        }
        # -- direct baselines, then the federated runs ----------------------------------------------
        dep_threads = (max(1, cores // len(sites)) if args.deployment_threads is None
                       else (args.deployment_threads or None))
        concurrency = {"simulation": (sim_workers, client_cpus), "deployment": (len(sites), dep_threads)}
        result["setting"]["concurrency"] = {m: {"sites_at_once": w, "torch_threads_per_site": t or "torch default"}
                                            for m, (w, t) in concurrency.items()}
        for mode in modes:
            workers, threads = concurrency[mode]
            print(f"direct, before the {mode} ({workers} concurrent sites, "
                  f"{threads or default_threads} torch threads each)", flush=True)
            before_run = run_direct(cfg, sites, workers, threads, rounds)
            result["load_average"][f"after_direct_before_{mode}"] = os.getloadavg()
            print(f"{mode} ({rounds} rounds)", flush=True)
            run_dir = tmp / f"{mode}-run"
            t0 = time.monotonic()
            tag = f"{os.getpid()}-{mode}"
            os.environ[TAG_ENV] = tag
            try:
                with CpuMeter(tag) as meter:
                    if mode == "simulation":
                        info = run_simulation(cfg, run_dir, tmp / "simulation.log", args.timeout)
                    else:
                        info = run_deployment(cfg, sites, tmp / "deployment", run_dir, args.timeout, dep_threads)
            finally:
                os.environ.pop(TAG_ENV, None)
            info["wall_s"] = time.monotonic() - t0
            info["cpu"] = meter.report()
            left = pids_with_env(TAG_ENV, tag)
            if left:
                print(f"WARNING: processes of the {mode} still running: {left}", file=sys.stderr)
            info["timings"]["leftover_processes"] = int(info["timings"].get("leftover_processes", 0)) + len(left)
            # The machine is shared: the baseline runs again right after, and both runs count.
            print(f"direct, after the {mode}", flush=True)
            after_run = run_direct(cfg, sites, workers, threads, rounds)
            result.setdefault("direct", {})[mode] = {
                "workers": workers, "threads": threads or "torch default",
                "rounds": before_run["rounds"] + after_run["rounds"],
                "runs": {"before": before_run, "after": after_run}}
            if mode == "simulation":
                logs = sorted((run_dir / "site-logs").glob("*.log"))
            else:
                logs = [site / "logs" / "fedsmm-client.log" for site in sites]
                info["clientapp_process_start_s"] = clientapp_start_s(dep_threads)
                print(f"  a fresh ClientApp process imports in {info['clientapp_process_start_s']:.2f} s", flush=True)
            info["per_round"] = read_run(run_dir, workers)
            info["timeline"] = site_timeline(logs, run_dir)
            info["summary"] = summarise(info["per_round"], result["direct"][mode], first, info["timeline"])
            c = info["cpu"]
            print(f"  CPU during the run: ours {c['ours_cpu_s']:.0f} s, others on the machine "
                  f"{c['others_cpu_s']:.0f} s over {c['wall_s']:.0f} s wall; " + ", ".join(f"{k} {v['cpu_s']:.0f} s"
                                                                 for k, v in c["by_component"].items()), flush=True)
            result[mode] = info
            result["load_average"][f"after_{mode}"] = os.getloadavg()
            for r in info["per_round"]:
                print(f"  {mode} round {r['round']}: train {r['train_s']:.2f} s (sites "
                      + ", ".join(f"{s:.2f}" for s in r["site_seconds"]) + f"), aggregate {r['aggregate_s']:.2f} s, "
                      f"evaluate {r['evaluate_s']:.2f} s, whole round {_fmt(r['round_s'], ' s')}", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    time.sleep(1.0)
    # Each run stops its own processes by PID and counts what is left (``leftover_processes``:
    # theirs, plus any process still carrying the run's tag); other users' Flower / Ray processes
    # that appeared meanwhile are only listed.
    new = sorted(set(_flower_processes()) - before)
    result["leftover_processes"] = {m: int(result[m]["timings"].get("leftover_processes", 0))
                                    for m in ("simulation", "deployment") if m in result}
    result["other_flower_processes_new_since_start"] = new
    result["total_s"] = time.monotonic() - t_all

    # -- table ----------------------------------------------------------------------------------------
    rows = [("round: train + aggregate (s)", "round_train_aggregate_s", ""),
            ("round: + federated evaluation (s)", "round_train_aggregate_evaluate_s", ""),
            ("whole round from server.log (s)", "round_whole_s", ""),
            ("direct local training, same concurrency (s)", "direct_train_makespan_s", ""),
            ("direct evaluation, same concurrency (s)", "direct_evaluate_makespan_s", ""),
            ("direct sum over sites (s)", "direct_sum_of_sites_s", ""),
            ("site train_round in federation, median (s)", "site_train_round_s_in_federation", ""),
            ("site train_round direct, median (s)", "direct_site_train_round_s", ""),
            ("site trainer (train_epochs) direct, median (s)", "direct_site_trainer_s", ""),
            ("train phase: messaging / dispatch (s)", "train_phase_messaging_s", ""),
            ("train phase: site makespan minus direct (s)", "train_phase_slower_sites_s", ""),
            ("aggregate (s)", "aggregate_s", ""),
            ("site starts training, after the phase starts (s)", "timeline_dispatch_s", ""),
            ("server has all replies, after the last site ends (s)", "timeline_collect_s", ""),
            ("overhead, train + aggregate", "overhead_train_aggregate", "pct"),
            ("overhead, with evaluation", "overhead_train_aggregate_evaluate", "pct"),
            ("overhead, whole round", "overhead_whole_round", "pct"),
            ("messaging + aggregate share of train + aggregate", "overhead_messaging_share", "pct")]
    modes = [m for m in ("simulation", "deployment") if m in result]
    print("\n| measurement | " + " | ".join(modes) + " |")
    for label, key, kind in rows:
        print(f"| {label} | " + " | ".join(_fmt(result[m]["summary"].get(key), pct=kind == "pct") for m in modes)
              + " |")
    for m in modes:
        b = result[m]["summary"]["bytes_per_round_per_site"]
        print(f"{m}: bytes per round per site: sent {b['sent']:,.0f}, received {b['received']:,.0f} "
              f"(model weights {weight_bytes:,} B, as an ArrayRecord {record_bytes:,} B; plus "
              f"{config_bytes:,} B of config text per message)")
        net = ((result[m].get("flwr_ls") or {}).get("runs") or [{}])[0].get("network-traffic")
        if net and net.get("total-bytes"):
            print(f"{m}: Flower's network traffic for the whole run: out {net['outbound-bytes']:,} B, "
                  f"in {net['inbound-bytes']:,} B")
        ok = result[m]["summary"].get("overhead_train_aggregate_evaluate")
        if ok is not None:
            print(f"{m}: target (< {targets[m]:.0%} of the round, evaluation included) "
                  f"{'met' if ok < targets[m] else 'NOT met'} ({ok:.0%})")
    result["target"] = {"overhead_below": {m: targets[m] for m in modes}, **{m: {
        k: (result[m]["summary"].get(k) is not None and result[m]["summary"][k] < targets[m])
        for k in ("overhead_train_aggregate_evaluate", "overhead_whole_round")}
        for m in modes}}
    if any(result["leftover_processes"].values()):
        print(f"WARNING: processes left: {result['leftover_processes']}", file=sys.stderr)
    if new:
        print(f"note: {len(new)} Flower/Ray process(es) not started here appeared meanwhile (other users)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = ("federation_overhead_quick" if args.quick else "federation_overhead") + (
        f"_steps{args.local_steps}" if args.local_steps is not None else "")
    path = RESULTS / f"{name}_{device}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"total {result['total_s']:.0f} s; wrote {path}")
    return 1 if any(result["leftover_processes"].values()) else 0


def _sigterm_to_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)  # so every `finally` teardown runs
    sys.exit(main())
