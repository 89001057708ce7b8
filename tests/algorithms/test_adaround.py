"""AdaRound: the grid is nearest rounding's, each code is its floor or ceiling, and the learned rounding
lowers the layer's output error on the calibration inputs below rounding to nearest."""

import torch
from hypothesis import given, settings, strategies as st

from qcore.algorithms.adaround import adaround
from qcore.numerics.quantize import quantize
from qcore.numerics.spec import TensorSpec

SPECS = st.sampled_from([TensorSpec(format="int3", granularity="per_channel"),
                         TensorSpec(format="int4", granularity="per_group", group_size=8, symmetric=False)])


def relu_inputs(n, cols, g):
    return torch.relu(torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(st.integers(4, 12), st.sampled_from([16, 32]), SPECS, st.integers(0, 10_000))
def test_adaround_lowers_the_output_error_and_only_rounds_up_or_down(rows, cols, spec, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.1
    X = relu_inputs(256, cols, g)
    got = adaround(W, X, spec, iters=100, reg=0.01)
    nearest = quantize(W, spec)
    assert torch.equal(got.scale, nearest.scale)  # the same grid
    # every code is the floor or the ceiling of w / s (+ z), clamped to the code range: computed by hand here
    s = nearest.scale.reshape(rows, -1).repeat_interleave(cols // nearest.scale.reshape(rows, -1).shape[1], dim=1)
    z = torch.zeros_like(s) if nearest.zero_point is None else \
        nearest.zero_point.reshape(rows, -1).repeat_interleave(s.shape[1] // nearest.zero_point.reshape(rows, -1).shape[1], 1)
    lo, hi = -(2 ** (spec.fmt.bits - 1)), 2 ** (spec.fmt.bits - 1) - 1
    down = torch.clamp(torch.floor(W / s) + z, lo, hi)
    up = torch.clamp(torch.floor(W / s) + 1 + z, lo, hi)
    assert bool(((got.codes == down) | (got.codes == up)).all())
    err = lambda q: float(((W - q.dequantize()) @ X.T).pow(2).sum())  # noqa: E731
    assert err(got) < err(nearest)


def test_zero_input_channel_and_a_constant_weight_stay_finite():
    g = torch.Generator().manual_seed(0)
    X = relu_inputs(200, 8, g)
    X[:, 2] = 0
    for W in (torch.randn(4, 8, generator=g), torch.zeros(4, 8), torch.full((4, 8), 1e-30)):
        got = adaround(W, X, TensorSpec(format="int3", granularity="per_channel"), iters=20)
        assert torch.isfinite(got.dequantize()).all()
    W = torch.randn(4, 8, generator=g)
    no_data = adaround(W, torch.zeros(0, 8), TensorSpec(format="int4"), iters=20)  # nothing to learn from
    assert torch.equal(no_data.codes, quantize(W, TensorSpec(format="int4")).codes)
