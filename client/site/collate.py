"""Collate patient items (variable bag sizes) into one padded, masked ``Batch``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from smm_model.nn.batch import Batch

__all__ = ["collate_patients"]


def collate_patients(items: Sequence[Mapping[str, Any]]) -> Batch:
    """Pad each bag to the longest in the batch and stack everything else.

    An item holds ``patches`` (N_i, D), ``genes_tumour`` (Gt,), ``genes_micro`` (Ge,), optional
    ``coords`` (N_i, 2) and ``patch_step`` (scalar), ``labels`` / ``label_mask`` mappings of
    scalars, and optional ``has_patches`` / ``has_genes`` (False: a placeholder the models skip). Padding is zeros with ``patch_mask`` False, so no model ever reads it as tissue.
    """
    if not items:
        raise ValueError("collate_patients: empty batch")
    B = len(items)
    n_max = max(int(it["patches"].shape[0]) for it in items)
    D = int(items[0]["patches"].shape[1])
    patches = torch.zeros(B, n_max, D, dtype=torch.float32)
    mask = torch.zeros(B, n_max, dtype=torch.bool)
    has_coords = all(it.get("coords") is not None for it in items)
    coords = torch.zeros(B, n_max, 2, dtype=torch.float32) if has_coords else None
    for i, it in enumerate(items):
        p = torch.as_tensor(it["patches"], dtype=torch.float32)
        if p.ndim != 2 or p.shape[1] != D:
            raise ValueError(f"collate_patients: item {i} has patches of shape {tuple(p.shape)}; "
                             f"expected (N, {D})")
        n = p.shape[0]
        patches[i, :n] = p
        mask[i, :n] = True
        if coords is not None:
            coords[i, :n] = torch.as_tensor(it["coords"], dtype=torch.float32)
    steps = [it.get("patch_step") for it in items]
    patch_step = torch.tensor(steps, dtype=torch.float32) if all(s is not None for s in steps) else None
    stack = lambda key: torch.stack([torch.as_tensor(it[key], dtype=torch.float32) for it in items])
    labels: dict[str, torch.Tensor] = {}
    for key in items[0].get("labels", {}):
        # An unknown label (None) becomes 0 here; its label_mask entry keeps it out of every loss.
        vals = [0 if it["labels"][key] is None else it["labels"][key] for it in items]
        dtype = torch.long if key in ("diagnosis", "grade", "survival_bin") else torch.float32
        labels[key] = torch.tensor(vals, dtype=dtype)
    label_mask = {key: torch.tensor([bool(it["label_mask"][key]) for it in items])
                  for key in items[0].get("label_mask", {})}
    return Batch(patches=patches, patch_mask=mask, genes_tumour=stack("genes_tumour"),
                 genes_micro=stack("genes_micro"), coords=coords, patch_step=patch_step,
                 labels=labels, label_mask=label_mask, has_patches=_flags(items, "has_patches"),
                 has_genes=_flags(items, "has_genes"))


def _flags(items: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor | None:
    """(B,) bool of an optional per-item modality flag (absent = True); None when every item has the
    modality, so a full batch is the batch it always was."""
    flags = [bool(it.get(key, True)) for it in items]
    return None if all(flags) else torch.tensor(flags, dtype=torch.bool)
