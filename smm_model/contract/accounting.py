"""epsilon(delta) of a history of Gaussian mechanisms: one rule for the sites' DP-SGD and the server's central DP.

A history is a list of ``(noise_multiplier, sample_rate, steps)``: DP-SGD at a site records its
Poisson-sampled steps (``client.local.ledger``), the server's central DP one step per aggregated
round at sample rate 1, each site contributing one clipped update (``server.aggregation.central_dp``).
epsilon is always recomputed from the whole history with a fresh Opacus accountant (RDP or PRV),
so the number does not depend on when or in which process it is asked. Opacus is imported only
when an epsilon is computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from smm_model.config import ACCOUNTANTS

__all__ = ["Mechanism", "mechanisms", "epsilon_of"]

#: (noise_multiplier, sample_rate, steps)
Mechanism = tuple[float, float, int]


def mechanisms(history: Sequence[Any]) -> list[Mechanism]:
    """The history as an Opacus accountant's ``history``: (sigma, q, steps) with the steps of equal
    (sigma, q) pairs added up. Entries are tuples or objects with a ``mechanism`` tuple (the ledger's
    entries). Composition does not depend on order, so this is the same mechanism; it makes the
    PRV accountant, whose cost grows with the number of entries, as fast as one round."""
    merged: dict[tuple[float, float], int] = {}
    for e in history:
        sigma, q, steps = getattr(e, "mechanism", e)
        merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return [(s, q, n) for (s, q), n in merged.items()]


def epsilon_of(history: Sequence[Any], delta: float, accountant: str = "rdp") -> float:
    """epsilon(delta) of a history of mechanisms, from a fresh Opacus accountant (0 for no history,
    inf when a step had no noise)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.dp_accountant: unknown {accountant!r}; expected one of {ACCOUNTANTS}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"privacy.dp_delta: must be in (0, 1), got {delta}")
    mech = mechanisms(history)
    if not mech:
        return 0.0
    if any(s == 0 for s, _, _ in mech):
        return math.inf  # no noise: no finite epsilon (RDP would say so too, PRV would fail)
    import warnings

    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = mech
    with warnings.catch_warnings():  # PRV at sample rate 1 (central DP) warns of log(1 - q) = -inf, harmlessly
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta=delta))
