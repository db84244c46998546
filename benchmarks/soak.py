"""A 50-round soak of a tiny simulated federation: does the server's memory grow round by round?

The run is ``smm simulate`` as a user starts it (``server.ops.simulate.Simulation``: its own
SuperLink, Ray and every process stopped by PID afterwards), 3 sites x ``--patients`` (20)
features-only synthetic patients, ``inprocess.SMALL_MODEL``, one local step per round, a
validation every round, ``keep_last`` checkpoints (3, the default). A thread of this process
samples, every ``--period`` (1) s, the resident set size (``VmRSS`` of ``/proc/PID/status``) of
every process carrying the simulation's private ``FLWR_HOME``, by role (``federation_overhead._role``):
``flwr-simulation`` is the process the ServerApp, so the server loop, runs in (Flower's simulation
runtime: it also hosts the Ray driver; the sites are Ray ``ClientAppActor`` workers, sampled as well),
``flower-superlink`` the SuperLink. Samples are mapped to rounds by the time stamps of the
server's ``round N/R`` lines in ``server.log`` (the end of round N's aggregation): a round's RSS is
the largest sample between the end of the previous round and its own.

Target (issue 14): the server's RSS growth after warm-up below 10 %: round ``--warmup`` (5)
against the last round, (RSS_last - RSS_warmup) / RSS_warmup; the slope (MiB per round, least
squares over rounds after warm-up) and the peak are recorded too, and the run folder's size
(checkpoints, rounds.jsonl, logs).

``--inprocess`` is the fallback without Ray: the server loop and the real ClientApps in this
process (``inprocess.InProcessTransport``), sampling this process's own RSS (which then holds the
sites too).

    OMP_NUM_THREADS=1 python benchmarks/soak.py            # 50 rounds: 8.7 minutes on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/soak.py --quick    # 12 rounds, warm-up 3: 1.5 minutes on 2 quiet cores

Results: ``benchmarks/results/soak_<device>.json`` (``soak_quick_...`` for --quick,
``soak_inprocess_...`` with --inprocess).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import inprocess  # noqa: E402
import quality  # noqa: E402
from federation_overhead import _role, _sigterm_to_interrupt, round_stamps  # noqa: E402

SITES = 3
TARGET = 0.10
SERVER_ROLES = ("flwr-simulation (our server)", "flwr-serverapp (our server)", "in-process (server + sites)")


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Every ``period`` s in a thread: ``(time, {role: summed RSS MiB})`` of the processes
    ``find()`` returns as ``{pid: role}``."""

    def __init__(self, find, period: float = 1.0) -> None:
        self.find, self.period = find, period
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            roles: dict[str, float] = {}
            for pid, role in self.find().items():
                r = rss_mib(pid)
                if r is not None:
                    roles[role] = roles.get(role, 0.0) + r
            if roles:
                self.samples.append((time.time(), roles))
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def flower_processes(sim) -> dict[int, str]:
    """The simulation's live processes by role (found by its private FLWR_HOME)."""
    from server.ops.simulate import pids_with_env

    home = getattr(sim, "_flwr_home", None)
    if home is None:
        return {}
    out = {}
    for pid in pids_with_env("FLWR_HOME", str(home)):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[pid] = _role(args)
    return out


def per_round(samples: list[tuple[float, dict[str, float]]], stamps: dict[int, float]) -> dict[int, dict[str, float]]:
    """Round -> role -> the largest RSS sampled between the previous round's end and this one's."""
    out: dict[int, dict[str, float]] = {}
    prev = -float("inf")
    for r in sorted(stamps):
        window = [roles for t, roles in samples if prev < t <= stamps[r]]
        prev = stamps[r]
        if window:
            out[r] = {role: round(max(w.get(role, 0.0) for w in window), 1) for role in {k for w in window for k in w}}
    return out


def growth(series: dict[int, float], warmup: int) -> dict[str, Any]:
    rounds = sorted(r for r in series if r >= warmup)
    if len(rounds) < 2 or warmup not in series:
        return {"warmup_round": warmup, "growth": None}
    first, last = series[warmup], series[rounds[-1]]
    n = len(rounds)
    mx = sum(rounds) / n
    my = sum(series[r] for r in rounds) / n
    slope = sum((r - mx) * (series[r] - my) for r in rounds) / sum((r - mx) ** 2 for r in rounds)
    return {"warmup_round": warmup, "last_round": rounds[-1], "rss_warmup_mib": first, "rss_last_mib": last,
            "growth": round((last - first) / first, 4), "peak_after_warmup_mib": max(series[r] for r in rounds),
            "slope_mib_per_round": round(slope, 3), "met": (last - first) / first < TARGET}


def folder_size(path: Path) -> dict[str, Any]:
    files = [p for p in path.rglob("*") if p.is_file()]
    ckpt = [p for p in files if "checkpoints" in p.parts]
    return {"bytes": sum(p.stat().st_size for p in files), "files": len(files),
            "checkpoint_files": len([p for p in ckpt if p.suffix == ".pt"]),
            "checkpoint_bytes": sum(p.stat().st_size for p in ckpt)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--patients", type=int, default=20, help="patients per site")
    ap.add_argument("--period", type=float, default=1.0, help="sampling period (s)")
    ap.add_argument("--inprocess", action="store_true", help="no Ray: server loop and ClientApps in this process")
    ap.add_argument("--quick", action="store_true", help="12 rounds, warm-up 3")
    ap.add_argument("--work", type=Path, default=None, help="keep the cohort and run folder here")
    args = ap.parse_args(argv)
    rounds, warmup = (12, 3) if args.quick else (args.rounds, args.warmup)
    from smm_model.config import ExperimentConfig

    t0 = time.perf_counter()
    with quality.work_folder(args.work, "soak_") as work:
        cohort = inprocess.write_features_cohort(work / "cohort", SITES, args.patients)
        sets = [*inprocess.SMALL_MODEL, f"data.sites_root={cohort}", f"federation.rounds={rounds}",
                "federation.local_steps=1", f"federation.min_nodes={SITES}", "federation.strategy=fedavg"]
        cfg = ExperimentConfig.from_yaml_text("name: soak\n", sets)
        run_dir = work / "run"
        if args.inprocess:
            import client.app as client_app
            from server.federation.loop import run_federation

            os.environ[client_app.LOG_DIR_ENV] = str(work / "site-logs")
            me = os.getpid()
            with RssSampler(lambda: {me: SERVER_ROLES[2]}, args.period) as sampler:
                run_federation(inprocess.InProcessTransport(SITES), cfg, run_dir, poll_s=0.01)
            mode, status = "in-process", "finished:completed"
        else:
            from server.ops.simulate import Simulation

            with (work / "simulate.log").open("w") as echo:
                sim = Simulation(cfg, run_dir, timeout_s=3600.0, echo=echo)
                with RssSampler(lambda: flower_processes(sim), args.period) as sampler:
                    status = sim.run(SITES)
            mode = "flower simulation (smm simulate)"
            if status != "finished:completed":
                raise quality.BenchmarkError(f"simulation ended {status!r}; see {work / 'simulate.log'}")
        stamps = round_stamps(run_dir)
        rss = per_round(sampler.samples, stamps)
        roles = sorted({k for v in rss.values() for k in v})
        server_role = next((r for r in SERVER_ROLES if r in roles), None)
        result = {
            **quality.result_header("soak_inprocess" if args.inprocess else "soak", __file__, argv, t0),
            "setting": {"mode": mode, "sites": SITES, "patients_per_site": args.patients, "rounds": rounds,
                        "local_steps": 1, "strategy": "fedavg", "model": "benchmarks/inprocess.py SMALL_MODEL",
                        "keep_last": 3, "sampling_period_s": args.period, "target_growth": TARGET,
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            "status": status, "server_role": server_role,
            "server": growth({r: v[server_role] for r, v in rss.items() if server_role in v}, warmup)
            if server_role else None,
            "by_role": {role: growth({r: v[role] for r, v in rss.items() if role in v}, warmup) for role in roles},
            "rss_per_round_mib": {str(r): v for r, v in sorted(rss.items())},
            "samples": len(sampler.samples), "run_folder": folder_size(run_dir),
            "round_s_median": quality.median([stamps[r] - stamps[r - 1] for r in stamps if r - 1 in stamps]),
        }
        path = quality.write_result(result, args.quick)
    s = result["server"] or {}
    print(f"| measured process | RSS at round {warmup} (MiB) | RSS at round {s.get('last_round')} (MiB) | growth | "
          f"slope (MiB/round) | peak (MiB) | met (< 10 %) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for role, g in result["by_role"].items():
        if g.get("growth") is None:
            continue
        print(f"| {role} | {g['rss_warmup_mib']:.1f} | {g['rss_last_mib']:.1f} | {100 * g['growth']:+.1f} % | "
              f"{g['slope_mib_per_round']:+.2f} | {g['peak_after_warmup_mib']:.1f} | {'yes' if g['met'] else 'no'} |")
    print(f"run folder: {result['run_folder']}; median round {result['round_s_median']} s")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)  # so the simulation's teardown runs
    sys.exit(main())
