"""The Flower ClientApp: a thin adapter from messages to ``client/local/round.py``.

The message contract (types, record names, config keys) is ``smm_model.contract.wire``.

Each handler parses the config once, finds the site folder (``site-dir`` in the SuperNode's
node_config, or ``partition-id`` in simulation), calls one plain function and wraps the result.

Failures: Flower returns the text of an exception raised here to the server, so a handler never
lets an exception with a path, patient id or value escape. The full error (with its traceback and
cause) goes to the SITE's log only; what is raised is ``SiteError("E_<STAGE>: <ExceptionClass>")``
with no chained context. The site log is a file: ``node_config["log-file"]``, else
``$FEDSMM_SITE_LOG_DIR/<site folder name>.log`` (``smm simulate`` sets it to the run folder), else
``<site-dir>/logs/fedsmm-client.log``. In deployment (``site-dir`` given) the details also go to
the SuperNode's own stderr, which stays at the hospital; in simulation the console is shared with
the server's log, so only the sanitized line is printed there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local.round import (SITE_DIR_KEY, SiteError, evaluate_round, preflight_summary, resolve_site_dir,
                                ledger_file, site_label, site_modalities, site_policy, stage, train_round,
                                trained_tensors)
from smm_model.config import ExperimentConfig
from smm_model.contract import wire
from smm_model.contract.packing import Layout, pack, unpack
from smm_model.contract.protocol import SharedStats

__all__ = ["app", "LOG_DIR_ENV", "OPTIMIZER_STATE_KEY", "site_log_path"]

#: Environment variable naming a folder for the site logs (one file per site folder name).
LOG_DIR_ENV = "FEDSMM_SITE_LOG_DIR"
#: Key of the site's optimizer state in its ``Context.state`` (federation.site_optimizer: persist).
OPTIMIZER_STATE_KEY = "fedsmm-optimizer"

app = ClientApp()


def site_log_path(node_config: dict[str, Any], site_dir: Path | None) -> Path | None:
    """Where this node's detailed log goes (see the module docstring); None if nowhere is known."""
    if isinstance(node_config.get("log-file"), str) and node_config["log-file"]:
        return Path(node_config["log-file"]).expanduser()
    if site_dir is None:
        return None
    if os.environ.get(LOG_DIR_ENV):
        return Path(os.environ[LOG_DIR_ENV]) / f"{site_dir.name}.log"
    return site_dir / "logs" / "fedsmm-client.log"


def _logger(node_config: dict[str, Any], site_dir: Path | None) -> logging.Logger:
    """This site's logger: its own file (and, in deployment, the SuperNode's stderr), nothing else.

    One logger per log file, never shared: in simulation one Ray actor serves several sites in
    turn, and a shared logger with one handler per file would copy every site's lines into every
    other site's log.
    """
    path = site_log_path(node_config, site_dir)
    deployment = SITE_DIR_KEY in node_config
    key = f"{path}|{deployment}"
    log = logging.getLogger("fedsmm.client.site." + hashlib.sha256(key.encode()).hexdigest()[:16])
    if getattr(log, "_fedsmm_configured", False):
        return log
    log.propagate = False  # never into Flower's or the root handlers (they may print to a shared console)
    log.setLevel(logging.INFO)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        except OSError:
            pass  # a read-only site folder: keep going without a file log
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
    if deployment:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s fedsmm-site %(levelname)s %(message)s"))
        log.addHandler(handler)
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    log._fedsmm_configured = True  # type: ignore[attr-defined]
    return log


def _threads(context: Context, cfg: ExperimentConfig) -> None:
    """Simulation: hold torch to the CPUs Ray reserved per simulated site (federation.client_cpus),
    so parallel ClientApps do not oversubscribe the machine. Deployment keeps torch's default."""
    if "partition-id" in context.node_config and SITE_DIR_KEY not in context.node_config:
        torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))


Work = Callable[[Message, ExperimentConfig, Path, logging.Logger], RecordDict]


def _handle(kind: str, msg: Message, context: Context, work: Work) -> Message:
    """Parse, resolve the site, run ``work``; sanitize any failure (see the module docstring)."""
    node_config = dict(context.node_config)
    site_dir: Path | None = None
    try:
        with stage("E_PROTOCOL"):
            text = str(msg.content[wire.CONFIG][wire.KEY_EXPERIMENT])
        with stage("E_CONFIG"):
            cfg = ExperimentConfig.from_yaml_text(text, source="the run's experiment config")
            # The site's own minimum cell count (node config min-cell) can raise the run's, never lower it.
            cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(
                cfg.privacy, min_cell=site_policy(cfg, node_config).k))
            site_dir = resolve_site_dir(node_config, cfg)
        _threads(context, cfg)
        log = _logger(node_config, site_dir)
        return Message(content=work(msg, cfg, site_dir, log), reply_to=msg)
    except Exception as e:  # noqa: BLE001 - the one place where failures are sanitized
        err = e if isinstance(e, SiteError) else SiteError("E_INTERNAL", type(e).__name__)
        _logger(node_config, site_dir).error("%s failed (%s)", kind, err, exc_info=e)
        print(f"fedsmm site: {kind} failed: {err} (details in the site log)", file=sys.stderr, flush=True)
        raise SiteError(err.code, err.cause_type) from None


def _weights_in(content: RecordDict, name: str) -> tuple[dict[str, torch.Tensor], Layout]:
    """The packed weights record ``name`` of an instruction, unpacked with the layout the server
    sent beside it (``smm_model.contract.packing``): flat arrays that do not fit it are a protocol error."""
    with stage("E_PROTOCOL"):
        layout = Layout.from_json(str(content[wire.CONFIG][wire.layout_key(name)]))
        arrays = unpack({k: a.numpy() for k, a in content[name].items()}, layout)
        return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, layout


def _weights_out(state: dict[str, torch.Tensor], layout: Layout) -> ArrayRecord:
    """Weights packed in the instruction's layout (same names, shapes, dtypes and order), so the
    server unpacks them with the layout it sent; anything else is refused here, before it leaves."""
    with stage("E_PROTOCOL"):
        flat, _ = pack({k: v.detach().cpu().numpy() for k, v in state.items()}, layout)
        return ArrayRecord({dtype: Array(a) for dtype, a in flat.items()})


def _shared(cfg_rec: ConfigRecord) -> SharedStats:
    with stage("E_PROTOCOL"):
        return SharedStats.from_json(str(cfg_rec[wire.KEY_SHARED]))


def _preflight(msg: Message, cfg: ExperimentConfig, site_dir: Path, log: logging.Logger,
               label: str | None = None, ledger: Path | None = None) -> RecordDict:
    summary = preflight_summary(site_dir, cfg, label=label, ledger_path=ledger)
    log.info("preflight: %s training patients", summary.splits["train"]["patients"])
    return RecordDict({wire.SUMMARY: ConfigRecord({wire.SUMMARY_JSON: summary.to_json()})})


def _train(msg: Message, cfg: ExperimentConfig, site_dir: Path, log: logging.Logger,
           site_state: RecordDict | None = None, node_config: dict[str, Any] | None = None) -> RecordDict:
    """One local round. With ``federation.site_optimizer: persist`` the optimizer's state is read
    from and written back to ``site_state`` (the node's ``Context.state``, which Flower keeps on the
    site across the messages of a run); it is never part of the reply."""
    c = msg.content[wire.CONFIG]
    shared = _shared(c)
    with stage("E_PROTOCOL"):
        rnd = int(c[wire.KEY_ROUND])
        lr, epochs = float(c[wire.KEY_LR]), int(c[wire.KEY_LOCAL_EPOCHS])
        steps = int(c[wire.KEY_LOCAL_STEPS]) if wire.KEY_LOCAL_STEPS in c else 0
        mu = float(c[wire.KEY_PROXIMAL_MU]) if wire.KEY_PROXIMAL_MU in c else 0.0
    state, layout = _weights_in(msg.content, wire.ARRAYS)
    control, control_layout = (_weights_in(msg.content, wire.CONTROL) if wire.CONTROL in msg.content.array_records
                               else (None, None))
    with stage("E_PROTOCOL"):
        validate = str(c[wire.KEY_VALIDATE]) if wire.KEY_VALIDATE in c else None
    # One message phase per round: the weights as received are validated first (the global model
    # of the previous round), then trained on.
    t_val = time.perf_counter()
    val_stats = evaluate_round(site_dir, cfg, shared, state, validate) if validate else None
    t_val = time.perf_counter() - t_val
    persist = site_state is not None and cfg.federation.site_optimizer == "persist"
    previous = None
    with stage("E_TRAIN"):
        if persist and OPTIMIZER_STATE_KEY in site_state:
            previous = site_state[OPTIMIZER_STATE_KEY].to_torch_state_dict()
    new_state, metrics, optimizer_state, new_control = train_round(
        site_dir, cfg, shared, state, lr, epochs, mu, server_round=rnd, local_steps=steps, optimizer_state=previous,
        control=control, ledger_path=ledger_file(site_dir, node_config) if cfg.privacy.dp else None)
    if val_stats is not None:  # the site's seconds for this message: validation and training
        metrics = {**metrics, wire.SECONDS: float(metrics[wire.SECONDS]) + t_val}
    if persist:
        site_state[OPTIMIZER_STATE_KEY] = ArrayRecord(optimizer_state)
    reply = RecordDict({wire.ARRAYS: _weights_out(new_state, layout), wire.METRICS: MetricRecord(metrics)})
    digests = {wire.ARRAYS: layout.digest}
    if new_control is not None:  # SCAFFOLD: the site's new c_i (its mean gradient), for the server to average
        if control_layout is None:
            raise SiteError("E_PROTOCOL", "MissingControlLayout")
        reply[wire.CONTROL] = _weights_out(new_control, control_layout)
        digests[wire.CONTROL] = control_layout.digest
    reply[wire.LAYOUT] = ConfigRecord(digests)
    with stage("E_CONFIG"):
        trained = trained_tensors(cfg, site_modalities(site_dir))
    if trained is not None:  # a site lacking a modality: the server averages only what it trained
        reply[wire.TRAINED] = ConfigRecord({wire.TRAINED_TENSORS: list(trained)})
        log.info("train round %d: the site lacks a modality; it trained %d of %d weight tensors", rnd,
                 len(trained), len(new_state))
    if val_stats is not None:
        reply[wire.VALIDATION] = ConfigRecord(val_stats.to_record())
        # "validate", not "train" or "evaluate": log readers (benchmarks/federation_overhead.py) key on the verb.
        log.info("validate round %d on %s (the global model as received, before training): %d patients%s, %.2f s",
                 rnd, validate, val_stats.n, " (suppressed)" if val_stats.suppressed
                 else f", loss {val_stats.loss_sum / max(val_stats.n, 1):.4f}", t_val)
    if wire.DP_EPSILON in metrics:
        log.info("train round %d: DP-SGD, sigma %.3f, C %.3g, q %.3f; the site's epsilon is now %.3f at delta %.1e",
                 rnd, metrics[wire.DP_SIGMA], metrics[wire.DP_CLIP], metrics[wire.DP_SAMPLE_RATE],
                 metrics[wire.DP_EPSILON], metrics[wire.DP_DELTA])
    log.info("train round %d: %d patients, %d steps, loss %s, %.1f s%s", rnd, metrics[wire.NUM_EXAMPLES],
             metrics[wire.STEPS], f"{metrics[wire.TRAIN_LOSS]:.4f}" if wire.TRAIN_LOSS in metrics else "not sent (DP)",
             metrics[wire.SECONDS],
             "" if not persist else (", optimizer state continued from the previous round" if previous is not None
                                     else ", new optimizer state kept at the site"))
    if control is not None:
        log.info("train round %d: SCAFFOLD correction applied (norm %.4g)", rnd,
                 float(sum(float((v.double() ** 2).sum()) for v in control.values())) ** 0.5)
    return reply


def _evaluate(msg: Message, cfg: ExperimentConfig, site_dir: Path, log: logging.Logger) -> RecordDict:
    c = msg.content[wire.CONFIG]
    shared = _shared(c)
    with stage("E_PROTOCOL"):
        rnd = int(c[wire.KEY_ROUND]) if wire.KEY_ROUND in c else -1
        split = str(c[wire.KEY_SPLIT])
    state, _ = _weights_in(msg.content, wire.ARRAYS)
    stats = evaluate_round(site_dir, cfg, shared, state, split)
    log.info("evaluate round %d on %s: %d patients%s", rnd, split, stats.n,
             " (suppressed: below federation.min_site_patients or privacy.min_cell)" if stats.suppressed else
             f", loss {stats.loss_sum / max(stats.n, 1):.4f}")
    return RecordDict({wire.METRICS: MetricRecord(stats.to_record())})


@app.query(wire.PREFLIGHT_HANDLER)
def preflight(msg: Message, context: Context) -> Message:
    """Schema and aggregate statistics of this site."""
    node_config = dict(context.node_config)

    def work(m: Message, cfg: ExperimentConfig, site_dir: Path, log: logging.Logger) -> RecordDict:
        with stage("E_CONFIG"):
            label = site_label(node_config, site_dir)
            ledger = ledger_file(site_dir, node_config) if cfg.privacy.dp else None
        return _preflight(m, cfg, site_dir, log, label=label, ledger=ledger)

    return _handle("preflight", msg, context, work)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global weights."""

    def work(m: Message, cfg: ExperimentConfig, site_dir: Path, log: logging.Logger) -> RecordDict:
        return _train(m, cfg, site_dir, log, site_state=context.state, node_config=dict(context.node_config))

    return _handle("train", msg, context, work)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Additive evaluation statistics of the global weights on one split."""
    return _handle("evaluate", msg, context, _evaluate)
