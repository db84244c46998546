"""The ``smm`` command: one entry point, subcommands beside the code they drive.

This module is only a dispatcher. It maps each subcommand name to ``"module:function"`` and imports
that module when the subcommand runs, so ``smm --help`` is instant and no package is imported
before it is needed. It is the one place that names both site-side (``client``) and server-side
(``server``) commands; it never imports them at module level.

A subcommand function takes the remaining argv and returns an exit status.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

__all__ = ["COMMANDS", "main"]

#: name -> (target "module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("smm_model.cli:config_command", "validate a config (with --set overrides) and print it resolved"),
    "extract": ("client.wsi.extract:main", "slides to patch features (features/<slide>.h5), resumable"),
    "synth": ("client.cohorts.synth:main", "write a synthetic multi-site cohort with known ground truth"),
    "tcga": ("client.cohorts.tcga:main", "site folders from the real TCGA GBM/LGG tables"),
    "site": ("client.site.check:main", "site folder tools: `smm site check SITE_DIR`"),
    "centralized": ("client.baselines.centralized:main", "train on all sites' training data pooled (a benchmark reference) or per site (--local-only), same run folder"),
    "evaluate": ("client.baselines.evaluate:main", "evaluate a final or checkpointed global model on site folders, locally"),
    "heatmap": ("client.wsi.heatmap:main", "draw where a trained model looked on one slide (attention over its "
                "thumbnail), at the site; nothing is sent"),
    "simulate": ("server.ops.simulate:main", "run a simulated federation (own SuperLink on a free port) and check its final status"),
    "report": ("server.report.build:main", "write report.html, report.md and metrics.json for run folder(s), the first "
                                     "compared with the others"),
    "certs": ("server.ops.certs:main", "create a CA, a SuperLink certificate and SuperNode auth keys for a test or small deployment"),
}


def config_command(argv: list[str]) -> int:
    """``smm config CONFIG [--set key=value ...]``: validate and print the resolved configuration."""
    import argparse
    from pathlib import Path

    import yaml

    from smm_model.config import ConfigError, ExperimentConfig, to_dict
    from smm_model.nn.model import build_model, count_parameters

    ap = argparse.ArgumentParser(prog="smm config", description=config_command.__doc__)
    ap.add_argument("config", type=Path, help="YAML experiment config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set model.hidden_dim=64 (repeatable)")
    args = ap.parse_args(argv)
    try:
        text = args.config.read_text()
    except OSError as e:
        print(f"smm config: cannot read {args.config}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        cfg = ExperimentConfig.from_yaml_text(text, args.overrides, source=str(args.config))
    except ConfigError as e:
        print(f"smm config: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print(f"# model parameters: {count_parameters(build_model(cfg.model)):,}")
    return 0


#: Commands that leave a run folder: the entry point, the one place that may name both sides, writes
#: the run's report when they end (as every federated run does), passing ``report`` to them.
REPORTED = ("centralized", "evaluate")


def write_run_report(run_dir: Path, prog: str) -> Path | None:
    """Write the run folder's report (``smm report``) and say where it is, or why it could not be
    drawn (the finished run's results stay as they are)."""
    from server.report.build import report_after_run  # matplotlib: only once a run has finished

    path, problem = report_after_run(run_dir)
    if path is None:
        print(f"{prog}: {problem}", file=sys.stderr)
    else:
        print(f"{prog}: report {path}")
    return path


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: smm COMMAND [ARGS...]", "", "Federated subspace multimodal learning (fedsmm).", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `smm COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"smm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, _, func = COMMANDS[name][0].partition(":")
    command = getattr(importlib.import_module(module), func)
    if name in REPORTED:
        return int(command(rest, report=write_run_report) or 0)
    return int(command(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
