"""Which round a run keeps, and the final record it writes: one rule for every kind of run.

A federated run (``server.federation.loop``) and a pooled run (``client.baselines.centralized``:
centralized, local-only, the IID control) choose their model the same way and describe it with the
same ``final_metrics.json`` keys (``runfolder.FINAL_KEYS``), so that the report and the benchmarks
compare like with like. The rule: the round whose validation value of
``federation.selection_metric`` is best (lowest for a loss, highest otherwise; a tie keeps the
earlier round); a round without a finite value cannot be chosen; if none had one, the last usable
round is kept and the final record says so. Never the test split: it is evaluated once, on the
chosen model.

Values are compared only between rounds validated by the same number of sites: a round that a site
missed (dead, timed out) is validated on fewer patients, and its loss or AUC is not comparable with
a round's over every site. A round validated by more sites replaces one validated by fewer, and a
round validated by fewer sites than the best is passed over (``selection_note`` in the final
record says which rounds were passed over or compared across different sites).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smm_model.config import ExperimentConfig
from smm_model.contract.protocol import selection_lower_is_better
from smm_model.contract.records import library_versions
from smm_model.contract.runfolder import C_INDEX_NOTE, FEDERATED_KEYS, FINAL_KEYS

__all__ = ["Selection", "final_record"]

#: Keys a pooled run adds to the final record: how many epochs it trained and on which sites.
POOLED_KEYS = ("epochs", "training_sites")


@dataclass
class Selection:
    """The best round so far and its validation value (checkpointed by a federated run)."""

    metric: str
    lower_is_better: bool
    best_round: int | None = None
    best_value: float | None = None
    best_sites: int | None = None  # how many sites validated the best round (None: not counted)

    @classmethod
    def for_config(cls, cfg: ExperimentConfig, best_round: int | None = None,
                   best_value: float | None = None) -> Selection:
        """Validates ``federation.selection_metric`` against the enabled tasks."""
        return cls(cfg.federation.selection_metric, selection_lower_is_better(cfg), best_round, best_value)

    def offer(self, round_: int, value: float | None, sites: int | None = None) -> bool:
        """Round ``round_`` scored ``value`` on validation over ``sites`` sites (None: not
        evaluated or not finite); True when it becomes the best round. Idempotent: offering the
        best round's own value again changes nothing."""
        if value is None:
            return False
        if self.best_value is not None:
            more = sites is not None and self.best_sites is not None and sites > self.best_sites
            fewer = sites is not None and self.best_sites is not None and sites < self.best_sites
            better = value < self.best_value if self.lower_is_better else value > self.best_value
            if fewer or not (more or better):
                return False
        self.best_round, self.best_value, self.best_sites = round_, value, sites
        return True

    def record(self, value: float | None) -> dict[str, Any]:
        """The ``selection`` entry of a round record in ``rounds.jsonl``."""
        return {"metric": self.metric, "value": value, "best_round": self.best_round, "best_value": self.best_value}

    def chosen(self, last_round: int, last_what: str = "round") -> tuple[int, str | None]:
        """(the round to keep, a note when it is not a validated choice): the best round, or
        ``last_round`` (the last ``last_what``) when no round had a finite value."""
        if self.best_round is not None:
            return self.best_round, None
        return last_round, (f"no round had a finite validation {self.metric}; the last {last_what} ({last_round}) "
                            "was selected")


def final_record(*, mode: str, cfg: ExperimentConfig, rounds: int, selection: Selection, best_round: int,
                 note: str | None, test: Mapping[str, Any], sites: Sequence[Any], model_file: str, model_sha256: str,
                 wall_s: float, config_text: str, site_info: Mapping[str, Any],
                 refused_sites: Mapping[str, Any] | None = None, skipped_rounds: Sequence[int] = (),
                 notes: Mapping[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """``final_metrics.json`` of any run: the ``FINAL_KEYS`` in order, then ``extra`` (a federated
    run's ``FEDERATED_KEYS``, a pooled run's ``POOLED_KEYS``); any other extra key is refused, so
    a new field is added here, once, for every kind of run."""
    unknown = set(extra) - set(FEDERATED_KEYS) - set(POOLED_KEYS)
    if unknown:
        raise ValueError(f"final_metrics.json: unknown keys {sorted(unknown)}; add them to the run-folder contract")
    out = {
        "mode": mode, "run": cfg.name, "rounds": rounds, "best_round": best_round,
        "selection_metric": selection.metric, "selection_value": selection.best_value,
        "lower_is_better": selection.lower_is_better, "selection_note": note,
        "test": dict(test), "suppressed_sites": test["suppressed"],
        "notes": {"survival.c_index": C_INDEX_NOTE, **(notes or {})},
        "sites": list(sites), "refused_sites": dict(refused_sites or {}), "skipped_rounds": list(skipped_rounds),
        "model": {"file": model_file, "sha256": model_sha256}, "versions": library_versions(), "wall_s": wall_s,
        "config_sha256": hashlib.sha256(config_text.encode("utf-8")).hexdigest(), "site_info": dict(site_info),
    }
    assert tuple(out) == FINAL_KEYS
    return {**out, **extra}
