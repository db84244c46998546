"""``smm evaluate MODEL SITE_DIR... [--out DIR] [--split test|val|all]``: evaluate a final model
locally.

A hospital that did not train (or any site) evaluates a run's ``model.pt`` -- or a server
checkpoint (``checkpoints/round_NNNN.pt``) -- on its own site folders, on this machine, with the
preprocessing the model was trained with (the shared statistics stored with it):

1. the model file is read (``torch.load(weights_only=True)``: no code is unpickled) and rebuilt from
   its stored config; weights must fit it exactly;
2. every site's schema (encoder, feature_dim, gene_set, genes_tumour, genes_micro, genomics_policy,
   and the genomic feature list) is checked against the model's; a mismatching site is refused with
   a message naming the site folder and the field, and nothing is evaluated (exit status 2);
3. each site's split is evaluated with the federation's own code (``client.local.round.evaluate_round``,
   or, for ``--split all``, the same statistics over the site's whole cohort), with the federation's
   small-cell suppression (``federation.min_site_patients``);
4. ``DIR/final_metrics.json`` is written in a run's format (``client.baselines.runfolder``): global metrics over
   the given sites (summed statistics; within-site C-index) and per-site metrics, keyed by site
   folder name, with ``"mode": "evaluate"``.

Only aggregate metrics are printed or written, never a per-patient value.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from client.site.dataset import SiteDataset
from smm_model.contract.disclosure import DisclosurePolicy
from client.local.round import (SiteError, _shared_inputs, evaluate_dataset, evaluate_round, load_site,
                              preflight_summary)
from client.baselines.runfolder import (C_INDEX_NOTE, CHECKPOINT_FORMAT, CONFIG_FILE, FINAL_FILE, MODEL_FORMAT,
                              atomic_write_bytes, config_text, eval_record, library_versions,
                              selection_lower_is_better, site_names, write_json)
from smm_model.contract.atomic import sha256_file
from client.local.train import resolve_device
from smm_model.config import ConfigError, ExperimentConfig, ModelConfig, from_dict, to_dict
from smm_model.contract.protocol import HISTOLOGY_FIELDS, SharedStats, SiteSummary, site_modalities
from smm_model.contract.sites import ARCH_MODALITIES

__all__ = ["ModelFileError", "LoadedModel", "load_model_file", "schema_problems", "evaluate_sites", "main"]

SPLIT_CHOICES = ("test", "val", "all")


class ModelFileError(ValueError):
    """The model file cannot be used (unreadable, not a fedsmm model, inconsistent)."""


class LoadedModel:
    """What ``smm evaluate`` needs from a model.pt or a server checkpoint."""

    def __init__(self, path: Path, payload: Mapping[str, Any]) -> None:
        self.path = path
        self.kind = "checkpoint" if payload.get("format") == CHECKPOINT_FORMAT else "model"
        try:
            self.cfg = ExperimentConfig.from_yaml_text(payload["config"], source=f"{path} (stored config)")
            self.shared = SharedStats.from_json(payload["shared"])
            self.weights = {k: v for k, v in payload["weights"].items()}
            self.schema = dict(payload.get("schema") or {})
            self.round = int(payload["round"])
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ModelFileError(f"{path}: incomplete or inconsistent {self.kind} file ({type(e).__name__}: {e})") \
                from None
        if "model_config" in payload and _model_section(payload["model_config"], path) != to_dict(self.cfg.model):
            raise ModelFileError(f"{path}: model_config differs from the model section of the stored config")
        self.selection_value = payload.get("selection_value", payload.get("best_value"))


def _model_section(stored: Any, path: Path) -> dict[str, Any]:
    """A stored model_config with the defaults of keys added since the file was written (read like
    the stored config, which fills them the same way), so an older model file still loads."""
    try:
        return to_dict(from_dict(ModelConfig, stored, "model_config"))
    except (ConfigError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: model_config is not a valid model section ({e})") from None


def load_model_file(path: Path | str) -> LoadedModel:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror})") from None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, unpickling refusals
        raise ModelFileError(f"{path}: not a readable model file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT) \
            or payload.get("version") != 1:
        raise ModelFileError(f"{path}: not a fedsmm model.pt or server checkpoint (format "
                             f"{payload.get('format') if isinstance(payload, dict) else None!r}, expected "
                             f"{MODEL_FORMAT!r} version 1)")
    return LoadedModel(path, payload)


def schema_problems(site_dir: Path, summary: SiteSummary, model: LoadedModel) -> list[str]:
    """Why ``site_dir`` cannot be evaluated with ``model`` (empty: it can), naming folder and field."""
    cfg = model.cfg
    expected: dict[str, Any] = {k: v for k, v in model.schema.items() if k != "protocol_version"}
    # Whatever the stored schema lacks (an older file), the model config still fixes these.
    expected.setdefault("genes_tumour", cfg.model.genes_tumour)
    expected.setdefault("genes_micro", cfg.model.genes_micro)
    expected.setdefault("genomics_policy", cfg.data.genomics_policy)
    have = site_modalities(summary)
    if cfg.model.arch == "snn" or "histology" not in have:  # no slides read (a site without slides: none held)
        for k in HISTOLOGY_FIELDS:
            expected.pop(k, None)
    else:
        expected.setdefault("feature_dim", cfg.model.feature_dim)
    problems = [f"site {site_dir}: {k} is {summary.schema.get(k)!r}, the model expects {want!r}"
                for k, want in expected.items() if summary.schema.get(k) != want]
    reads = ARCH_MODALITIES[cfg.model.arch]
    if not set(have) & set(reads):
        problems.append(f"site {site_dir}: holds {' and '.join(have)} only, but the model ({cfg.model.arch}) reads "
                        f"{' and '.join(reads)}")
    feats = tuple((summary.genomics or {}).get("features", ()))
    if summary.genomics and feats != tuple(model.shared.genomics_features):
        problems.append(f"site {site_dir}: genomics features differ from the model's ({len(feats)} vs "
                        f"{len(model.shared.genomics_features)} features, or another order)")
    return problems


def _evaluate_site(site_dir: Path, model: LoadedModel, split: str, device: torch.device):
    cfg = model.cfg
    if split != "all":
        # A local evaluation: its numbers stay where the data are, so exact (no disclosure control).
        return evaluate_round(site_dir, cfg, model.shared, model.weights, split, policy=DisclosurePolicy(1))
    site = load_site(site_dir, cfg)
    stats, edges = _shared_inputs(site, cfg, model.shared)
    grid = cfg.model.grid_size if cfg.model.layout == "spatial" else None
    norm = model.shared.patch_norm() if cfg.model.arch != "snn" else None
    ds = SiteDataset(site, site.patients(), stats=stats, bin_edges=edges, grid_size=grid,  # type: ignore[arg-type]
                     patch_norm=norm)
    return evaluate_dataset(ds, cfg, model.shared, model.weights, device)


def evaluate_sites(model: LoadedModel, site_dirs: Sequence[Path], out_dir: Path, split: str = "test"
                   ) -> dict[str, Any]:
    """Check every site against the model (SchemaRefused naming site and field), evaluate, write
    ``out_dir/final_metrics.json``; returns its content."""
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {SPLIT_CHOICES}")
    # Evaluation trains nothing and so spends no privacy budget: a model trained with DP-SGD is
    # evaluated on sites whose ledgers are spent (the preflight's budget check is for training).
    cfg = dataclasses.replace(model.cfg, privacy=dataclasses.replace(model.cfg.privacy, dp=False))
    t0 = time.perf_counter()
    problems: list[str] = []
    names = site_names(site_dirs)
    info: dict[str, Any] = {}
    for name, d in zip(names, site_dirs):
        try:
            summary = preflight_summary(d, cfg, patch_sums=False, policy=DisclosurePolicy(1))  # the model carries its statistics
        except SiteError as e:
            problems.append(f"site {d}: cannot be read ({e.__cause__ or e})")
            continue
        problems += schema_problems(d, summary, model)
        info[name] = {**summary.info(), "label": name}
    if problems:
        raise SchemaRefused("; ".join(problems))
    device = resolve_device(cfg.train.device)
    stats = {n: _evaluate_site(d, model, split, device) for n, d in zip(names, site_dirs)}
    rec = eval_record(split, stats, cfg, km_grid=model.shared.km_grid)
    final = {
        "mode": "evaluate", "run": cfg.name, "rounds": model.round, "best_round": model.round,
        "selection_metric": cfg.federation.selection_metric, "selection_value": model.selection_value,
        "lower_is_better": selection_lower_is_better(cfg), "selection_note": None,
        "test": rec, "suppressed_sites": rec["suppressed"],
        "notes": {"survival.c_index": C_INDEX_NOTE,
                  "mode": f"local evaluation of {model.kind} {model.path.name} (round {model.round}) on the "
                          f"{split} split{'s' if split == 'all' else ''} of the given site folders, with the "
                          "model's stored preprocessing"},
        "split": split, "sites": names, "refused_sites": {}, "skipped_rounds": [],
        "model": {"file": str(model.path), "sha256": sha256_file(model.path)},
        "versions": library_versions(),
        "site_info": info,
        "wall_s": time.perf_counter() - t0,
        "config_sha256": hashlib.sha256(config_text(cfg).encode("utf-8")).hexdigest(),
    }
    write_json(Path(out_dir) / FINAL_FILE, final)
    # The model's resolved config beside the metrics, as in every run folder (reports read it).
    atomic_write_bytes(Path(out_dir) / CONFIG_FILE, config_text(cfg).encode("utf-8"))
    return final


class SchemaRefused(ValueError):
    """A site's data does not fit the model (message names the site folder and the field)."""


def main(argv: Sequence[str] | None = None, report: Callable[[Path, str], object] | None = None) -> int:
    """``smm evaluate MODEL SITE_DIR... [--out DIR] [--split test|val|all] [--device D]``.
    ``report``: called with the run folder and the program name once the run has finished; the
    ``smm`` entry point passes one that writes the run's report (the site side never imports the
    report, which is the server's).
    """
    ap = argparse.ArgumentParser(prog="smm evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a run's model.pt, or a server checkpoint (checkpoints/round_NNNN.pt)")
    ap.add_argument("sites", type=Path, nargs="+", metavar="SITE_DIR", help="site folder(s) to evaluate on")
    ap.add_argument("--out", type=Path, default=Path("evaluation"), metavar="DIR",
                    help="where final_metrics.json goes (default ./evaluation)")
    ap.add_argument("--split", choices=SPLIT_CHOICES, default="test",
                    help="which patients: the test split (default), the validation split, or all of them")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    prog = "smm evaluate"
    try:
        model = load_model_file(args.model)
        resolve_device(args.device)  # refuse an unavailable device before reading any site
        model.cfg = dataclasses.replace(model.cfg, train=dataclasses.replace(model.cfg.train, device=args.device))
        final = evaluate_sites(model, args.sites, args.out, args.split)
    except (ModelFileError, SchemaRefused, ConfigError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except (SiteError, ValueError, RuntimeError) as e:
        cause = e.__cause__
        print(f"{prog}: {e}" + (f" ({type(cause).__name__}: {cause})" if cause is not None else ""), file=sys.stderr)
        return 1
    g = final["test"]["global"]["values"]
    shown = ", ".join(f"{k} {v:.4g}" for k, v in g.items() if v is not None)
    print(f"{prog}: {final['test']['patients']} patients at {len(final['sites'])} site(s) "
          f"({len(final['suppressed_sites'])} suppressed); {shown or 'no metric'}")
    print(f"{prog}: wrote {Path(args.out) / FINAL_FILE}")
    if report is not None:
        report(Path(args.out), prog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
