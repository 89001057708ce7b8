"""Independent oracles for calibration (``qcore.model.calibrate``) and the static range methods.

- min-max / moving-average ranges      vs ``torch.ao``'s ``MinMaxObserver`` / ``MovingAverageMinMaxObserver``
  (averaging constant 0.01, torch's default) fed the same batches: equal to float32 rounding (rel 1e-6);
- per-channel absmax                   vs ``PerChannelMinMaxObserver`` (ch_axis 1 of a Linear's (N, C) input);
- affine int8 scale / zero-point       vs the observer's ``calculate_qparams()`` (qint8, [-128, 127]): equal.
  Symmetric differs ON PURPOSE: torch divides the absmax by (qmax - qmin) / 2 = 127.5, we by qmax = 127 (so
  +absmax is exactly representable); the test checks that ratio 127.5 / 127 exactly;
- percentile (from the 2048-bin histogram) vs ``numpy.percentile(method="inverted_cdf")`` of all samples: within one
  histogram bin (two for |x|: its bins are those of x folded);
- the 2048-bin histogram           vs ``numpy.histogram`` over [min, max] (at most 2 values in a neighbouring bin);
- entropy (KL) threshold               vs onnxruntime's ``HistogramCollector.get_entropy_threshold`` on the same
  distribution (mirrored to ORT's signed histogram, 4096 bins, 255 quantized bins = our 128 levels a side):
  within two of our candidate steps (2 x 30 / 2048 of the range; ORT tries every bin, we 64 thresholds, and
  ORT smooths empty bins with 1e-4), and both clip well inside the heavy-tailed range.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver

from qcore.model.calibrate import calibrate
from qcore.numerics.quantize import quantize
from qcore.numerics.ranges import choose_range
from qcore.numerics.spec import TensorSpec


def _batches(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # ranges that drift from batch to batch, so the moving average differs from min-max
        x = torch.randn(16, 6, generator=g) * (1 + i) + 0.3 * i
        x[:, 2] *= 5  # an outlier channel
        out.append((x,))
    return out


@pytest.fixture(scope="module")
def stats():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    return calibrate(model, {"0": model[0]}, _batches())["0"]


def test_minmax_and_moving_average_match_torch_ao_observers(stats):
    mm, ema = MinMaxObserver(), MovingAverageMinMaxObserver(averaging_constant=0.01)
    pc = PerChannelMinMaxObserver(ch_axis=1)
    for (x,) in _batches():
        mm(x), ema(x), pc(x)
    assert (stats.min, stats.max) == pytest.approx((float(mm.min_val), float(mm.max_val)), rel=1e-6)
    assert (stats.ema_min, stats.ema_max) == pytest.approx((float(ema.min_val), float(ema.max_val)), rel=1e-6)
    assert stats.ema_max < stats.max * 0.9  # the drift makes the two really differ
    channel_absmax = torch.maximum(pc.min_val.abs(), pc.max_val.abs())
    np.testing.assert_allclose(stats.channel_absmax.numpy(), channel_absmax.numpy(), rtol=1e-6)
    from qcore.numerics.formats import FORMATS
    for method, obs in (("minmax", mm), ("moving_average", ema)):
        lo, hi = stats.static_range(FORMATS["int8"], TensorSpec(range=method, symmetric=False))
        assert (lo, hi) == pytest.approx((float(obs.min_val), float(obs.max_val)), rel=1e-6)


def test_affine_qparams_equal_torch_and_symmetric_differs_by_127_5_over_127(stats):
    from qcore.numerics.formats import FORMATS

    x = torch.cat([b[0] for b in _batches()]).reshape(-1)
    for method, obs in (("minmax", MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine)),
                        ("moving_average", MovingAverageMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine))):
        for (b,) in _batches():
            obs(b)
        t_scale, t_zp = obs.calculate_qparams()
        lo, hi = stats.static_range(FORMATS["int8"], TensorSpec(range=method, symmetric=False))
        qt = quantize(x, {"format": "int8", "symmetric": False}, lo, hi)
        assert float(qt.scale[0]) == pytest.approx(float(t_scale), rel=1e-6)
        assert int(qt.zero_point[0]) == int(t_zp)
    sym = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    for (b,) in _batches():
        sym(b)
    t_scale, t_zp = sym.calculate_qparams()
    lo, hi = stats.static_range(FORMATS["int8"], TensorSpec(range="minmax"))
    qt = quantize(x, {"format": "int8"}, lo, hi)
    assert int(t_zp) == 0 and qt.zero_point is None
    assert float(qt.scale[0]) / float(t_scale) == pytest.approx(127.5 / 127, rel=1e-6)


def test_static_percentile_is_numpy_percentile_of_all_batches_within_one_bin(stats):
    from qcore.numerics.formats import FORMATS

    x = torch.cat([b[0] for b in _batches()]).reshape(-1).numpy()
    bin_width = (stats.max - stats.min) / 2048
    for pct in (99.0, 99.9):
        lo, hi = stats.static_range(FORMATS["int8"], TensorSpec(range="percentile", percentile=pct, symmetric=False))
        assert hi == pytest.approx(np.percentile(x, pct, method="inverted_cdf"), abs=bin_width)
        assert lo == pytest.approx(np.percentile(x, 100 - pct, method="inverted_cdf"), abs=bin_width)
        lo, hi = stats.static_range(FORMATS["int8"], TensorSpec(range="percentile", percentile=pct))
        assert hi == pytest.approx(np.percentile(np.abs(x), pct, method="inverted_cdf"), abs=2 * bin_width) and lo == -hi


def _gauss_cdf(v):
    return 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))


def _laplace_cdf(v):
    return np.where(v < 0, 0.5 * np.exp(np.minimum(v, 0)), 1 - 0.5 * np.exp(-np.maximum(v, 0)))


@pytest.mark.parametrize("name,cdf,extent", [("gauss", _gauss_cdf, 6.0), ("laplace", _laplace_cdf, 16.0)])
def test_entropy_threshold_matches_onnxruntime_within_two_candidate_steps(name, cdf, extent):
    from onnxruntime.quantization.calibrate import HistogramCollector

    edges = np.linspace(-extent, extent, 4097)
    hist = np.round(np.diff(cdf(edges)) * 1e12).astype(np.int64)  # a dense histogram: no empty bins
    ort = HistogramCollector("entropy", True, 4096, 255, None, None)
    _, ort_hi = ort.get_entropy_threshold((hist, edges.astype(np.float32), np.float32(-extent), np.float32(extent)), 255)
    absolute = hist[2048:] + hist[:2048][::-1]  # the same mass as a histogram of |x| over [0, extent]
    centers = torch.from_numpy((edges[2048:-1] + edges[2049:]) / 2).float()[None]
    spec = TensorSpec(range="entropy")
    lo, hi = choose_range(centers, spec.fmt, spec, torch.from_numpy(absolute.astype(np.float64))[None])
    assert float(hi[0]) == pytest.approx(float(ort_hi), abs=2 * 30 / 2048 * extent)
    assert float(lo[0]) == -float(hi[0])
    if name == "laplace":
        assert float(hi[0]) < 0.8 * extent and float(ort_hi) < 0.8 * extent  # both clip the long tail


def test_histogram_is_numpys_histogram_over_min_max_of_all_batches(stats):
    x = torch.cat([b[0] for b in _batches()]).reshape(-1).double().numpy()
    expected, _ = np.histogram(x, bins=2048, range=(stats.min, stats.max))  # last bin closed: the max lands in it
    assert stats.hist.sum() == len(x) == stats.numel
    # identical except where float rounding puts a value exactly on a bin edge into the neighbouring bin
    assert np.abs(stats.hist.numpy() - expected).sum() <= 2
