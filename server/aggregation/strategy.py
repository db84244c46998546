"""The aggregation strategy: Flower's averaging behind our guards, with our own server optimisers.

``build_strategy`` maps ``federation.strategy`` to an ``AggregationRule``: a Flower Message-API
strategy that combines the replies (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum:
Flower's own, tested implementations, all stateless between rounds) and, for FedAvgM, FedAdam,
FedYogi and FedAdagrad, a server optimiser of ours (``server.aggregation.server_opt``) that steps
along FedAvg's mean and owns its moments. ``GuardedStrategy`` is what the server loop calls each
round: it runs the guards of ``server.aggregation.guard`` on neutral ``Reply`` objects, hands the
survivors to the Flower strategy's public ``aggregate_train``, applies the server step and checks
the result. It is not a ``flwr`` ``Strategy`` subclass: the loop does its own sampling, messaging,
waiting and evaluation (Flower's ``Strategy.start`` waits for nodes forever and lets one malformed
reply end the run), and only borrows the aggregation. Nothing here reads or writes a Flower
strategy's attributes beyond its constructor arguments.

A site lacking a modality trains part of the model and lists what it trained (``wire.TRAINED``):
each weight is then averaged over the sites that trained it (``_aggregate_partial``: Flower's
``aggregate_train`` per group of weights with the same sites), a weight trained by fewer than
``federation.min_nodes`` sites keeps its value, and the server optimiser leaves such a weight and
its moments alone (``ServerOptimizer.step_frozen``). Only the weighted-mean rules can do that; the
preflight refuses partial sites for the others (``smm_model.contract.protocol.check_schemas``).

This module and ``server.app`` are the only server modules that import ``flwr``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy

from smm_model.config import ConfigError, FederationConfig, TrainConfig

from server.aggregation.central_dp import CentralDP
from server.aggregation.guard import control_norms, flag_outliers, guard_replies, trained_names, update_norms
from server.aggregation.server_opt import ServerOptimizer, build_server_optimizer
from server.federation.messages import Reply
from smm_model.contract.wire import ARRAYS, METRICS, NUM_EXAMPLES

__all__ = ["build_strategy", "AggregationRule", "GuardedStrategy", "AggregateOutcome", "strategy_state",
           "restore_strategy_state", "ControlVariates"]

log = logging.getLogger("fedsmm.server.strategy")

class ControlVariates:
    """SCAFFOLD's server side (Karimireddy et al. 2020): each site's latest control variate c_i and
    the server's c, their example-weighted mean, one array per model parameter.

    Flower has no SCAFFOLD; the weights are still aggregated by Flower's FedAvg, and this adds the
    control variates that correct each site's local steps towards the federation's gradient (the
    drift that makes sites with disjoint case mixes, such as an all-GBM hospital, pull the shared
    head apart). A site sends its new c_i with its weights; the server keeps the latest one per
    node (a site's mean gradient over its last round: kept in the server's checkpoints), so a
    site that skipped a round counts with its last
    known one, and c covers the sites in the round. Each site gets c - c_i (``correction``).
    """

    def __init__(self, parameters: Mapping[str, np.ndarray]) -> None:
        self.zeros = {k: np.zeros_like(v) for k, v in parameters.items()}
        self.sites: dict[int, tuple[float, dict[str, np.ndarray]]] = {}

    def server_control(self, nodes: Sequence[int]) -> dict[str, np.ndarray]:
        """c over ``nodes``: the example-weighted mean of their known c_i (zeros before any)."""
        known = [self.sites[int(n)] for n in nodes if int(n) in self.sites]
        if not known:
            return {k: v.copy() for k, v in self.zeros.items()}
        total = sum(w for w, _ in known)
        return {k: (sum(w * c[k].astype(np.float64) for w, c in known) / total).astype(ref.dtype)
                for k, ref in self.zeros.items()}

    def correction(self, node: int, nodes: Sequence[int]) -> dict[str, np.ndarray]:
        """What node ``node`` adds to every local gradient this round: c over ``nodes`` minus the
        node's own c_i as the server holds it (zeros before its first accepted reply).

        Why the server sends it rather than each site keeping c_i: the server's copy is the one c
        was averaged from, so a dropped or lost reply, a skipped round, a restarted SuperNode or a
        resumed run (a new Flower run, whose sites start with an empty Context.state) cannot leave
        a site correcting with a c_i that c does not contain. The site stays stateless for SCAFFOLD,
        and what it receives is its own last c_i, already sent, plus the federation's mean.
        """
        c = self.server_control(nodes)
        own = self.sites.get(int(node))
        if own is None:
            return c
        return {k: (v.astype(np.float64) - own[1][k].astype(np.float64)).astype(v.dtype) for k, v in c.items()}

    def update(self, kept: Sequence[Reply]) -> None:
        for r in kept:
            assert r.control is not None and r.metrics is not None
            self.sites[int(r.node_id)] = (float(r.metrics[NUM_EXAMPLES]),
                                          {k: np.array(r.control[k], copy=True) for k in self.zeros})

    def state_dict(self) -> dict[str, Any]:
        return {"sites": {n: {"weight": w, "control": dict(c)} for n, (w, c) in self.sites.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sites = {int(n): (float(v["weight"]), {k: np.array(v["control"][k], copy=True) for k in self.zeros})
                      for n, v in (state.get("sites") or {}).items()}


@dataclass
class AggregationRule:
    """What ``federation.strategy`` names: a Flower strategy that combines the replies (FedAvg's
    weighted mean, FedMedian, FedTrimmedAvg, (Multi)Krum, FedProx) and, for FedAvgM and the FedOpt
    family, a server optimiser of our own (``server.aggregation.server_opt``) stepping from the
    round's global model along FedAvg's mean. Flower's strategies are used only where they hold no
    state between rounds, so a checkpoint holds exactly the state this server owns."""

    averaging: Strategy
    server_opt: ServerOptimizer | None = None

    @property
    def name(self) -> str:
        """The class name recorded in checkpoints (FedAvg, FedAdam, Krum...)."""
        return self.server_opt.name if self.server_opt is not None else type(self.averaging).__name__


def build_strategy(fed: FederationConfig, train: TrainConfig | None = None, n_sites: int | None = None
                   ) -> AggregationRule:
    """The aggregation ``fed.strategy`` names, configured from the run's config.

    ``train`` supplies FedProx's ``proximal_mu`` and FedOpt's client learning rate ``eta_l``
    (defaults: ``TrainConfig()``). With ``n_sites``, the site-count constraints are checked first
    (``FederationConfig.check_sites``: FedTrimmedAvg must trim someone, Krum needs n > 2f + 2)
    and MultiKrum's ``multikrum_keep=0`` resolves to ``n_sites - krum_byzantine``.
    """
    train = train or TrainConfig()
    if n_sites is not None:
        fed.check_sites(n_sites)
    common: dict[str, Any] = dict(fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                                  min_train_nodes=fed.min_nodes, min_evaluate_nodes=fed.min_nodes,
                                  min_available_nodes=fed.min_nodes)
    name = fed.strategy
    server_opt = build_server_optimizer(fed, train.lr)
    if server_opt is not None or name in ("fedavg", "scaffold"):  # SCAFFOLD: FedAvg + ControlVariates
        return AggregationRule(FedAvg(**common), server_opt)
    if name == "fedprox":
        return AggregationRule(FedProx(**common, proximal_mu=train.proximal_mu))
    if name == "fedmedian":
        return AggregationRule(FedMedian(**common))
    if name == "fedtrimmedavg":
        return AggregationRule(FedTrimmedAvg(**common, beta=fed.trimmed_beta))
    if name == "krum":
        return AggregationRule(Krum(**common, num_malicious_nodes=fed.krum_byzantine))
    if name == "multikrum":
        keep = fed.multikrum_keep or (max(1, n_sites - fed.krum_byzantine) if n_sites else 1)
        if n_sites is not None and keep > n_sites:
            raise ConfigError(f"federation.multikrum_keep: keeps {keep} updates but the run has {n_sites} sites")
        return AggregationRule(MultiKrum(**common, num_malicious_nodes=fed.krum_byzantine, num_nodes_to_select=keep))
    raise ConfigError(f"federation.strategy: unknown {name!r}")  # config validation makes this unreachable


def strategy_state(rule: AggregationRule) -> dict[str, Any]:
    """The server-side optimiser state a checkpoint must hold to resume bit-exactly: the rule's
    class name and, for the server optimisers, their moments (copied). The averaging strategies
    are stateless between rounds."""
    out: dict[str, Any] = {"class": rule.name}
    if rule.server_opt is not None:
        out.update(rule.server_opt.state_dict())
    return out


def restore_strategy_state(rule: AggregationRule, state: Mapping[str, Any]) -> None:
    """Put a ``strategy_state`` back; refuses a state captured from another strategy class."""
    cls = state.get("class")
    if cls != rule.name:
        raise ValueError(f"strategy state was saved by {cls}, cannot restore it into {rule.name} "
                         f"(federation.strategy changed since the checkpoint?)")
    if rule.server_opt is not None:
        rule.server_opt.load_state_dict(state)


@dataclass
class AggregateOutcome:
    """What one round's aggregation did.

    ``arrays`` is the new global model (same keys, order and dtypes as the old one), or None when
    the round was skipped; ``skip_reason`` then says why. ``clamped`` lists (node, claimed, used).
    ``site_metrics`` are the kept replies' whitelisted train metrics (what may be logged per site).
    """

    arrays: dict[str, np.ndarray] | None
    metrics: dict[str, float]
    kept: list[int]
    dropped: list[tuple[int, str]]
    clamped: list[tuple[int, float, int]] = field(default_factory=list)
    norms: dict[int, float] = field(default_factory=dict)
    outliers: list[int] = field(default_factory=list)
    control_norms: dict[int, float] = field(default_factory=dict)  # SCAFFOLD: ||c_i|| per kept reply
    control_outliers: list[int] = field(default_factory=list)
    central_dp: dict[str, Any] | None = None  # privacy.central_dp: what the clip-and-noise step did
    site_metrics: dict[int, dict[str, int | float]] = field(default_factory=dict)
    skip_reason: str | None = None
    frozen: list[str] = field(default_factory=list)  # weights no (or too few) site trained: kept as they were
    partial: list[int] = field(default_factory=list)  # kept replies that trained part of the model (wire.TRAINED)


def _reply_message(reply: Reply, metric_keys: Sequence[str], server_round: int, order: Sequence[str]) -> Message:
    """A Flower reply Message for ``aggregate_train``, built from ``flwr.app``'s public classes.

    The reply Message's public constructor derives its metadata from the instruction it answers,
    and an instruction's from the Flower runtime's task identity, which plain functions and tests
    do not have; so the metadata is given explicitly (``flwr.app.Metadata``), as Flower's own
    strategy tests build replies: a TRAIN reply from ``reply.node_id`` in the round's group. The
    strategies read only its ``src_node_id`` (for their logs) and the content. Arrays are copied
    into fresh ``Array`` objects: FedMedian and FedTrimmedAvg pop arrays out of the records.
    """
    assert reply.arrays is not None and reply.metrics is not None
    md = Metadata(run_id=0, message_id=f"guarded-{reply.node_id}-{server_round}", src_node_id=int(reply.node_id),
                  dst_node_id=0, reply_to_message_id="", group_id=str(server_round), created_at=time.time(),
                  ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
    # In the global model's key order, so the aggregate comes back in that order.
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(reply.arrays[k])) for k in order})
    metrics = MetricRecord({k: reply.metrics[k] for k in metric_keys})
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics}), metadata=md)


class GuardedStrategy:
    """Guards + a Flower strategy's ``aggregate_train``; what the server loop aggregates with.

    A round is skipped (global model unchanged, error logged, ``skip_reason`` set) when fewer than
    ``federation.min_nodes`` replies survive the guards (``E_TOO_FEW_REPLIES``: with no secure
    aggregation, averaging a single hospital's update would expose it), when the Flower strategy
    returns nothing or raises (``E_AGGREGATION``), or when its result is not finite
    (``E_NONFINITE_AGGREGATE``; the optimiser state is rolled back). A NaN model is never returned.
    """

    def __init__(self, strategy: Strategy, cfg: FederationConfig, outlier_k: float = 3.0,
                 control: ControlVariates | None = None, central: CentralDP | None = None) -> None:
        self.strategy = strategy
        self.cfg = cfg
        self.outlier_k = outlier_k
        self.control = control  # SCAFFOLD (federation.strategy: scaffold)
        self.central = central  # privacy.central_dp: the mean is replaced by a clipped, noised one

    def state_dict(self) -> dict[str, Any]:
        out = strategy_state(self.strategy)
        if self.control is not None:
            out["scaffold"] = self.control.state_dict()
        if self.central is not None:
            out["central_dp"] = self.central.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restore_strategy_state(self.strategy, state)
        if self.control is not None:
            self.control.load_state_dict(state.get("scaffold") or {})
        if self.central is not None:
            self.central.load_state_dict(state.get("central_dp") or {})

    def aggregate(self, server_round: int, replies: Sequence[Reply], global_arrays: Mapping[str, np.ndarray]
                  ) -> AggregateOutcome:
        """Guard ``replies`` against ``global_arrays`` and aggregate the survivors."""
        kept, dropped = guard_replies(replies, global_arrays, self.cfg,
                                      control_reference=None if self.control is None else self.control.zeros)
        clamped = [(int(r.node_id), float(r.clamped_from), int(r.metrics[NUM_EXAMPLES]))  # type: ignore[index]
                   for r in kept if r.clamped_from is not None]
        norms = update_norms(kept, global_arrays)
        outliers = flag_outliers(norms, self.outlier_k)
        for nid in outliers:
            log.warning("round %d: node %d's update norm %.4g is an outlier (median %.4g); kept, flagged for review",
                        server_round, nid, norms[nid], float(np.median(list(norms.values()))))
        cnorms = control_norms(kept)
        control_outliers = flag_outliers(cnorms, self.outlier_k)
        for nid in control_outliers:
            log.warning("round %d: node %d's SCAFFOLD control variate norm %.4g is an outlier (median %.4g); kept, "
                        "flagged for review", server_round, nid, cnorms[nid], float(np.median(list(cnorms.values()))))
        out = AggregateOutcome(arrays=None, metrics={}, kept=[int(r.node_id) for r in kept], dropped=dropped,
                               clamped=clamped, norms=norms, outliers=outliers,
                               site_metrics={int(r.node_id): dict(r.metrics or {}) for r in kept},
                               control_norms=cnorms, control_outliers=control_outliers)
        if len(kept) < self.cfg.min_nodes:
            out.skip_reason = "E_TOO_FEW_REPLIES"
            log.error("round %d skipped: %d usable replies, federation.min_nodes is %d; the global model is unchanged",
                      server_round, len(kept), self.cfg.min_nodes)
            return out
        self._per_round_settings(len(kept), server_round)
        # Same metric keys on every reply, or Flower's consistency check ends the run.
        keys = sorted(set.intersection(*(set(r.metrics or {}) for r in kept)))
        messages = [_reply_message(r, keys, server_round, list(global_arrays)) for r in kept]
        averaging, server_opt = self.strategy.averaging, self.strategy.server_opt
        snapshot = strategy_state(self.strategy)
        central_history = None if self.central is None else list(self.central.history)
        trained = {int(r.node_id): trained_names(r) for r in kept}
        out.partial = sorted(n for n, t in trained.items() if t is not None)
        partial = bool(out.partial)
        if partial and not self.averages_partial():
            out.skip_reason = "E_PARTIAL_UNSUPPORTED"
            log.error("round %d skipped: a site trained part of the model, and %s cannot average each weight over "
                      "the sites that trained it (the preflight refuses such sites; see smm_model.contract.sites)",
                      server_round, self.strategy.name)
            return out
        frozen: list[str] = []
        try:
            if partial:
                arrays, metrics, frozen = self._aggregate_partial(server_round, kept, keys, global_arrays, trained)
            else:
                arrays, metrics = averaging.aggregate_train(server_round, messages)
            out.frozen = list(frozen)
            mean = None if arrays is None else self._as_global(arrays, global_arrays, cast=server_opt is None)
            if mean is not None and self.central is not None:
                # The example-weighted mean is replaced by the clipped, noised, site-weighted one.
                noised, out.central_dp = self.central.release([r.arrays for r in kept], global_arrays)  # type: ignore[misc]
                mean = self._checked(noised, global_arrays) if server_opt is None else noised
            new = mean if server_opt is None or mean is None else self._checked(
                server_opt.step_frozen(server_round, global_arrays, mean, frozen), global_arrays)
        except Exception as e:  # Flower's AggregationError, InconsistentMessageReplies, numeric errors
            restore_strategy_state(self.strategy, snapshot)
            if self.central is not None and central_history is not None:
                self.central.history = central_history  # nothing was released
            out.central_dp = None
            out.skip_reason = "E_AGGREGATION"
            log.error("round %d skipped: the %s aggregation failed (%s); the global model is unchanged",
                      server_round, self.strategy.name, type(e).__name__)
            return out
        if arrays is None:
            out.skip_reason = "E_AGGREGATION"
            log.error("round %d skipped: the strategy returned no arrays", server_round)
            return out
        if new is None:
            restore_strategy_state(self.strategy, snapshot)
            if self.central is not None and central_history is not None:
                self.central.history = central_history  # nothing was released
            out.central_dp = None
            out.skip_reason = "E_NONFINITE_AGGREGATE"
            log.error("round %d skipped: the aggregate is not finite or does not match the model; "
                      "the global model is unchanged", server_round)
            return out
        out.arrays = new
        if self.control is not None:
            self.control.update(kept)
        out.metrics = {k: float(v) for k, v in (metrics or {}).items()
                       if not isinstance(v, list) and math.isfinite(float(v))}
        return out

    def averages_partial(self) -> bool:
        """Whether this aggregation can average each weight over the sites that trained it: a
        weighted mean (FedAvg, FedProx) and the server optimisers stepping along it, without
        SCAFFOLD's control variates or central DP's whole-update clipping
        (``smm_model.contract.sites.PARTIAL_STRATEGIES``; the preflight refuses the others)."""
        return (type(self.strategy.averaging) in (FedAvg, FedProx) and self.control is None
                and self.central is None)

    def _aggregate_partial(self, server_round: int, kept: Sequence[Reply], metric_keys: Sequence[str],
                           global_arrays: Mapping[str, np.ndarray], trained: Mapping[int, set[str] | None]
                           ) -> tuple[ArrayRecord | None, Any, list[str]]:
        """Each weight averaged over the sites that trained it, weighted by their example counts.

        Weights are grouped by the set of sites that trained them (a few groups: those every site
        trains, those only the sites with slides train...) and each group goes through the Flower
        strategy's ``aggregate_train`` with those sites' replies only. A weight trained by fewer
        than ``federation.min_nodes`` sites keeps its current value (``frozen``): averaging it over
        fewer would expose those sites' updates, the reason whole rounds need ``min_nodes`` replies.
        Returns (the mean as an ArrayRecord in the global order, the metrics of the largest group,
        the frozen names).
        """
        by_node = {int(r.node_id): r for r in kept}
        groups: dict[tuple[int, ...], list[str]] = {}
        for name in global_arrays:
            sites = tuple(n for n in by_node if trained[n] is None or name in trained[n])  # type: ignore[operator]
            groups.setdefault(sites, []).append(name)
        mean: dict[str, np.ndarray] = {}
        frozen: list[str] = []
        metrics, largest = None, 0
        for sites, names in groups.items():
            if len(sites) < self.cfg.min_nodes:
                frozen.extend(names)
                mean.update({k: np.array(global_arrays[k], copy=True) for k in names})
                log.warning("round %d: %d weight tensor(s) trained by %d site(s), fewer than federation.min_nodes %d; "
                            "they keep their value", server_round, len(names), len(sites), self.cfg.min_nodes)
                continue
            messages = [_reply_message(by_node[n], metric_keys, server_round, names) for n in sites]
            arrays, m = self.strategy.averaging.aggregate_train(server_round, messages)
            if arrays is None:
                return None, None, frozen
            mean.update({k: arrays[k].numpy() for k in names})
            if len(sites) > largest:
                metrics, largest = m, len(sites)
        return ArrayRecord({k: Array(np.ascontiguousarray(mean[k])) for k in global_arrays}), metrics, frozen

    def _per_round_settings(self, n_kept: int, server_round: int) -> None:
        """Settings that depend on how many replies survived this round."""
        s, cfg = self.strategy.averaging, self.cfg
        if isinstance(s, MultiKrum) and not isinstance(s, Krum) and cfg.multikrum_keep == 0:
            s.num_nodes_to_select = max(1, n_kept - cfg.krum_byzantine)
        if isinstance(s, (Krum, MultiKrum)) and n_kept <= 2 * cfg.krum_byzantine + 2:
            log.warning("round %d: %d replies; Krum's guarantee needs more than 2f + 2 = %d", server_round, n_kept,
                        2 * cfg.krum_byzantine + 2)
        if isinstance(s, FedTrimmedAvg) and int(s.beta * n_kept) == 0:
            log.warning("round %d: trimming %s of %d replies removes none (plain mean this round)", server_round,
                        s.beta, n_kept)

    @staticmethod
    def _as_global(arrays: ArrayRecord, reference: Mapping[str, np.ndarray], cast: bool = True
                   ) -> dict[str, np.ndarray] | None:
        """Flower's aggregate as ndarrays in the global model's key order, checked (and, with
        ``cast``, in the model's dtypes), or None if unusable. A server optimiser steps from the
        uncast mean, as Flower's own FedOpt does."""
        if set(arrays.keys()) != set(reference):
            return None
        mean = {k: arrays[k].numpy() for k in reference}
        return GuardedStrategy._checked(mean, reference) if cast else (
            mean if all(mean[k].shape == ref.shape for k, ref in reference.items()) else None)

    @staticmethod
    def _checked(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """``arrays`` in the reference's key order and dtypes, or None if a key, a shape or a value
        is unusable.

        FedAdam's bias-corrected step is a float64 scalar, so its result is float64; the model is
        float32 and sites must get float32 back (the guard compares dtypes). Integer buffers are
        rounded, not truncated, before the cast.
        """
        if set(arrays) != set(reference):
            return None
        out: dict[str, np.ndarray] = {}
        for k, ref in reference.items():
            a = np.asarray(arrays[k])
            if a.shape != ref.shape:
                return None
            if ref.dtype.kind in "iub" and a.dtype.kind == "f":
                a = np.rint(a)
            a = np.array(a, dtype=ref.dtype, copy=True)
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                return None
            out[k] = a
        return out
