"""SmoothQuant, AWQ, CLE and bias correction as tensor math (``qcore.algorithms``), each against a hand
computation or a direct one written here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.algorithms.awq import awq_scales
from qcore.algorithms.bias_correction import corrected_bias
from qcore.algorithms.cle import equalization_scales
from qcore.algorithms.smoothquant import smoothing_scales
from qcore.errors import QcoreError


def int4_per_row(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 per output row, absmax / 7, round half to even: the oracle quantizer."""
    scale = (w.abs().amax(1, keepdim=True) / 7).clamp(min=1e-12)
    return torch.round(w / scale).clamp(-8, 7) * scale


def test_smoothquant_scales_follow_the_paper_formula_by_hand():
    # channel 0: X 16, W 1 -> s = 16^0.5 / 1^0.5 = 4 ; channel 1: X 1, W 4 -> 1 / 2 = 0.5
    s = smoothing_scales(torch.tensor([16.0, 1.0]), torch.tensor([1.0, 4.0]), 0.5)
    assert s.tolist() == pytest.approx([4.0, 0.5])
    # alpha 0.75: 16^0.75 / 1^0.25 = 8
    assert float(smoothing_scales(torch.tensor([16.0]), torch.tensor([1.0]), 0.75)[0]) == pytest.approx(8.0)


def test_smoothquant_balances_both_maxima_and_lowers_the_activation_max_over_mean():
    act = torch.tensor([100.0, 1.0, 2.0, 1.5])  # one outlier channel: max/mean = 100 / 26.1
    w = torch.tensor([0.5, 0.4, 0.6, 0.5])
    s = smoothing_scales(act, w, 0.5)
    after_x, after_w = act / s, w * s
    assert torch.allclose(after_x, torch.sqrt(act * w)) and torch.allclose(after_w, torch.sqrt(act * w))
    ratio = lambda v: float(v.max() / v.mean())
    # by hand: sqrt(act * w) = [7.0711, 0.6325, 1.0954, 0.8660], mean 2.4163: max/mean 3.83 -> 2.926
    assert ratio(act) == pytest.approx(100 / 26.125)
    assert ratio(after_x) == pytest.approx(7.0711 / 2.41625, rel=1e-4)


def test_smoothquant_guards_zero_and_non_finite_channels():
    s = smoothing_scales(torch.tensor([0.0, 4.0, float("inf"), 1.0]), torch.tensor([1.0, 0.0, 1.0, 1.0]), 0.5)
    assert s.tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(QcoreError) as e:
        smoothing_scales(torch.ones(2), torch.ones(2), 1.5)
    assert "\n" not in str(e.value)


def test_cle_scales_equalise_both_ranges_to_their_geometric_mean():
    r1, r2 = torch.tensor([8.0, 0.5, 2.0, 0.0]), torch.tensor([2.0, 2.0, 2.0, 3.0])
    s = equalization_scales(r1, r2)
    assert s[:3].tolist() == pytest.approx([2.0, 0.5, 1.0]) and s[3] == 1.0  # sqrt(r1 / r2); zero range: 1
    assert (r1 / s)[:3].tolist() == pytest.approx((r2 * s)[:3].tolist())
    assert (r1 / s)[:3].tolist() == pytest.approx([4.0, 1.0, 2.0])  # sqrt(16), sqrt(1), sqrt(4)


def test_bias_correction_zeroes_the_mean_output_error_of_a_linear_on_its_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g) + torch.linspace(-2, 3, 16)  # inputs with a non-zero mean
    w, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    wq = int4_per_row(w)
    b2 = corrected_bias(b, w, wq, x.mean(0))
    before = (x @ wq.T + b - (x @ w.T + b)).mean(0)
    after = (x @ wq.T + b2 - (x @ w.T + b)).mean(0)
    assert before.abs().max() > 0.05
    assert after.abs().max() < 1e-4
    # direct: b + (W - Wq) E[x], written out element by element
    direct = [float(b[o]) + sum(float(w[o, i] - wq[o, i]) * float(x[:, i].mean()) for i in range(16)) for o in range(8)]
    assert b2.tolist() == pytest.approx(direct, abs=1e-4)


def test_bias_correction_of_a_conv_sums_the_kernel_and_respects_groups():
    w = torch.ones(4, 1, 3, 3)
    wq = torch.zeros(4, 1, 3, 3)  # error 1 on each of 9 taps
    mean = torch.tensor([1.0, 2.0])  # depthwise-like: groups 2, two output channels per group
    b2 = corrected_bias(None, w, wq, mean, groups=2)
    assert b2.tolist() == [9.0, 9.0, 18.0, 18.0]


@settings(max_examples=12, deadline=None)
@given(c=st.integers(4, 24), o=st.integers(2, 12), outlier=st.floats(5.0, 80.0), seed=st.integers(0, 10_000))
def test_awq_chosen_scale_lowers_the_output_error_versus_no_scale(c, o, outlier, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, c, generator=g)
    x[:, 0] *= outlier  # one salient input channel
    w = torch.randn(o, c, generator=g)
    result = awq_scales(x, [w], [int4_per_row], grid=10)

    def error(s):  # || X W^T - (X / s) Q(W s)^T ||^2 per sample, computed here
        return float(((x / s) @ int4_per_row(w * s).T - x @ w.T).pow(2).sum()) / len(x)

    assert result.losses[0] == pytest.approx(error(torch.ones(c)), rel=1e-5)  # alpha 0 is round-to-nearest
    assert error(result.scales) == pytest.approx(min(result.losses), rel=1e-5)
    assert error(result.scales) <= error(torch.ones(c)) * (1 + 1e-6)
    assert math.isfinite(result.alpha) and 0 <= result.alpha < 1


def test_awq_beats_no_scale_clearly_when_one_channel_dominates():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g) * 0.1
    x[:, 3] *= 300
    w = torch.randn(16, 32, generator=g)
    result = awq_scales(x, [w], [int4_per_row], grid=20)
    assert result.alpha > 0 and min(result.losses) < 0.7 * result.losses[0]


def _int8_rows(w):  # symmetric int8 per output row, round half to even: the test's own weight quantizer
    scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(w / scale).clamp(-128, 127) * scale


def _uint8_tensor(x):  # asymmetric 8-bit per tensor over [min(lo, 0), max(hi, 0)]: the test's input quantizer
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    zp = round(-lo / scale)
    return (torch.round(x / scale) + zp).clamp(0, 255).sub(zp) * scale


def test_search_alpha_picks_the_alpha_of_least_quantized_output_error_and_never_loses_to_no_smoothing():
    from qcore.algorithms.smoothquant import ALPHA_GRID, search_alpha

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    x[:, 2] *= 80.0  # one outlier channel, as after BERT's LayerNorm
    w = torch.randn(10, 12, generator=g) * 0.1
    r = search_alpha(x, x.abs().amax(0), [w], [_int8_rows], _uint8_tensor)
    want = []
    for alpha in (None, *ALPHA_GRID):  # the objective computed here: s by the paper's formula, plain torch
        s = torch.ones(12) if alpha is None else x.abs().amax(0) ** alpha / w.abs().amax(0) ** (1 - alpha)
        want.append(float(((_uint8_tensor(x / s) @ _int8_rows(w * s).T - x @ w.T) ** 2).sum()) / len(x))
    assert r.losses == pytest.approx(want, rel=1e-4)
    best = min(range(len(want)), key=want.__getitem__)
    assert r.alpha == (None, *ALPHA_GRID)[best] and r.alpha is not None
    assert min(r.losses) < r.losses[0] / 4  # smoothing the outlier channel helps a lot here
    # nothing to migrate (an all-zero input): no NaN, and "no smoothing" is kept
    from qcore.numerics.quantize import fake_quantize

    uint8 = {"format": "int8", "symmetric": False, "granularity": "per_tensor"}  # the engine's, which takes zeros
    z = search_alpha(torch.zeros(8, 12), torch.zeros(12), [w], [_int8_rows], lambda v: fake_quantize(v, uint8))
    assert torch.isfinite(z.scales).all() and all(math.isfinite(v) for v in z.losses)
