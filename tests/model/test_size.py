"""Size estimates in bytes, computed by hand for small shapes: codes at their bit width plus scales
(float32) and zero-points (at the format's bit width), and everything else at its stored dtype."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from qcore import Recipe, TensorSpec, preset, quantize
from qcore.model.simulate import find_layers
from qcore.model.size import float_bytes, model_size, n_blocks, weight_bytes


def _bytes(codes, scales=0, zero_points=0):
    return {"codes": codes, "scales": scales, "zero_points": zero_points, "total": codes + scales + zero_points}


@pytest.mark.parametrize("shape,spec,expected", [
    # int8 per-channel symmetric (10, 64): 640 code bytes + 10 float32 scales
    ((10, 64), TensorSpec(format="int8", granularity="per_channel"), _bytes(640, 40)),
    # int4 groups of 32, affine (4, 64): 256 * 4 bits = 128 B, 8 groups -> 32 B scales + 8 * 4 bits = 4 B zps
    ((4, 64), TensorSpec(format="int4", granularity="per_group", group_size=32, symmetric=False), _bytes(128, 32, 4)),
    # int3 per-tensor (3, 5): ceil(15 * 3 / 8) = 6 B codes, one scale
    ((3, 5), TensorSpec(format="int3"), _bytes(6, 4)),
    # int3 per-channel along axis 1 of (3, 5), affine: 5 scales, ceil(5 * 3 / 8) = 2 B zps
    ((3, 5), TensorSpec(format="int3", granularity="per_channel", axis=1, symmetric=False), _bytes(6, 20, 2)),
    # nf4 blocks of 64 on (4, 64): 128 B codes + 4 absmax scales
    ((4, 64), TensorSpec(format="nf4", granularity="per_group", group_size=64), _bytes(128, 16)),
    # conv weight (8, 2, 3, 3) int2 per-channel: 144 * 2 bits = 36 B + 8 scales
    ((8, 2, 3, 3), TensorSpec(format="int2", granularity="per_channel"), _bytes(36, 32)),
    # float casts carry no scale; scaled fp8 carries one float32 per channel
    ((10, 64), TensorSpec(format="fp16"), _bytes(1280)),
    ((10, 64), TensorSpec(format="bf16", granularity="per_channel"), _bytes(1280)),
    ((10, 64), TensorSpec(format="fp8_e5m2"), _bytes(640)),
    ((10, 64), TensorSpec(format="fp8_e4m3", granularity="per_channel", scaled=True), _bytes(640, 40)),
    ((10, 64), TensorSpec(format="int16", symmetric=False), _bytes(1280, 4, 2)),
    ((10, 64), TensorSpec(format="fp32"), _bytes(2560)),
    ((10, 64), None, _bytes(2560)),
])
def test_weight_bytes_by_hand(shape, spec, expected):
    assert weight_bytes(shape, spec) == expected


@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=3).map(tuple),
       fmt=st.sampled_from(["int2", "int4", "int8", "nf4", "fp8_e4m3"]),
       granularity=st.sampled_from(["per_tensor", "per_channel", "per_group"]), symmetric=st.booleans(),
       data=st.data())
def test_block_count_equals_the_scales_quantize_produces(shape, fmt, granularity, symmetric, data):
    fan = math.prod(shape[1:])
    group = data.draw(st.sampled_from([d for d in range(1, fan + 1) if fan % d == 0]))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    kw = {"format": fmt, "granularity": granularity, "group_size": group, "axis": axis}
    if fmt.startswith("int"):
        kw["symmetric"] = symmetric
    if fmt.startswith("fp8"):
        kw["scaled"] = True
    spec = TensorSpec(**kw)
    q = quantize(torch.randn(shape), spec)
    assert n_blocks(shape, spec) == q.scale.numel()
    b = weight_bytes(shape, spec)
    assert b["scales"] == 4 * q.scale.numel()
    assert b["zero_points"] == (math.ceil(q.scale.numel() * int(fmt[3:]) / 8) if q.zero_point is not None else 0)
    assert b["codes"] == math.ceil(math.prod(shape) * spec.fmt.bits / 8)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 2))


def test_model_size_by_hand():
    model = _mlp()
    layers = find_layers(model)
    fp32 = (64 * 4 + 4 + 4 * 2 + 2) * 4  # 1080 bytes: weights and biases in float32
    assert float_bytes(model) == fp32
    assert model_size(model, layers, preset("fp32")) == {
        "fp32_bytes": fp32, "size_bytes": fp32,
        "layers": [{"name": "0", "format": "fp32", "fp32_bytes": 1024, "size_bytes": 1024, "bits_per_weight": 32.0},
                   {"name": "2", "format": "fp32", "fp32_bytes": 32, "size_bytes": 32, "bits_per_weight": 32.0}]}
    # int4 groups of 32 (affine) for layer 0: 128 + 8 * 4 + 4 = 164 B. Layer 2's fan-in 4 is below 32, so its
    # group is 4 (the largest divisor of 4 up to 32): 4 B codes + 2 groups * 4 B scales + 1 B of zero-points.
    r = preset("int4-weight-only", {n: i.weight_shape for n, i in layers.items()})
    assert r.plan("2").weights.group_size == 4
    size = model_size(model, layers, r)
    assert size["size_bytes"] == fp32 - 1024 + 164 - 32 + 13
    assert [row["size_bytes"] for row in size["layers"]] == [164, 13]
    assert size["layers"][0]["bits_per_weight"] == pytest.approx(164 * 8 / 256)  # 5.125: 4 bits + overhead
    # a layer kept in fp32 by the recipe costs its float32 bytes
    mixed = Recipe.from_dict({"weights": {"format": "int8", "granularity": "per_channel"}, "layers": {"0": None}})
    assert model_size(model, layers, mixed)["size_bytes"] == fp32 - 32 + (8 + 2 * 4)


def test_float_bytes_counts_dtypes_buffers_and_shared_tensors_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied weights
    model = nn.Sequential(emb, nn.BatchNorm1d(4), head)
    # embedding 40 floats once; BN weight, bias, running mean/var (4 floats each) + num_batches_tracked (int64)
    assert float_bytes(model) == 40 * 4 + 4 * 4 * 4 + 8
    assert float_bytes(nn.Linear(8, 8).half()) == (64 + 8) * 2


def test_regression_per_group_on_digits_cnn_first_conv_is_counted_at_its_resolved_group():
    """Regression: per_group on digits-cnn failed on features.0, a 3x3 conv with one input channel (fan-in
    9), since 32 does not divide 9. A recipe file's group of 32 now resolves to 9 there (one group per
    output channel), and the size counts 16 groups: int4 affine codes 144 * 4 bits = 72 B, 16 float32
    scales = 64 B, 16 zero-points * 4 bits = 8 B -> 144 B."""
    from qcore.model.simulate import simulate
    from qcore.zoo.digits import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN().eval()
    layers = find_layers(model)
    assert layers["features.0"].weight_shape == (16, 1, 3, 3)
    recipe = Recipe.from_dict({"weights": {"format": "int4", "granularity": "per_group", "group_size": 32,
                                           "symmetric": False}})
    assert weight_bytes((16, 1, 3, 3), recipe.plan("features.0").weights) == _bytes(72, 64, 8)
    row = next(r for r in model_size(model, layers, recipe)["layers"] if r["name"] == "features.0")
    assert row["size_bytes"] == 144 and row["bits_per_weight"] == 144 * 8 / 144
    simulate(model, recipe)  # no longer refused
    # nf4 (groups of 64, no zero-points) on the same conv: 72 B codes + 16 scales * 4 B = 136 B
    assert weight_bytes((16, 1, 3, 3), preset("nf4").weights)["total"] == 136
    # a 1-D tensor is one row: 2560 elements in groups of 64 -> 40 scales
    assert n_blocks((2560,), preset("nf4").weights) == 40
    assert n_blocks((2560,), TensorSpec(format="int8", granularity="per_channel")) == 1
