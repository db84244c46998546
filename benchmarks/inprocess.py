"""A federation in one process for the simulation benchmarks: the server loop driving the real
ClientApp through Flower ``Message`` objects, with an optional tamper hook on the replies.

``InProcessTransport`` does what Flower does between ``Grid.send_and_receive`` and a ClientApp
(as ``tests/sim/test_contract_inprocess.py``'s ``InProcessFlower``): each ``Instruction`` becomes
a ``Message`` (``server.app.instruction_content``, weights packed with ``pack_record``) for the
node's ``Context`` (partition id -> site folder), ``client.app.app`` answers it, and the answer goes
back through ``server.app.reply_from_message``, the server's own decoding. ``tamper(ins, reply)``
may replace a decoded reply before the server loop sees it: that is where ``robustness.py`` makes
one site malicious, so nothing of the attack lives in the production ClientApp.

Also here: the small features-only synthetic cohort and model both benchmarks use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import DEFAULT_TTL, Context, Message, Metadata, RecordDict

import client.app as client_app
from client.cohorts.synth import CohortSpec, write_cohort
from server.app import instruction_content, pack_record, reply_from_message
from server.federation.messages import ARRAYS, CONTROL, Instruction, Reply, sanitize_error

#: A model for 2 CPU cores (the tests' simulation-tier size): all three tasks, spatial layout,
#: 32-dim patch features. ``privacy.min_cell=1``: exact statistics at every site, so validation
#: AUCs are defined at ~12 validation patients a site (the deployed default of 5 withholds them;
#: configs/demo.yaml explains why it selects on the loss).
SMALL_MODEL = ["model.feature_dim=32", "model.genes_tumour=20", "model.genes_micro=30", "model.hidden_dim=16",
               "model.heads=4", "model.dim_head=8", "model.offset_groups=4", "model.layout=spatial",
               "model.grid_size=8", "model.n_patches=64", "model.key_grid=4", "model.bias_table_size=33",
               "model.snn_hidden=[16]", "model.tasks=[diagnosis, grade, survival]", "train.batch_size=4",
               "train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.0001",
               "federation.min_site_patients=1", "federation.wait_for_nodes_s=120", "privacy.min_cell=1"]
FEATURE_DIM = 32


def write_features_cohort(out: Path, sites: int, patients: int, seed: int = 5,
                          split: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Path:
    """``smm synth --features-only`` (site_1..site_K, ``FEATURE_DIM``-dim features) into ``out``."""
    d = CohortSpec()
    write_cohort(out, replace(d, sites=sites, patients_per_site=patients, features_only=True, seed=seed,
                              split=split, features=replace(d.features, feature_dim=FEATURE_DIM)),
                 log=lambda *_: None)
    return out


Tamper = Callable[[Instruction, Reply], Reply]


class InProcessTransport:
    """``client.app.app`` for each of ``n_sites`` nodes (ids 100.., partition ids 0..), in this
    process, one message at a time; node contexts live as long as the transport."""

    def __init__(self, n_sites: int, tamper: Tamper | None = None) -> None:
        self.tamper = tamper
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                                          node_config={"partition-id": k, "num-partitions": n_sites})
                         for k in range(n_sites)}
        self.errors: list[str] = []

    def node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send(self, instructions: list[Instruction]) -> list[Reply]:
        out = []
        for i, ins in enumerate(instructions):
            packed = {name: pack_record(a) for name, a in ((ARRAYS, ins.arrays), (CONTROL, ins.control))
                      if a is not None}
            msg = Message(content=instruction_content(ins, packed.get(ARRAYS), packed.get(CONTROL)),
                          metadata=Metadata(run_id=1, message_id=f"m{i}", src_node_id=1, dst_node_id=ins.node_id,
                                            reply_to_message_id="", group_id="", created_at=time.time(),
                                            ttl=DEFAULT_TTL, message_type=ins.message_type))
            try:
                reply = reply_from_message(client_app.app(msg, self.contexts[ins.node_id]),
                                           {name: p.layout for name, p in packed.items()})
            except Exception as e:  # what Flower sends back for a raising ClientApp
                reason = f"{type(e)}:<'{e}'>"
                self.errors.append(reason)
                reply = Reply(ins.node_id, error=sanitize_error(2, reason))
            out.append(reply if self.tamper is None else self.tamper(ins, reply))
        return out


def scaled_update(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray], scale: float
                  ) -> dict[str, np.ndarray]:
    """``global + scale * (local - global)`` on every floating-point array (float64 arithmetic,
    the array's dtype kept); integer buffers stay the site's. ``scale=-1`` is a sign flip."""
    out = {}
    for k, a in local.items():
        g = global_[k]
        if a.dtype.kind == "f":
            out[k] = (g.astype(np.float64) + scale * (a.astype(np.float64) - g.astype(np.float64))).astype(a.dtype)
        else:
            out[k] = a
    return out
