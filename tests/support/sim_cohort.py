"""Small synthetic cohorts and configs shared by the simulation-tier tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from client.cohorts.synth import CohortSpec, write_cohort

#: A model small enough for a 2-core CI runner, all three tasks, spatial layout.
SMALL = ["model.feature_dim=32", "model.genes_tumour=20", "model.genes_micro=30", "model.hidden_dim=16",
         "model.heads=4", "model.dim_head=8", "model.offset_groups=4", "model.layout=spatial",
         "model.grid_size=8", "model.n_patches=64", "model.key_grid=4", "model.bias_table_size=33",
         "model.snn_hidden=[16]", "model.tasks=[diagnosis, grade, survival]", "train.batch_size=4",
         "train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.0001", "federation.rounds=2",
         "federation.local_epochs=2", "federation.min_nodes=3", "federation.min_site_patients=1",
         "federation.wait_for_nodes_s=120",
         "privacy.min_cell=1"]  # sites of ~20 patients, exact statistics; tests/sim/test_privacy_attack.py runs k = 5


#: ``CohortSpec`` settings that make the sites identically distributed: the same class prior (a
#: Dirichlet this concentrated draws the cohort's prior at every site) and no site batch effects.
IID = {"class_concentration": 1e6, "site_gene_shift": 0.0, "site_patch_shift": 0.0}


def write_features_cohort(out: Path, sites: int = 3, patients: int = 24, feature_dim: int = 32,
                          seed: int = 5, **spec) -> Path:
    """``smm synth --features-only`` into ``out`` (site_1..site_K); returns ``out``. ``spec``: other
    ``CohortSpec`` fields (e.g. ``**IID``)."""
    d = CohortSpec()
    write_cohort(out, replace(d, sites=sites, patients_per_site=patients, features_only=True, seed=seed,
                              features=replace(d.features, feature_dim=feature_dim), **spec), log=lambda *_: None)
    return out


#: configs/bench_synthetic.yaml (64-dim features, 20 + 30 genes) at a size a test trains in seconds
BENCH_SMALL = ["model.feature_dim=64", "model.genes_tumour=20", "model.genes_micro=30", "model.hidden_dim=16",
               "model.heads=2", "model.dim_head=8", "model.offset_groups=2", "model.layout=spatial",
               "model.grid_size=8", "model.key_grid=4", "model.bias_table_size=17", "model.snn_hidden=[16]",
               "federation.min_nodes=2", "train.batch_size=4"]


def train_bench_run(cohort: Path, run: Path, arch: str, rounds: int = 1) -> Path:
    """``smm centralized configs/bench_synthetic.yaml`` on ``cohort`` at ``BENCH_SMALL``, in a
    subprocess as the benchmarks run it; returns the run folder."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    sets = [*BENCH_SMALL, f"federation.rounds={rounds}", f"model.arch={arch}", f"data.sites_root={cohort}"]
    cmd = [sys.executable, "-m", "smm_model.cli", "centralized", str(root / "configs" / "bench_synthetic.yaml"),
           "--run-dir", str(run), *[a for s in sets for a in ("--set", s)]]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return run
