"""The centralized baseline and local-only runs: ``smm centralized CONFIG [--local-only]``.

A benchmark reference, not a deployment mode: it reads every site folder on one machine.

Centralized: all sites' TRAINING splits pooled into one training set, through the federation's own
code path, so that the only difference from a federated run is where the data sits:

* preprocessing: each site's ``preflight_summary`` -> ``smm_model.contract.protocol.derive_shared`` (the same
  genomic standardisation, survival bin edges, class weights and Kaplan-Meier grid as the federation
  derives from the same sites);
* initial model: ``build_model`` under ``torch.manual_seed(federation.seed)`` (the federation's round 0);
* training: ``client.local.train.train_epochs`` for ``federation.rounds * federation.local_epochs`` epochs,
  in ``federation.rounds`` "rounds" of ``federation.local_epochs`` epochs; the learning rate of round r
  is the federation's (cosine over the rounds from ``train.lr`` to ``train.min_lr``, held within a
  round), so a federated run and this one see the same number of passes over every training patient
  with the same schedule. Unlike a site, the optimiser keeps its state across rounds (one model, one
  optimiser: the best a pooled run can do);
* evaluation: after round 0 (initial model) and every round, ``client.local.round.evaluate_round`` on
  every site's validation split (the same per-site statistics, the same small-cell suppression and
  the same within-site C-index); the best round by ``federation.selection_metric`` is evaluated on
  every site's test split.

It writes the federated run-folder format (``client.baselines.runfolder``): config.yaml, rounds.jsonl,
final_metrics.json (``"mode": "centralized"``), model.pt, so results compare directly.

``--local-only``: each site trains alone on its own training split, with preprocessing derived from
its own summary only (what a site without a federation would have), selected on its own validation
split, evaluated on its own test split (``test``) and, as well, on every site's test split
(``all_sites_test``). One run folder per site under ``RUN_DIR/local/<site>/``; ``RUN_DIR/local_only.json``
tabulates both, labelled.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader

from client.site.collate import collate_patients
from client.local.round import SiteError, _class_weights, split_dataset, evaluate_round, load_site, preflight_summary
from client.baselines.runfolder import (C_INDEX_NOTE, CONFIG_FILE, FINAL_FILE, MODEL_FILE, ROUNDS_FILE, append_jsonl,
                                        atomic_write_bytes, config_text, eval_record, library_versions, model_payload,
                                        round_lr, selection_lower_is_better, site_names, write_json, write_model)
from client.local.train import make_optimizer, resolve_device, train_epochs
from smm_model.config import ConfigError, ExperimentConfig
from smm_model.contract.protocol import (PROTOCOL_VERSION, SCHEMA_FIELDS, SchemaMismatch, SharedStats, SiteSummary,
                                         check_schemas, derive_shared, evaluation_round, selection_value)
from smm_model.contract.disclosure import DisclosurePolicy
from smm_model.contract.runfolder import LOCAL_ONLY_FILE, default_run_dir
from smm_model.contract.selection import Selection, final_record
from smm_model.contract.sites import simulation_site_dirs
from smm_model.nn.model import build_model

__all__ = ["RunDirInUse", "check_sites", "run_centralized", "run_local_only", "main"]

#: Pooled, local-only and IID-control runs happen where all their data already are and send nothing
#: to anyone, so they read exact statistics (no disclosure control): the reference a federation's
#: coarsened statistics are measured against.
POOLED_POLICY = DisclosurePolicy(1)

MODE_NOTES = {
    "centralized": ("centralized baseline: all sites' training splits pooled on one machine (a benchmark "
                    "reference, not a deployment mode); federation.rounds x federation.local_epochs epochs with "
                    "the federation's per-round learning rate; evaluated per site like a federated run"),
    "local-only": ("local-only: this site trained alone on its own training split with preprocessing from its "
                   "own data; 'test' is its own test split, 'all_sites_test' every site's test split"),
}


class RunDirInUse(RuntimeError):
    """The run folder already holds a run."""


class _Hold:
    """A scheduler that keeps the learning rate the round set (train_epochs steps it per epoch)."""

    def step(self) -> None:
        pass


def check_sites(summaries: Mapping[str, SiteSummary], cfg: ExperimentConfig) -> None:
    """The federation's preflight check: every site against the config and against the others
    (``check_schemas``), and the same genomic feature list; raises SchemaMismatch naming site and field."""
    check_schemas(summaries, cfg)
    items = list(summaries.items())
    ref_name, ref = items[0]
    for name, s in items[1:]:
        a, b = (s.genomics or {}).get("features", ()), (ref.genomics or {}).get("features", ())
        if tuple(a) != tuple(b):
            raise SchemaMismatch(f"site {name}: genomics features differ from site {ref_name}'s ({len(a)} vs "
                                 f"{len(b)} features, or another order)")


def _check_run_dir(run_dir: Path) -> None:
    for name in (ROUNDS_FILE, FINAL_FILE):
        if (run_dir / name).exists():
            raise RunDirInUse(f"{run_dir} already holds a run ({name}); choose another run directory")


def _select_value(rec: Mapping[str, Any] | None, cfg: ExperimentConfig) -> float | None:
    return None if rec is None else selection_value(rec["global"]["values"], cfg)


def _evaluate(sites: Mapping[str, Path], cfg: ExperimentConfig, shared, weights, split: str) -> dict[str, Any]:
    return eval_record(split, {n: evaluate_round(d, cfg, shared, weights, split, policy=POOLED_POLICY) for n, d in sites.items()}, cfg,
                       km_grid=shared.km_grid)


def run_centralized(cfg: ExperimentConfig, train_sites: Mapping[str, Path], run_dir: Path, *,
                    eval_sites: Mapping[str, Path] | None = None, mode: str = "centralized",
                    summaries: Mapping[str, SiteSummary] | None = None,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one model on the pooled training splits of ``train_sites``, select on the validation
    splits of ``eval_sites`` (default: the same sites), test on their test splits; write the run
    folder and return its final_metrics. ``summaries``: the sites' preflight summaries if already read."""
    run_dir = Path(run_dir)
    eval_sites = dict(eval_sites or train_sites)
    fed = cfg.federation
    selection = Selection.for_config(cfg)
    _check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = config_text(cfg)
    atomic_write_bytes(run_dir / CONFIG_FILE, text.encode("utf-8"))

    if summaries is None:
        summaries = {n: preflight_summary(d, cfg, policy=POOLED_POLICY) for n, d in train_sites.items()}
        check_sites(summaries, cfg)
    all_summaries = dict(summaries)
    summaries = {n: summaries[n] for n in train_sites}
    shared = derive_shared(list(summaries.values()), cfg)
    shared_json = shared.to_json()
    ref = next(iter(summaries.values()))
    schema: dict[str, Any] = {k: ref.schema.get(k) for k in SCHEMA_FIELDS}
    schema["protocol_version"] = PROTOCOL_VERSION

    device = resolve_device(cfg.train.device)
    datasets = [split_dataset(load_site(d, cfg), cfg, shared, "train") for d in train_sites.values()]
    datasets = [ds for ds in datasets if len(ds)]
    if not datasets:
        raise ValueError("no training patient at any site")
    pooled = ConcatDataset(datasets)
    n_train, bs = len(pooled), cfg.train.batch_size
    loader = DataLoader(pooled, batch_size=bs, shuffle=True, collate_fn=collate_patients,
                        drop_last=cfg.train.drop_last and n_train >= bs, num_workers=cfg.train.num_workers,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    torch.manual_seed(fed.seed)  # the federation's initial model (server.federation.loop.initial_weights)
    model = build_model(cfg.model).to(device)
    weights = _class_weights(cfg, shared, device)
    optimizer = make_optimizer(model, cfg.train)

    def state() -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    rounds_path = run_dir / ROUNDS_FILE
    t0 = time.perf_counter()
    val = _evaluate(eval_sites, cfg, shared, state(), "val")
    value = _select_value(val, cfg)
    append_jsonl(rounds_path, {"round": 0, "status": "initial", "lr": None,
                               "timings": {"evaluate": time.perf_counter() - t0}, "train": None, "val": val,
                               "selection": selection.record(value)})
    say(f"[{mode}] round 0 (initial model): val {fed.selection_metric} = {_fmt(value)}")
    best_state = state()
    for r in range(1, fed.rounds + 1):
        lr = round_lr(cfg.train, fed.rounds, r)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for ds in datasets:
            ds.set_epoch(r)  # as a site does each round
        torch.manual_seed(cfg.train.seed + r)
        t = time.perf_counter()
        logs = train_epochs(model, loader, cfg, epochs=fed.local_epochs, device=device, optimizer=optimizer,
                            scheduler=_Hold(), class_weights=weights)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        val = (_evaluate(eval_sites, cfg, shared, state(), "val")
               if evaluation_round(r, fed.rounds, fed.eval_every) else None)
        t_eval = time.perf_counter() - t
        value = _select_value(val, cfg)
        if selection.offer(r, value):
            best_state = state()
        append_jsonl(rounds_path, {
            "round": r, "status": "trained", "lr": lr, "timings": {"train": t_train, "evaluate": t_eval},
            "train": {"sites": list(train_sites), "epochs": fed.local_epochs, "precision": logs[-1].precision,
                      "epoch_losses": [float(x.loss) for x in logs],
                      "aggregate": {"num-examples": n_train, "train-loss": float(logs[-1].loss)}},
            "val": val,
            "selection": selection.record(value)})
        say(f"[{mode}] round {r}/{fed.rounds}: train loss {logs[-1].loss:.4g}; val {fed.selection_metric} = "
            f"{_fmt(value)} (best round {selection.best_round})")
    best_round, note = selection.chosen(fed.rounds)
    if note is not None:
        best_state = state()
        say(f"[{mode}] {note}")
    test = _evaluate(eval_sites, cfg, shared, best_state, "test")
    sha = write_model(run_dir / MODEL_FILE, model_payload(best_state, cfg, schema, shared_json, best_round,
                                                          selection.best_value))
    final = final_record(
        mode=mode, cfg=cfg, rounds=fed.rounds, selection=selection, best_round=best_round, note=note, test=test,
        sites=list(eval_sites), model_file=MODEL_FILE, model_sha256=sha, wall_s=time.perf_counter() - t0,
        config_text=text, notes={"mode": MODE_NOTES[mode]},
        site_info={n: {**s.info(), "label": n} for n, s in all_summaries.items() if n in eval_sites or n in train_sites},
        epochs=fed.rounds * fed.local_epochs, training_sites=list(train_sites))
    write_json(run_dir / FINAL_FILE, final)
    say(f"[{mode}] final: round {best_round} selected; test {fed.selection_metric} = "
        f"{_fmt(_select_value(test, cfg))} over {test['patients']} patients")
    return final


def run_local_only(cfg: ExperimentConfig, sites: Mapping[str, Path], run_dir: Path, *,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """Each site alone: RUN_DIR/local/<site>/ (a run folder), plus RUN_DIR/local_only.json."""
    run_dir = Path(run_dir)
    if (run_dir / LOCAL_ONLY_FILE).exists():
        raise RunDirInUse(f"{run_dir} already holds a local-only run ({LOCAL_ONLY_FILE})")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / CONFIG_FILE, config_text(cfg).encode("utf-8"))
    summaries = {n: preflight_summary(d, cfg, policy=POOLED_POLICY) for n, d in sites.items()}
    check_sites(summaries, cfg)  # all of them: every local model is also tested at every site
    table: dict[str, Any] = {}
    for name, d in sites.items():
        sub = run_dir / "local" / name
        final = run_centralized(cfg, {name: d}, sub, mode="local-only", summaries=summaries,
                                say=lambda m, n=name: say(f"{n}: {m}"))
        # The selected model, with its own preprocessing, on every site's test split.
        payload = torch.load(io.BytesIO((sub / MODEL_FILE).read_bytes()), map_location="cpu", weights_only=True)
        shared = SharedStats.from_json(payload["shared"])
        all_test = _evaluate(sites, cfg, shared, payload["weights"], "test")
        final["all_sites_test"] = all_test
        write_json(sub / FINAL_FILE, final)
        table[name] = {"run_dir": str(Path("local") / name), "best_round": final["best_round"],
                       "own_test": {"patients": final["test"]["patients"], **final["test"]["global"]},
                       "all_sites_test": {"patients": all_test["patients"], **all_test["global"],
                                          "per_site": all_test["per_site"],
                                          "suppressed": all_test["suppressed"]}}
    summary = {"mode": "local-only", "run": cfg.name, "selection_metric": cfg.federation.selection_metric,
               "notes": {"own_test": "each site's model on its OWN test split",
                         "all_sites_test": "each site's model on EVERY site's test split (global = summed "
                                           "statistics of all sites' test splits, its own included)",
                         "survival.c_index": C_INDEX_NOTE},
               "sites": table, "versions": library_versions()}
    write_json(run_dir / LOCAL_ONLY_FILE, summary)
    return summary


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _site_error_text(e: BaseException) -> str:
    cause = e.__cause__
    return f"{e} ({type(cause).__name__}: {cause})" if isinstance(e, SiteError) and cause is not None else str(e)


def main(argv: Sequence[str] | None = None, report: Callable[[Path, str], object] | None = None) -> int:
    """``smm centralized CONFIG [--run-dir DIR] [--set key=value ...] [--local-only]``.
    ``report``: called with the run folder and the program name once the run has finished; the
    ``smm`` entry point passes one that writes the run's report (the site side never imports the
    report, which is the server's).
    """
    ap = argparse.ArgumentParser(prog="smm centralized", description=__doc__.split("\n\n")[0] + " See the module "
                                 "docstring of client/baselines/centralized.py for the equivalence with a federated run.")
    ap.add_argument("config", type=Path, help="YAML experiment config (its data.sites_root / data.sites)")
    ap.add_argument("--run-dir", type=Path, metavar="DIR",
                    help="run folder (default runs/<config name>-centralized|local-<date-time>)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")
    ap.add_argument("--local-only", action="store_true",
                    help="each site trains alone; one run folder per site under RUN_DIR/local/<site>/")
    args = ap.parse_args(list(argv) if argv is not None else None)
    prog = "smm centralized"
    try:
        text = args.config.read_text()
        cfg = ExperimentConfig.from_yaml_text(text, args.overrides, source=str(args.config))
        dirs = simulation_site_dirs(cfg.data)
        if not dirs:
            raise ConfigError("data: no site folder found (data.sites_root / data.sites)")
        selection_lower_is_better(cfg)
    except OSError as e:
        print(f"{prog}: cannot read {args.config}: {e.strerror}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    sites = dict(zip(site_names(dirs), dirs))
    kind = "local" if args.local_only else "centralized"
    run_dir = args.run_dir or default_run_dir(cfg.name, kind)
    print(f"{prog}: run folder {run_dir}")
    try:
        if args.local_only:
            run_local_only(cfg, sites, run_dir)
        else:
            run_centralized(cfg, sites, run_dir)
    except (SchemaMismatch, RunDirInUse, ConfigError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except (SiteError, ValueError, FloatingPointError) as e:
        print(f"{prog}: {_site_error_text(e)}", file=sys.stderr)
        return 1
    if report is not None:
        report(run_dir, prog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
