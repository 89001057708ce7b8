"""Independent oracles for ``qcore.numerics``: every expected value here is computed another way.

- int8 per-channel quantize/dequantize  vs torch's own quantizer (``torch.fake_quantize_per_channel_affine``,
  ``torch.quantize_per_channel``), element for element;
- fp16 / bf16 / fp8 casts                vs ``ml_dtypes`` / numpy's float16, bit for bit;
- int4 per_group and nf4                 vs a plain numpy reference written here (blocks cut by hand);
- SQNR, cosine, KL                       vs float64 numpy formulas written here;
- percentile ranges                      vs ``numpy.percentile(..., method="inverted_cdf")`` (our quantile is the
  "lower"/inverse-CDF one: the smallest value whose cumulative share reaches q);
- MSE range                              vs a brute-force search over the same grid of clip factors k/50.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from qcore.numerics.formats import FORMATS, NF4_CODEBOOK
from qcore.numerics.metrics import kl_divergence, mean_cosine, sqnr_db
from qcore.numerics.quantize import fake_quantize, quantize
from qcore.numerics.ranges import choose_range
from qcore.numerics.spec import TensorSpec

shapes = st.tuples(st.integers(1, 12), st.integers(1, 40))
seeds = st.integers(0, 2**31 - 1)
# torch deprecates its quantized tensor type; torch.quantize_per_channel is still the reference quantizer here
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor, torch.quantize_per_channel:UserWarning")


def _weights(shape, seed, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).mul(3).add(0.1)
    if outliers:
        w[0, 0] = 9.0  # one outlier channel
    return w


# ---- int8 per-channel vs torch's quantizer ------------------------------------------------------
@given(shapes, seeds)
def test_int8_per_channel_symmetric_matches_torch_quantize_per_channel(shape, seed):
    w = _weights(shape, seed)
    ours = fake_quantize(w, {"format": "int8", "granularity": "per_channel", "symmetric": True})
    scale = (w.abs().amax(1).double() / 127).clamp(min=torch.finfo(torch.float32).tiny)  # symmetric: amax / 127
    ref = torch.quantize_per_channel(w, scale, torch.zeros(shape[0], dtype=torch.long), 0, torch.qint8)
    np.testing.assert_allclose(ours.numpy(), ref.dequantize().float().numpy(), rtol=0, atol=1e-6)


@given(shapes, seeds)
def test_int8_per_channel_affine_matches_torch_fake_quantize(shape, seed):
    w = _weights(shape, seed) + 0.5  # shifted, so the zero-points are not 0
    qt = quantize(w, {"format": "int8", "granularity": "per_channel", "symmetric": False})
    lo, hi = w.amin(1).clamp(max=0).double(), w.amax(1).clamp(min=0).double()
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).tiny)  # 255 = qmax - qmin for [-128, 127]
    zp = torch.clamp(torch.round(-128 - lo / scale), -128, 127)
    np.testing.assert_allclose(qt.scale.numpy(), scale.float().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(qt.zero_point.numpy(), zp.float().numpy())
    ref = torch.fake_quantize_per_channel_affine(w, scale.float(), zp.int(), 0, -128, 127)
    np.testing.assert_allclose(qt.dequantize().numpy(), ref.float().numpy(), rtol=0, atol=1e-5)


# ---- float casts vs ml_dtypes --------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype,fmax", [("fp16", np.float16, 65504.0), ("bf16", ml_dtypes.bfloat16, None),
                                             ("fp8_e4m3", ml_dtypes.float8_e4m3fn, 448.0),
                                             ("fp8_e5m2", ml_dtypes.float8_e5m2, 57344.0)])
def test_float_casts_match_ml_dtypes_bit_for_bit(name, dtype, fmax):
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(4000, generator=g) * s for s in (1e-6, 1e-2, 1.0, 30.0, 1e3, 1e5)])
    ours = fake_quantize(x, {"format": name}).numpy()  # unscaled: a saturating round-to-nearest-even cast
    clip = float(ml_dtypes.finfo(dtype).max) if fmax is None else fmax
    expected = np.clip(x.numpy(), -clip, clip).astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(ours, expected)


def test_scaled_fp8_maps_the_absmax_onto_448():
    x = torch.tensor([[-3.0, 0.1, 1.5, 2.0]])
    ours = fake_quantize(x, {"format": "fp8_e4m3", "scaled": True}).numpy()
    s = 3.0 / 448.0
    expected = (x.numpy() / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert ours[0, 0] == pytest.approx(-3.0, rel=1e-6)


# ---- int4 per_group and nf4 vs a numpy reference ---------------------------------------------------
@given(st.integers(1, 6), st.sampled_from([32, 64, 96, 128]), seeds)
def test_int4_per_group_symmetric_matches_a_numpy_reference(rows, fan_in, seed):
    w = _weights((rows, fan_in), seed).numpy().astype(np.float64)
    g = 32  # the spec's group size: divides every fan-in drawn here
    ours = fake_quantize(torch.from_numpy(w).float(), {"format": "int4", "granularity": "per_group", "group_size": g}).numpy()
    blocks = w.astype(np.float32).reshape(rows, fan_in // g, g)  # groups of g consecutive fan-in elements
    scale = np.abs(blocks).max(-1, keepdims=True).astype(np.float32) / np.float32(7)  # int4: qmax = 7
    q = np.clip(np.round(blocks.astype(np.float64) / scale), -8, 7)
    np.testing.assert_allclose(ours, (q * scale).reshape(rows, fan_in), rtol=0, atol=1e-6)


@given(st.integers(1, 5), seeds)
def test_nf4_is_the_nearest_codebook_value_times_the_block_absmax(rows, seed):
    w = _weights((rows, 128), seed, outliers=False)
    ours = fake_quantize(w, {"format": "nf4"}).numpy()  # default: per_group of 64
    blocks = w.numpy().reshape(-1, 64)
    absmax = np.abs(blocks).max(1, keepdims=True)
    cb = np.array(NF4_CODEBOOK, dtype=np.float32)
    nearest = cb[np.abs(blocks[..., None] / absmax[..., None] - cb).argmin(-1)]  # brute force over 16 codes
    np.testing.assert_allclose(ours, (nearest * absmax).reshape(w.shape), rtol=1e-6, atol=1e-7)


def test_int_grid_bounds_are_the_twos_complement_range():
    for b in (2, 3, 4, 8, 16):
        v = FORMATS[f"int{b}"].values()
        assert (float(v.min()), float(v.max()), len(v)) == (-(2 ** (b - 1)), 2 ** (b - 1) - 1, 2**b)


def test_rounding_is_half_to_even():
    # scale = 127 / 127 = 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0 (np.round is half-to-even too)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 127.0])
    np.testing.assert_array_equal(fake_quantize(x, {"format": "int8"}).numpy(), np.round(x.numpy()))


# ---- metrics vs float64 numpy ------------------------------------------------------------------
@given(st.integers(1, 8), st.integers(1, 16), seeds, st.floats(1e-4, 1.0))
def test_sqnr_cosine_kl_match_numpy_float64(n, k, seed, noise):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n, k))
    out = ref + noise * rng.standard_normal((n, k))
    expected_sqnr = 10 * math.log10(np.sum(ref**2) / np.sum((out - ref) ** 2))
    assert sqnr_db(torch.from_numpy(out), torch.from_numpy(ref)) == pytest.approx(expected_sqnr, abs=1e-9)
    cos = np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    assert mean_cosine(torch.from_numpy(out), torch.from_numpy(ref)) == pytest.approx(cos.mean(), abs=1e-9)
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    q = np.exp(out) / np.exp(out).sum(-1, keepdims=True)
    kl = np.sum(p * np.log(p / q), -1).mean()  # KL(softmax(reference) || softmax(outputs)), nats
    assert kl_divergence(torch.from_numpy(out), torch.from_numpy(ref)) == pytest.approx(kl, abs=1e-9)


def test_sqnr_of_a_known_noise_is_the_hand_value():
    ref = torch.tensor([[3.0, 4.0]])  # signal power 25
    assert sqnr_db(ref + torch.tensor([[0.0, 0.5]]), ref) == pytest.approx(10 * math.log10(25 / 0.25))  # 20 dB


def test_cosine_of_orthogonal_and_opposite_rows():
    ref = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = torch.tensor([[0.0, 2.0], [-1.0, -1.0]])
    assert mean_cosine(out, ref) == pytest.approx((0.0 + -1.0) / 2)


# ---- ranges: percentile vs numpy, mse vs brute force ------------------------------------------------
@given(st.integers(1, 4), st.integers(10, 300), seeds, st.sampled_from([90.0, 99.0, 99.9, 99.99]))
def test_percentile_range_is_numpy_inverted_cdf_percentile(rows, n, seed, pct):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32))
    sym = TensorSpec(range="percentile", percentile=pct)
    lo, hi = choose_range(x, sym.fmt, sym)
    expected = np.percentile(np.abs(x.numpy()), pct, axis=1, method="inverted_cdf")
    np.testing.assert_allclose(hi.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(lo.numpy(), -expected, rtol=1e-6)
    aff = TensorSpec(range="percentile", percentile=pct, symmetric=False)
    lo, hi = choose_range(x, aff.fmt, aff)
    np.testing.assert_allclose(hi.numpy(), np.percentile(x.numpy(), pct, axis=1, method="inverted_cdf"), rtol=1e-6)
    np.testing.assert_allclose(lo.numpy(), np.percentile(x.numpy(), 100 - pct, axis=1, method="inverted_cdf"),
                               rtol=1e-6)


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int4", False), ("int3", True)])
def test_mse_range_is_the_brute_force_best_clip_factor(fmt, symmetric):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 400, generator=g)
    x[:, :4] *= 8  # heavy tails: the best clip is well inside min-max
    spec = TensorSpec(format=fmt, range="mse", symmetric=symmetric)
    lo, hi = choose_range(x, spec.fmt, spec)
    qmax = 2 ** (int(fmt[3:]) - 1) - 1
    for r in range(3):
        row = x[r].double().numpy()
        best = (math.inf, None)
        for k in range(50, 0, -1):  # the same grid of clip factors, k / 50; on a tie the wider clip stays
            a = k / 50
            if symmetric:
                s = max(abs(row.min()), abs(row.max())) * a / qmax
                xq = np.clip(np.round(row / s), -qmax - 1, qmax) * s
                rng = (-s * qmax, s * qmax)
            else:
                l, h = min(row.min(), 0) * a, max(row.max(), 0) * a
                s = (h - l) / (2 * qmax + 1)
                z = np.clip(np.round(-qmax - 1 - l / s), -qmax - 1, qmax)
                xq = (np.clip(np.round(row / s) + z, -qmax - 1, qmax) - z) * s
                rng = (l, h)
            err = float(np.sum((xq - row) ** 2))
            if err < best[0]:
                best = (err, rng)
        assert float(hi[r]) == pytest.approx(best[1][1], rel=1e-5)
        assert float(lo[r]) == pytest.approx(best[1][0], rel=1e-5)
        assert float(hi[r]) < float(x[r].abs().max()) * 0.9  # the clip really moved inside the outliers


def test_per_channel_axis_1_blocks_are_columns():
    w = torch.tensor([[1.0, -4.0, 0.5], [2.0, 1.0, -8.0]])
    qt = quantize(w, {"format": "int8", "granularity": "per_channel", "axis": 1})
    np.testing.assert_allclose(qt.scale.numpy(), np.abs(w.numpy()).max(0) / 127, rtol=1e-6)  # one scale per column
