"""The clipping search on the output error against a brute-force loop written out in the test (one group: every
shrink factor tried, the output error ``||X (w - q)||^2`` measured on the inputs themselves), its never-worse
property on the calibration data, zero/constant groups, and GPTQ on the searched grid."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qcore.algorithms.clip import clipped_params, hessian_blocks
from qcore.algorithms.gptq import gptq_quantize
from qcore.numerics.quantize import quantize
from qcore.numerics.spec import TensorSpec


def brute_force_range(w: np.ndarray, X: np.ndarray, factors, qmax: int = 15):
    """One row's one group, int4 affine by hand: for each factor p the range [p*min, p*max] (0 kept inside),
    scale (hi-lo)/qmax, zero round(-lo/scale), codes clamp(round(w/s)+z, 0, qmax); the p whose
    ||X (w - w')||^2 is smallest (the first on ties)."""
    best = None
    for p in factors:
        lo, hi = min(w.min() * p, 0.0), max(w.max() * p, 0.0)
        s = (hi - lo) / qmax
        z = np.clip(np.round(-lo / s), 0, qmax)
        wq = (np.clip(np.round(w / s) + z, 0, qmax) - z) * s
        err = float(np.sum((X @ (w - wq)) ** 2))
        if best is None or err < best[0]:
            best = (err, lo, hi)
    return best


def test_one_group_picks_the_range_a_brute_force_loop_picks():
    rng = np.random.default_rng(0)
    spec = TensorSpec(format="int4", granularity="per_group", group_size=16, symmetric=False)
    factors = [1 - i / 20 for i in range(10)]  # grid 20: 1, 0.95, ..., 0.55
    for trial in range(20):
        w = rng.normal(size=16)
        w[rng.integers(16)] *= 4  # an outlier: clipping it can pay
        X = rng.normal(size=(64, 16)) * rng.uniform(0.1, 3, size=16)
        err, lo, hi = brute_force_range(w, X, factors)
        H = torch.tensor(X.T @ X)
        got_lo, got_hi, _, _ = clipped_params(spec, torch.tensor(w[None], dtype=torch.float32),
                                              hessian_blocks(H, spec, 16), grid=20)
        assert float(got_lo[0]) == pytest.approx(lo, rel=1e-5) and float(got_hi[0]) == pytest.approx(hi, rel=1e-5)


def _deq(w2, spec, params):
    lo, hi, scale, zp = params
    blocks = w2.reshape(-1, spec.group_size)
    codes = torch.clamp(torch.round(blocks / scale[:, None]) + zp[:, None], spec.fmt.qmin, spec.fmt.qmax)
    return ((codes - zp[:, None]) * scale[:, None]).reshape(w2.shape)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.integers(1, 8), st.sampled_from([16, 32, 64]), st.sampled_from([4, 8, 16]), st.booleans(),
       st.integers(0, 10_000))
def test_never_worse_than_the_original_range_on_the_calibration_data(rows, cols, g, symmetric, seed):
    """With inputs whose groups are independent (H block-diagonal, the search's own objective is then the whole
    output error), the searched grid's output error is at most the min-max grid's."""
    gen = torch.Generator().manual_seed(seed)
    spec = TensorSpec(format="int4", granularity="per_group", group_size=g, symmetric=symmetric)
    W = torch.randn(rows, cols, generator=gen) * torch.rand(rows, cols, generator=gen).pow(4) * 5
    X = torch.randn(128, cols, generator=gen) * torch.rand(cols, generator=gen) * 3
    H = torch.block_diag(*[(X[:, i:i + g].T @ X[:, i:i + g]) for i in range(0, cols, g)]).double()
    searched = _deq(W, spec, clipped_params(spec, W, hessian_blocks(H, spec, cols), grid=20))
    nearest = quantize(W, spec).dequantize()

    def err(q):
        d = (W - q).double()
        return float(torch.einsum("oi,ij,oj->", d, H, d))
    assert err(searched) <= err(nearest) * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("case", ["zero weights", "constant weights", "dead inputs", "tiny", "huge"])
def test_zero_constant_tiny_huge_groups_and_dead_inputs_stay_finite(case):
    spec = TensorSpec(format="int4", granularity="per_group", group_size=8, symmetric=False)
    W = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    X = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    W = {"zero weights": W * 0, "constant weights": torch.full((3, 16), 0.7), "tiny": W * 1e-30,
         "huge": W * 1e30}.get(case, W)
    H = (X.T @ X).double() * (0 if case == "dead inputs" else 1)
    lo, hi, scale, zp = clipped_params(spec, W, hessian_blocks(H, spec, 16), grid=20)
    assert all(torch.isfinite(t).all() for t in (lo, hi, scale, zp))
    if case in ("dead inputs", "zero weights", "constant weights"):  # nothing to gain: the original range is kept
        want = quantize(W, spec)
        assert torch.equal(scale, want.scale) and torch.equal(zp, want.zero_point)
    got = gptq_quantize(W, H, spec, clip=20).dequantize()
    assert torch.isfinite(got).all()


def test_gptq_on_the_searched_grid_lowers_the_output_error_on_an_outlier_weight():
    gen = torch.Generator().manual_seed(4)
    spec = TensorSpec(format="int4", granularity="per_group", group_size=32, symmetric=False)
    W = torch.randn(32, 128, generator=gen)
    W[torch.rand(32, 128, generator=gen) < 0.02] *= 8  # a few outliers per row, as in minilm's FFN weights
    X = torch.randn(512, 128, generator=gen) @ torch.randn(128, 128, generator=gen)
    H = X.T @ X

    def err(q):
        return float(((W - q.dequantize()) @ X.T).pow(2).sum())
    plain, clipped = gptq_quantize(W, H, spec), gptq_quantize(W, H, spec, clip=20)
    assert err(clipped) < err(quantize(W, spec)) and err(plain) < err(quantize(W, spec))
    assert not torch.equal(clipped.scale, plain.scale)  # the grid itself moved, not only the codes
