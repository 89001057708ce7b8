"""Output metrics: SQNR in dB (with its finite cap), cosine similarity, KL divergence, accuracy."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qcore import QcoreError
import numpy as np
from hypothesis.extra.numpy import arrays

from qcore.numerics.metrics import (SQNR_EXACT_DB, classification_metrics, kl_divergence, mean_cosine, sqnr_db,
                                    sqnr_db_from_sums)


def test_sqnr_known_values_and_caps():
    ref = torch.ones(4, 2)
    assert sqnr_db(ref + 0.1, ref) == pytest.approx(20.0)  # signal 8, noise 0.08 -> 100x
    assert sqnr_db(ref * 0.0, ref) == pytest.approx(0.0)  # noise == signal
    assert sqnr_db(ref, ref) == SQNR_EXACT_DB == 200.0  # identical: the finite cap, valid JSON
    assert sqnr_db(ref + 1e-30, ref) == SQNR_EXACT_DB  # beyond the cap is capped
    assert sqnr_db(ref, torch.zeros(4, 2)) == -SQNR_EXACT_DB  # no signal, some noise
    assert sqnr_db(torch.zeros(3), torch.zeros(3)) == SQNR_EXACT_DB
    assert sqnr_db(torch.tensor([1e30, -1e30]), torch.tensor([1.1e30, -1e30])) == pytest.approx(
        10 * math.log10((1.1**2 + 1) / 0.01), rel=1e-9)  # no overflow: computed in float64


_values = arrays(np.float32, st.integers(1, 40), elements=st.floats(-1e3, 1e3, width=32))


@given(x=_values, delta=_values)
def test_sqnr_from_sums_and_from_tensors_match_numpy_in_float64(x, delta):
    y = (x + np.resize(delta, x.shape)).astype(np.float32)  # x perturbed by delta (repeated to x.shape)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    signal, noise = float(np.sum(x64**2)), float(np.sum((y64 - x64) ** 2))
    if noise == 0.0:
        expected = 200.0
    elif signal == 0.0:
        expected = -200.0
    else:
        expected = float(np.clip(10 * np.log10(signal / noise), -200.0, 200.0))
    assert sqnr_db_from_sums(signal, noise) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert sqnr_db(torch.from_numpy(y), torch.from_numpy(x)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("signal, noise", [(float("nan"), 1.0), (1.0, float("nan")), (float("inf"), 1.0),
                                           (1.0, float("inf"))])
def test_sqnr_from_sums_refuses_non_finite_sums(signal, noise):
    with pytest.raises(QcoreError, match="finite"):
        sqnr_db_from_sums(signal, noise)


@given(bits=st.integers(3, 12), seed=st.integers(0, 1000))
def test_sqnr_of_a_uniform_grid_is_about_six_db_per_bit(bits, seed):
    x = torch.rand(20000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    step = 2.0 / 2**bits
    xq = torch.round(x / step) * step
    # noise step^2/12 against signal 1/3 (uniform on [-1, 1]): 6.02 dB per bit
    assert sqnr_db(xq, x) == pytest.approx(20 * math.log10(2) * bits, abs=0.3)


def test_cosine_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0], [0.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    # orthogonal 0, parallel 1, both zero 1 (identical), opposite -1, one zero 0
    assert mean_cosine(a, b) == pytest.approx((0 + 1 + 1 - 1 + 0) / 5)
    x = torch.randn(3, 4, 5)
    assert mean_cosine(x, x) == pytest.approx(1.0)
    assert mean_cosine(torch.full((2, 3), 1e-30), torch.full((2, 3), 2e-30)) == pytest.approx(1.0)
    assert mean_cosine(torch.full((2, 3), 1e30), torch.full((2, 3), 3e30)) == pytest.approx(1.0)


def test_kl_known_values():
    # KL(p || q), p = softmax(reference) = (1/2, 1/2), q = softmax(logits) = (3/4, 1/4)
    ref = torch.tensor([[0.0, 0.0]])
    logits = torch.tensor([[math.log(3.0), 0.0]])
    assert kl_divergence(logits, ref) == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert kl_divergence(ref, ref) == 0.0
    x = torch.randn(8, 10)
    assert kl_divergence(x + 5.0, x) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    assert kl_divergence(x * 3.0, x) > 0.0
    big = torch.tensor([[1e4, 0.0], [0.0, 1e4]])
    assert math.isfinite(kl_divergence(big.flip(1), big)) and kl_divergence(big.flip(1), big) == pytest.approx(1e4)


def test_classification_metrics_by_hand():
    ref = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    out = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])
    m = classification_metrics(out, ref, labels)
    assert m["agreement"] == 0.75  # sample 1 flips from class 1 to 2
    assert m["accuracy"] == 0.5  # samples 0 and 2 right
    assert m["per_class_accuracy"] == [1.0, 0.0, 1.0]
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(36.0 / 10.0))
    assert m["cosine"] == pytest.approx((3 * 2 / (3 * math.sqrt(5)) + 3 / (3 * math.sqrt(5)) + 1 + 1) / 4)
    assert m["kl_div"] > 0
    assert classification_metrics(out, ref, labels, num_classes=4)["per_class_accuracy"] == [1.0, 0.0, 1.0, None]
    unlabeled = classification_metrics(ref, ref, None)
    assert unlabeled == {"agreement": 1.0, "sqnr_db": SQNR_EXACT_DB, "cosine": pytest.approx(1.0), "kl_div": 0.0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("metric", [sqnr_db, mean_cosine, kl_divergence])
def test_non_finite_outputs_are_a_clear_error_not_nan(metric, bad):
    ref = torch.randn(4, 3)
    out = ref.clone()
    out[1, 2] = bad
    for args in ((out, ref), (ref, out)):
        with pytest.raises(QcoreError) as e:
            metric(*args)
        assert "\n" not in str(e.value) and "NaN or infinite" in str(e.value)
