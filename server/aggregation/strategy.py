"""The aggregation strategy: Flower's math behind our guards.

``build_strategy`` maps ``federation.strategy`` to a Flower Message-API strategy; ``GuardedStrategy``
is what the server loop calls each round. It runs the guards of ``server.aggregation.guard`` on neutral
``Reply`` objects, hands the surviving replies to the Flower strategy's ``aggregate_train`` (so
FedAvg, FedMedian, Krum, FedAdam... are Flower's own, tested implementations) and checks what comes
back. It is not a ``flwr`` ``Strategy`` subclass: the loop does its own sampling, messaging, waiting
and evaluation (Flower's ``Strategy.start`` waits for nodes forever and lets one malformed reply end
the run), and only borrows the aggregation.

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
from flwr.serverapp.strategy import (FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi,
                                     Krum, MultiKrum, Strategy)

from smm_model.config import ConfigError, FederationConfig, TrainConfig

from server.aggregation.guard import control_norms, flag_outliers, guard_replies, update_norms
from server.federation.messages import Reply
from smm_model.contract.wire import ARRAYS, METRICS, NUM_EXAMPLES

__all__ = ["build_strategy", "GuardedStrategy", "AggregateOutcome", "strategy_state", "restore_strategy_state",
           "set_current_arrays", "ControlVariates", "OPTIMIZER_STATE_ATTRS", "DEFAULT_SERVER_LR"]

log = logging.getLogger("fedsmm.server.strategy")

#: What the FedOpt family (FedAdam, FedYogi, FedAdagrad) keeps between rounds in flwr 1.42
#: (``flwr/serverapp/strategy/fedopt.py``): the arrays sent this round and the first and second
#: moments, each a ``dict[str, ndarray]`` or None before the first aggregation.
OPTIMIZER_STATE_ATTRS = ("current_arrays", "m_t", "v_t")
#: Server learning rates when ``federation.server_lr`` is null: FedOpt's customary eta, and plain
#: averaging for FedAvgM.
DEFAULT_SERVER_LR = {"fedopt": 0.01, "fedavgm": 1.0}


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


def build_strategy(fed: FederationConfig, train: TrainConfig | None = None, n_sites: int | None = None) -> Strategy:
    """The Flower strategy named by ``fed.strategy``, configured from the run's config.

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
    opt = dict(eta=fed.server_lr if fed.server_lr is not None else DEFAULT_SERVER_LR["fedopt"], eta_l=train.lr,
               tau=fed.server_tau)
    name = fed.strategy
    if name in ("fedavg", "scaffold"):  # SCAFFOLD: FedAvg of the weights + ControlVariates
        return FedAvg(**common)
    if name == "fedavgm":
        return FedAvgM(**common, server_momentum=fed.server_momentum,
                       server_learning_rate=fed.server_lr if fed.server_lr is not None else DEFAULT_SERVER_LR["fedavgm"])
    if name == "fedprox":
        return FedProx(**common, proximal_mu=train.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, **opt, beta_1=fed.server_beta_1, beta_2=fed.server_beta_2)
    if name == "fedyogi":
        return FedYogi(**common, **opt, beta_1=fed.server_beta_1, beta_2=fed.server_beta_2)
    if name == "fedadagrad":
        return FedAdagrad(**common, **opt)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=fed.trimmed_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=fed.krum_byzantine)
    if name == "multikrum":
        keep = fed.multikrum_keep or (max(1, n_sites - fed.krum_byzantine) if n_sites else 1)
        if n_sites is not None and keep > n_sites:
            raise ConfigError(f"federation.multikrum_keep: keeps {keep} updates but the run has {n_sites} sites")
        return MultiKrum(**common, num_malicious_nodes=fed.krum_byzantine, num_nodes_to_select=keep)
    raise ConfigError(f"federation.strategy: unknown {name!r}")  # config validation makes this unreachable


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The server-side optimiser state a checkpoint must hold to resume bit-exactly.

    FedAvg, FedProx, FedMedian, FedTrimmedAvg and (Multi)Krum are stateless between rounds; the
    FedOpt family keeps ``OPTIMIZER_STATE_ATTRS``. Arrays are copied, so later rounds cannot alter
    a captured state.
    """
    out: dict[str, Any] = {"class": type(strategy).__name__}
    if isinstance(strategy, FedAvgM):
        # FedAvgM (flwr/serverapp/strategy/fedavgm.py) keeps the arrays sent this round as an
        # ArrayRecord and its momentum buffer as a list of ndarrays in the arrays' order.
        arrays, momentum = strategy.current_arrays, strategy.momentum_vector
        out["current_arrays"] = None if arrays is None else {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}
        out["momentum_vector"] = None if momentum is None else [np.array(x, copy=True) for x in momentum]
    elif all(hasattr(strategy, a) for a in OPTIMIZER_STATE_ATTRS):
        for a in OPTIMIZER_STATE_ATTRS:
            v = getattr(strategy, a)
            out[a] = None if v is None else {k: np.array(x, copy=True) for k, x in v.items()}
    return out


def set_current_arrays(strategy: Strategy, arrays: Mapping[str, np.ndarray]) -> None:
    """Tell a stateful strategy which arrays this round sent (Flower's ``configure_train`` records
    them; the loop sends them itself): FedOpt keeps a dict of ndarrays, FedAvgM an ArrayRecord."""
    if isinstance(strategy, FedAvgM):
        strategy.current_arrays = ArrayRecord({k: Array(np.array(v, copy=True)) for k, v in arrays.items()})
    elif hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Put a ``strategy_state`` back; refuses a state captured from another strategy class."""
    cls = state.get("class")
    if cls != type(strategy).__name__:
        raise ValueError(f"strategy state was saved by {cls}, cannot restore it into {type(strategy).__name__} "
                         f"(federation.strategy changed since the checkpoint?)")
    if isinstance(strategy, FedAvgM):
        arrays, momentum = state.get("current_arrays"), state.get("momentum_vector")
        strategy.current_arrays = None if arrays is None else ArrayRecord(
            {k: Array(np.array(x, copy=True)) for k, x in arrays.items()})
        strategy.momentum_vector = None if momentum is None else [np.array(x, copy=True) for x in momentum]
        return
    for a in OPTIMIZER_STATE_ATTRS:
        if a in state:
            v = state[a]
            setattr(strategy, a, None if v is None else {k: np.array(x, copy=True) for k, x in v.items()})


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
    site_metrics: dict[int, dict[str, int | float]] = field(default_factory=dict)
    skip_reason: str | None = None


def _reply_message(reply: Reply, metric_keys: Sequence[str], server_round: int, order: Sequence[str]) -> Message:
    """A Flower reply Message for ``aggregate_train``, built outside a Flower runtime.

    Instruction/reply constructors need a live task identity, so the metadata is given explicitly
    (as Flower's own strategy tests do). Arrays are copied into fresh ``Array`` objects: FedMedian
    and FedTrimmedAvg pop arrays out of the records they are given.
    """
    assert reply.arrays is not None and reply.metrics is not None
    md = Metadata(run_id=0, message_id=f"guarded-{reply.node_id}-{server_round}", src_node_id=int(reply.node_id),
                  dst_node_id=0, reply_to_message_id="", group_id=str(server_round), created_at=time.time(),
                  ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
    # In the global model's key order: FedAvgM pairs the aggregate with the current arrays by position.
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
                 control: ControlVariates | None = None) -> None:
        self.strategy = strategy
        self.cfg = cfg
        self.outlier_k = outlier_k
        self.control = control  # SCAFFOLD (federation.strategy: scaffold)

    def state_dict(self) -> dict[str, Any]:
        out = strategy_state(self.strategy)
        if self.control is not None:
            out["scaffold"] = self.control.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restore_strategy_state(self.strategy, state)
        if self.control is not None:
            self.control.load_state_dict(state.get("scaffold") or {})

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
        snapshot = strategy_state(self.strategy)
        set_current_arrays(self.strategy, global_arrays)
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, messages)
        except Exception as e:  # Flower's AggregationError, InconsistentMessageReplies, numeric errors
            restore_strategy_state(self.strategy, snapshot)
            out.skip_reason = "E_AGGREGATION"
            log.error("round %d skipped: the %s aggregation failed (%s); the global model is unchanged",
                      server_round, type(self.strategy).__name__, type(e).__name__)
            return out
        if arrays is None:
            restore_strategy_state(self.strategy, snapshot)
            out.skip_reason = "E_AGGREGATION"
            log.error("round %d skipped: the strategy returned no arrays", server_round)
            return out
        new = self._as_global(arrays, global_arrays)
        if new is None:
            restore_strategy_state(self.strategy, snapshot)
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

    def _per_round_settings(self, n_kept: int, server_round: int) -> None:
        """Settings that depend on how many replies survived this round."""
        s, cfg = self.strategy, self.cfg
        if isinstance(s, MultiKrum) and not isinstance(s, Krum) and cfg.multikrum_keep == 0:
            s.num_nodes_to_select = max(1, n_kept - cfg.krum_byzantine)
        if isinstance(s, (Krum, MultiKrum)) and n_kept <= 2 * cfg.krum_byzantine + 2:
            log.warning("round %d: %d replies; Krum's guarantee needs more than 2f + 2 = %d", server_round, n_kept,
                        2 * cfg.krum_byzantine + 2)
        if isinstance(s, FedTrimmedAvg) and int(s.beta * n_kept) == 0:
            log.warning("round %d: trimming %s of %d replies removes none (plain mean this round)", server_round,
                        s.beta, n_kept)

    @staticmethod
    def _as_global(arrays: ArrayRecord, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The aggregate in the global model's key order and dtypes, or None if unusable.

        FedAdam's bias-corrected step is a float64 scalar, so its result is float64; the model is
        float32 and sites must get float32 back (the guard compares dtypes). Integer buffers are
        rounded, not truncated, before the cast.
        """
        if set(arrays.keys()) != set(reference):
            return None
        out: dict[str, np.ndarray] = {}
        for k, ref in reference.items():
            a = arrays[k].numpy()
            if a.shape != ref.shape:
                return None
            if ref.dtype.kind in "iub" and a.dtype.kind == "f":
                a = np.rint(a)
            a = np.array(a, dtype=ref.dtype, copy=True)
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                return None
            out[k] = a
        return out
