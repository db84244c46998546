"""Central differential privacy (``privacy.central_dp``): the server clips each site's update and noises their sum.

Site-level DP (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR
2018; Flower's ``DifferentialPrivacyServerSideFixedClipping``): in every aggregated round each
kept site's update ``w_site - w_global`` (its floating-point arrays as one vector) is clipped to
L2 norm C (``privacy.central_dp_clipping_norm``), the clipped updates are summed, Gaussian noise
of standard deviation sigma * C (``privacy.central_dp_noise_multiplier``) is added to the sum, and
the sum is divided by the number of kept sites; that noised mean is what FedAvg, or the server
optimiser (FedAvgM, FedAdam, ...: post-processing) steps along. Each site's weight is 1, not its
patient count: an example-weighted mean would let the largest site move the model by more than C/n.

Why our own step and not Flower's wrapper (same clip and noise formula):

* The noise must be secret. Flower's helper draws from NumPy's global generator, which a seeded
  run (``federation.seed``, restored on resume) makes reproducible by anyone holding the config.
  Here it comes from a generator seeded from the operating system's entropy (``secrets``).
* Never less noise than calibrated. Flower's wrapper sets the noise of the *mean* to
  sigma * C / ``num_sampled_clients``, fixed when it is built; when fewer replies arrive (a site
  dropped, a reply failed the guards) the mean over them carries less noise than the mechanism
  needs. Here the noise is calibrated on the sum, so it holds whatever number of sites replies.
* The wrapper reads the round's arrays from its own ``configure_train``, which this server's loop
  does not call, and keeps no state a checkpoint could restore.

Accounting: one Gaussian mechanism per aggregated round at sample rate 1 (the sites are not
Poisson-sampled, so no amplification is claimed; ``federation.fraction_train`` < 1 is not credited),
epsilon(delta = ``privacy.dp_delta``) from the whole history with Opacus's accountant
(``smm_model.contract.accounting``). The history is part of the server's checkpoint, so a resumed
run continues it. What it protects: a whole site's contribution in every model the server releases
(to the sites each round, in ``model.pt``), against the sites and anyone who receives a model. What
it does not: the server sees every update before it is noised (that is what patient-level DP-SGD
at the site, ``privacy.dp``, is for), and the statistics the sites send (protected by the cell rules).
Refused with strategies that do not average (FedMedian, FedTrimmedAvg, Krum: their result is not
a clipped sum) and with SCAFFOLD (its control variates leave the server un-noised).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smm_model.config import ConfigError, ExperimentConfig
from smm_model.contract.accounting import Mechanism, epsilon_of

__all__ = ["CentralDP", "CENTRAL_DP_STRATEGIES", "check_central_dp"]

#: Strategies whose aggregate is a mean of the updates, so a clipped, noised sum can stand in for it.
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


def check_central_dp(cfg: ExperimentConfig) -> None:
    """Refuse, naming the field, a central DP config this server cannot honour (before any training)."""
    if not cfg.privacy.central_dp:
        return
    if cfg.federation.strategy not in CENTRAL_DP_STRATEGIES:
        raise ConfigError(f"federation.strategy: {cfg.federation.strategy!r} cannot run with privacy.central_dp "
                          f"(its aggregate is not a mean of clipped updates, or it sends un-noised state); "
                          f"expected one of {CENTRAL_DP_STRATEGIES}")


@dataclass
class CentralDP:
    """The server's clip-and-noise step and its accountant's history (checkpointed)."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    accountant: str = "rdp"
    history: list[Mechanism] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(secrets.randbits(128))

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> CentralDP | None:
        """The step ``cfg.privacy`` asks for, or None with central DP off (refuses a bad combination)."""
        check_central_dp(cfg)
        pc = cfg.privacy
        if not pc.central_dp:
            return None
        assert pc.central_dp_noise_multiplier is not None and pc.central_dp_clipping_norm is not None
        return cls(float(pc.central_dp_noise_multiplier), float(pc.central_dp_clipping_norm), float(pc.dp_delta),
                   pc.dp_accountant)

    def release(self, updates: Sequence[Mapping[str, np.ndarray]], current: Mapping[str, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(the noised mean of ``updates`` in ``current``'s keys, what was done).

        ``updates`` are the kept sites' arrays (the whole model), ``current`` what they were sent.
        Floating-point arrays: current + (sum of clipped deltas + N(0, (sigma C)^2)) / n, float64.
        Integer arrays (counters, not learned from patients' values) keep ``current``'s value. The
        round is added to the history only here, when a model is released.
        """
        if not updates:
            raise ValueError("central DP: no updates to release")
        keys = [k for k, v in current.items() if np.asarray(v).dtype.kind in "fc"]
        total = {k: np.zeros(np.shape(current[k]), dtype=np.float64) for k in keys}
        norms: list[float] = []
        for u in updates:
            delta = {k: np.asarray(u[k], dtype=np.float64) - np.asarray(current[k], dtype=np.float64) for k in keys}
            norm = math.sqrt(sum(float(np.vdot(d, d)) for d in delta.values()))
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            norms.append(norm)
            for k in keys:
                total[k] += delta[k] * scale
        std = self.noise_multiplier * self.clipping_norm  # of the sum: one site moves it by at most C
        n = len(updates)
        out: dict[str, np.ndarray] = {}
        for k, v in current.items():
            if k in total:
                noise = self._rng.normal(0.0, std, size=total[k].shape)
                out[k] = np.asarray(v, dtype=np.float64) + (total[k] + noise) / n
            else:
                out[k] = np.array(v, copy=True)
        self.history.append((self.noise_multiplier, 1.0, 1))
        info = {"epsilon": self.epsilon(), "delta": self.delta, "sigma": self.noise_multiplier,
                "clip": self.clipping_norm, "sites": n, "clipped": int(sum(x > self.clipping_norm for x in norms)),
                "noise_std_mean": std / n, "releases": sum(s for _, _, s in self.history)}
        return out, info

    def epsilon(self) -> float:
        """epsilon(delta) of every release so far."""
        return epsilon_of(self.history, self.delta, self.accountant)

    def planned_epsilon(self, rounds: int) -> float:
        """epsilon(delta) after ``rounds`` releases (the run's plan, logged at its start)."""
        return epsilon_of([*self.history, (self.noise_multiplier, 1.0, rounds)], self.delta, self.accountant)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(m) for m in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in state.get("history") or []]
