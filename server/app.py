"""The Flower ServerApp: a thin adapter from Flower's Grid to ``server.federation.loop.run_federation``.

Run config keys read here (``[tool.flwr.app.config]`` defaults, ``flwr run --run-config``
overrides; all optional because ``run_simulation`` passes an empty run config):

=================  ===========================================================================
``config-path``    experiment YAML; a relative path is resolved against the installed app
                   directory (the FAB ships ``configs/``). Default ``configs/demo.yaml``.
``overrides``      ``key.path=value`` overrides separated by ``;`` (e.g.
                   ``"federation.rounds=2; train.lr=0.001"``). Default: none.
``run-dir``        where the run folder goes; absolute recommended (the ServerApp inherits the
                   SuperLink's working directory); relative -> against the current directory.
                   Default: ``runs/<config name>-<UTC time>`` under the current directory.
``resume``         ``true`` continues the run in ``run-dir`` from its last valid checkpoint.
=================  ===========================================================================

Everything else (waiting, preflight, guards, checkpoints, metrics) is ``server.federation.loop``; any
failure propagates, so the run ends ``finished:failed`` rather than quietly "completed".
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from smm_model.contract.runfolder import default_run_dir
from smm_model.config import ConfigError, ExperimentConfig

from server.federation.loop import RunDirInUse, run_federation
from server.federation.messages import Instruction, Reply, sanitize_error
from smm_model.contract.packing import Layout, pack, unpack
from smm_model.contract.wire import ARRAYS, CONFIG, CONTROL, KEY_ROUND, LAYOUT, METRICS, layout_key

__all__ = ["app", "main", "RunSettings", "read_run_settings", "parse_overrides", "load_experiment",
           "FlowerTransport", "Packed", "pack_record", "instruction_content", "instruction_message", "reply_from_message", "APP_DIR",
           "RUN_CONFIG_KEYS"]

log = logging.getLogger("fedsmm.server")

#: The installed app directory (the FAB root, holding ``configs/``).
APP_DIR = Path(__file__).resolve().parents[1]
RUN_CONFIG_KEYS = ("config-path", "overrides", "run-dir", "resume")
DEFAULT_CONFIG = "configs/demo.yaml"


# --- run config -> settings (pure) -------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSettings:
    """The ServerApp's inputs, parsed once from Flower's run config."""

    config_path: Path
    overrides: tuple[str, ...]
    run_dir: Path | None  # None: a fresh folder under ./runs, named once the config is loaded
    resume: bool


def parse_overrides(text: str) -> tuple[str, ...]:
    """``"a.b=1; c.d=[x, y]"`` -> ``("a.b=1", "c.d=[x, y]")`` (blank items ignored)."""
    items = tuple(s.strip() for s in text.split(";") if s.strip())
    for item in items:
        if "=" not in item:
            raise ConfigError(f"run config 'overrides': item {item!r} is not key.path=value "
                              f"(items are separated by ';')")
    return items


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"run config {key!r}: expected true or false, got {value!r}")


def _as_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"run config {key!r}: expected a string, got {value!r}")
    return value


def read_run_settings(run_config: Mapping[str, Any], app_dir: Path = APP_DIR, cwd: Path | None = None) -> RunSettings:
    """Parse the run config keys ``RUN_CONFIG_KEYS`` (module docstring); unknown keys are ignored
    (they belong to the ClientApp)."""
    cwd = cwd or Path.cwd()
    cp = Path(_as_str(run_config.get("config-path", DEFAULT_CONFIG), "config-path")).expanduser()
    config_path = cp if cp.is_absolute() else app_dir / cp
    overrides = parse_overrides(_as_str(run_config.get("overrides", ""), "overrides"))
    rd = _as_str(run_config.get("run-dir", ""), "run-dir").strip()
    run_dir = None
    if rd:
        p = Path(rd).expanduser()
        run_dir = p if p.is_absolute() else cwd / p
    return RunSettings(config_path, overrides, run_dir, _as_bool(run_config.get("resume", False), "resume"))


def load_experiment(settings: RunSettings) -> ExperimentConfig:
    """Read and validate the experiment config once (errors name the file and the field)."""
    try:
        text = settings.config_path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"run config 'config-path': cannot read {settings.config_path} "
                          f"({type(e).__name__}); a relative path is resolved against {APP_DIR}") from None
    return ExperimentConfig.from_yaml_text(text, settings.overrides, source=str(settings.config_path))


def _default_run_dir(cfg: ExperimentConfig, cwd: Path | None = None) -> Path:
    return (cwd or Path.cwd()) / default_run_dir(cfg.name)


# --- neutral <-> Flower messages -------------------------------------------------------------------------

@dataclass(frozen=True)
class Packed:
    """A weights mapping as it travels: one flat array per dtype and the layout that unpacks it."""

    record: ArrayRecord
    layout: Layout


def pack_record(arrays: Mapping[str, np.ndarray]) -> Packed:
    flat, layout = pack(arrays)
    return Packed(ArrayRecord({dtype: Array(a) for dtype, a in flat.items()}), layout)


def instruction_content(ins: Instruction, arrays: Packed | None, control: Packed | None = None) -> RecordDict:
    """The content of ``ins``'s message: its config record (with each packed record's layout) and
    the packed weights records."""
    config = dict(ins.config)
    content = RecordDict()
    for name, packed in ((ARRAYS, arrays), (CONTROL, control)):
        if packed is not None:
            content[name] = packed.record
            config[layout_key(name)] = packed.layout.to_json()
    content[CONFIG] = ConfigRecord(config)
    return content


def instruction_message(ins: Instruction, arrays: Packed | None, ttl: float | None = None,
                        control: Packed | None = None) -> Message:
    """A Flower instruction ``Message`` for ``ins`` (only inside a running ServerApp: Flower needs
    the task identity it sets up)."""
    content = instruction_content(ins, arrays, control)
    group = ins.config.get(KEY_ROUND)  # Flower's group id is conventionally the round
    return Message(content=content, dst_node_id=int(ins.node_id), message_type=ins.message_type, ttl=ttl,
                   group_id=None if group is None else str(group))


def reply_from_message(msg: Message, expected: Mapping[str, Layout] | None = None, node_id: int | None = None) -> Reply:
    """A neutral ``Reply`` from a Flower reply; an error becomes a sanitized code (its reason text,
    the site's exception message, is dropped here and goes nowhere).

    ``expected``: the layout each weights record of the instruction was packed with; a reply's
    weights must carry the same layout's digest and fit it exactly, or the reply is ``E_BAD_REPLY``
    (as is a weights record nobody sent a layout for). ``node_id``: the node the instruction went
    to, when the caller matched the reply to it (default: the reply's sender)."""
    nid = int(msg.metadata.src_node_id) if node_id is None else int(node_id)
    if msg.has_error():
        return Reply(nid, error=sanitize_error(int(msg.error.code), msg.error.reason))
    expected = expected or {}
    try:
        content = msg.content
        received = content_bytes(content)
        unpacked: dict[str, dict[str, np.ndarray]] = {}
        digests = dict(content.config_records[LAYOUT]) if LAYOUT in content.config_records else {}
        for name, rec in content.array_records.items():
            layout = expected.get(name)
            if name not in (ARRAYS, CONTROL) or layout is None or digests.get(name) != layout.digest:
                return Reply(nid, error="E_BAD_REPLY")
            unpacked[name] = unpack({k: a.numpy() for k, a in rec.items()}, layout)
        metrics = dict(content.metric_records[METRICS]) if METRICS in content.metric_records else None
        records = {name: dict(rec) for name, rec in content.config_records.items() if name != LAYOUT}
    except Exception:  # an undecodable array or record, weights that do not fit: a bad reply, not a crashed server
        return Reply(nid, error="E_BAD_REPLY")
    return Reply(nid, arrays=unpacked.get(ARRAYS), control=unpacked.get(CONTROL), metrics=metrics, records=records,
                 bytes_received=received)


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: arrays plus the config and metric records (the run's config and
    shared statistics travel as text with every instruction, so they count too)."""
    return int(sum(rec.count_bytes() for rec in content.values()))


class FlowerTransport:
    """``server.federation.loop``'s transport over a Flower ``Grid``.

    ``send`` packs each distinct weights mapping once (all sites of a round share it; one flat
    array per dtype, ``smm_model.contract.packing``), pushes the messages and pulls the replies
    every ``poll_s`` seconds (Flower's ``send_and_receive`` sleeps a fixed 3 s between pulls)
    until all have answered or ``timeout_s`` has passed; a site that did not answer in time gets
    ``E_NO_REPLY``, and its late reply is never pulled (pulls ask for this exchange's message ids
    only). Messages carry ``ttl=timeout_s`` so an instruction nobody picked up in time expires
    instead of being trained on later.
    """

    def __init__(self, grid: Grid, timeout_s: float, poll_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.grid = grid
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s)
        self.clock, self.sleep = clock, sleep

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def _exchange(self, messages: list[Message]) -> list[tuple[int, Message]]:
        """Push, then pull until every pushed message has its reply or the timeout passes; each
        reply with the node its message went to, matched by ``reply_to_message_id``, never by
        sender: the error reply the SuperLink writes for a node it lost (``E_NODE_UNAVAILABLE``)
        names the SuperLink itself as its sender."""
        ids = list(self.grid.push_messages(messages))  # in the messages' order; None: refused by the SuperLink
        to_node = {i: int(m.metadata.dst_node_id) for i, m in zip(ids, messages) if i}
        pending = set(to_node)
        end = self.clock() + self.timeout_s
        replies: list[tuple[int, Message]] = []
        while pending:
            for m in self.grid.pull_messages(sorted(pending)):
                rid = m.metadata.reply_to_message_id
                if rid in pending:
                    pending.discard(rid)
                    replies.append((to_node[rid], m))
            if not pending or self.clock() >= end:
                break
            self.sleep(min(self.poll_s, max(0.0, end - self.clock())))
        return replies

    def send(self, instructions: Sequence[Instruction]) -> list[Reply]:
        packed: dict[int, Packed] = {}
        messages, sent, expected = [], {}, {}

        def record(arrays: Mapping[str, np.ndarray] | None) -> Packed | None:
            if arrays is None:
                return None
            if id(arrays) not in packed:
                packed[id(arrays)] = pack_record(arrays)
            return packed[id(arrays)]

        for ins in instructions:
            a, c = record(ins.arrays), record(ins.control)
            messages.append(instruction_message(ins, a, ttl=self.timeout_s, control=c))
            sent[int(ins.node_id)] = content_bytes(messages[-1].content)
            # The site replies with weights of the model it was sent (and SCAFFOLD's control variate
            # in the correction's layout: the model's parameters).
            expected[int(ins.node_id)] = {name: p.layout for name, p in ((ARRAYS, a), (CONTROL, c)) if p is not None}
        by_node: dict[int, Reply] = {}
        for node, m in self._exchange(messages):
            by_node.setdefault(node, reply_from_message(m, expected.get(node), node_id=node))
        out = []
        for ins in instructions:
            r = by_node.get(int(ins.node_id)) or Reply(int(ins.node_id), error="E_NO_REPLY")
            r.bytes_sent = sent[int(ins.node_id)]
            out.append(r)
        return out


# --- the ServerApp -----------------------------------------------------------------------------------------

def _ensure_logging() -> None:
    """Make our INFO records visible (Flower mirrors the ServerApp's stderr into ``flwr log``)."""
    logger = logging.getLogger("fedsmm")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Parse the run config once, build the transport, run the federation; failures propagate."""
    _ensure_logging()
    settings = read_run_settings(context.run_config)
    cfg = load_experiment(settings)
    run_dir = settings.run_dir or _default_run_dir(cfg)
    log.info("run %r: config %s, run folder %s%s", cfg.name, settings.config_path, run_dir,
             " (resume)" if settings.resume else "")
    transport = FlowerTransport(grid, timeout_s=cfg.federation.round_timeout_s, poll_s=cfg.federation.poll_interval_s)
    try:
        run_federation(transport, cfg, run_dir, resume=settings.resume)
    except RunDirInUse:
        raise  # another run's folder: its report is not this run's to rewrite
    except Exception:
        _report(run_dir, "failed")  # what was recorded, with the reason (failure.json); then the run fails
        raise
    _report(run_dir, "finished")


def _report(run_dir: Path, how: str) -> None:
    from server.report.build import report_after_run  # matplotlib: imported only once the run has ended

    if not run_dir.is_dir():
        return
    path, problem = report_after_run(run_dir)
    if path is not None:
        log.info("report: %s", path)
    else:
        log.warning("the run %s but %s", how, problem)
