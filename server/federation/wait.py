"""A bounded wait for sites.

Flower's ``sample_nodes`` polls ``grid.get_node_ids()`` once a second *forever* until enough nodes
are connected: a hospital that goes down for good hangs the run. Here the wait has a deadline
(``federation.wait_for_nodes_s``) and ends in an error that says how many sites were there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable

__all__ = ["NodeWaitTimeout", "wait_for_nodes"]

log = logging.getLogger("fedsmm.server.wait")


class NodeWaitTimeout(RuntimeError):
    """Fewer sites than needed were connected when the wait ran out."""


def wait_for_nodes(list_nodes: Callable[[], Iterable[int]], needed: int, timeout_s: float, *,
                   eligible: Collection[int] | None = None, exclude: Collection[int] = (), poll_s: float = 1.0,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """Poll ``list_nodes()`` until at least ``needed`` (eligible) nodes are connected.

    ``eligible``: only these node ids count (the sites that passed preflight); ``exclude``: these
    never count (sites refused at preflight). Returns the sorted
    connected eligible ids as soon as there are enough; raises ``NodeWaitTimeout`` ("only X of Y
    sites connected after N s") once ``timeout_s`` has passed. The last poll happens at the
    deadline, so the call returns within ``timeout_s`` plus one ``list_nodes()`` call.
    """
    start = clock()
    deadline = start + timeout_s
    announced = -1
    while True:
        nodes = sorted({int(n) for n in list_nodes()})
        if eligible is not None:
            nodes = [n for n in nodes if n in eligible]
        if exclude:
            nodes = [n for n in nodes if n not in exclude]
        if len(nodes) >= needed:
            return nodes
        now = clock()
        if now >= deadline:
            raise NodeWaitTimeout(f"only {len(nodes)} of {needed} sites connected after {now - start:.1f} s "
                                  f"(federation.wait_for_nodes_s={timeout_s:g}); check that the sites' SuperNodes "
                                  f"are running and reach the SuperLink, or lower federation.min_nodes")
        if len(nodes) != announced:
            log.info("waiting for sites: %d of %d connected (giving up after %g s)", len(nodes), needed, timeout_s)
            announced = len(nodes)
        sleep(max(0.0, min(poll_s, deadline - now)))
