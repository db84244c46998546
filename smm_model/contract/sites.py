"""Which site folders a simulated federation has: the one rule both sides apply.

The launcher (``server.ops.simulate``) counts the simulated sites with it, and each simulated
ClientApp (``client.local.round.resolve_site_dir``) maps its ``partition-id`` k to the k-th folder
of the same list; if the two differed, a site would be trained twice and another never. The rule
reads the folder names on disk only, never a file's content.
"""

from __future__ import annotations

from pathlib import Path

from smm_model.config import ConfigError, DataConfig

__all__ = ["CLINICAL_FILE", "MODALITIES", "ARCH_MODALITIES", "PARTIAL_STRATEGIES", "simulation_site_dirs"]

#: The file that makes a folder a site folder (its patients and labels; client/site/folder.py).
CLINICAL_FILE = "clinical.csv"
#: The data modalities a site may hold: slides (patch features) and genomic profiles. A site
#: declares the ones it lacks in its manifest (``client.site.folder.Manifest.modalities``).
MODALITIES = ("histology", "genomics")
#: The modalities each ``model.arch`` reads. A site holding some but not all of them trains part of
#: the model (``smm_model.nn.model.trained_parameters``); one holding none of them cannot take part.
ARCH_MODALITIES = {"smm": MODALITIES, "concat": MODALITIES, "snn": ("genomics",), "abmil": ("histology",)}
#: ``federation.strategy`` values that can average each weight over the sites that trained it
#: (a weighted mean per weight, then the server optimiser): the ones a partial site may join.
PARTIAL_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")


def simulation_site_dirs(data: DataConfig) -> list[Path]:
    """The site folders of a simulated federation, sorted, so that ``partition-id`` k is always the
    same folder: ``data.sites`` (relative ones under ``data.sites_root``) or, when it is empty, every
    subfolder of ``data.sites_root`` holding a ``clinical.csv``."""
    root = Path(data.sites_root) if data.sites_root else None
    if data.sites:
        dirs = [Path(s) if Path(s).is_absolute() or root is None else root / s for s in data.sites]
    else:
        if root is None:
            raise ConfigError("data.sites_root: a simulation needs data.sites_root or data.sites")
        if not root.is_dir():
            raise ConfigError(f"data.sites_root: {root} is not a folder")
        dirs = [p for p in root.iterdir() if p.is_dir() and (p / CLINICAL_FILE).is_file()]
    return sorted(dirs, key=lambda p: str(p))
