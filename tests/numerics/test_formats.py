"""Number formats: float casts equal torch's, integer grids, the NF4 codebook, values() and bits."""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qcore import fake_quantize, quantize
from qcore.numerics.formats import FORMATS, NF4_CODEBOOK

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16,
                "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
INT_FORMATS = ["int2", "int3", "int4", "int5", "int6", "int7", "int8", "int16"]

# Any finite float32, including subnormals, values past every format's max, and the float32 extremes.
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
finite_lists = st.lists(finite32, min_size=1, max_size=48)


@functools.cache
def _non_negative_grid(name: str) -> torch.Tensor:
    grid = FORMATS[name].values()
    return grid[grid >= 0]


def _rne_reference(x: torch.Tensor, name: str) -> torch.Tensor:
    """Independent reference for an unscaled float format: nearest representable value, ties to the
    even bit pattern, saturating at +-max. Non-negative finite values sorted ascending are exactly the
    bit patterns 0, 1, 2, ... so a value's index in that list is its bit pattern."""
    pos = _non_negative_grid(name)
    a = x.double().abs()
    i = torch.searchsorted(pos, a).clamp(1, len(pos) - 1)
    lower, upper = pos[i - 1], pos[i]
    d_lo, d_hi = a - lower, upper - a
    pick_upper = (d_hi < d_lo) | ((d_hi == d_lo) & (i % 2 == 0))
    nearest = torch.where(pick_upper, upper, lower)
    nearest = torch.where(a >= pos[-1], pos[-1], nearest)  # saturate
    return (torch.sign(x.double()) * nearest).float()


@pytest.mark.parametrize("name", list(FLOAT_DTYPES))
@given(values=finite_lists)
def test_unscaled_float_format_equals_torch_cast_with_saturation(name, values):
    x = torch.tensor(values, dtype=torch.float32)
    got = fake_quantize(x, {"format": name})
    torch_cast = x.to(FLOAT_DTYPES[name]).float()
    m = FORMATS[name].max_value
    expected = torch.where(torch.isfinite(torch_cast), torch_cast, torch.sign(x) * m)
    assert torch.equal(got, expected)
    assert torch.equal(got, _rne_reference(x, name))
    q = quantize(x, {"format": name})
    assert q.scale is None and q.zero_point is None and q.lo is None


@pytest.mark.parametrize("name", list(FLOAT_DTYPES))
def test_float_saturation_at_format_max(name):
    m = FORMATS[name].max_value
    x = torch.tensor([3e38, -3e38, 1e30, m, -m, 0.0, -0.0])
    got = fake_quantize(x, {"format": name})
    head = torch.tensor([m, -m]) if name != "bf16" else torch.tensor([3e38, -3e38]).to(torch.bfloat16).float()
    assert torch.equal(got[:2], head)
    assert torch.equal(got[3:], torch.tensor([m, -m, 0.0, 0.0]))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name,max_value,step,levels", [
    ("fp8_e4m3", 448.0, 2.0**-9, 253),  # 256 patterns - 2 NaN - duplicate zero
    ("fp8_e5m2", 57344.0, 2.0**-16, 247),  # - 6 NaN - 2 Inf - duplicate zero
    ("fp16", 65504.0, 2.0**-24, 63487),  # - 2046 NaN - 2 Inf - duplicate zero
    ("bf16", 3.3895313892515355e38, 2.0**-133, 65279),  # - 254 NaN - 2 Inf - duplicate zero
])
def test_float_values_bits_and_description(name, max_value, step, levels):
    fmt = FORMATS[name]
    v = fmt.values()
    assert v.dtype == torch.float64 and torch.all(v[1:] > v[:-1])
    assert torch.equal(v, -v.flip(0))  # symmetric grid
    assert fmt.bits == {"fp16": 16, "bf16": 16}.get(name, 8)
    assert fmt.describe() == {"name": name, "family": "float", "bits": fmt.bits, "min": -max_value,
                              "max": max_value, "smallest_step_near_zero": step, "levels": levels}
    # every listed value survives a round trip through the real dtype
    assert torch.equal(v.float().to(FLOAT_DTYPES[name]).double(), v)


@pytest.mark.parametrize("name", INT_FORMATS)
def test_int_values_bits_and_description(name):
    fmt = FORMATS[name]
    b = int(name[3:])
    assert fmt.bits == b and (fmt.qmin, fmt.qmax) == (-(2 ** (b - 1)), 2 ** (b - 1) - 1)
    assert torch.equal(fmt.values(), torch.arange(-(2 ** (b - 1)), 2 ** (b - 1), dtype=torch.float64))
    assert fmt.describe() == {"name": name, "family": "int", "bits": b, "min": float(-(2 ** (b - 1))),
                              "max": float(2 ** (b - 1) - 1), "smallest_step_near_zero": 1.0, "levels": 2**b}


def test_registry_lists_every_required_format():
    assert set(FORMATS) == {"fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "nf4", *INT_FORMATS}
    assert all(FORMATS[n].name == n for n in FORMATS)
    assert FORMATS["fp32"].describe()["bits"] == 32 and FORMATS["nf4"].bits == 4


@pytest.mark.parametrize("name", INT_FORMATS)
@given(values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=40), symmetric=st.booleans())
def test_int_codes_in_range_zero_exact_and_error_within_half_step(name, values, symmetric):
    fmt = FORMATS[name]
    x = torch.tensor(values + [0.0])
    q = quantize(x, {"format": name, "symmetric": symmetric})
    codes = q.codes
    assert torch.equal(codes, torch.round(codes))
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    dq = q.dequantize()
    assert dq[-1].item() == 0.0  # zero is exactly representable, symmetric or affine
    if symmetric:
        assert q.zero_point is None
        assert torch.equal(dq, codes * q.scale)
    else:
        zp = q.zero_point
        assert torch.equal(zp, torch.round(zp)) and fmt.qmin <= zp.item() <= fmt.qmax
        assert torch.equal(dq, (codes - zp) * q.scale)
    # minmax range holds every value: reconstruction error <= half a step (plus float32 rounding)
    amax = float(x.abs().max())
    tol = 0.5 * float(q.scale) + 1e-6 * amax
    assert float((dq - x).abs().max()) <= tol


def test_int_rounding_is_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5])
    q = quantize(x, {"format": "int8"}, lo=-127.0, hi=127.0)  # scale exactly 1
    assert float(q.scale) == 1.0
    assert q.codes.tolist() == [0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0, 126.0]
    qa = quantize(x, {"format": "int8", "symmetric": False}, lo=-128.0, hi=127.0)  # scale 1, zp 0
    assert float(qa.scale) == 1.0 and float(qa.zero_point) == 0.0
    assert qa.codes.tolist() == [0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0, 126.0]


def test_int_clipping_saturates_at_grid_ends():
    x = torch.tensor([-5.0, -1.0, 0.0, 0.3, 1.0, 5.0])
    q = quantize(x, {"format": "int4"}, lo=-1.0, hi=1.0)  # scale 1/7, codes in [-8, 7]
    assert q.codes.tolist() == [-8.0, -7.0, 0.0, 2.0, 7.0, 7.0]
    assert q.dequantize().tolist() == pytest.approx([-8 / 7, -1.0, 0.0, 2 / 7, 1.0, 1.0], rel=1e-6)
    assert q.clipped_fraction(x) == pytest.approx(2 / 6)


def test_affine_range_uses_full_grid_and_zero_point():
    x = torch.tensor([-1.0, 0.0, 3.0])
    q = quantize(x, {"format": "int8", "symmetric": False})
    assert float(q.scale) == pytest.approx(4.0 / 255)
    assert float(q.zero_point) == round(-128 + 1.0 / (4.0 / 255))  # -64.25 -> -64
    assert q.codes.tolist() == [-128.0, -64.0, 127.0]
    # an all-positive tensor still contains 0 in its range: zero point at the bottom of the grid
    qp = quantize(torch.tensor([2.0, 4.0]), {"format": "int8", "symmetric": False})
    assert float(qp.zero_point) == -128.0 and float(qp.scale) == pytest.approx(4.0 / 255)


def test_nf4_codebook_is_the_qlora_normal_float():
    # bitsandbytes' NF4 table, as listed in the QLoRA paper (Dettmers et al. 2023, appendix E)
    qlora = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
    assert list(NF4_CODEBOOK) == qlora
    # and it is what QLoRA's construction gives: normal quantiles, 8 positive, 7 negative, exact 0, scaled to [-1, 1]
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    levels = levels / levels.max()
    assert float((levels - torch.tensor(qlora, dtype=torch.float64)).abs().max()) < 1e-6
    fmt = FORMATS["nf4"]
    assert fmt.bits == 4 and torch.equal(fmt.values(), torch.tensor(qlora, dtype=torch.float64))
    assert fmt.describe()["levels"] == 16 and fmt.describe()["smallest_step_near_zero"] == qlora[8]


@given(rows=st.integers(1, 3), groups=st.integers(1, 3), seed=st.integers(0, 2**16),
       log_scale=st.floats(-30, 30), zero_rows=st.booleans())
def test_nf4_outputs_over_block_absmax_are_nearest_codebook_values(rows, groups, seed, log_scale, zero_rows):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, groups * 64, generator=g) * 10.0**log_scale
    if zero_rows:
        x[0] = 0.0
    q = quantize(x, {"format": "nf4"})  # default: absmax per block of 64 along the input dimension
    assert q.spec.granularity == "per_group" and q.spec.group_size == 64
    blocks = x.reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    nonzero = absmax > 0
    assert torch.equal(q.scale[nonzero], absmax[nonzero])
    cb = torch.tensor(NF4_CODEBOOK)
    assert torch.equal(q.codes, torch.round(q.codes)) and q.codes.min() >= 0 and q.codes.max() <= 15
    dq_blocks = q.dequantize().reshape(-1, 64)
    assert torch.equal(dq_blocks, cb[q.codes.reshape(-1, 64).long()] * q.scale[:, None])
    normalized = dq_blocks / q.scale[:, None]
    assert float((normalized[..., None] - cb).abs().amin(-1).max()) <= 1e-6
    # each code is a nearest codebook level of x / absmax
    dist = (blocks / q.scale[:, None])[..., None].sub(cb).abs()
    chosen = dist.gather(-1, q.codes.reshape(-1, 64, 1).long()).squeeze(-1)
    assert torch.all(chosen <= dist.amin(-1) + 1e-6)
    # the block's largest magnitude is reproduced exactly
    top = blocks.abs().argmax(1)
    assert torch.equal(dq_blocks.gather(1, top[:, None]).abs().squeeze(1)[nonzero], absmax[nonzero])


@given(values=st.lists(finite32, min_size=1, max_size=40))
def test_fp32_is_the_identity(values):
    x = torch.tensor(values)
    q = quantize(x, {"format": "fp32"})
    assert torch.equal(q.dequantize(), x) and q.scale is None and q.lo is None


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
@given(values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=4, max_size=4 * 12))
def test_scaled_fp8_per_channel_maps_each_channel_absmax_to_format_max(name, values):
    n = len(values) // 4 * 4
    x = torch.tensor(values[:n]).reshape(4, -1)
    fmt = FORMATS[name]
    q = quantize(x, {"format": name, "granularity": "per_channel", "scaled": True})
    absmax = x.abs().amax(1)
    ok = absmax / fmt.max_value >= torch.finfo(torch.float32).tiny
    torch.testing.assert_close(q.scale[ok], absmax[ok] / fmt.max_value, rtol=0, atol=0)
    assert torch.isin(q.codes.double(), fmt.values()).all()  # codes are format values before scaling
    dq = q.dequantize()
    assert torch.equal(dq, q.codes * q.scale[:, None])
    # the relative error of a scaled fp8 value is at most half its mantissa step (2^-m / 2) for normals;
    # near zero the absolute error is at most half the subnormal step
    rel = 2.0 ** -(fmt.mantissa_bits + 1)
    bound = torch.maximum(x.abs() * rel, fmt.describe()["smallest_step_near_zero"] / 2 * q.scale[:, None])
    assert torch.all((dq - x).abs() <= bound * (1 + 1e-5) + 1e-30)


def test_describe_smallest_step_matches_values():
    for name, fmt in FORMATS.items():
        d = fmt.describe()
        if name == "fp32":
            assert d["smallest_step_near_zero"] == 2.0**-149 and d["max"] == torch.finfo(torch.float32).max
            continue
        v = fmt.values()
        assert d["levels"] == len(v) and d["min"] == float(v[0]) and d["max"] == float(v[-1])
        assert d["smallest_step_near_zero"] == float(v[v > 0].min())
        assert math.isfinite(d["max"])


# ---- integer codes are ONNX QuantizeLinear's ---------------------------------------------------------
@functools.cache
def _quantize_linear_session(onnx_type: str):
    """ONNX Runtime running QuantizeLinear(x (B, n) float32, scale (B,), zero_point (B,), axis=0), opset 21:
    round(x / scale) half to even + zero_point, saturated to the output type: the oracle for the engine's codes."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    t = getattr(TensorProto, onnx_type)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=0)], "ql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "n"]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["B"]), helper.make_tensor_value_info("z", t, ["B"])],
        [helper.make_tensor_value_info("q", t, ["B", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@st.composite
def _blocks_and_ranges(draw):
    """(x (B, n) float32, lo (B,), hi (B,)): ranges of any magnitude (tiny, subnormal, huge, zero) and
    values drawn from the block's own grid at and next to the rounding ties (k + 1/2) * step."""
    rows, n = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    exp = st.sampled_from([-140, -126, -60, -20, -3, 0, 3, 20, 60, 120])
    lo, hi, x = [], [], []
    for _ in range(rows):
        e = draw(exp)
        a, b = draw(st.floats(-2, 0, width=32)) * 2.0 ** e, draw(st.floats(0, 2, width=32)) * 2.0 ** e
        lo.append(a), hi.append(b)
        span = (b - a) or 1.0
        row = []
        for _ in range(n):
            kind = draw(st.sampled_from(["tie", "near", "any", "out"]))
            k = draw(st.integers(-130, 130))
            if kind == "tie":  # (k + 0.5) * step: a tie of the exact quotient, or within 1 ulp of one
                v = (k + 0.5) * span / 255
            elif kind == "near":
                v = (k + 0.5 + draw(st.sampled_from([-1e-6, -1e-7, 1e-7, 1e-6]))) * span / 255
            elif kind == "out":  # past the range: saturates
                v = draw(st.sampled_from([-1, 1])) * span * draw(st.sampled_from([2.0, 1e3, 1e30]))
            else:
                v = a + draw(st.floats(0, 1)) * (b - a)
            row.append(v)
        x.append(row)
    f32 = lambda v: torch.tensor(v, dtype=torch.float64).float()  # noqa: E731
    x, lo, hi = f32(x), f32(lo), f32(hi)
    return torch.where(torch.isfinite(x), x, torch.zeros(())), torch.nan_to_num(lo), torch.nan_to_num(hi)


@pytest.mark.parametrize("name", ["int8", "int4", "int16", "int2"])
@pytest.mark.parametrize("symmetric", [True, False])
@given(data=_blocks_and_ranges())
def test_int_codes_equal_onnx_quantize_linear_with_the_same_scale_and_zero_point(name, symmetric, data):
    """The codes of ``encode`` are QuantizeLinear's of its own scale and zero-point (float32 division, ties
    to even), element for element, so a file's QuantizeLinear reproduces the simulation; below 8 bits the
    file clips an int8 container to the format's range (``activations._codes``), as here."""
    x, lo, hi = data
    fmt = FORMATS[name]
    codes, scale, zp = fmt.encode(x, lo, hi, symmetric)
    container = "INT16" if fmt.bits > 8 else "INT8"
    dtype = np.int16 if fmt.bits > 8 else np.int8
    q = _quantize_linear_session(container).run(None, {"x": x.numpy(), "s": scale.numpy().astype(np.float32),
                                                       "z": zp.numpy().astype(dtype)})[0]
    expected = np.clip(q.astype(np.int64), fmt.qmin, fmt.qmax)
    assert np.array_equal(codes.numpy().astype(np.int64), expected), (x, scale, zp)


def test_a_near_tie_rounds_as_quantize_linear_does_not_as_the_exact_quotient():
    """An int16 value whose exact quotient x / scale lies just above k + 1/2 (k even) but is k + 1/2 in
    float32: QuantizeLinear, and so the engine, give the even level k; float64 division (the engine before)
    gave k + 1. Found by search among the float32 neighbours of (k + 1/2) * scale."""
    fmt = FORMATS["int16"]
    hi = torch.tensor([1.0])
    scale = float(fmt.encode(torch.zeros(1, 1), -hi, hi, True)[1])  # 1 / 32767 in float32
    found = None
    for k in range(20000, 20200, 2):
        x0 = np.float32((k + 0.5) * scale)
        for x in (x0, np.nextafter(x0, np.float32(np.inf)), np.nextafter(x0, np.float32(-np.inf))):
            if np.float32(x) / np.float32(scale) == k + 0.5 and float(x) / scale > k + 0.5:
                found = (k, np.float32(x))
                break
        if found:
            break
    assert found is not None
    k, x = found
    codes, s, _ = fmt.encode(torch.tensor([[x]]), -hi, hi, True)
    q = _quantize_linear_session("INT16").run(None, {"x": np.array([[x]], np.float32), "s": s.numpy(),
                                                     "z": np.zeros(1, np.int16)})[0]
    assert int(codes[0, 0]) == int(q[0, 0]) == k and round(float(x) / scale) == k + 1
