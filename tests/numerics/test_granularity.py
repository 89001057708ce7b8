"""Granularity: blocks are exact views of the tensor, and each block is quantized on its own."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qcore import QcoreError, fake_quantize, quantize
from qcore.numerics.granularity import fan_in, from_blocks, to_blocks

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@given(shape=shapes, seed=st.integers(0, 999), data=st.data())
def test_per_tensor_and_per_channel_round_trip_on_any_axis(shape, seed, data):
    x = _randn(shape, seed)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    t = to_blocks(x, "per_tensor")
    assert t.shape == (1, x.numel()) and torch.equal(from_blocks(t, shape, "per_tensor"), x)
    c = to_blocks(x, "per_channel", axis=axis)
    if len(shape) == 1:  # a 1-D tensor is one row: one channel holding every element
        assert torch.equal(c, x.reshape(1, -1)) and torch.equal(from_blocks(c, shape, "per_channel", axis=axis), x)
        return
    assert c.shape == (shape[axis], x.numel() // shape[axis])
    for i in range(shape[axis]):  # block i holds exactly channel i
        assert torch.equal(c[i], x.select(axis, i).reshape(-1))
    assert torch.equal(from_blocks(c, shape, "per_channel", axis=axis), x)


@given(rows=st.integers(1, 4), fan=st.sampled_from([(8,), (2, 4), (4, 2, 2), (3, 2, 2), (3, 3)]),
       group_size=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 999))
def test_per_group_cuts_each_row_into_consecutive_fan_in_groups(rows, fan, group_size, seed):
    shape = (rows, *fan)
    x = _randn(shape, seed)
    n = math.prod(fan)
    g = max(d for d in range(1, group_size + 1) if n % d == 0)  # e.g. fan-in 12, group_size 8 -> 6; 9, 4 -> 3
    b = to_blocks(x, "per_group", group_size=group_size)
    assert b.shape == (rows * n // g, g)
    flat = x.reshape(rows, n)
    for r in range(rows):
        for j in range(n // g):
            assert torch.equal(b[r * (n // g) + j], flat[r, j * g:(j + 1) * g])
    assert torch.equal(from_blocks(b, shape, "per_group"), x)


def test_scalar_and_errors():
    s = torch.tensor(2.5)
    for gran in ("per_tensor", "per_channel", "per_group"):
        b = to_blocks(s, gran, group_size=1)
        assert b.shape == (1, 1) and from_blocks(b, (), gran).shape == ()
    with pytest.raises(QcoreError) as e:
        to_blocks(torch.zeros(4, 6), "per_row")
    assert str(e.value) == "unknown granularity 'per_row'; allowed: per_tensor, per_channel, per_group"
    with pytest.raises(QcoreError, match=r"axis=2 is out of range for a tensor of shape \(4, 6\)"):
        quantize(torch.zeros(4, 6), {"granularity": "per_channel", "axis": 2})


def test_fan_in_is_the_input_dimension():
    assert fan_in((10, 64)) == 64
    assert fan_in((32, 16, 3, 3)) == 144
    assert fan_in((8, 4, 5)) == 20  # Conv1d (C_out, C_in, k)
    assert fan_in((7,)) == 7  # a 1-D tensor is one row: its only dimension is the input dimension
    assert fan_in(()) == 1


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8_e4m3"])
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=3).map(tuple), seed=st.integers(0, 999),
       symmetric=st.booleans(), data=st.data())
def test_per_channel_equals_quantizing_each_channel_alone(fmt, shape, seed, symmetric, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = _randn(shape, seed) * torch.logspace(-3, 3, shape[axis]).reshape(
        [-1 if d == axis % len(shape) else 1 for d in range(len(shape))])
    extra = {"scaled": True} if fmt.startswith("fp8") else {"symmetric": symmetric}
    q = quantize(x, {"format": fmt, "granularity": "per_channel", "axis": axis, **extra})
    assert q.scale.shape == (shape[axis],)
    dq = q.dequantize()
    for i in range(shape[axis]):
        alone = fake_quantize(x.select(axis, i), {"format": fmt, **extra})
        assert torch.equal(dq.select(axis, i), alone)


@given(rows=st.integers(1, 3), groups=st.integers(1, 4), group_size=st.sampled_from([2, 4, 8]),
       seed=st.integers(0, 999), fmt=st.sampled_from(["int4", "int8", "nf4"]))
def test_per_group_equals_quantizing_each_group_alone(rows, groups, group_size, seed, fmt):
    x = _randn((rows, groups * group_size), seed)
    x[0, :group_size] *= 1000.0  # one loud group must not change the others' steps
    spec = {"format": fmt, "granularity": "per_group", "group_size": group_size}
    q = quantize(x, spec)
    assert q.scale.shape == (rows * groups,)
    dq = q.dequantize()
    for r in range(rows):
        for g in range(groups):
            sl = slice(g * group_size, (g + 1) * group_size)
            assert torch.equal(dq[r, sl], fake_quantize(x[r, sl], {"format": fmt, "granularity": "per_tensor"}))


def test_per_channel_beats_per_tensor_when_channels_differ_in_scale():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 8)[:, None]
    err_t = (fake_quantize(x, {"format": "int8"}) - x).pow(2).sum(1)
    err_c = (fake_quantize(x, {"format": "int8", "granularity": "per_channel"}) - x).pow(2).sum(1)
    assert torch.all(err_c[:4] < err_t[:4] / 100)  # quiet channels gain most from their own scale


def test_single_element_channels_are_exact():
    x = torch.tensor([[3.0], [-0.25], [0.0], [1e-20], [7e30]])
    for fmt, extra in (("int8", {}), ("int4", {"symmetric": False}), ("int2", {})):
        dq = fake_quantize(x, {"format": fmt, "granularity": "per_channel", **extra})
        torch.testing.assert_close(dq, x, rtol=1e-6, atol=0)


def test_group_size_for_is_the_largest_divisor_not_above_the_size():
    from qcore.numerics.granularity import group_size_for

    assert group_size_for(96, 64) == 48  # a fan-in of 96 under a preset of 64
    assert group_size_for(9, 32) == 9  # a 3x3 conv with one input channel under 32: one group per row
    assert group_size_for(9, 8) == 3 and group_size_for(9, 2) == 1
    assert group_size_for(97, 64) == 1  # a prime fan-in above the size: a scale per weight
    assert group_size_for(4096, 128) == 128 and group_size_for(0, 64) == 64


@given(n=st.integers(1, 3000), size=st.integers(1, 300))
def test_group_size_for_matches_a_plain_divisor_loop(n, size):
    from qcore.numerics.granularity import group_size_for

    expected = 1
    for d in range(1, size + 1):
        if n % d == 0:
            expected = d
    assert group_size_for(n, size) == expected


def _nf4_by_hand(block: torch.Tensor) -> torch.Tensor:
    from qcore.numerics.formats import NF4_CODEBOOK

    cb = torch.tensor(NF4_CODEBOOK)
    s = block.abs().max()  # absmax of the block
    nearest = (block[:, None] / s - cb[None, :]).abs().argmin(1)  # nearest level, by brute force
    return cb[nearest] * s


def _int4_symmetric_by_hand(block: torch.Tensor) -> torch.Tensor:
    s = block.abs().max() / 7  # int4: codes -8..7, symmetric minmax maps absmax to 7
    return torch.clamp(torch.round(block / s), -8, 7) * s


@pytest.mark.parametrize("fmt,by_hand", [("nf4", _nf4_by_hand), ("int4", _int4_symmetric_by_hand)])
def test_regression_blockwise_formats_on_a_1d_tensor(fmt, by_hand):
    """Regression: per_group on a 1-D tensor raised "group_size=64 does not divide the input dimension 1";
    a 1-D tensor is one row whose fan-in is its length (bitsandbytes quantizes flattened tensors so)."""
    x = _randn((2560,), 0)
    x[100] = 40.0  # one loud block must not change the others' scales
    dq = fake_quantize(x, {"format": fmt, "granularity": "per_group", "group_size": 64})
    rows = x.reshape(2560 // 64, 64)
    expected = torch.stack([by_hand(rows[i]) for i in range(rows.shape[0])]).reshape(2560)
    torch.testing.assert_close(dq, expected, rtol=1e-6, atol=0)
    assert quantize(x, {"format": fmt, "granularity": "per_group", "group_size": 64}).scale.shape == (40,)
    # the same as the (40, 64) matrix quantized per row
    two_d = fake_quantize(rows, {"format": fmt, "granularity": "per_channel"})
    assert torch.equal(dq, two_d.reshape(2560))


def test_per_channel_on_a_1d_tensor_is_one_channel():
    """Convention: a 1-D tensor is one row (one output channel), so per_channel gives one scale, as
    per_tensor does, and axis 0 / -1 are its only axes."""
    x = _randn((50,), 1)
    q = quantize(x, {"format": "int8", "granularity": "per_channel"})
    assert q.scale.shape == (1,)
    assert torch.allclose(q.scale, x.abs().max() / 127)
    assert torch.equal(q.dequantize(), fake_quantize(x, {"format": "int8", "granularity": "per_tensor"}))
    with pytest.raises(QcoreError, match=r"axis=1 is out of range for a tensor of shape \(50,\)"):
        quantize(x, {"format": "int8", "granularity": "per_channel", "axis": 1})
