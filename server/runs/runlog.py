"""The run folder: what a federated run leaves behind for people, reports and a resumed server.

::

    <run_dir>/config.yaml          the resolved configuration this run uses
    <run_dir>/rounds.jsonl         one JSON object per round (0 = the initial model), in order
    <run_dir>/final_metrics.json   best round, selection metric, test metrics (global + per site)
    <run_dir>/model.pt             the selected model: weights + model config + site schema
    <run_dir>/checkpoints/         server checkpoints (server.runs.checkpoint)
    <run_dir>/server.log           the server's log lines (node ids, codes and aggregates only)

Whole files are written atomically (``smm_model.contract.atomic``); ``rounds.jsonl`` grows by appending one
whole, fsynced line per round. JSON is strict: an undefined metric is ``null``, and its reason is
next to it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from smm_model.contract.atomic import append_line, atomic_write_json, atomic_write_text, dumps
from smm_model.contract.runfolder import (CONFIG_FILE, FAILURE_FILE, FINAL_FILE, LOG_FILE, MODEL_FILE, ROUNDS_FILE,
                                         read_rounds_file)

__all__ = ["RunLog", "CONFIG_FILE", "ROUNDS_FILE", "FINAL_FILE", "MODEL_FILE", "LOG_FILE"]

log = logging.getLogger("fedsmm.server.runlog")



class RunLog:
    """Reads and writes the files of one run folder (created on first use)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def rounds_path(self) -> Path:
        return self.dir / ROUNDS_FILE

    @property
    def final_path(self) -> Path:
        return self.dir / FINAL_FILE

    @property
    def model_path(self) -> Path:
        return self.dir / MODEL_FILE

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_FILE

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config_path, text)

    def append_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's record as one fsynced line."""
        append_line(self.rounds_path, dumps(record))

    def amend_last_round(self, record: Mapping[str, Any]) -> None:
        """Replace the last round's record (the one awaiting its validation, which arrives with the
        next round's replies), rewriting the file atomically."""
        rounds = self.read_rounds()
        if not rounds or int(rounds[-1].get("round", -1)) != int(record["round"]):
            raise ValueError(f"{self.rounds_path}: the last record is not round {record['round']}'s")
        atomic_write_text(self.rounds_path, "".join(dumps(r) + "\n" for r in [*rounds[:-1], record]))

    def read_rounds(self) -> list[dict[str, Any]]:
        """All complete round records; a torn last line (a crash mid-append) is left out with a
        warning, any other unreadable line is an error naming the file and line."""
        rounds = read_rounds_file(self.rounds_path)
        if rounds.torn:
            log.warning("%s: ignoring a torn last line (the run stopped while writing it)", self.rounds_path)
        return rounds.strict()

    def truncate_rounds(self, last_round: int) -> list[dict[str, Any]]:
        """Keep the records of rounds ``<= last_round`` (resume: the rounds after the checkpoint are
        redone, so their old records go), rewriting the file atomically. Returns the kept records."""
        kept = [r for r in self.read_rounds() if int(r.get("round", -1)) <= last_round]
        rounds = [int(r["round"]) for r in kept]
        if rounds != list(range(len(rounds))):
            raise ValueError(f"{self.rounds_path}: rounds {rounds} are not 0..{last_round} without gaps")
        atomic_write_text(self.rounds_path, "".join(dumps(r) + "\n" for r in kept))
        return kept

    def write_final(self, metrics: Mapping[str, Any]) -> None:
        """The finished run's record; a failure recorded by an earlier attempt of this run (which
        this one resumed and finished) goes."""
        atomic_write_json(self.final_path, metrics)
        self.failure_path.unlink(missing_ok=True)

    @property
    def failure_path(self) -> Path:
        return self.dir / FAILURE_FILE

    def write_failure(self, record: Mapping[str, Any]) -> None:
        atomic_write_json(self.failure_path, record)

    @contextlib.contextmanager
    def log_to_file(self, logger_name: str = "fedsmm") -> Iterator[None]:
        """Copy ``logger_name``'s records into ``server.log`` for the duration of the block."""
        handler = logging.FileHandler(self.dir / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger(logger_name)
        level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:  # the round summaries are INFO records
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            handler.close()
