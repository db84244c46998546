"""Weights on the wire (smm_model/contract/packing.py): one flat array per dtype, and a layout that
gives back exactly the named arrays or refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smm_model.config import ExperimentConfig
from smm_model.contract.packing import Layout, LayoutError, check_matches, pack, unpack
from smm_model.nn.model import build_model


def _state(arch: str) -> dict[str, np.ndarray]:
    cfg = ExperimentConfig.from_yaml_text("", [f"model.arch={arch}", "model.feature_dim=16", "model.hidden_dim=16",
                                               "model.heads=4", "model.dim_head=8", "model.offset_groups=4", "model.genes_tumour=4",
                                               "model.genes_micro=4"])
    torch.manual_seed(0)
    return {k: v.numpy() for k, v in build_model(cfg.model).state_dict().items()}


@pytest.mark.parametrize("arch", ["smm", "snn", "abmil", "concat"])
def test_a_model_round_trips_bit_for_bit_as_one_array_per_dtype(arch):
    state = _state(arch)
    flat, layout = pack(state)
    assert set(flat) == {str(v.dtype) for v in state.values()}  # a few arrays, not one per tensor
    assert all(a.ndim == 1 and a.flags.c_contiguous for a in flat.values())
    back = unpack({d: a.copy() for d, a in flat.items()}, Layout.from_json(layout.to_json()))
    assert list(back) == list(state)
    assert all(back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]) for k in state)


def test_packing_in_a_given_layout_uses_its_order_and_checks_the_arrays():
    w = {"a": np.arange(4, dtype=np.float32).reshape(2, 2), "n": np.array([7], dtype=np.int64),
         "b": np.ones(3, dtype=np.float32)}
    layout = Layout.of(w)
    reordered = {"b": w["b"], "n": w["n"], "a": w["a"]}
    flat, same = pack(reordered, layout)
    assert same == layout and np.array_equal(flat["float32"], np.r_[np.arange(4.0), np.ones(3)])
    with pytest.raises(LayoutError, match="'a' is \\(4,\\) float32, expected \\(2, 2\\) float32"):
        pack({**w, "a": w["a"].ravel()}, layout)
    with pytest.raises(LayoutError, match="1 array\\(s\\) missing \\(first \\['n'\\]\\)"):
        check_matches({"a": w["a"], "b": w["b"]}, layout)
    with pytest.raises(LayoutError, match="expected \\(2, 2\\) float32"):
        check_matches({**w, "a": w["a"].astype(np.float64)}, layout)


def test_flat_arrays_that_do_not_fit_the_layout_are_refused():
    w = {"a": np.zeros((2, 3), dtype=np.float32), "n": np.zeros(2, dtype=np.int64)}
    flat, layout = pack(w)
    with pytest.raises(LayoutError, match="the float32 group has shape \\(5,\\)"):
        unpack({**flat, "float32": flat["float32"][:5]}, layout)
    with pytest.raises(LayoutError, match="dtype groups \\['float32'\\], the layout expects \\['float32', 'int64'\\]"):
        unpack({"float32": flat["float32"]}, layout)
    with pytest.raises(LayoutError, match="dtype float64"):
        unpack({**flat, "float32": flat["float32"].astype(np.float64)}, layout)
    with pytest.raises(LayoutError, match="cannot go on the wire"):
        Layout.of({"s": np.array(["x"])})
    with pytest.raises(LayoutError, match="a name appears twice"):
        Layout.from_json('[["a",[1],"float32"],["a",[1],"float32"]]')
    with pytest.raises(LayoutError, match="not a list"):
        Layout.from_json("{}")
    assert Layout.of(w).digest == layout.digest != Layout.of({"n": w["n"], "a": w["a"]}).digest
