"""Range methods: min-max is exact, percentiles come from the data, MSE never loses to min-max,
entropy clips outliers, and weighted histograms give the same ranges as the raw values."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from qcore import TensorSpec, fake_quantize, quantize
from qcore.model.calibrate import ActivationStats
from qcore.numerics.formats import FORMATS
from qcore.numerics.ranges import ACTIVATION_ONLY_METHODS, RANGE_METHODS, choose_range, minmax

INT8 = FORMATS["int8"]
blocks = st.lists(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=24), min_size=1, max_size=4)


def _rect(rows):
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


def _spec(**kw):
    return TensorSpec(**kw)


def test_registry():
    assert list(RANGE_METHODS) == ["minmax", "percentile", "mse", "entropy"]
    assert ACTIVATION_ONLY_METHODS == ("moving_average",)


@given(rows=blocks)
def test_minmax_is_exact_per_block(rows):
    x = _rect(rows)
    lo, hi = choose_range(x, INT8, _spec(symmetric=False))
    assert torch.equal(lo, x.amin(1)) and torch.equal(hi, x.amax(1))
    slo, shi = choose_range(x, INT8, _spec(symmetric=True))
    assert torch.equal(shi, x.abs().amax(1)) and torch.equal(slo, -shi)


def test_weighted_minmax_ignores_zero_weight_samples_and_empty_blocks():
    x = torch.tensor([[-9.0, 1.0, 2.0, 30.0], [5.0, 6.0, 7.0, 8.0]])
    w = torch.tensor([[0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    lo, hi = minmax(x, w)
    assert lo.tolist() == [1.0, 0.0] and hi.tolist() == [2.0, 0.0]


@given(rows=blocks, p=st.sampled_from([60.0, 90.0, 99.0, 99.9, 99.99, 100.0]), symmetric=st.booleans())
def test_percentile_is_a_value_of_the_data_and_never_beyond_minmax(rows, p, symmetric):
    x = _rect(rows)
    lo, hi = choose_range(x, INT8, _spec(range="percentile", percentile=p, symmetric=symmetric))
    n = x.shape[1]
    for i in range(x.shape[0]):
        if symmetric:
            a = x[i].abs().sort().values
            assert hi[i] == a[min(max(math.ceil(p / 100 * n), 1), n) - 1] and lo[i] == -hi[i]
        else:
            assert lo[i] in x[i] and hi[i] in x[i]
            assert x[i].min() <= lo[i] <= hi[i] <= x[i].max()
    if p == 100.0:
        mm = choose_range(x, INT8, _spec(symmetric=symmetric))
        assert torch.equal(lo, mm[0]) and torch.equal(hi, mm[1])


def test_percentile_known_values():
    x = torch.arange(1, 10001, dtype=torch.float32)[None]  # 1..10000
    lo, hi = choose_range(x, INT8, _spec(range="percentile", percentile=99.9, symmetric=False))
    assert (float(lo), float(hi)) == (10.0, 9990.0)  # lower interpolation: ceil(q n)-th value
    lo, hi = choose_range(x, INT8, _spec(range="percentile", percentile=99.0, symmetric=True))
    assert (float(lo), float(hi)) == (-9900.0, 9900.0)


@given(values=st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=20),
       counts=st.lists(st.integers(0, 4), min_size=20, max_size=20),
       p=st.sampled_from([75.0, 99.0, 99.9, 100.0]), symmetric=st.booleans(),
       method=st.sampled_from(["minmax", "percentile"]))
@example(values=[-3.0, 1.0, 2.0], counts=[0, 2, 1] + [0] * 17, p=100.0, symmetric=False, method="percentile")
@example(values=[1.0, 2.0, 5.0], counts=[1, 2, 0] + [0] * 17, p=99.0, symmetric=True, method="percentile")
def test_weighted_samples_equal_repeated_samples(values, counts, p, symmetric, method):
    """A histogram given as (value, count) pairs yields the range of the values repeated count times."""
    x = torch.tensor(values)
    c = torch.tensor(counts[: len(values)])
    if c.sum() == 0:
        c[0] = 1
    spec = _spec(range=method, percentile=p, symmetric=symmetric)
    lo_w, hi_w = choose_range(x[None], INT8, spec, c[None].float())
    lo_r, hi_r = choose_range(torch.repeat_interleave(x, c)[None], INT8, spec)
    assert torch.equal(lo_w, lo_r) and torch.equal(hi_w, hi_r)


def _outliers(seed=0, n=4096):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[:4] = torch.tensor([40.0, -35.0, 60.0, 25.0])  # outliers far beyond N(0, 1)
    return x


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "nf4", "fp8_e4m3"])
@given(seed=st.integers(0, 10_000), log_scale=st.floats(-20, 20), symmetric=st.booleans(),
       heavy=st.booleans())
def test_mse_range_never_has_higher_error_than_minmax(fmt, seed, log_scale, symmetric, heavy):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 64, generator=g) ** (3 if heavy else 1)) * 10.0**log_scale
    base = {"format": fmt, "granularity": "per_channel"}
    if fmt.startswith("int"):
        base["symmetric"] = symmetric
    if fmt.startswith("fp8"):
        base["scaled"] = True
    err_mm = (fake_quantize(x, {**base, "range": "minmax"}) - x).double().pow(2).sum(1)
    err_mse = (fake_quantize(x, {**base, "range": "mse"}) - x).double().pow(2).sum(1)
    assert torch.all(err_mse <= err_mm)


def test_mse_clips_moderate_outliers_and_wins_clearly():
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
    x[0, :4] = torch.tensor([8.0, -9.0, 10.0, 7.0])
    lo, hi = choose_range(x, FORMATS["int4"], _spec(format="int4", range="mse"))
    assert float(hi) == pytest.approx(3.2) and float(lo) == -float(hi)  # 16/50 of the absmax 10
    err_mm = (fake_quantize(x, {"format": "int4"}) - x).pow(2).sum()
    err_mse = (fake_quantize(x, {"format": "int4", "range": "mse"}) - x).pow(2).sum()
    assert err_mse < 0.3 * err_mm


def test_entropy_clips_outliers_but_keeps_the_bulk():
    x = _outliers()
    lo, hi = choose_range(x[None], INT8, _spec(range="entropy"))
    assert float(lo) == -float(hi)
    assert 3.0 < float(hi) < 30.0  # far inside the 60.0 outlier, beyond the bulk of N(0, 1)
    q = quantize(x, {"format": "int8", "range": "entropy"})
    assert 4 / 4096 <= q.clipped_fraction(x) < 0.005  # the outliers plus a few of the bulk's far tail
    lo_a, hi_a = choose_range(x[None], INT8, _spec(range="entropy", symmetric=False))
    assert -35.0 <= float(lo_a) < 0 < float(hi_a) <= 60.0 and float(hi_a) == pytest.approx(float(hi))


def test_entropy_without_outliers_keeps_nearly_everything():
    x = torch.rand(1, 4096, generator=torch.Generator().manual_seed(1)) * 2 - 1  # uniform: nothing to clip
    lo, hi = choose_range(x, INT8, _spec(range="entropy"))
    assert float(hi) >= 0.9 * float(x.abs().max())
    assert float(hi) <= float(x.abs().max())


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_histogram_weights_give_nearly_the_raw_range(method):
    """Calibration passes bin centres and counts; the range must match the raw data's within a bin
    (entropy: both clip the outliers but keep the bulk)."""
    x = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(2)), torch.tensor([12.0, -9.0])])
    bins = 2048
    edges = torch.linspace(float(x.min()), float(x.max()), bins + 1, dtype=torch.float64)
    idx = ((x.double() - edges[0]) / (edges[-1] - edges[0]) * bins).long().clamp(0, bins - 1)
    counts = torch.bincount(idx, minlength=bins).double()
    centres = ((edges[1:] + edges[:-1]) / 2).float()
    spec = _spec(range=method, percentile=99.9)
    _, hi_raw = choose_range(x[None], INT8, spec)
    _, hi_hist = choose_range(centres[None], INT8, spec, counts[None])
    width = float(edges[1] - edges[0])
    if method == "entropy":  # the KL search sees a re-binned histogram: same decision, not the same bin
        assert 3.0 < float(hi_raw) < 9.0 and 3.0 < float(hi_hist) < 9.0
    else:
        assert abs(float(hi_hist) - float(hi_raw)) <= width
    assert float(hi_hist) < 12.0


def test_static_ranges_from_calibration_statistics():
    s = ActivationStats(min=-4.0, max=3.0, ema_min=-2.0, ema_max=1.0)
    assert s.static_range(INT8, _spec(range="moving_average", symmetric=False)) == (-2.0, 1.0)
    assert s.static_range(INT8, _spec(range="moving_average", symmetric=True)) == (-2.0, 2.0)
    assert s.static_range(INT8, _spec(range="minmax", symmetric=False)) == (-4.0, 3.0)
    assert s.static_range(INT8, _spec(range="minmax", symmetric=True)) == (-4.0, 4.0)
    # outside calibration, a moving average of one tensor is its min-max
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    lo, hi = choose_range(x, INT8, _spec(range="moving_average", symmetric=False))
    assert (float(lo), float(hi)) == (-1.0, 2.0)


@pytest.mark.parametrize("method", list(RANGE_METHODS))
@pytest.mark.parametrize("symmetric", [True, False])
def test_degenerate_blocks_give_finite_ranges(method, symmetric):
    x = torch.tensor([[0.0] * 8, [5.0] * 8, [-2.0] * 7 + [0.0], [1e-30] * 4 + [-1e-30] * 4,
                      [1e30] * 4 + [-3e38] * 4])
    lo, hi = choose_range(x, INT8, _spec(range=method, symmetric=symmetric, percentile=99.0))
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and torch.all(lo <= hi)
    assert float(lo[0]) == 0.0 and float(hi[0]) == 0.0  # all-zero block
    assert float(hi[1]) == 5.0  # constant block keeps its value
    dq = fake_quantize(x, {"format": "int8", "granularity": "per_channel", "range": method,
                           "symmetric": symmetric, "percentile": 99.0})
    assert torch.isfinite(dq).all()
    assert torch.equal(dq[0], x[0])
    torch.testing.assert_close(dq[1], x[1], rtol=1e-6, atol=0)


# ---- bounded work: chunks of blocks, and a limit on entropy blocks -------------------------------
CHUNK_CASES = [(m, "int8", True, False) for m in RANGE_METHODS] + [(m, "int4", False, True) for m in RANGE_METHODS] + [
    ("mse", "nf4", True, False), ("mse", "fp8_e4m3", True, True)]  # mse is the method that encodes


@pytest.mark.parametrize("method,fmt,symmetric,weighted", CHUNK_CASES)
def test_chunked_ranges_equal_one_call(monkeypatch, method, fmt, symmetric, weighted):
    """choose_range in chunks of 3 blocks (and a last chunk of 1) gives bit-identical ranges to the
    method called once on all blocks."""
    from qcore.numerics import ranges

    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 40, generator=g) * torch.logspace(-2, 2, 7)[:, None]
    x[3, 5] = 40.0  # an outlier block
    w = torch.randint(0, 4, x.shape, generator=g).double() if weighted else None
    spec = _spec(format=fmt, symmetric=symmetric, range=method, scaled=fmt.startswith("fp8"))
    whole = RANGE_METHODS[method](x, spec.fmt, spec, w)
    monkeypatch.setattr(ranges, "CHUNK_BYTES", 3 * ranges.block_bytes(method, x.shape[1]))
    chunked = choose_range(x, spec.fmt, spec, w)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


PEAK_SCRIPT = r"""
import resource, sys, torch
torch.set_num_threads(1)
from qcore.numerics import ranges
from qcore.numerics.spec import TensorSpec
ranges.CHUNK_BYTES = int(sys.argv[1])
spec = TensorSpec(format="int8", granularity="per_group", group_size=32, range="entropy")
x = torch.randn(200, 32, generator=torch.Generator().manual_seed(0))
ranges.choose_range(x[:2], spec.fmt, spec)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lo, hi = ranges.choose_range(x, spec.fmt, spec)
assert lo.shape == (200,) and bool((hi > 0).all())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)  # MiB (ru_maxrss is KiB)
"""


def test_entropy_memory_stays_within_the_chunk_budget():
    """200 groups of 32 values with 2048-bin histograms need ~50 MiB in one call; with a 4 MiB chunk
    budget the peak RSS grows by under 20 MiB. (Measured in a fresh process.)"""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(4 * 2**20)], capture_output=True, text=True,
                         cwd=root, timeout=120, check=True)
    assert float(out.stdout.strip()) < 20


def test_entropy_on_too_many_blocks_is_refused_at_once():
    """minilm-l6's word embeddings (30522 x 384) in groups of 32 would be 366,264 histograms (7.3 GiB
    in one call, over an hour of work): one line naming the method, granularity and a way out."""
    import time

    from qcore.errors import QcoreError

    w = torch.zeros(30522, 384)
    start = time.perf_counter()
    with pytest.raises(QcoreError) as e:
        quantize(w, {"format": "int8", "granularity": "per_group", "group_size": 32, "range": "entropy"})
    assert time.perf_counter() - start < 2
    msg = str(e.value)
    assert "\n" not in msg and "'entropy'" in msg and "per_group of 32" in msg and "366,264 blocks" in msg
    assert "per_channel" in msg and "minmax" in msg
