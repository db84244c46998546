"""In-process fake sites and transports for the server tests (not a test module).

A ``FakeSite`` answers the three message types of the protocol the way a ClientApp must: it parses
the experiment YAML it is sent, replies to preflight with a ``SiteSummary``, "trains" by moving
the weights deterministically towards a site-specific target, and evaluates with ``EvalStats``
whose loss is the distance to its target. Faults (NaN weights, wrong shapes, exceptions carrying a
PHI sentinel, absurd example counts...) are switched on per site and per round.

``FakeTransport`` is ``server.federation.loop``'s transport over a dict of such sites. Site exceptions become
error replies exactly as Flower reports them (``"<class 'X'>:<'message'>"``), passed through the
same ``sanitize_error`` the Flower transport uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from server.federation.messages import (EVALUATE, KEY_EXPERIMENT, KEY_ROUND, KEY_SPLIT, PREFLIGHT, TRAIN, Instruction, Reply,
                             arrays_nbytes, sanitize_error)
from smm_model.config import ExperimentConfig
from smm_model.contract.wire import KEY_VALIDATE, VALIDATION
from smm_model.contract.protocol import SURVIVAL_HIST_EDGES, EvalStats, SiteSummary
from smm_model.contract.stats import GenomicsStats

SENTINEL = "PHI-SENTINEL-TCGA-XX-0000"

SMALL = ["model.feature_dim=24", "model.genes_tumour=10", "model.genes_micro=14", "model.hidden_dim=24",
         "model.heads=4", "model.dim_head=8", "model.offset_groups=4", "model.grid_size=8",
         "model.n_patches=64", "model.key_grid=4", "model.bias_table_size=33", "model.snn_hidden=[16]",
         "train.batch_size=8", "train.weight_decay=0.0001", "train.lr=0.002"]
FED = ["federation.rounds=3", "federation.min_nodes=2", "federation.wait_for_nodes_s=2.0",
       "federation.min_site_patients=5", "federation.seed=7"]


def config(*extra: str) -> ExperimentConfig:
    return ExperimentConfig.from_yaml_text("", [*SMALL, *FED, *extra])


def site_summary(cfg: ExperimentConfig, seed: int, n: int = 40, **schema: Any) -> SiteSummary:
    """A plausible preflight summary whose schema matches ``cfg`` unless ``schema`` overrides it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 3))
    t = rng.exponential(600, n)
    e = rng.random(n) < 0.6
    base = {"encoder": "resnet50_trunc", "feature_dim": cfg.model.feature_dim, "gene_set": "demo-v1",
            "genes_tumour": cfg.model.genes_tumour, "genes_micro": cfg.model.genes_micro,
            "genomics_policy": cfg.data.genomics_policy}
    base.update(schema)
    return SiteSummary(
        schema=base,
        splits={"train": {"patients": n, "diagnosis": [n // 4] * 4, "grade": [n // 3, n // 3, n - 2 * (n // 3)],
                          "survival_labelled": n, "events": int(e.sum())},
                "val": {"patients": 20}, "test": {"patients": 20}},
        genomics=GenomicsStats(("g1", "g2", "g3"), np.full(3, n), x.sum(0), (x * x).sum(0)).to_dict(),
        survival_hist_events=np.histogram(t[e], SURVIVAL_HIST_EDGES)[0].tolist(),
        survival_hist_all=np.histogram(t, SURVIVAL_HIST_EDGES)[0].tolist(),
        patches=_patch_sums(rng, 10 * n, int(base["feature_dim"])), label=f"fake-{seed}",
        data_digest=f"{seed:064x}", synthetic=True)


def _patch_sums(rng: np.random.Generator, n: int, dim: int) -> dict[str, Any]:
    """The additive patch statistics a site sends (``SiteData.patch_sums``) of n random patches."""
    p = rng.normal(3.0, 2.0, (n, dim))
    return {"n": n, "sum": p.sum(0).tolist(), "sum_sq": (p * p).sum(0).tolist()}


class FakeSite:
    """A deterministic site: same inputs, same replies, bit for bit.

    ``train_fault`` / ``eval_fault`` / ``preflight_fault``: a fault name, or a callable
    ``round -> fault name | None`` to fault only some rounds. ``eval_patients``: patients in the val
    and test splits; ``honest_suppression=False`` makes a small site send numbers anyway.
    """

    def __init__(self, node_id: int, *, n_train: int = 40, eval_patients: int = 20, step: float = 0.5,
                 train_fault: Any = None, eval_fault: Any = None, preflight_fault: Any = None,
                 schema: Mapping[str, Any] | None = None, honest_suppression: bool = True) -> None:
        self.node_id = node_id
        self.n_train = n_train
        self.eval_patients = eval_patients
        self.step = step
        self.train_fault, self.eval_fault, self.preflight_fault = train_fault, eval_fault, preflight_fault
        self.schema = dict(schema or {})
        self.honest_suppression = honest_suppression
        self.target: dict[str, np.ndarray] | None = None
        self.seen_configs: list[dict[str, Any]] = []

    @staticmethod
    def _fault(fault: Any, r: int) -> str | None:
        return fault(r) if callable(fault) else fault

    def _targets(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # A function of the node id and the array shapes only, so a restarted site (resume) is the
        # same site: its target never depends on the weights it happened to see first.
        if self.target is None:
            rng = np.random.default_rng(1000 + self.node_id)
            self.target = {k: rng.normal(0, 0.05, arrays[k].shape).astype(arrays[k].dtype) for k in sorted(arrays)}
        return self.target

    def __call__(self, ins: Instruction) -> Reply:
        self.seen_configs.append(dict(ins.config))
        cfg = ExperimentConfig.from_yaml_text(ins.config[KEY_EXPERIMENT])  # the contract: resolved YAML
        if ins.message_type == PREFLIGHT:
            return self._preflight(cfg)
        if ins.message_type == TRAIN:
            return self._train(ins)
        if ins.message_type == EVALUATE:
            return self._evaluate(ins, cfg)
        raise ValueError(f"unexpected message type {ins.message_type}")

    def _preflight(self, cfg: ExperimentConfig) -> Reply:
        fault = self._fault(self.preflight_fault, 0)
        if fault == "error":
            raise FileNotFoundError(f"/data/{SENTINEL}.svs")
        s = site_summary(cfg, self.node_id, **self.schema)
        if fault == "garbage":
            return Reply(self.node_id, records={"summary": {"json": "{" + SENTINEL}})
        return Reply(self.node_id, records={"summary": {"json": s.to_json()}})

    def _train(self, ins: Instruction) -> Reply:
        assert ins.arrays is not None
        r = int(ins.config[KEY_ROUND])
        fault = self._fault(self.train_fault, r)
        if fault == "error":
            raise RuntimeError(f"cannot read slide {SENTINEL}.svs for patient {SENTINEL}")
        target = self._targets(ins.arrays)
        new = {k: (v + np.float32(self.step) * (target[k] - v)).astype(v.dtype) for k, v in ins.arrays.items()}
        loss = float(np.mean([np.mean((target[k] - v) ** 2) for k, v in ins.arrays.items()]))
        metrics: dict[str, Any] = {"num-examples": self.n_train, "train-loss": loss, "seconds": 0.01,
                                   "coord-diagnosis-tumour": 1, "coord-diagnosis-micro": 0,
                                   "coord-diagnosis-conflicts": 2}
        first = next(iter(new))
        if fault == "nan":
            new[first] = new[first].copy()
            new[first].flat[0] = np.nan
        elif fault == "inf":
            new[first] = np.full_like(new[first], np.inf)
        elif fault == "shape":
            new[first] = np.zeros(new[first].shape + (1,), dtype=new[first].dtype)
        elif fault == "dtype":
            new[first] = new[first].astype(np.float64)
        elif fault == "missing_key":
            del new[first]
        elif fault == "extra_key":
            new["extra.weight"] = np.zeros(3, dtype=np.float32)
        elif fault == "huge":
            metrics["num-examples"] = 1e9
        elif fault == "zero":
            metrics["num-examples"] = 0
        elif fault == "no_num_examples":
            del metrics["num-examples"]
        elif fault == "phi_metric_key":
            metrics[SENTINEL] = 1.0
        elif fault == "scaled":
            new = {k: (v + 100 * (new[k] - v)).astype(v.dtype) for k, v in ins.arrays.items()}
        records = {}
        if KEY_VALIDATE in ins.config:  # one phase per round: the received weights validated first
            cfg = ExperimentConfig.from_yaml_text(ins.config[KEY_EXPERIMENT])
            val = self._evaluate(Instruction(ins.node_id, EVALUATE, {**ins.config, KEY_SPLIT: ins.config[KEY_VALIDATE]},
                                             ins.arrays), cfg)
            if val.metrics is not None:
                records[VALIDATION] = val.metrics
        if fault == "no_metrics":
            return Reply(self.node_id, arrays=new, records=records)
        if fault == "no_arrays":
            return Reply(self.node_id, metrics=metrics, records=records)
        return Reply(self.node_id, arrays=new, metrics=metrics, records=records)

    def _evaluate(self, ins: Instruction, cfg: ExperimentConfig) -> Reply:
        assert ins.arrays is not None
        r = int(ins.config[KEY_ROUND])
        fault = self._fault(self.eval_fault, r)
        if fault == "error":
            raise RuntimeError(f"evaluation failed on {SENTINEL}")
        n = self.eval_patients
        if n < cfg.federation.min_site_patients and self.honest_suppression:
            return Reply(self.node_id, metrics=EvalStats(n=n, suppressed=True).to_record())
        target = self._targets(ins.arrays)
        dist = float(np.mean([np.mean((target[k] - v).astype(np.float64) ** 2) for k, v in ins.arrays.items()]))
        acc = 1.0 / (1.0 + 100 * dist)
        right = int(round(n * acc))
        confusion = {}
        for task, C in cfg.model.n_classes.items():
            if task == "survival":
                continue
            cm = np.zeros((C, C), dtype=int)
            cm[0, 0] = right
            cm[1, 0] = n - right
            confusion[task] = cm.ravel().tolist()
        comp = 2 * n
        conc = int(round(comp * (0.5 + acc / 2)))
        stats = EvalStats(n=n, loss_sum=n * dist, confusion=confusion,
                          cindex=[conc, comp - conc, 0, comp] if "survival" in cfg.model.tasks else None)
        assert ins.config[KEY_SPLIT] in ("val", "test")
        rec = stats.to_record()
        if fault == "bad_lengths":
            rec["diagnosis-confusion"] = [1, 2, 3]
        if fault == "no_metrics":
            return Reply(self.node_id)
        return Reply(self.node_id, metrics=rec)


class Crash(BaseException):
    """Simulates the server process dying (not an Exception: nothing may catch it)."""


class FakeTransport:
    """``server.federation.loop``'s transport over in-process sites.

    ``connected``: callable returning the connected node ids (default: all sites). ``crash``:
    callable ``Instruction -> bool``; when true the "server" dies before sending it.
    """

    def __init__(self, sites: Mapping[int, Callable[[Instruction], Reply]], *,
                 connected: Callable[[], Sequence[int]] | None = None,
                 crash: Callable[[Instruction], bool] | None = None) -> None:
        self.sites = dict(sites)
        self.connected = connected
        self.crash = crash
        self.sent: list[Instruction] = []
        self.phases: list[list[tuple[int, str]]] = []  # (node, message type) of each send call: one message phase

    def node_ids(self) -> list[int]:
        return sorted(self.connected() if self.connected else self.sites)

    def send(self, instructions: Sequence[Instruction]) -> list[Reply]:
        out = []
        self.phases.append([(ins.node_id, ins.message_type) for ins in instructions])
        for ins in instructions:
            if self.crash is not None and self.crash(ins):
                raise Crash(f"server killed before sending {ins.message_type} to node {ins.node_id}")
            self.sent.append(ins)
            site = self.sites.get(ins.node_id)
            if site is None or ins.node_id not in self.node_ids():
                continue  # a node that is gone does not answer
            try:
                reply = site(ins)
            except Exception as e:  # what Flower does with a ClientApp exception
                reply = Reply(ins.node_id, error=sanitize_error(2, f"<class '{type(e).__name__}'>:<'{e}'>"))
            reply.bytes_sent = arrays_nbytes(ins.arrays)
            reply.bytes_received = arrays_nbytes(reply.arrays)
            out.append(reply)
        return out


def sites(n: int = 3, **per_site: dict[str, Any]) -> dict[int, FakeSite]:
    """``n`` healthy sites with node ids 11, 12, ...; ``per_site={"12": {...}}`` customises one."""
    return {nid: FakeSite(nid, **per_site.get(str(nid), {})) for nid in range(11, 11 + n)}
