"""Byzantine robustness in simulation: one site of five sends a scaled or sign-flipped update.

Every run is the real server loop (``server.federation.loop.run_federation``) driving the real
ClientApp in one process (``inprocess.InProcessTransport``: Flower ``Message`` objects both ways);
the attack sits in the transport, after the attacker's ClientApp replied and before the server
decodes nothing more than it always does. Each round the attacker's trained weights ``local``
become ``global + s * (local - global)`` (every float array; its validation statistics and its
example count stay honest):

* ``scaled``: s = ``--scale`` (10), a boosted update;
* ``signflip``: s = ``--flip-scale`` (-10), the update reversed and amplified as much.

Per strategy (``fedavg``, ``fedmedian``, ``fedtrimmedavg`` with beta 0.2, ``krum`` and
``multikrum`` with ``federation.krum_byzantine=1``; MultiKrum keeps n - f = 4) the clean run and
both attacked runs have the same seed, cohort and config. Measured per run: the federated
validation metrics of the last round (``rounds.jsonl``; exact statistics, ``privacy.min_cell=1``,
see ``inprocess.SMALL_MODEL``) and of the selected round (validation loss, the demo's
``selection_metric``), and the selected ``model.pt`` evaluated exactly on every site's pooled test
patients (``client.baselines.evaluate.evaluate_sites``, what ``smm evaluate`` runs); the guard's
view of the attacker every round (``train.norm_outliers``, ``train.dropped``, the attacker's update
norm against the honest median, ``rounds.jsonl``), and how much of the attacker's update reached
the aggregate (``Attacker.share``: its deviation from the honest sites' mean projected onto the
round's aggregate, from the checkpoint of every round; 0.2 is FedAvg's equal weight, 0 a rejection).

Target (issue 14): every robust strategy keeps the validation metrics (diagnosis AUC, grade AUC,
C-index) within 2 points of its own clean run, read as no more than 2 points below it
(``attacked_minus_clean`` keeps the signed differences); FedAvg's degradation is recorded.

Cohort: ``smm synth --features-only`` seed 5, 5 sites x ``--patients`` (40: 24 train, 8 val,
8 test a site), 32-dim features; model: ``inprocess.SMALL_MODEL`` (the simulation tests' size),
``--rounds`` (6) rounds of ``--local-steps`` (4) AdamW steps.

    OMP_NUM_THREADS=1 python benchmarks/robustness.py            # 15 runs, one after another
    OMP_NUM_THREADS=1 python benchmarks/robustness.py --jobs 5   # in 5 processes: 27 minutes on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/robustness.py --quick    # fedavg + fedmedian, 3 rounds: 2.5 minutes on 2 quiet cores

Results: ``benchmarks/results/robustness_<device>.json`` (``robustness_quick_...`` for --quick).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import inprocess  # noqa: E402
import quality  # noqa: E402

SITES = 5
ATTACKER = 100  # node id of site_1 (partition 0)
STRATEGIES: dict[str, list[str]] = {
    "fedavg": [],
    "fedmedian": [],
    "fedtrimmedavg": ["federation.trimmed_beta=0.2"],
    "krum": ["federation.krum_byzantine=1"],
    "multikrum": ["federation.krum_byzantine=1"],
}
METRICS = ("diagnosis.auc", "grade.auc", "survival.c_index")
REPORTED = (*METRICS, "diagnosis.macro_f1", "grade.macro_f1", "loss")
TARGET_POINTS = 2.0


def _pct(values: dict) -> dict[str, float | None]:
    """Percent (the loss as is), None for n/a."""
    out: dict[str, float | None] = {}
    for m in REPORTED:
        v = values.get(m)
        ok = v is not None and math.isfinite(float(v))
        out[m] = None if not ok else round(float(v) * (1 if m == "loss" else 100), 2 if m == "loss" else 1)
    return out


class Attacker:
    """The transport hook: the attacker's train reply scaled about the global model it was sent
    (``scale`` None: honest). Keeps, per round, the global model sent and every site's train
    reply as the server received it, for ``attacker_share``."""

    def __init__(self, scale: float | None) -> None:
        self.scale = scale
        self.sent: dict[int, dict[str, np.ndarray]] = {}
        self.replies: dict[int, dict[int, dict[str, np.ndarray]]] = {}

    def __call__(self, ins, reply):
        from server.federation.messages import TRAIN
        from smm_model.contract.wire import KEY_ROUND

        if ins.message_type != TRAIN or reply.arrays is None:
            return reply
        if self.scale is not None and ins.node_id == ATTACKER:
            reply = replace(reply, arrays=inprocess.scaled_update(reply.arrays, ins.arrays, self.scale))
        r = int(ins.config[KEY_ROUND])
        self.sent[r] = ins.arrays
        self.replies.setdefault(r, {})[int(ins.node_id)] = reply.arrays
        return reply

    def share(self, aggregates: dict[int, dict[str, np.ndarray]]) -> dict[int, float | None]:
        """Per round, how much of the attacker's deviation from the honest sites' mean ``h`` made it
        into the aggregate ``a``: <a - h, p - h> / ||p - h||^2 over the float arrays, with ``p``
        the attacker's reply (FedAvg of five equal sites: 0.2; an update rejected: about 0)."""
        out: dict[int, float | None] = {}
        for r, reps in sorted(self.replies.items()):
            if r not in aggregates or ATTACKER not in reps or len(reps) < 2:
                continue
            keys = [k for k, v in self.sent[r].items() if v.dtype.kind == "f"]
            flat = lambda d: np.concatenate([d[k].astype(np.float64).ravel() for k in keys])  # noqa: E731
            h = np.mean([flat(a) for n, a in reps.items() if n != ATTACKER], axis=0)
            dev = flat(reps[ATTACKER]) - h
            den = float(dev @ dev)
            out[r] = None if den == 0 else round(float((flat(aggregates[r]) - h) @ dev) / den, 3)
        return out


def guard_view(rounds: list[dict]) -> dict[str, Any]:
    """What the server's guard did with the attacker, over the training rounds."""
    flagged, dropped, ratio = [], [], []
    for rec in rounds:
        tr = rec.get("train")
        if not tr:
            continue
        norms = {int(n): v for n, v in (tr.get("update_norms") or {}).items()}
        if ATTACKER in tr.get("norm_outliers", []):
            flagged.append(rec["round"])
        dropped += [{"round": rec["round"], **d} for d in tr.get("dropped", [])]
        honest = sorted(v for n, v in norms.items() if n != ATTACKER)
        if ATTACKER in norms and honest:
            ratio.append(round(norms[ATTACKER] / honest[len(honest) // 2], 2))
    return {"flagged_rounds": flagged, "dropped": dropped, "attacker_norm_over_honest_median": ratio,
            "kept_every_round": all(ATTACKER in (r.get("train") or {}).get("kept", [ATTACKER]) for r in rounds)}


def one_run(work: Path, cohort: Path, strategy: str, attack: str, scale: float | None, rounds: int,
            local_steps: int) -> dict[str, Any]:
    import client.app as client_app
    from client.baselines.evaluate import evaluate_sites, load_model_file
    from server.federation.loop import run_federation
    from server.runs.checkpoint import load_checkpoint
    from smm_model.config import ExperimentConfig

    name = f"{strategy}-{attack}"
    sets = [*inprocess.SMALL_MODEL, f"data.sites_root={cohort}", f"federation.rounds={rounds}",
            f"federation.local_steps={local_steps}", f"federation.min_nodes={SITES}",
            f"federation.strategy={strategy}", *STRATEGIES[strategy]]
    cfg = ExperimentConfig.from_yaml_text("", sets)
    os.environ[client_app.LOG_DIR_ENV] = str(work / "site-logs" / name)
    run_dir = work / name
    t0 = time.perf_counter()
    attacker = Attacker(scale)
    transport = inprocess.InProcessTransport(SITES, attacker)
    final = run_federation(transport, cfg, run_dir, keep_last=rounds + 1, poll_s=0.01)  # every round's weights
    wall = time.perf_counter() - t0
    recs = quality.round_records(run_dir)
    aggregates = {r: load_checkpoint(run_dir, r).weights for r in attacker.replies
                  if r not in final.get("skipped_rounds", [])}
    last = next(r for r in reversed(recs) if r.get("val"))
    best = next(r for r in recs if r["round"] == final["best_round"])
    sites = sorted(p for p in cohort.iterdir() if (p / "clinical.csv").is_file())
    exact = evaluate_sites(load_model_file(run_dir / "model.pt"), sites, work / f"eval-{name}", split="test")
    return {"strategy": strategy, "attack": attack, "scale": scale, "overrides": sets, "wall_s": round(wall, 1),
            "best_round": final["best_round"], "last_round": last["round"],
            "val_last": _pct(last["val"]["global"]["values"]), "val_selected": _pct(best["val"]["global"]["values"]),
            "test_exact": _pct(exact["test"]["global"]["values"]),
            "test_reported": _pct(final["test"]["global"]["values"]),
            "skipped_rounds": final.get("skipped_rounds", []), "guard": guard_view(recs),
            "attacker_share": {str(r): v for r, v in attacker.share(aggregates).items()},
            "transport_errors": transport.errors}


def compare(runs: dict[str, dict]) -> dict[str, Any]:
    """Per strategy and attack: attacked minus clean, in points, on ``METRICS``; within target?"""
    out: dict[str, Any] = {}
    for strategy in STRATEGIES:
        clean = runs.get(f"{strategy}-clean")
        if clean is None:
            continue
        for key, run in runs.items():
            if run["strategy"] != strategy or run["attack"] == "clean":
                continue
            row: dict[str, Any] = {}
            for view in ("val_last", "val_selected", "test_exact"):
                d = {m: (None if run[view][m] is None or clean[view][m] is None
                         else round(run[view][m] - clean[view][m], 1)) for m in METRICS}
                row[view] = d
                row[f"{view}_within_{TARGET_POINTS:g}"] = all(v is not None and v >= -TARGET_POINTS for v in d.values())
            out[key] = row
    return out


def _share(run: dict) -> str:
    v = [x for x in run["attacker_share"].values() if x is not None]
    return "n/a" if not v else f"{min(v):.2f} to {max(v):.2f}"


def table(runs: dict[str, dict], deltas: dict[str, Any]) -> str:
    head = ("| strategy | attack | " + " | ".join(f"val {m}" for m in METRICS) + " | val loss | "
            + " | ".join(f"test {m}" for m in METRICS) + " | Δ val (worst, points) | within 2? | attacker flagged | attacker share |")
    lines = [head, "|" + " --- |" * (2 * len(METRICS) + 7)]
    f = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    for key, r in runs.items():
        d = deltas.get(key)
        worst = "–" if d is None else f(min((v for v in d["val_last"].values() if v is not None), default=None))
        ok = "–" if d is None else ("yes" if d[f"val_last_within_{TARGET_POINTS:g}"] else "**no**")
        g = r["guard"]
        flagged = "–" if r["attack"] == "clean" else f"{len(g['flagged_rounds'])}/{r['last_round']}"
        lines.append(f"| {r['strategy']} | {r['attack']} | " + " | ".join(f(r["val_last"][m]) for m in METRICS)
                     + f" | {r['val_last']['loss']:.3f} | " + " | ".join(f(r["test_exact"][m]) for m in METRICS)
                     + f" | {worst} | {ok} | {flagged} | {_share(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated subset of {tuple(STRATEGIES)}")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--patients", type=int, default=40, help="patients per site (60/20/20 split)")
    ap.add_argument("--scale", type=float, default=10.0, help="the scaled attack's s")
    ap.add_argument("--flip-scale", type=float, default=-10.0, help="the sign-flip attack's s (negative)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    ap.add_argument("--quick", action="store_true", help="fedavg and fedmedian, 3 rounds")
    ap.add_argument("--work", type=Path, default=None, help="keep the cohort and run folders here")
    args = ap.parse_args(argv)
    strategies = ("fedavg", "fedmedian") if args.quick else tuple(args.strategies.split(","))
    if set(strategies) - set(STRATEGIES):
        ap.error(f"unknown strategies {sorted(set(strategies) - set(STRATEGIES))}")
    if args.flip_scale >= 0:
        ap.error("--flip-scale must be negative")
    rounds = 3 if args.quick else args.rounds
    attacks = {"clean": None, "scaled": args.scale, "signflip": args.flip_scale}
    logging.getLogger("flwr").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    runs: dict[str, dict] = {}
    with quality.work_folder(args.work, "robustness_") as work:
        cohort = inprocess.write_features_cohort(work / "cohort", SITES, args.patients)

        def write() -> Path:
            deltas = compare(runs)
            return quality.write_result({
                **quality.result_header("robustness", __file__, argv, t0),
                "setting": {"sites": SITES, "patients_per_site": args.patients, "split": [0.6, 0.2, 0.2],
                            "cohort": "smm synth --features-only seed 5, 32-dim features",
                            "attacker": f"node {ATTACKER} (site_1)", "attacks": attacks, "rounds": rounds,
                            "local_steps": args.local_steps, "model": "benchmarks/inprocess.py SMALL_MODEL",
                            "selection": "validation loss", "min_cell": 1, "target_points": TARGET_POINTS,
                            "transport": "in-process, real ClientApp through Flower Messages", "jobs": args.jobs,
                            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
                "runs": runs, "attacked_minus_clean": deltas}, args.quick)

        jobs = [(strategy, attack, scale) for strategy in strategies for attack, scale in attacks.items()]
        order = {f"{s}-{a}": i for i, (s, a, _) in enumerate(jobs)}

        def done(r: dict) -> Path:
            runs[f"{r['strategy']}-{r['attack']}"] = r
            ordered = dict(sorted(runs.items(), key=lambda kv: order[kv[0]]))  # the jobs' order, whatever finished first
            runs.clear()
            runs.update(ordered)
            print(f"[robustness] {r['strategy']:<13} {r['attack']:<8} val {r['val_last']} test {r['test_exact']} "
                  f"flagged {r['guard']['flagged_rounds']} share {_share(r)} ({r['wall_s']} s)", flush=True)
            return write()

        if args.jobs == 1:
            for job in jobs:
                path = done(one_run(work, cohort, *job, rounds, args.local_steps))
        else:  # each run in its own process (spawned: a fresh interpreter, its own site-log folder)
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(one_run, work, cohort, *job, rounds, args.local_steps) for job in jobs]
                for f in as_completed(futures):
                    path = done(f.result())
    print(table(runs, compare(runs)))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
