"""Server optimisers: a step of our own on top of Flower's weighted mean of the sites' weights.

FedAvgM (Hsu et al. 2019) and the FedOpt family FedAdam, FedYogi and FedAdagrad (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021) treat ``mean - current`` as a pseudo-gradient and
keep moments of it between rounds. Flower's classes keep those moments, and the arrays of the
round, as attributes that its own ``configure_train`` sets; this server sends the arrays itself and
checkpoints every round, so it would have to write Flower's internal state to resume a run. Here
the mean still comes from Flower's ``FedAvg`` (``server.aggregation.strategy``), and the step and
the state it needs are ours: plain ndarrays by parameter name, checkpointed and restored through
``state_dict``/``load_state_dict``, with the update formulas of flwr 1.42
(``flwr/serverapp/strategy/fed{avgm,opt,adam,yogi,adagrad}.py``), which
``tests/server/aggregation/test_server_opt.py`` checks against Flower's classes round by round.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from smm_model.config import FederationConfig

__all__ = ["ServerOptimizer", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "build_server_optimizer",
           "DEFAULT_SERVER_LR", "SERVER_OPTIMIZERS"]

Arrays = dict[str, np.ndarray]

#: Server learning rates when ``federation.server_lr`` is null: FedOpt's customary eta, and plain
#: averaging for FedAvgM.
DEFAULT_SERVER_LR = {"fedopt": 0.01, "fedavgm": 1.0}


def _copy(arrays: Mapping[str, np.ndarray] | None) -> Arrays | None:
    return None if arrays is None else {k: np.array(v, copy=True) for k, v in arrays.items()}


class ServerOptimizer(ABC):
    """One server step per round: ``step(round, current, mean)`` is the next global model, where
    ``current`` is what the sites were sent and ``mean`` is their example-weighted mean reply.

    ``name`` is the class name recorded in checkpoints (the same names as Flower's strategies, so
    a checkpoint written before this module existed still names its strategy correctly).
    """

    name: ClassVar[str]
    state_keys: ClassVar[tuple[str, ...]]

    @abstractmethod
    def step(self, server_round: int, current: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> Arrays:
        """The new global arrays (same keys as ``current``); updates the optimiser's moments."""

    def step_frozen(self, server_round: int, current: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray],
                    frozen: Sequence[str] = ()) -> Arrays:
        """``step`` for every weight except those in ``frozen`` (no site trained them this round):
        they keep their current value and their moments, as if the round had not happened for
        them. Without it, FedAvgM's momentum (and FedOpt's first moment) would keep moving a weight
        nobody trained, and its moments would decay towards a zero pseudo-gradient."""
        if not frozen:
            return self.step(server_round, current, mean)
        before = {k: copy.deepcopy(getattr(self, k)) for k in self.state_keys}
        new = self.step(server_round, current, mean)
        for attr in self.state_keys:
            old, moments = before[attr], getattr(self, attr)
            if isinstance(moments, dict):
                for k in frozen:  # a weight with no moment yet gets a zero one (no step taken)
                    moments[k] = (np.array(old[k], copy=True) if isinstance(old, dict) and k in old
                                  else np.zeros_like(np.asarray(current[k], dtype=moments[k].dtype)))
        return {k: (np.array(current[k], copy=True) if k in frozen else v) for k, v in new.items()}

    def state_dict(self) -> dict[str, Any]:
        """The moments, copied (a later round cannot alter a captured state)."""
        return {k: copy.deepcopy(getattr(self, k)) for k in self.state_keys}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in self.state_keys:
            setattr(self, k, copy.deepcopy(state.get(k)))


class FedAvgM(ServerOptimizer):
    """Server momentum: m = beta * m + (current - mean) (m = current - mean in the first round),
    new = current - lr * m. With beta 0 and lr 1 the step is skipped and the mean is returned as it
    is (Flower's ``server_opt`` flag), so FedAvgM then equals FedAvg bit for bit."""

    name = "FedAvgM"
    state_keys = ("momentum_vector",)

    def __init__(self, server_momentum: float, server_learning_rate: float) -> None:
        self.server_momentum = server_momentum
        self.server_learning_rate = server_learning_rate
        self.momentum_vector: Arrays | None = None

    @property
    def server_opt(self) -> bool:
        return self.server_momentum != 0.0 or self.server_learning_rate != 1.0

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        # Checkpoints written with Flower's FedAvgM held the buffer as a list in the model's order;
        # it becomes a dict at the next step, when the keys are known.

    def step(self, server_round: int, current: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> Arrays:
        if not self.server_opt:
            return dict(mean)
        pseudo = {k: current[k] - mean[k] for k in current}
        if self.server_momentum > 0.0:
            m = self.momentum_vector
            if isinstance(m, list):
                m = dict(zip(current, m, strict=True))
            self.momentum_vector = pseudo if m is None else {
                k: self.server_momentum * m[k] + pseudo[k] for k in current}
            pseudo = self.momentum_vector
        return {k: np.asarray(current[k] - self.server_learning_rate * pseudo[k]) for k in current}


class _FedOpt(ServerOptimizer):
    """Shared by FedAdam, FedYogi and FedAdagrad: delta = mean - current and the first moment
    m = beta_1 * m + (1 - beta_1) * delta; the subclasses differ in the second moment v."""

    state_keys = ("m_t", "v_t")

    def __init__(self, eta: float, eta_l: float, tau: float, beta_1: float = 0.0, beta_2: float = 0.0) -> None:
        self.eta, self.eta_l, self.tau, self.beta_1, self.beta_2 = eta, eta_l, tau, beta_1, beta_2
        self.m_t: Arrays | None = None
        self.v_t: Arrays | None = None

    @abstractmethod
    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray: ...

    def _rate(self, server_round: int) -> float:
        return self.eta

    def step(self, server_round: int, current: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> Arrays:
        delta = {k: mean[k] - current[k] for k in current}
        m = self.m_t or {k: np.zeros_like(v) for k, v in mean.items()}
        self.m_t = {k: self.beta_1 * m[k] + (1 - self.beta_1) * delta[k] for k in current}
        v = self.v_t or {k: np.zeros_like(x) for k, x in mean.items()}
        self.v_t = {k: self._second_moment(v[k], delta[k]) for k in current}
        rate = self._rate(server_round)
        return {k: np.asarray(x + rate * self.m_t[k] / (np.sqrt(self.v_t[k]) + self.tau)) for k, x in current.items()}


class FedAdam(_FedOpt):
    """v = beta_2 * v + (1 - beta_2) * delta^2, with Adam's bias correction on the rate."""

    name = "FedAdam"

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * delta ** 2

    def _rate(self, server_round: int) -> float:
        return self.eta * np.sqrt(1 - np.power(self.beta_2, server_round + 1.0)) / (
            1 - np.power(self.beta_1, server_round + 1.0))


class FedYogi(_FedOpt):
    """v = v - (1 - beta_2) * delta^2 * sign(v - delta^2): v grows no faster than additively."""

    name = "FedYogi"

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta_2) * delta ** 2 * np.sign(v - delta ** 2)


class FedAdagrad(_FedOpt):
    """v = v + delta^2."""

    name = "FedAdagrad"

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta ** 2


#: ``federation.strategy`` -> the server optimiser it adds to FedAvg's mean.
SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


def build_server_optimizer(fed: FederationConfig, client_lr: float) -> ServerOptimizer | None:
    """The server optimiser ``fed.strategy`` names, or None for the averaging-only strategies.

    ``client_lr`` is FedOpt's ``eta_l`` (``train.lr``; recorded, not used by the step).
    """
    cls = SERVER_OPTIMIZERS.get(fed.strategy)
    if cls is None:
        return None
    if cls is FedAvgM:
        lr = fed.server_lr if fed.server_lr is not None else DEFAULT_SERVER_LR["fedavgm"]
        return FedAvgM(server_momentum=fed.server_momentum, server_learning_rate=lr)
    eta = fed.server_lr if fed.server_lr is not None else DEFAULT_SERVER_LR["fedopt"]
    if cls is FedAdagrad:
        return FedAdagrad(eta=eta, eta_l=client_lr, tau=fed.server_tau)
    return cls(eta=eta, eta_l=client_lr, tau=fed.server_tau, beta_1=fed.server_beta_1, beta_2=fed.server_beta_2)
