"""Collating variable-size bags into a padded, masked Batch."""

import numpy as np
import pytest
import torch

from client.site.collate import collate_patients


def item(n, d=4, diag=1, known=True):
    return {"patches": np.arange(n * d, dtype=np.float32).reshape(n, d) + 1,
            "coords": np.stack([np.arange(n) * 256, np.zeros(n)], 1), "patch_step": 256.0,
            "genes_tumour": np.ones(3), "genes_micro": np.zeros(5),
            "labels": {"diagnosis": diag if known else None, "survival_time": 10.0, "event": 1.0},
            "label_mask": {"diagnosis": known, "survival": True}}


def test_padding_and_masks():
    b = collate_patients([item(2), item(5), item(3, known=False)])
    assert b.patches.shape == (3, 5, 4) and b.coords.shape == (3, 5, 2)
    assert b.patch_mask.sum(1).tolist() == [2, 5, 3]
    assert torch.all(b.patches[0, 2:] == 0) and torch.all(b.patches[0, :2] > 0)
    assert b.labels["diagnosis"].dtype == torch.long and b.labels["diagnosis"].tolist() == [1, 1, 0]
    assert b.label_mask["diagnosis"].tolist() == [True, True, False]
    assert b.task_mask("grade").tolist() == [True, True, True]  # no mask given: all labelled
    assert b.patch_step.tolist() == [256.0] * 3
    assert b.genes_tumour.shape == (3, 3) and b.genes_micro.shape == (3, 5)


def test_bad_items_are_named():
    bad = item(2)
    bad["patches"] = np.zeros((2, 7), dtype=np.float32)
    with pytest.raises(ValueError, match="item 1"):
        collate_patients([item(2), bad])
    with pytest.raises(ValueError, match="empty"):
        collate_patients([])
