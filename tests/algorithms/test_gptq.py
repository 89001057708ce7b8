"""GPTQ against a direct computation of its update, nearest rounding as its H = identity case, and the
property it exists for: a lower layer output error than rounding to nearest on the same grid."""

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qcore.algorithms.gptq import gptq_quantize, one_thread
from qcore.numerics.quantize import quantize
from qcore.numerics.spec import TensorSpec


def obs_reference(W: np.ndarray, H: np.ndarray, damp: float, bits: int) -> np.ndarray:
    """GPTQ written straight from the OBS formula, float64, natural column order, int-b symmetric
    per-channel grid from the original weight: round column j, then update the columns still free (F)
    with the inverse of H restricted to them, recomputed from scratch at every step."""
    W = W.astype(np.float64).copy()
    n = W.shape[1]
    H = H + np.eye(n) * damp * np.mean(np.diag(H))
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(W).max(axis=1) / qmax  # one scale per output row
    Q = np.zeros_like(W)
    for j in range(n):
        free = list(range(j, n))
        Hinv = np.linalg.inv(H[np.ix_(free, free)])
        q = np.clip(np.round(W[:, j] / scale), -qmax - 1, qmax) * scale
        Q[:, j] = q
        W[:, free] -= np.outer((W[:, j] - q) / Hinv[0, 0], Hinv[0, :])
    return Q


def test_gptq_on_a_4x8_weight_matches_the_obs_update_written_out():
    rng = np.random.default_rng(3)
    W = rng.normal(size=(4, 8))
    X = rng.normal(size=(32, 8)) @ rng.normal(size=(8, 8))  # correlated inputs: the update matters
    H = X.T @ X
    expected = obs_reference(W, H, damp=0.01, bits=4)
    spec = TensorSpec(format="int4", granularity="per_channel")
    for block_size in (2, 3, 128):  # lazy block updates give the same result as column by column
        got = gptq_quantize(torch.tensor(W, dtype=torch.float32), torch.tensor(H), spec, damp=0.01,
                            act_order=False, block_size=block_size)
        np.testing.assert_allclose(got.dequantize().numpy(), expected, rtol=0, atol=1e-5)
    nearest = quantize(torch.tensor(W, dtype=torch.float32), spec).dequantize().numpy()
    assert np.abs(nearest - expected).max() > 0.1  # the update really moved weights to other grid points


SPECS = st.sampled_from([
    TensorSpec(format="int4", granularity="per_group", group_size=8, symmetric=False),
    TensorSpec(format="int3", granularity="per_channel"),
    TensorSpec(format="int8", granularity="per_tensor", symmetric=False),
    TensorSpec(format="int4", granularity="per_group", group_size=4, range="mse"),
])


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.sampled_from([8, 16, 24]), SPECS, st.booleans(), st.integers(0, 10_000))
def test_identity_hessian_gives_rounding_to_nearest(rows, cols, spec, act_order, seed):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    got = gptq_quantize(W, torch.eye(cols), spec, act_order=act_order, block_size=5)
    want = quantize(W, spec)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    assert (got.zero_point is None) == (want.zero_point is None)
    if want.zero_point is not None:
        assert torch.equal(got.zero_point, want.zero_point)


def output_error(W, Wq, X):
    return float(((W - Wq) @ X.T).pow(2).sum())


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(4, 12), st.sampled_from([16, 32]), SPECS, st.booleans(), st.integers(0, 10_000))
def test_gptq_lowers_the_layer_output_error_below_nearest(rows, cols, spec, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(256, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    got = gptq_quantize(W, X.T @ X, spec, act_order=act_order, block_size=8)
    assert output_error(W, got.dequantize(), X) < output_error(W, quantize(W, spec).dequantize(), X)


@pytest.mark.parametrize("case", ["zero input channel", "rank deficient", "no data", "indefinite"])
def test_singular_or_ill_conditioned_hessians_give_finite_codes(case):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 8, generator=g)
    X = torch.randn(50, 8, generator=g)
    if case == "zero input channel":
        X[:, 3] = 0
    if case == "rank deficient":
        X = torch.randn(50, 2, generator=g) @ torch.randn(2, 8, generator=g)  # rank 2 of 8
    H = X.T @ X
    if case == "no data":
        H = torch.zeros(8, 8)
    if case == "indefinite":  # positive diagonal, negative eigenvalues: Cholesky fails until damping grows
        H = torch.ones(8, 8) * 2 - torch.eye(8)
    spec = TensorSpec(format="int4", granularity="per_group", group_size=4)
    got = gptq_quantize(W, H, spec)
    deq = got.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(got.scale).all()
    nearest = quantize(W, spec)
    if case in ("zero input channel", "no data"):  # a dead input channel is rounded to nearest
        assert torch.equal(got.codes[:, 3], nearest.codes[:, 3])
    if case == "rank deficient":
        assert output_error(W, deq, X) < output_error(W, nearest.dequantize(), X)


def test_a_conv_weight_is_read_as_c_out_by_fan_in():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 2, 3, 3, generator=g)
    X = torch.randn(100, 18, generator=g) @ torch.randn(18, 18, generator=g)
    spec = TensorSpec(format="int4", granularity="per_channel")
    got = gptq_quantize(W, X.T @ X, spec)
    flat = gptq_quantize(W.reshape(4, 18), X.T @ X, spec)
    assert got.shape == (4, 2, 3, 3) and torch.equal(got.codes.reshape(4, 18), flat.codes)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(1, 40), st.sampled_from([8, 24, 64]), SPECS, st.booleans(), st.integers(0, 10_000))
def test_one_thread_gives_the_same_codes_as_the_callers_threads(rows, cols, spec, act_order, seed):
    """``gptq_quantize`` runs its loop on one intra-op thread; undecorated, on two, it must give the same
    codes and scales (the speed-up changes nothing but the time)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(128, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = gptq_quantize.__wrapped__(W, X.T @ X, spec, act_order=act_order, block_size=16)
        got = gptq_quantize(W, X.T @ X, spec, act_order=act_order, block_size=16)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)


def test_one_thread_is_restored_and_leaves_running_threads_alone():
    started, asked, seen = threading.Event(), threading.Event(), []

    def worker():  # a thread already using torch, as a Streamlit session's is
        torch.ones(2).sum()
        outside = torch.get_num_threads()
        started.set()
        asked.wait()
        seen.append((outside, torch.get_num_threads()))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    thread = threading.Thread(target=worker)
    try:
        thread.start()
        started.wait()
        with one_thread():
            assert torch.get_num_threads() == 1
            asked.set()
            thread.join()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    outside, during = seen[0]
    assert during == outside  # only the calling thread ran on one
