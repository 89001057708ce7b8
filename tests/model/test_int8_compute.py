"""int8 compute (``qcore.model.int8_compute``): the recipe key's validation and JSON, and the input quantization
against a numpy hand computation of what ONNX Runtime's MatMulNBits (accuracy_level 4) does to A."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.errors import QcoreError
from qcore.model.int8_compute import Int8ComputeInput, quantize_blocks_int8
from qcore.numerics.spec import TensorSpec
from qcore.recipe import Recipe, preset

W4 = {"format": "int4", "granularity": "per_group", "group_size": 32}


def numpy_int8_blocks(a: np.ndarray, block: int) -> np.ndarray:
    """A as the kernel sees it, written out row by row, block by block: s = max|a| / 127, q = rint(a / s)."""
    out = np.zeros_like(a, dtype=np.float32)
    for r in range(a.shape[0]):
        for k0 in range(0, a.shape[1], block):
            blk = a[r, k0:k0 + block].astype(np.float32)
            s = np.float32(np.abs(blk).max()) / np.float32(127)
            inv = np.float32(1) / s if s > 0 else np.float32(0)
            out[r, k0:k0 + block] = np.clip(np.rint(blk * inv), -127, 127) * s
    return out


def test_block_quantization_matches_a_hand_computation():
    a = np.array([[127.0, -63.5, 0.5, 1.0, 2.0, -2.0, 0.0, 3.0],   # block 1: scale 1, 0.5 rounds to even 0
                  [0.0] * 4 + [1e-30, -1e-30, 0.0, 0.0]], np.float32)  # a zero block and a tiny one
    codes, scale = quantize_blocks_int8(torch.from_numpy(a), 4)
    assert codes[0].tolist() == [127, -64, 0, 1, 85, -85, 0, 127]  # -63.5 ties to even; 2 * 127 / 3 = 84.7
    assert scale[0].tolist() == pytest.approx([1.0, 3 / 127])
    assert codes[1].tolist() == [0, 0, 0, 0, 127, -127, 0, 0] and scale[1, 0] == 0
    y = Int8ComputeInput("fc", 4)(None, (torch.from_numpy(a),))[0]
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(y.numpy(), numpy_int8_blocks(a, 4), rtol=1e-6, atol=0)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 3), block=st.sampled_from([16, 32]),
       scale=st.sampled_from([1e-3, 1.0, 1e4]), seed=st.integers(0, 2**16))
def test_random_inputs_match_the_hand_computation(rows, blocks, block, scale, seed):
    a = (np.random.default_rng(seed).standard_normal((rows, blocks * block)) * scale).astype(np.float32)
    y = Int8ComputeInput("fc", block)(None, (torch.from_numpy(a),))[0].numpy()
    np.testing.assert_allclose(y, numpy_int8_blocks(a, block), rtol=1e-6, atol=0)


def test_non_finite_inputs_are_refused_with_the_layer_name():
    with pytest.raises(QcoreError, match="'fc'"):
        Int8ComputeInput("fc", 4)(None, (torch.tensor([[1.0, float("nan"), 0.0, 0.0]]),))


@pytest.mark.parametrize("spec, message", [
    ({**W4, "compute": "int4"}, "compute='int4' is not a compute precision; allowed: float, int8"),
    ({"format": "fp8_e4m3", "compute": "int8"}, "needs an integer weight format of at most 8 bits"),
    ({"format": "int16", "granularity": "per_group", "compute": "int8"}, "needs an integer weight format"),
    ({"format": "int8", "granularity": "per_channel", "compute": "int8"}, "needs per_group weights"),
])
def test_invalid_compute_is_one_line(spec, message):
    with pytest.raises(QcoreError) as e:
        TensorSpec.from_dict(spec, "weights")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_compute_is_for_weights_only():
    with pytest.raises(QcoreError, match="applies to weights only"):
        Recipe.from_dict({"weights": W4, "activations": {"format": "int8", "compute": "int8"}})


def test_float_compute_is_omitted_and_int8_round_trips():
    assert "compute" not in TensorSpec.from_dict(W4).to_dict()
    assert TensorSpec.from_dict({**W4, "compute": "float"}) == TensorSpec.from_dict(W4)
    r = preset("int4-int8compute")
    assert r.to_dict()["weights"]["compute"] == "int8" and Recipe.from_json(r.to_json()) == r
    assert r.to_json() != preset("int4-weight-only").to_json()  # a different recipe, with its own hash


def test_a_layer_switched_to_a_float_format_drops_int8_compute():
    r = preset("int4-int8compute").with_layer("fc1", {"weights": {"format": "fp16"}})
    assert r.plan("fc1").weights.compute == "float" and r.plan("fc2").weights.compute == "int8"
    back = preset("int4-int8compute").with_layer("fc1", {"weights": {**W4, "compute": "float"}})
    assert back.plan("fc1").weights.compute == "float" and Recipe.from_json(back.to_json()) == back


def test_the_shortest_override_says_compute_when_only_it_differs():
    from qcore.recipe.core import LayerOverride

    defaults = preset("int4-int8compute").plan("fc1")
    target = preset("int4-weight-only").plan("fc1")  # the same grid, float compute
    entry = LayerOverride.to_reach(defaults, defaults, target)
    assert entry.apply(defaults) == target
    assert entry.apply(target) == target and LayerOverride.to_reach(target, target, defaults).apply(target) == defaults
