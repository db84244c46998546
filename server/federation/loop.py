"""The server's federated workflow, over an abstract transport (no Flower types here).

``run_federation(transport, cfg, run_dir)`` is the whole server side of a run (architecture.md,
"Federated protocol"):

1. wait (bounded) for ``federation.min_nodes`` sites; send every connected site the preflight
   query; refuse sites whose schema differs (naming site and field) and go on with the rest if
   enough remain; derive the shared statistics; check the strategy's site-count constraints.
   A site that connects later (or a restarted SuperNode with a new node id) is preflighted when
   it is first seen and joins from the next round if it matches the run; a refused site stays
   refused for the run;
2. round 0: the initial model (``build_model`` under ``torch.manual_seed(federation.seed)``) is
   evaluated on the sites' validation splits, so learning can be shown against it;
3. rounds 1..R: cosine learning rate over the rounds, train on the sampled sites (seeded sampler),
   guard + aggregate (``server.aggregation.strategy.GuardedStrategy``), evaluate on "val" (every
   ``federation.eval_every``-th round and the last), append a line to
   ``rounds.jsonl``, checkpoint, track the best round by ``federation.selection_metric``;
4. final: the best round's model is evaluated on every site's "test" split; ``final_metrics.json``
   and ``model.pt`` are written.

``resume=True`` continues from the newest valid checkpoint: same weights, optimiser state, shared
statistics, sampler and RNG states, so rounds are numbered without gaps or duplicates and, with
deterministic sites, the final weights equal an uninterrupted run's bit for bit.

A ``transport`` has ``node_ids() -> list[int]`` and ``send(list[Instruction]) -> list[Reply]``
(``server.federation.messages``); ``server.app.FlowerTransport`` is the Flower one, tests use in-process fakes.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from server.aggregation.guard import guard_eval_replies
from server.aggregation.central_dp import CentralDP, check_central_dp
from server.aggregation.strategy import AggregateOutcome, ControlVariates, GuardedStrategy, build_strategy
from server.federation.messages import Instruction, Reply, Transport
from server.federation.wait import NodeWaitTimeout, wait_for_nodes
from server.runs.checkpoint import (CHECKPOINT_DIR, INDEX_FILE, ServerState, capture_rng, library_versions,
                                    load_checkpoint, load_latest, restore_rng, save_checkpoint)
from server.runs.runlog import RunLog
from smm_model.config import TASK_CLASSES, ConfigError, ExperimentConfig, to_dict
from smm_model.contract.protocol import (HISTOLOGY_FIELDS, PROTOCOL_VERSION, SCHEMA_FIELDS, SURVIVAL_HIST_EDGES,
                                         EvalStats, SchemaMismatch, SharedStats, SiteSummary, check_schemas, site_modalities,
                                         derive_shared, evaluation_round, metrics_from_eval, round_lr,
                                         selection_value)
from smm_model.contract.protocol import config_text as resolved_config_text
from smm_model.contract.runfolder import model_payload, write_model
from smm_model.contract.selection import Selection, final_record
from smm_model.contract.stats import GenomicsStats
from smm_model.contract.wire import (EVALUATE, KEY_EXPERIMENT, KEY_LOCAL_EPOCHS, KEY_LOCAL_STEPS, KEY_LR,
                                     KEY_PROXIMAL_MU, KEY_ROUND, KEY_SHARED, KEY_SPLIT, KEY_VALIDATE, PREFLIGHT,
                                     SUMMARY, SUMMARY_JSON, TRAIN, VALIDATION)
from smm_model.metrics.exact import MetricReport
from smm_model.nn.model import build_model

__all__ = ["run_federation", "RunDirInUse", "resolved_config_text", "round_lr", "sample_nodes", "initial_weights"]

log = logging.getLogger("fedsmm.server")

#: Printed beside every federated C-index (smm_model.metrics.federated explains why).


class RunDirInUse(RuntimeError):
    """A fresh run was asked to write into a folder that already holds a run."""


# --- small pure helpers ---------------------------------------------------------------------------------







def sample_nodes(rng: random.Random, available: Sequence[int], fraction: float, minimum: int) -> list[int]:
    """``max(int(n * fraction), minimum)`` of the ``n`` available nodes (capped at n), drawn with
    ``rng`` from the sorted ids, so the draw depends only on the seed and the node set."""
    nodes = sorted(int(n) for n in available)
    k = min(len(nodes), max(int(len(nodes) * fraction), minimum))
    if k >= len(nodes):
        return nodes
    return sorted(rng.sample(nodes, k))


def initial_weights(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """The initial global model: ``build_model(cfg.model)`` under ``torch.manual_seed(federation.seed)``."""
    torch.manual_seed(cfg.federation.seed)
    model = build_model(cfg.model)
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def model_parameters(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """The model's trainable parameters (names and shapes as the initial model's), the arrays a
    SCAFFOLD control variate has."""
    torch.manual_seed(cfg.federation.seed)
    return {k: p.detach().cpu().numpy().copy() for k, p in build_model(cfg.model).named_parameters()}


def _report_dict(report: MetricReport) -> dict[str, Any]:
    return report.to_dict()


# --- evaluation results ---------------------------------------------------------------------------------

@dataclass
class EvalOutcome:
    """One evaluation of the global model over the sites' ``split``.

    Suppressed sites (they said so, or they evaluated fewer than ``federation.min_site_patients``
    patients) contribute nothing to the global metrics and get no per-site metrics: only their node
    id is recorded.
    """

    split: str
    global_report: MetricReport
    per_site: dict[int, tuple[int, MetricReport]]
    suppressed: list[int]
    dropped: list[tuple[int, str]]
    sampled: list[int]
    bytes_sent: int = 0
    bytes_received: int = 0
    pooled: EvalStats | None = None  # the summed statistics behind global_report (plots in reports)
    km_grid: list[float] | None = None

    @property
    def patients(self) -> int:
        return int(sum(n for n, _ in self.per_site.values()))

    @property
    def sites_validated(self) -> int:
        """Sites that took part (suppressed ones too: they always are, their split is small)."""
        return len(self.per_site) + len(self.suppressed)

    def to_record(self) -> dict[str, Any]:
        # The pooled statistics (for the report's confusion matrices, ROC and Kaplan-Meier curves)
        # are kept with the final test evaluation only; validation rounds keep their metrics.
        pooled = {"stats": self.pooled.to_record()} if self.pooled is not None and self.split == "test" else {}
        return {"split": self.split, "sampled": self.sampled, "patients": self.patients,
                "global": {**_report_dict(self.global_report), **pooled}, "km_grid": self.km_grid,
                "per_site": {str(n): {"patients": p, **_report_dict(r)} for n, (p, r) in sorted(self.per_site.items())},
                "suppressed": self.suppressed,
                "dropped": [{"node": n, "reason": c} for n, c in self.dropped]}


def summarise_eval(replies: Sequence[Reply], cfg: ExperimentConfig, km_len: int | None, split: str,
                   sampled: Sequence[int], km_grid: Sequence[float] | None = None) -> EvalOutcome:
    """Guard evaluate replies, apply suppression, and compute global and per-site metrics (the
    pooled statistics are kept too: reports draw confusion matrices, ROC and Kaplan-Meier curves
    from them)."""
    n_classes = cfg.model.n_classes
    parsed, dropped = guard_eval_replies(replies, n_classes, km_len)
    min_p = cfg.federation.min_site_patients
    suppressed = sorted(n for n, s in parsed.items() if s.suppressed or s.n < min_p)
    per_site: dict[int, tuple[int, MetricReport]] = {}
    for nid in sorted(parsed):
        if nid in suppressed:
            continue
        try:
            per_site[nid] = (int(parsed[nid].n), metrics_from_eval(parsed[nid], n_classes))
        except (ValueError, TypeError, KeyError):
            dropped.append((nid, "E_BAD_METRICS"))
            log.warning("dropped the evaluation reply of node %d: E_BAD_METRICS", nid)
    total = EvalStats.merge([parsed[n] for n in sorted(per_site)])
    return EvalOutcome(split=split, global_report=metrics_from_eval(total, n_classes), per_site=per_site,
                       suppressed=suppressed, dropped=dropped, sampled=list(sampled),
                       bytes_sent=sum(r.bytes_sent for r in replies),
                       bytes_received=sum(r.bytes_received for r in replies), pooled=total,
                       km_grid=list(km_grid) if km_grid is not None else None)


def validated_sites(val: Mapping[str, Any] | None) -> int | None:
    """How many sites took part in a round record's validation (``EvalOutcome.sites_validated``)."""
    if not isinstance(val, Mapping):
        return None
    return len(val.get("per_site") or {}) + len(val.get("suppressed") or [])


def selection_sites_note(rounds: Sequence[Mapping[str, Any]], best_round: int, n_sites: int) -> str | None:
    """What the final record says when rounds were validated by different numbers of sites
    (``Selection.offer`` compares values only between equal counts), else None."""
    counts = {int(r["round"]): validated_sites(r.get("val")) for r in rounds
              if int(r["round"]) > 0 and (r.get("selection") or {}).get("value") is not None}
    best = counts.get(best_round)
    if best is None:
        return None
    fewer = sorted(k for k, c in counts.items() if c is not None and c < best)
    parts = []
    if fewer:
        parts.append(f"round(s) {', '.join(map(str, fewer))} were validated by fewer sites than round {best_round} "
                     f"({', '.join(str(counts[k]) for k in fewer)} against {best}) and were not compared with it")
    if best < n_sites:
        parts.append(f"round {best_round} was validated by {best} of the run's {n_sites} sites")
    return "; ".join(parts) or None


# --- preflight ------------------------------------------------------------------------------------------

def _parse_summary(reply: Reply, cfg: ExperimentConfig) -> SiteSummary | str:
    """The site's summary, or a reason code (never the site's text)."""
    if reply.error is not None:
        return reply.error
    text = reply.records.get(SUMMARY, {}).get(SUMMARY_JSON)
    if not isinstance(text, str):
        return "E_MISSING_SUMMARY"
    try:
        s = SiteSummary.from_json(text)
        train = s.splits["train"]
        for task, n_cls in TASK_CLASSES.items():  # derive_shared reads both, whatever the run's tasks
            if len(train[task]) != n_cls:
                return "E_BAD_SUMMARY"
        if s.genomics:
            GenomicsStats.from_dict(s.genomics)
        n_hist = len(SURVIVAL_HIST_EDGES) - 1
        if len(s.survival_hist_events) != n_hist or len(s.survival_hist_all) != n_hist:
            return "E_BAD_SUMMARY"
        if not isinstance(s.schema, dict):
            return "E_BAD_SUMMARY"
    except (ValueError, TypeError, KeyError, AttributeError):
        return "E_BAD_SUMMARY"
    return s


def _cross_site_fields(cfg: ExperimentConfig) -> list[str]:
    """Schema fields that must agree *between* sites (the others are checked against the config)."""
    against_config = {"genes_tumour", "genes_micro", "genomics_policy"}
    if cfg.model.arch != "snn":
        against_config.add("feature_dim")
    return [k for k in SCHEMA_FIELDS
            if k not in against_config and not (cfg.model.arch == "snn" and k in HISTOLOGY_FIELDS)]


def _features(s: SiteSummary) -> tuple[str, ...]:
    return tuple((s.genomics or {}).get("features", ()))


def compare_with_reference(nid: int, s: SiteSummary, ref_nid: int, ref: SiteSummary,
                           cfg: ExperimentConfig) -> str | None:
    """Why site ``nid`` cannot join a run whose reference site is ``ref_nid`` (None: it can).

    Checks the site against the config, then the fields that must agree between sites (encoder,
    gene set) and the genomic feature list; the message names the site and the field.
    """
    try:
        check_schemas({str(nid): s}, cfg)
        check_schemas({str(ref_nid): ref, str(nid): s}, cfg)
    except SchemaMismatch as e:
        return str(e)[:500]
    if "genomics" in site_modalities(s) and "genomics" in site_modalities(ref) and _features(s) != _features(ref):
        return (f"site {nid}: genomics features differ from site {ref_nid}'s ({len(_features(s))} vs "
                f"{len(_features(ref))} features, or another order)")
    return None


def screen_sites(summaries: Mapping[int, SiteSummary], cfg: ExperimentConfig
                 ) -> tuple[dict[int, SiteSummary], dict[int, str], int | None]:
    """Accept the sites whose schema matches the run and the majority; refuse the others.

    Returns (accepted, refused: node -> message naming site and field, the reference node). Each
    site is first checked against the config (``check_schemas``); among those that pass, the largest
    group agreeing on the cross-site fields (encoder, gene set, genomic feature list) is kept, ties
    going to the group of the smallest node id, and every other site is refused with a message
    comparing it with the reference site (the group's smallest node id). The reference group is one
    of sites holding every modality when there is one (a site declaring no histology has no encoder
    to agree on, one declaring no genomics no genomic feature list).
    """
    refused: dict[int, str] = {}
    ok: dict[int, SiteSummary] = {}
    for nid in sorted(summaries):
        try:
            check_schemas({str(nid): summaries[nid]}, cfg)
            ok[nid] = summaries[nid]
        except SchemaMismatch as e:
            refused[nid] = str(e)[:500]
    fields = _cross_site_fields(cfg)
    groups: dict[tuple, list[int]] = {}
    for nid in sorted(ok):
        key = tuple(repr(ok[nid].schema.get(f)) for f in fields) + (_features(ok[nid]),)
        groups.setdefault(key, []).append(nid)
    if not groups:
        return {}, refused, None
    # A site holding every modality carries the whole schema (encoder, feature width, genomic
    # features), so the reference holds the most modalities there are: a site lacking one is then
    # compared on what it has.
    ref = max(groups.values(), key=lambda ids: (len(site_modalities(ok[ids[0]])), len(ids), -ids[0]))[0]
    accepted: dict[int, SiteSummary] = {}
    for nid in sorted(ok):
        why = compare_with_reference(nid, ok[nid], ref, ok[ref], cfg)
        if why is None:
            accepted[nid] = ok[nid]
        else:
            refused[nid] = why
    return accepted, refused, ref


# --- the run --------------------------------------------------------------------------------------------

@dataclass
class _Progress:
    """What changes round by round (and is checkpointed)."""

    weights: dict[str, np.ndarray]
    round: int = 0
    selection: Selection | None = None  # the best validated round so far
    skipped: list[int] = field(default_factory=list)


class FederationRun:
    """One server run; ``run_federation`` is the public entry point."""

    def __init__(self, transport: Transport, cfg: ExperimentConfig, run_dir: str | Path, resume: bool, *,
                 keep_last: int, poll_s: float, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self.transport, self.cfg, self.fed = transport, cfg, cfg.federation
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.keep_last, self.poll_s, self.clock, self.sleep = keep_last, poll_s, clock, sleep
        Selection.for_config(cfg)  # an unknown or disabled selection metric fails before any site is asked
        check_central_dp(cfg)  # so does a central DP config this server cannot honour
        self.config_text = resolved_config_text(cfg)
        self.runlog = RunLog(self.run_dir)
        self.accepted: list[int] = []
        self.refused: dict[int, str] = {}
        self.schema: dict[str, Any] = {}
        self.reference: tuple[int, SiteSummary] | None = None  # set by preflight
        self._guarded: GuardedStrategy | None = None  # built once the number of sites is known
        self.shared_json = ""
        self.km_len: int | None = None
        self.km_grid: list[float] | None = None
        self.sampler = random.Random(self.fed.seed)
        self.site_info: dict[int, dict[str, Any]] = {}  # accepted sites' counts and provenance
        self.started = time.monotonic()
        self.resumed_after: int | None = None
        self.pending: dict[str, Any] | None = None  # the last round record, awaiting its validation

    @property
    def guarded(self) -> GuardedStrategy:
        if self._guarded is None:
            raise RuntimeError("the strategy is built after preflight")
        return self._guarded

    # -- plumbing

    def _wait(self) -> list[int]:
        return wait_for_nodes(self.transport.node_ids, self.fed.min_nodes, self.fed.wait_for_nodes_s,
                              poll_s=self.poll_s, clock=self.clock, sleep=self.sleep)

    def _send(self, instructions: Sequence[Instruction]) -> list[Reply]:
        """One reply per instruction, in order; a node that did not answer gets E_NO_REPLY."""
        if not instructions:
            return []
        by_node: dict[int, Reply] = {}
        for r in self.transport.send(list(instructions)):
            if int(r.node_id) in by_node:
                continue
            by_node[int(r.node_id)] = r
        out = []
        for ins in instructions:
            r = by_node.pop(ins.node_id, None)
            if r is None:
                log.warning("node %d did not reply (%s)", ins.node_id, ins.message_type)
                r = Reply(ins.node_id, error="E_NO_REPLY")
            out.append(r)
        for nid in by_node:
            log.warning("ignoring a reply from node %d, which was not asked", nid)
        return out

    def _base_config(self, server_round: int) -> dict[str, Any]:
        return {KEY_EXPERIMENT: self.config_text, KEY_SHARED: self.shared_json, KEY_ROUND: int(server_round)}

    # -- phases

    def _ask_preflight(self, nodes: Sequence[int]) -> dict[int, SiteSummary]:
        """Send the preflight query; sites whose answer is unusable are refused (with a code)."""
        replies = self._send([Instruction(n, PREFLIGHT, {KEY_EXPERIMENT: self.config_text}) for n in nodes])
        summaries: dict[int, SiteSummary] = {}
        for r in replies:
            parsed = _parse_summary(r, self.cfg)
            if isinstance(parsed, str):
                self.refused[int(r.node_id)] = f"site {r.node_id}: preflight failed ({parsed})"
                log.error("refused site %d: %s", r.node_id, self.refused[int(r.node_id)])
            else:
                summaries[int(r.node_id)] = parsed
        return summaries

    def _preflight(self, nodes: Sequence[int]) -> dict[int, SiteSummary]:
        summaries = self._ask_preflight(nodes)
        accepted, refused, ref = screen_sites(summaries, self.cfg)
        for nid, why in sorted(refused.items()):
            self.refused[nid] = why
            log.error("refused site %d: %s", nid, why)
        if ref is None or len(accepted) < self.fed.min_nodes:
            raise RuntimeError(f"only {len(accepted)} of {len(nodes)} connected sites passed preflight, "
                               f"federation.min_nodes is {self.fed.min_nodes}; refused: "
                               + ("; ".join(self.refused[n] for n in sorted(self.refused)) or "none"))
        self.fed.check_sites(len(accepted))
        self.accepted = sorted(accepted)
        self.site_info.update({n: accepted[n].info() for n in self.accepted})
        self.reference = (ref, accepted[ref])
        self.schema = {k: accepted[ref].schema.get(k) for k in SCHEMA_FIELDS}
        self.schema["protocol_version"] = PROTOCOL_VERSION
        log.info("preflight: %d sites accepted (%s), %d refused", len(self.accepted),
                 ", ".join(map(str, self.accepted)), len(self.refused))
        return accepted

    def _admit(self, nodes: Sequence[int], server_round: int) -> list[int]:
        """Preflight sites that connected after the run started (a new site, or a restarted
        SuperNode that came back with a new node id) and let those that match the run join.

        The shared statistics were derived before they joined and stay as they are: every round
        of a run uses the same preprocessing.
        """
        assert self.reference is not None, "preflight sets the reference site"
        ref_nid, ref = self.reference
        joined = []
        for nid, s in sorted(self._ask_preflight(nodes).items()):
            why = compare_with_reference(nid, s, ref_nid, ref, self.cfg)
            if why is not None:
                self.refused[nid] = why
                log.error("refused site %d: %s", nid, why)
                continue
            self.accepted = sorted({*self.accepted, nid})
            self.site_info[nid] = s.info()
            joined.append(nid)
            log.info("site %d joined before round %d (it did not shape the shared statistics)", nid, server_round)
        return joined

    def _available(self, server_round: int) -> tuple[list[int], list[int]]:
        """(connected accepted sites, sites admitted now), waiting at most wait_for_nodes_s for
        ``min_nodes`` of them; sites not seen before are preflighted first."""
        start = self.clock()
        joined: list[int] = []
        while True:
            remaining = max(0.0, self.fed.wait_for_nodes_s - (self.clock() - start))
            nodes = wait_for_nodes(self.transport.node_ids, self.fed.min_nodes, remaining,
                                   exclude=set(self.refused), poll_s=self.poll_s, clock=self.clock,
                                   sleep=self.sleep)
            new = [n for n in nodes if n not in self.accepted]
            if new:
                joined += self._admit(new, server_round)
            available = [n for n in nodes if n in self.accepted]
            if len(available) >= self.fed.min_nodes:
                return available, joined
            if not new:  # every connected site is accepted or refused by now; cannot happen, but never spin
                raise NodeWaitTimeout(f"only {len(available)} of {self.fed.min_nodes} sites usable")

    def _evaluate(self, server_round: int, split: str, weights: Mapping[str, np.ndarray],
                  nodes: Sequence[int]) -> EvalOutcome:
        config = {**self._base_config(server_round), KEY_SPLIT: split}
        replies = self._send([Instruction(n, EVALUATE, config, weights) for n in nodes])
        return summarise_eval(replies, self.cfg, self.km_len, split, nodes, self.km_grid)

    def _selection_value(self, ev: EvalOutcome | None) -> float | None:
        return None if ev is None else selection_value(ev.global_report.values, self.cfg)

    def _checkpoint(self, p: _Progress) -> None:
        t0 = time.perf_counter()
        state = ServerState(round=p.round, weights=p.weights, config_text=self.config_text,
                            shared_json=self.shared_json, strategy_state=self.guarded.state_dict(),
                            sampler_state=self.sampler.getstate(), best_round=p.selection.best_round,
                            best_value=p.selection.best_value,
                            schema=self.schema, skipped_rounds=list(p.skipped), rng=capture_rng(),
                            versions=library_versions())
        save_checkpoint(self.run_dir, state, keep_last=self.keep_last)
        log.debug("round %d checkpointed in %.2f s", p.round, time.perf_counter() - t0)

    def _round_zero(self, p: _Progress) -> None:
        """Round 0's record: the initial model, validated by round 1's train messages (one message
        phase per round), so it is written pending and completed then."""
        record = {"round": 0, "status": "initial", "lr": None, "timings": {}, "train": None, "val": None,
                  "validation": "pending", "bytes": {"sent": 0, "received": 0},
                  "selection": p.selection.record(None)}
        self.runlog.append_round(record)
        self.pending = record
        self._checkpoint(p)
        log.info("round 0/%d: the initial model; round 1's messages validate it", self.fed.rounds)

    def _complete_pending(self, p: _Progress, ev: EvalOutcome) -> None:
        """The pending record (the last one written) gets its validation: offered to the selection,
        checkpointed by the caller, amended in ``rounds.jsonl``."""
        rec = dict(self.pending or {})
        self.pending = None
        value = self._selection_value(ev)
        if int(rec["round"]) > 0:  # the initial model is measured, never selected
            p.selection.offer(int(rec["round"]), value, ev.sites_validated)
        rec.pop("validation", None)
        rec["val"] = ev.to_record()
        rec["selection"] = p.selection.record(value)
        self.runlog.amend_last_round(rec)
        log.info("round %d's model: val %s = %s (best round %s)", rec["round"], self.fed.selection_metric, _fmt(value),
                 p.selection.best_round)

    def _validations(self, replies: Sequence[Reply]) -> list[Reply]:
        """The validation statistics riding on train replies, as evaluate replies for ``summarise_eval``."""
        out = []
        for r in replies:
            if r.error is not None:
                out.append(Reply(r.node_id, error=r.error))
            elif VALIDATION in r.records:
                out.append(Reply(r.node_id, metrics=dict(r.records[VALIDATION])))
            else:
                out.append(Reply(r.node_id, error="E_MISSING_VALIDATION"))
        return out

    def _train_round(self, p: _Progress, r: int) -> None:
        fed = self.fed
        timings: dict[str, float] = {}
        t = self.clock()
        available, joined = self._available(r)
        timings["wait"] = self.clock() - t
        t = self.clock()
        train_nodes = sample_nodes(self.sampler, available, fed.fraction_train, fed.min_nodes)
        lr = round_lr(self.cfg.train, fed.rounds, r)
        config = {**self._base_config(r), KEY_LR: lr, KEY_LOCAL_EPOCHS: int(fed.local_epochs),
                  KEY_LOCAL_STEPS: int(fed.local_steps), KEY_PROXIMAL_MU: float(self.cfg.train.proximal_mu)}
        # The weights sent now are the pending round's model: the sites sampled for validation
        # (fraction_evaluate) validate it in this same message phase, before training if they train,
        # with an evaluate message if they do not.
        val_nodes = (sample_nodes(self.sampler, available, fed.fraction_evaluate, fed.min_nodes)
                     if self.pending is not None else [])
        control = self.guarded.control  # SCAFFOLD: each site gets c - c_i (ControlVariates.correction)
        eval_only = [n for n in val_nodes if n not in train_nodes]
        val_config = {**self._base_config(int(self.pending["round"])), KEY_SPLIT: "val"} if eval_only else {}
        replies = self._send([Instruction(n, TRAIN, {**config, **({KEY_VALIDATE: "val"} if n in val_nodes else {})},
                                          p.weights, None if control is None else control.correction(n, train_nodes))
                              for n in train_nodes] + [Instruction(n, EVALUATE, val_config, p.weights) for n in eval_only])
        timings["train"] = self.clock() - t
        by_node = {int(x.node_id): x for x in replies}  # _send: one reply per instruction, one instruction per node
        if val_nodes:
            self._complete_pending(p, summarise_eval(
                self._validations([by_node[n] for n in val_nodes if n in train_nodes])
                + [by_node[n] for n in eval_only], self.cfg, self.km_len, "val", val_nodes, self.km_grid))
        replies = [by_node[n] for n in train_nodes]
        t = self.clock()
        out: AggregateOutcome = self.guarded.aggregate(r, replies, p.weights)
        timings["aggregate"] = self.clock() - t
        if out.arrays is not None:
            p.weights = out.arrays
        else:
            p.skipped.append(r)
        p.round = r
        pending = out.arrays is not None and evaluation_round(r, fed.rounds, fed.eval_every)
        record = {
            "round": r, "status": "aggregated" if out.arrays is not None else "skipped",
            "skip_reason": out.skip_reason, "lr": lr, "timings": timings, "joined": joined,
            "train": {"sampled": train_nodes, "kept": out.kept,
                      "dropped": [{"node": n, "reason": c} for n, c in out.dropped],
                      "clamped": [{"node": n, "claimed": c, "used": u} for n, c, u in out.clamped],
                      "per_site": {str(n): m for n, m in sorted(out.site_metrics.items())},
                      "aggregate": out.metrics,
                      "update_norms": {str(n): v for n, v in sorted(out.norms.items())},
                      "norm_outliers": out.outliers,
                      **({"control_norms": {str(n): v for n, v in sorted(out.control_norms.items())},
                          "control_norm_outliers": out.control_outliers} if out.control_norms else {}),
                      **({"central_dp": out.central_dp} if out.central_dp is not None else {}),
                      # sites lacking a modality (they trained part of the model) and the weights that
                      # too few sites trained to be averaged (kept as they were)
                      **({"partial_sites": out.partial, "frozen": out.frozen} if out.partial else {})},
            "val": None, **({"validation": "pending"} if pending else {}),
            "bytes": {"sent": sum(x.bytes_sent for x in replies), "received": sum(x.bytes_received for x in replies)},
            "selection": p.selection.record(None),
        }
        self.runlog.append_round(record)
        self.pending = record if pending else None
        self._checkpoint(p)
        log.info("round %d/%d: %d of %d replies aggregated%s%s", r, fed.rounds,
                 len(out.kept) if out.arrays is not None else 0, len(train_nodes),
                 f", skipped ({out.skip_reason})" if out.skip_reason else "",
                 "; its model is validated by the next message phase" if pending else "")

    def _validate_last(self, p: _Progress) -> None:
        """After the last round: validate the model no later train message carried (the last
        round's, or, when the last round was skipped and the newest aggregated model was never
        validated, that one under the last round's record, which its checkpoint holds), in one
        evaluate phase, so that selection can choose the final model."""
        if self.pending is None:
            aggregated = [k for k in range(1, p.round + 1) if k not in p.skipped]
            if not (aggregated and p.round == self.fed.rounds and p.round in p.skipped
                    and not evaluation_round(aggregated[-1], self.fed.rounds, self.fed.eval_every)):
                return
            self.pending = self.runlog.read_rounds()[-1]
        t = self.clock()
        available, _ = self._available(p.round + 1)
        nodes = sample_nodes(self.sampler, available, self.fed.fraction_evaluate, self.fed.min_nodes)
        ev = self._evaluate(int(self.pending["round"]), "val", p.weights, nodes)
        self.pending = {**self.pending, "timings": {**(self.pending.get("timings") or {}), "evaluate": self.clock() - t},
                        "bytes": {"sent": int(self.pending["bytes"]["sent"]) + ev.bytes_sent,
                                  "received": int(self.pending["bytes"]["received"]) + ev.bytes_received}}
        record_round = int(self.pending["round"])
        value = self._selection_value(ev)
        p.selection.offer(record_round, value, ev.sites_validated)
        self._checkpoint(p)  # the selection first: a crash before the amend re-validates, and offer is idempotent
        self._complete_pending(p, ev)

    def _final(self, p: _Progress) -> dict[str, Any]:
        aggregated = [r for r in range(1, p.round + 1) if r not in p.skipped]
        if not aggregated:
            raise RuntimeError(f"no round aggregated any update ({len(p.skipped)} rounds skipped); see "
                               f"{self.runlog.rounds_path} for the reason codes")
        best_round, note = p.selection.chosen(aggregated[-1], "aggregated round")
        rounds = self.runlog.read_rounds()
        note = "; ".join(x for x in (note, selection_sites_note(rounds, best_round, len(self.accepted))) if x) or None
        if note is not None:
            log.warning(note)
        best_value = p.selection.best_value
        weights = p.weights if best_round == p.round else load_checkpoint(self.run_dir, best_round).weights
        available, _ = self._available(p.round + 1)
        test = self._evaluate(best_round, "test", weights, available)
        model_sha = self._write_model(weights, best_round, best_value)
        sent = sum(int((r.get("bytes") or {}).get("sent", 0)) for r in rounds) + test.bytes_sent
        received = sum(int((r.get("bytes") or {}).get("received", 0)) for r in rounds) + test.bytes_received
        final = final_record(
            mode="federated", cfg=self.cfg, rounds=p.round, selection=p.selection, best_round=best_round, note=note,
            test=test.to_record(), sites=self.accepted, model_file=self.runlog.model_path.name,
            model_sha256=model_sha, wall_s=time.monotonic() - self.started,  # this server process (resumed: since)
            config_text=self.config_text, site_info={str(n): self.site_info[n] for n in sorted(self.site_info)},
            refused_sites={str(n): m for n, m in sorted(self.refused.items())}, skipped_rounds=p.skipped,
            strategy=self.fed.strategy, bytes={"sent": sent, "received": received},
            resumed_after_round=self.resumed_after)
        self.runlog.write_final(final)
        log.info("final: round %d selected by val %s = %s; test %s = %s", best_round, self.fed.selection_metric,
                 _fmt(best_value), self.fed.selection_metric, _fmt(selection_value(test.global_report.values, self.cfg)))
        return final

    def _write_model(self, weights: Mapping[str, np.ndarray], best_round: int, best_value: float | None) -> str:
        """``model.pt`` of the selected round (``smm_model.contract.runfolder.model_payload``)."""
        return write_model(self.runlog.model_path, model_payload(weights, self.cfg, self.schema, self.shared_json,
                                                                  best_round, best_value))

    # -- the whole run

    def run(self) -> dict[str, Any]:
        state = self._load_state()
        self.runlog.write_config(self.config_text)
        available = self._wait()
        summaries = self._preflight(available)
        shared = derive_shared([summaries[n] for n in self.accepted], self.cfg)
        if state is not None:
            if shared.to_json() != state.shared_json:
                log.warning("the sites' data summaries changed since the checkpoint; continuing with the "
                            "checkpoint's shared statistics so that the resumed rounds match the earlier ones")
            shared = SharedStats.from_json(state.shared_json)
        self.shared_json = shared.to_json()
        self.km_len = len(shared.km_grid)
        self.km_grid = list(shared.km_grid)
        control = ControlVariates(model_parameters(self.cfg)) if self.fed.strategy == "scaffold" else None
        central = CentralDP.from_config(self.cfg)
        self._guarded = GuardedStrategy(build_strategy(self.fed, self.cfg.train, n_sites=len(self.accepted)),
                                        self.fed, control=control, central=central)
        if state is None:
            p = _Progress(weights=initial_weights(self.cfg), selection=Selection.for_config(self.cfg))
            self._round_zero(p)
        else:
            p = _Progress(weights=state.weights, round=state.round,
                          selection=Selection.for_config(self.cfg, state.best_round, state.best_value),
                          skipped=list(state.skipped_rounds))
            self.guarded.load_state_dict(state.strategy_state)
            if state.sampler_state is not None:
                self.sampler.setstate(state.sampler_state)
            restore_rng(state.rng)
            kept = self.runlog.truncate_rounds(state.round)
            best = next((rec for rec in kept if rec.get("round") == state.best_round), None)
            p.selection.best_sites = validated_sites(best.get("val")) if best else None
            last = kept[-1] if kept else None
            if last is not None and (last.get("validation") == "pending"
                                     or (last.get("val") is not None and state.round < self.fed.rounds)):
                # Its validation rides on the next round's messages: again when they were sent but
                # that round was never checkpointed (same sampling, same values as before the crash).
                self.pending = {**last, "val": None, "validation": "pending"}
            elif last is not None and last.get("val") is not None:
                # Validated after the checkpoint was written (amended before the crash): offer it
                # again; offer is idempotent for a value it already holds.
                p.selection.offer(int(last["round"]), (last.get("selection") or {}).get("value"),
                                  validated_sites(last["val"]))
            self.resumed_after = state.round
            log.info("resuming after round %d of %d", state.round, self.fed.rounds)
        if central is not None:
            log.info("central DP: sigma %.3g, clipping norm %.3g; epsilon at delta %.0e after all %d rounds: %.3f (%s)",
                     central.noise_multiplier, central.clipping_norm, central.delta, self.fed.rounds,
                     central.planned_epsilon(self.fed.rounds - p.round), central.accountant)
        for r in range(p.round + 1, self.fed.rounds + 1):
            self._train_round(p, r)
        self._validate_last(p)
        return self._final(p)

    def record_failure(self, error: Exception) -> None:
        """``failure.json``: why the run failed (the server's own message; a site's text never
        reaches it), the last round checkpointed (what ``--resume`` continues from), and the sites
        as far as known, so that the report names them and says what happened."""
        try:
            latest = load_latest(self.run_dir)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint must not hide the original failure
            latest = None
        self.runlog.write_failure({
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "error": type(error).__name__,
            "reason": str(error)[:4000], "last_checkpoint_round": None if latest is None else latest.round,
            "rounds_configured": self.fed.rounds, "sites": list(self.accepted),
            "site_info": {str(n): self.site_info[n] for n in sorted(self.site_info)},
            "refused_sites": {str(n): m for n, m in sorted(self.refused.items())},
            "resume": "resume the run (smm simulate --resume, or run-config resume=true) to continue from the "
                      "last checkpoint" if latest is not None else "no checkpoint: start the run again"})

    def _load_state(self) -> ServerState | None:
        has_run = (self.run_dir / CHECKPOINT_DIR / INDEX_FILE).exists() or self.runlog.rounds_path.exists()
        if not self.resume:
            if has_run:
                raise RunDirInUse(f"{self.run_dir} already holds a run (checkpoints or rounds.jsonl); resume it "
                                  f"(resume=true) or choose another run directory")
            return None
        state = load_latest(self.run_dir)
        if state is None:
            if self.runlog.rounds_path.exists():
                raise RunDirInUse(f"{self.run_dir} has rounds.jsonl but no checkpoint to resume from")
            log.info("resume requested but %s has no checkpoint yet: starting a new run", self.run_dir)
            return None
        saved = yaml.safe_load(state.config_text) or {}
        if saved.get("model") != to_dict(self.cfg.model):
            diff = sorted(k for k in set(saved.get("model", {})) | set(to_dict(self.cfg.model))
                          if saved.get("model", {}).get(k) != to_dict(self.cfg.model).get(k))
            raise ConfigError(f"model: the checkpoint of round {state.round} was trained with different model "
                              f"settings ({', '.join('model.' + k for k in diff)}); its weights cannot be resumed")
        if saved != to_dict(self.cfg):
            changed = sorted(f"{sec}.{k}" for sec, v in to_dict(self.cfg).items() if isinstance(v, dict)
                             for k in v if (saved.get(sec) or {}).get(k) != v[k])
            log.warning("resuming with a config that differs from the checkpoint's in: %s",
                        ", ".join(changed) or "name")
        return state


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def run_federation(transport: Transport, cfg: ExperimentConfig, run_dir: str | Path, resume: bool = False, *,
                   keep_last: int = 3, poll_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Run the whole server workflow (module docstring) and return what ``final_metrics.json`` holds.

    ``run_dir`` must not hold a run unless ``resume`` is true; ``keep_last`` checkpoints are kept
    (plus the best round's). ``clock``/``sleep`` drive the bounded waits (injectable for tests).
    Raises on anything that makes the run unusable (too few sites, schema refusals leaving fewer than
    ``min_nodes``, no round aggregated), so a ServerApp ends ``finished:failed``.
    """
    fr = FederationRun(transport, cfg, run_dir, resume, keep_last=keep_last, poll_s=poll_s, clock=clock, sleep=sleep)
    with fr.runlog.log_to_file():
        try:
            return fr.run()
        except RunDirInUse:
            raise  # another run's folder: nothing of this run to record there
        except Exception as e:
            log.error("the run failed: %s: %s", type(e).__name__, e)
            fr.record_failure(e)
            raise
