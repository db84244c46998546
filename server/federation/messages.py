"""What the server loop sends and receives, as neutral data (no Flower types).

The federated workflow (``server.federation.loop``) speaks to sites through a *transport*: an object with
``node_ids()`` and ``send(instructions)``. The Flower transport (``server.app.FlowerTransport``)
turns an ``Instruction`` into a Flower ``Message`` and a reply ``Message`` back into a ``Reply``;
a test transport calls plain Python site functions instead. Keeping Flower out of this module and
out of the loop is what makes the whole server workflow testable in-process, in milliseconds.

The message contract (types, record names, config keys) is ``smm_model.contract.wire``.

Error replies never carry free text into the server's logs: ``sanitize_error`` reduces them to a
short code (the reason text of a Flower error reply is the site's exception message, which may name
a slide path or a patient barcode).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["PREFLIGHT", "TRAIN", "EVALUATE", "ARRAYS", "CONTROL", "METRICS", "CONFIG", "SUMMARY", "SUMMARY_JSON",
           "KEY_EXPERIMENT", "KEY_SHARED", "KEY_ROUND", "KEY_LR", "KEY_LOCAL_EPOCHS", "KEY_LOCAL_STEPS", "KEY_PROXIMAL_MU",
           "KEY_SPLIT", "NUM_EXAMPLES", "ConfigValue", "MetricValue", "Instruction", "Reply", "Transport",
           "sanitize_error", "arrays_nbytes", "FLOWER_ERROR_CODES"]

# The names on the wire live in the contract (both ends read them there); re-exported for the loop's
# transports.
from smm_model.contract.wire import (ARRAYS, CONFIG, CONTROL, EVALUATE, KEY_EXPERIMENT, KEY_LOCAL_EPOCHS,  # noqa: E402
                                     KEY_LOCAL_STEPS, KEY_LR, KEY_PROXIMAL_MU, KEY_ROUND, KEY_SHARED, KEY_SPLIT, METRICS,
                                     NUM_EXAMPLES, PREFLIGHT, SUMMARY, SUMMARY_JSON, TRAIN)

ConfigValue = int | float | str | bool | bytes
MetricValue = int | float | list[int] | list[float]


@dataclass(frozen=True)
class Instruction:
    """One message to one site.

    ``arrays`` is the global model as an ordered ``name -> ndarray`` mapping (a state_dict's
    order); instructions of one round share the same mapping object, so a transport can serialise
    it once for all sites.
    """

    node_id: int
    message_type: str
    config: Mapping[str, ConfigValue]
    arrays: Mapping[str, np.ndarray] | None = None
    control: Mapping[str, np.ndarray] | None = None  # SCAFFOLD: this site's correction c - c_i


@dataclass
class Reply:
    """One site's answer, or the reason there is none.

    ``error`` is a sanitized code such as ``E_CLIENT_ERROR`` or ``E_NO_REPLY`` (never the site's
    error text). ``records`` holds the reply's ConfigRecords by name (the preflight summary).
    ``bytes_sent`` / ``bytes_received`` are the array payload sizes of this exchange as the
    transport measured them. ``clamped_from`` is set by the guard when it clamped the example
    count this reply claimed.
    """

    node_id: int
    arrays: dict[str, np.ndarray] | None = None
    control: dict[str, np.ndarray] | None = None  # SCAFFOLD: the site's new control variate
    metrics: dict[str, Any] | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    clamped_from: float | None = None


class Transport(Protocol):
    """How the server loop reaches the sites.

    ``node_ids()`` lists the currently connected nodes. ``send(instructions)`` delivers them and
    returns one ``Reply`` per instruction, in the same order, within the transport's own time
    limit; a node that did not answer in time gets ``Reply(node_id, error="E_NO_REPLY")``.
    """

    def node_ids(self) -> list[int]: ...

    def send(self, instructions: Sequence[Instruction]) -> list[Reply]: ...


#: Flower ``ErrorCode`` values (flwr.common.constant.ErrorCode, 1.42) -> our codes.
FLOWER_ERROR_CODES = {
    0: "E_UNKNOWN",
    1: "E_CLIENT_LOAD",
    2: "E_CLIENT_ERROR",
    3: "E_MESSAGE_UNAVAILABLE",
    4: "E_REPLY_UNAVAILABLE",
    5: "E_NODE_UNAVAILABLE",
    6: "E_MOD_PRECONDITION",
    7: "E_INVALID_FAB",
    8: "E_CLIENT_CRASHED",
}

# A site-chosen code inside an exception message: "E_" then upper-case words joined by "_",
# letters only. Digits are excluded on purpose, so a patient barcode (TCGA-02-0001, TCGA_02_0001)
# can never pass for a code.
_SITE_CODE = re.compile(r"(?<![A-Za-z0-9_])(E_[A-Z]{2,}(?:_[A-Z]{2,}){0,5})(?![A-Za-z0-9_])")


def sanitize_error(code: int, reason: str | None) -> str:
    """A short, PHI-free code for an error reply.

    Flower puts ``"<class 'X'>:<'message'>"`` of the site's exception into ``reason``; the
    message may carry file paths or patient identifiers, so it is never logged. A site that wants
    the server to see *why* raises with a code such as ``E_DATA_READ`` in its message; that code
    (and only that) is kept for ``CLIENT_APP_RAISED_EXCEPTION``. Everything else maps from Flower's
    numeric error code.

    >>> sanitize_error(2, "<class 'OSError'>:<'E_DATA_READ: /data/TCGA-02-0001.svs'>")
    'E_DATA_READ'
    >>> sanitize_error(2, "<class 'KeyError'>:<'TCGA-02-0001'>")
    'E_CLIENT_ERROR'
    """
    fallback = FLOWER_ERROR_CODES.get(int(code), "E_UNKNOWN")
    if int(code) == 2 and reason:
        m = _SITE_CODE.search(reason)
        if m and len(m.group(1)) <= 40:
            return m.group(1)
    return fallback


def arrays_nbytes(arrays: Mapping[str, np.ndarray] | None) -> int:
    """Payload size of a name -> array mapping: data bytes plus key bytes.

    Flower's ``ArrayRecord.count_bytes()`` counts the same plus each array's small serialisation
    header; transports that can call it do, this is for those that cannot.
    """
    if not arrays:
        return 0
    return int(sum(np.asarray(v).nbytes + len(k) for k, v in arrays.items()))
