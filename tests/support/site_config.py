"""A small experiment config for site-side tests, and the thread setting they run under.

Not a test module: tests/client/test_client_app.py and the local-training tests import it
(tests/conftest.py puts tests/support on sys.path). Use ``two_threads`` as a module's autouse
fixture by importing it (``from site_config import two_threads  # noqa: F401``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smm_model.config import ExperimentConfig

#: A model small enough to train in a test (32-dim features, 64 patches, 16 hidden units).
SMALL = ["model.feature_dim=32", "model.genes_tumour=20", "model.genes_micro=30", "model.hidden_dim=16",
         "model.heads=4", "model.dim_head=8", "model.offset_groups=4", "model.layout=spatial",
         "model.grid_size=8", "model.n_patches=64", "model.key_grid=4", "model.bias_table_size=33",
         "model.snn_hidden=[16]", "train.batch_size=4", "train.lr=0.002", "train.weight_decay=0.0001",
         "federation.min_site_patients=1",
         "privacy.min_cell=1"]  # exact statistics of tiny sites; disclosure control has its own tests


def make_cfg(root: Path, *extra: str) -> ExperimentConfig:
    """SMALL with the sites under ``root`` and ``extra`` overrides."""
    return ExperimentConfig.from_yaml_text("", [*SMALL, f"data.sites_root={root}", *extra])


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    """Two intra-op threads for the module (these tests train real, if small, models), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)
