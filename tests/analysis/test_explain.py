"""qcore.analysis.explain: the numbers behind the Formats, Weights and Activations pages, checked against
independent computations (quantize / fake_quantize / metrics) and against what they must mean."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qcore.analysis import explain
from qcore.errors import QcoreError
from qcore.numerics.formats import FORMATS
from qcore.numerics.metrics import sqnr_db
from qcore.numerics.quantize import fake_quantize, quantize
from qcore.numerics.spec import TensorSpec


def uniform(n=50_000, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- Formats page ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", explain.DISTRIBUTIONS)
def test_sample_distribution_is_seeded_with_unit_spread(kind):
    x = explain.sample_distribution(kind, n=40_000)
    assert x.shape == (40_000,) and x.dtype == torch.float32
    assert torch.equal(x, explain.sample_distribution(kind, n=40_000))
    bulk = x[x.abs() < 6]
    assert float(bulk.std()) == pytest.approx(1.0, abs=0.05)
    outliers = int((x.abs() >= 6).sum())
    if kind == "normal with outliers":
        assert outliers == int(40_000 * explain.OUTLIER_SHARE)
        assert float(x.abs().max()) <= 10
    else:
        assert outliers <= 40  # tails only (Laplace reaches 6 sigma about once in 5,000)


def test_sample_distribution_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown distribution"):
        explain.sample_distribution("cauchy")


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int3", False), ("int8", True), ("nf4", True)])
def test_grid_levels_are_the_formats_values_scaled(fmt, symmetric):
    x = explain.sample_distribution("laplace")
    spec = TensorSpec(format=fmt, symmetric=symmetric, range="minmax")
    g = explain.grid(x, spec)
    q = quantize(x, spec)
    expected = (FORMATS[fmt].values() - float(q.zero_point[0] if q.zero_point is not None else 0)) * float(q.scale[0])
    assert torch.allclose(g["levels"], expected)
    assert g["scale"] == pytest.approx(float(q.scale[0]))
    # every dequantized value is one of the levels
    xq = q.dequantize().double()
    nearest = (xq[:, None] - g["levels"][None]).abs().min(1).values
    assert float(nearest.max()) < 1e-5 * float(x.abs().max())
    if fmt.startswith("int") and symmetric:
        assert g["levels"][-1] == pytest.approx(float(x.abs().max()), rel=1e-6)  # top code sits on max|x|


def test_grid_with_a_fixed_range_and_plain_cast():
    x = uniform()
    g = explain.grid(x, TensorSpec(format="int8", symmetric=True), -0.5, 0.5)
    assert (g["lo"], g["hi"]) == (-0.5, 0.5) and g["scale"] == pytest.approx(0.5 / 127)
    fp16 = explain.grid(x, TensorSpec(format="fp16"))
    assert fp16["scale"] is None and len(fp16["levels"]) == FORMATS["fp16"].describe()["levels"]
    shown = explain.visible_levels(fp16, -1.0, 1.0)
    assert float(shown.min()) >= -1.2 and float(shown.max()) <= 1.2 and len(shown) < len(fp16["levels"])
    assert torch.equal(explain.visible_levels(g, -1, 1), g["levels"])  # a scaled grid is drawn whole
    assert explain.grid(x, TensorSpec(format="fp32"))["levels"] is None


def test_visible_levels_stay_near_the_data_when_a_scale_falls_back_to_one():
    """bf16 "scaled" into its own range: max|x| / 3.39e38 is below float32's smallest normal number, so the scale
    falls back to 1 and the grid is bf16's 65,279 finite values out to 3.4e38; only those near the data are drawn
    (oracle: bf16's own values, enumerated here from its bit patterns, within the data range + 10 %)."""
    x = uniform()  # in [-1, 1]
    g = explain.grid(x, TensorSpec(format="bf16", scaled=True, range="minmax"))
    assert g["scale"] == 1.0 and float(g["levels"].max()) > 1e38
    shown = explain.visible_levels(g, float(x.min()), float(x.max()))
    bits = torch.arange(-2**15, 2**15, dtype=torch.int64).to(torch.int16).view(torch.bfloat16).to(torch.float64)
    lo, hi = float(x.min()), float(x.max())
    pad = 0.1 * (hi - lo)
    expected = torch.unique(bits[torch.isfinite(bits) & (bits >= lo - pad) & (bits <= hi + pad)])
    assert torch.equal(shown, expected)
    relu = explain.grid(x.clamp(min=0), TensorSpec(format="int8", symmetric=True))  # data in [0, 1]
    assert torch.equal(explain.visible_levels(relu, 0.0, float(x.max())), relu["levels"])  # the unused half too


@pytest.mark.parametrize("name", list(FORMATS))
def test_bit_layout_adds_up_to_the_formats_bits(name):
    fmt = FORMATS[name]
    layout = explain.bit_layout(fmt)
    assert sum(bits for _, bits in layout) == (32 if name == "fp32" else fmt.bits)
    if fmt.family == "float":
        assert layout == [("sign", 1), ("exponent", fmt.exponent_bits), ("mantissa", fmt.mantissa_bits)]


def test_format_numbers_of_an_integer_grid():
    x = uniform()
    spec = TensorSpec(format="int4", symmetric=True, range="minmax")
    n = explain.format_numbers(x, spec)
    assert n["levels"] == 16
    assert n["smallest_step"] == pytest.approx(n["largest_step"]) == pytest.approx(n["scale"])
    assert n["scale"] == pytest.approx(float(x.abs().max()) / 7)
    xq = fake_quantize(x, spec)
    assert n["sqnr_db"] == pytest.approx(sqnr_db(xq, x))
    assert n["mse"] == pytest.approx(float(((xq - x).double() ** 2).mean()))
    assert n["clipped_fraction"] == 0.0
    assert n["dynamic_range_db"] == pytest.approx(20 * math.log10(7))  # 8 / 1 would count the -8 code


def test_format_numbers_of_a_float_cast_have_growing_steps():
    n = explain.format_numbers(uniform(), TensorSpec(format="fp16"))
    assert n["lo"] is None and n["scale"] is None
    assert n["smallest_step"] == pytest.approx(2.0**-24) and n["largest_step"] == pytest.approx(2.0**-11)
    assert 70 < n["sqnr_db"] < 80  # 10 mantissa bits + hidden bit: about 6 dB each


@pytest.mark.parametrize("x", [torch.zeros(100), torch.full((100,), 3.0), torch.tensor([1e-30, -1e-30] * 10),
                               torch.tensor([1e30, -1e30] * 10)], ids=["zero", "constant", "tiny", "huge"])
def test_format_numbers_never_nan(x):
    n = explain.format_numbers(x, TensorSpec(format="int4", symmetric=True))
    assert all(math.isfinite(v) for v in n.values() if isinstance(v, float))


def test_format_numbers_refuses_nan():
    with pytest.raises(QcoreError, match="NaN"):
        explain.format_numbers(torch.tensor([1.0, float("nan")]), TensorSpec(format="int4"))


def test_bitwidth_sweep_gains_about_6_db_per_bit_on_uniform_data():
    x = uniform(20_000)
    rows = explain.bitwidth_sweep(x, methods=("minmax",))
    assert [r["bits"] for r in rows] == [2, 3, 4, 5, 6, 7, 8]
    sqnr = [r["sqnr_db"] for r in rows]
    gains = [b - a for a, b in zip(sqnr, sqnr[1:])]
    assert all(g > 0 for g in gains)
    assert all(5.8 < g < 6.8 for g in gains[2:]), gains  # from 4 bits on: 20 log10(2) = 6.02 dB per bit
    # symmetric int-b has 2^(b-1) - 1 steps per side: 4 -> 8 bits shrinks the step 127 / 7 times
    assert sqnr[-1] - sqnr[2] == pytest.approx(20 * math.log10(127 / 7), abs=0.2)
    for r in rows:
        assert r["sqnr_db"] == pytest.approx(sqnr_db(fake_quantize(x, TensorSpec(format=f"int{r['bits']}")), x))


def test_bitwidth_sweep_mse_range_beats_minmax_with_outliers():
    x = explain.sample_distribution("normal with outliers")
    rows = explain.bitwidth_sweep(x, bits=(3, 4))
    by = {(r["range"], r["bits"]): r["sqnr_db"] for r in rows}
    assert by[("mse", 3)] > by[("minmax", 3)] and by[("mse", 4)] > by[("minmax", 4)]


def test_clipping_tradeoff_splits_the_error():
    x = explain.sample_distribution("normal with outliers", n=8_000)
    spec = TensorSpec(format="int4", symmetric=True)
    r = explain.clipping_tradeoff(x, spec, points=30)
    amax = float(x.abs().max())
    assert r["threshold"][-1] == pytest.approx(amax) and len(r["threshold"]) == 30
    for a, b, t in zip(r["rounding"], r["clipping"], r["total"]):
        assert a + b == pytest.approx(t)
    assert r["clipping"][-1] == 0.0  # nothing is clipped at max |x|
    assert all(b >= a - 1e-12 for a, b in zip(r["clipping"][1:], r["clipping"]))  # less clipping as t grows
    assert min(r["total"]) < r["total"][-1]  # clipping the outliers pays off here
    mm = r["methods"]["minmax"]
    assert mm["threshold"] == pytest.approx(amax) and mm["total"] == pytest.approx(r["total"][-1], rel=1e-5)
    assert r["methods"]["mse"]["total"] <= mm["total"]
    # the total at a threshold is the fake-quantization error there
    t = r["threshold"][9]
    err = float(((fake_quantize(x, spec, -t, t) - x).double() ** 2).mean())
    assert r["total"][9] == pytest.approx(err)


# ---- Weights page ------------------------------------------------------------------------------
def test_analysed_weight_samples_whole_rows():
    w = torch.arange(64 * 100, dtype=torch.float32).reshape(64, 100)
    same, note = explain.analysed_weight(w, limit=10_000)
    assert note is None and torch.equal(same, w)
    part, note = explain.analysed_weight(w, limit=1_000)
    assert part.shape == (10, 100) and "10 of its 64 rows" in note
    rows = {int(r[0]) // 100 for r in part}
    assert all(torch.equal(part[i], w[r]) for i, r in enumerate(sorted(rows)))


def test_sample_values():
    x = torch.arange(1000.0)
    assert explain.sample_values(x, 2000)[1] is None
    s, note = explain.sample_values(x, 100)
    assert len(s) == 100 and len(set(s.tolist())) == 100 and "1,000" in note


def test_method_ranges_and_weight_error():
    x = explain.sample_distribution("normal with outliers")
    spec = TensorSpec(format="int4", symmetric=False)
    ranges = explain.method_ranges(x, spec)
    assert set(ranges) == {"minmax", "percentile", "mse", "entropy"}
    assert ranges["minmax"] == pytest.approx((float(x.min()), float(x.max())))
    lo, hi = ranges["percentile"]
    assert float(x.min()) <= lo < hi <= float(x.max())
    e = explain.weight_error(x, spec, lo, hi)
    xq = fake_quantize(x, spec, lo, hi)
    assert torch.allclose(e["error"], xq - x)
    assert e["sqnr_db"] == pytest.approx(sqnr_db(xq, x))
    assert e["clipped_fraction"] == pytest.approx(float(((x < lo) | (x > hi)).float().mean()))
    assert e["max_abs_error"] == pytest.approx(float((xq - x).abs().max()))


def test_channel_ranges_sorted_widest_first():
    w = torch.tensor([[0.1, -0.2], [3.0, -1.0], [0.5, 0.4]])
    c = explain.channel_ranges(w)
    assert c["channel"].tolist() == [1, 2, 0]
    assert c["min"].tolist() == pytest.approx([-1.0, 0.4, -0.2]) and c["max"].tolist() == pytest.approx([3.0, 0.5, 0.1])
    assert (c["tensor_min"], c["tensor_max"]) == (-1.0, 3.0)
    assert c["absmax_ratio"] == pytest.approx(3.0 / 0.5)


def test_layer_sqnr_and_group_fallback():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(8, 64, generator=g), "b": torch.randn(8, 48, generator=g) * 10}
    spec = TensorSpec(format="int4", granularity="per_group", group_size=32)
    rows = explain.layer_sqnr(weights, spec)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[0]["granularity"] == "per_group" and rows[0]["note"] is None
    assert rows[1]["granularity"] == "per_group" and "does not divide the fan-in 48: groups of 24" in rows[1]["note"]
    assert rows[0]["sqnr_db"] == pytest.approx(sqnr_db(fake_quantize(weights["a"], spec), weights["a"]))
    # 24 = the largest divisor of 48 not above 32; groups of 24 quantized by hand (int4 symmetric absmax per group)
    b = weights["b"].reshape(-1, 24)
    scale = b.abs().amax(1, keepdim=True) / 7
    by_hand = (torch.clamp(torch.round(b / scale), -8, 7) * scale).reshape(8, 48)
    assert rows[1]["sqnr_db"] == pytest.approx(sqnr_db(by_hand, weights["b"]), rel=1e-4)


def test_weight_report_per_channel_beats_per_tensor_on_unequal_channels():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g) * torch.logspace(-2, 0, 16)[:, None]
    spec = TensorSpec(format="int4", granularity="per_channel", range="minmax")
    r = explain.weight_report(w, spec, bins=50)
    counts, edges = r["hist"]
    assert float(counts.sum()) == w.numel() == r["numel"] and len(edges) == 51
    assert float(r["error_hist"][0].sum()) == w.numel()
    assert r["sqnr_per_channel"] > r["sqnr_per_tensor"] + 3
    per_tensor = TensorSpec(format="int4", range="minmax")
    assert r["sqnr_per_tensor"] == pytest.approx(sqnr_db(fake_quantize(w, per_tensor), w))
    assert r["sqnr_db"] == pytest.approx(r["sqnr_per_channel"])
    amax = float(w.abs().max())
    assert r["ranges"]["minmax"] == pytest.approx((-amax, amax))  # symmetric by default
    assert r["channels"]["absmax_ratio"] > 10
    assert r["note"] is None and r["fallback"] is None
    assert explain.weight_report(w, TensorSpec(format="fp16"))["ranges"] == {}


# ---- Activations page --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fc1_stats(digits_mlp):
    return digits_mlp.calibration_stats()["fc2"]


def test_activation_ranges_from_calibration(fc1_stats):
    s = fc1_stats
    rows = explain.activation_ranges(s, TensorSpec(format="int8", symmetric=False, percentile=99.0))
    by = {r["range"]: r for r in rows}
    assert list(by) == list(explain.ACTIVATION_METHODS)
    assert (by["minmax"]["lo"], by["minmax"]["hi"]) == (s.min, s.max) and by["minmax"]["clipped_fraction"] == 0
    assert (by["moving_average"]["lo"], by["moving_average"]["hi"]) == (s.ema_min, s.ema_max)
    assert by["minmax"]["step"] == pytest.approx((s.max - min(s.min, 0.0)) / 255, rel=1e-5)
    assert 0 < by["percentile"]["clipped_fraction"] <= 0.011
    assert by["percentile"]["hi"] < s.max
    assert all(r["step"] is None for r in explain.activation_ranges(s, TensorSpec(format="fp8_e4m3")))


def test_rebin_and_outlier_channels(fc1_stats):
    counts, edges = explain.rebin(fc1_stats.hist, fc1_stats.edges, 8)
    assert len(counts) == len(fc1_stats.hist) // 8 and len(edges) == len(counts) + 1
    assert float(counts.sum()) == float(fc1_stats.hist.sum()) == fc1_stats.numel
    o = explain.outlier_channels(fc1_stats)
    a = fc1_stats.channel_absmax.double()
    assert o["absmax"].tolist() == sorted(a.tolist(), reverse=True)
    assert o["ratio"] == pytest.approx(float(a.max()) / float(a.median()))


def test_batch_ranges_cover_the_calibration_range(digits_mlp):
    per_layer = explain.batch_ranges(digits_mlp, 16)
    n = len(digits_mlp.calibration)
    stats = digits_mlp.calibration_stats()
    for name, ranges in per_layer.items():
        assert len(ranges) == math.ceil(n / 16)
        assert min(lo for lo, _ in ranges) == pytest.approx(stats[name].min)
        assert max(hi for _, hi in ranges) == pytest.approx(stats[name].max)
        assert all(lo <= hi for lo, hi in ranges)
    assert not any(m._forward_pre_hooks for m in digits_mlp.folded[0].modules())  # the shared model is untouched


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200), st.integers(1, 40))
def test_histogram_counts_every_value(values, bins):
    x = torch.tensor(values, dtype=torch.float64)
    counts, edges = explain.histogram(x, bins)
    assert len(counts) == bins and len(edges) == bins + 1
    assert float(counts.sum()) == len(values)
    assert float(edges[0]) <= min(values) and float(edges[-1]) >= max(values)
    inside, _ = explain.histogram(x, bins, lo=0.0, hi=1.0)  # values outside land in the end bins
    assert float(inside.sum()) == len(values)
