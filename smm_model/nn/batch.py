"""The batch contract between a data loader and every model, loss and metric in ``smm_model``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from smm_model.contract.sites import MODALITIES

__all__ = ["Batch", "LABEL_KEYS", "MODALITY_FLAGS"]

#: Label tensors a batch may carry. ``survival`` needs ``survival_bin`` (long, discrete-time bin),
#: ``survival_time`` (float, days) and ``event`` (float, 1 = death observed, 0 = censored).
LABEL_KEYS = ("diagnosis", "grade", "survival_bin", "survival_time", "event")
#: Modality -> the Batch field flagging, per patient, that the patient holds it.
MODALITY_FLAGS = dict(zip(MODALITIES, ("has_patches", "has_genes")))


@dataclass
class Batch:
    """A padded batch of patients.

    patches       (B, N, D) float  patch features, right-padded to the longest bag
    patch_mask    (B, N) bool      True for real patches
    genes_tumour  (B, Gt) float    tumour-subspace gene vector
    genes_micro   (B, Ge) float    microenvironment-subspace gene vector
    coords        (B, N, 2) float  level-0 (x, y) of each patch (spatial layout), or None
    patch_step    (B,) float       level-0 pixels between neighbouring patches, or None (inferred)
    labels        task-independent label tensors, keys from LABEL_KEYS, each (B,)
    label_mask    per task ("diagnosis", "grade", "survival"): (B,) bool, False = unknown label,
                  so that patient is left out of that task's loss and metrics only
    has_patches   (B,) bool, False = this patient has no slide (its bag is a placeholder no model
                  reads), or None: every patient has one
    has_genes     (B,) bool, False = this patient has no genomic profile (its gene vectors are a
                  placeholder no model reads), or None: every patient has one

    Why per patient and not per batch: a site lacking a modality trains with every flag False, but
    evaluation and pooled (centralized) batches may mix patients with and without it, and each
    patient must then be predicted from what it has. None keeps full batches on the original path.
    """

    patches: Tensor
    patch_mask: Tensor
    genes_tumour: Tensor
    genes_micro: Tensor
    coords: Tensor | None = None
    patch_step: Tensor | None = None
    labels: dict[str, Tensor] = field(default_factory=dict)
    label_mask: dict[str, Tensor] = field(default_factory=dict)
    has_patches: Tensor | None = None
    has_genes: Tensor | None = None

    @property
    def size(self) -> int:
        return self.patches.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def mv(x):
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, dict):
                return {k: mv(v) for k, v in x.items()}
            return x

        return Batch(**{f.name: mv(getattr(self, f.name)) for f in fields(self)})

    def task_mask(self, task: str) -> Tensor:
        """Which samples have a label for ``task`` (all True when the batch carries no mask)."""
        m = self.label_mask.get(task)
        if m is None:
            return torch.ones(self.size, dtype=torch.bool, device=self.patches.device)
        return m

    def present(self, modality: str) -> Tensor | None:
        """(B,) bool of the patients holding ``modality`` ("histology" or "genomics"), or None when
        all of them do."""
        if modality not in MODALITY_FLAGS:
            raise ValueError(f"modality {modality!r}: expected one of {tuple(MODALITY_FLAGS)}")
        flags = getattr(self, MODALITY_FLAGS[modality])
        if flags is None or bool(flags.all()):
            return None
        return flags.to(torch.bool)
