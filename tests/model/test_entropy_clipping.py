"""The entropy (KL) range says when it clips a lot of a layer's input.

On the real model ocr-rec (int8-static, per-tensor activations), entropy drops the per-sample cosine to FP32 to
0.24-0.58 while minmax/percentile/mse stay at 0.89-0.98. That is the method, not a bug of ours: TensorRT's published
algorithm (pytorch-quantization ``_compute_amax_entropy``) and ONNX Runtime's ``HistogramCollector`` thresholds applied
to the same activations give 0.237 and 0.241 (README, "Range methods"). KL calibration fits the bulk of the histogram
and clips the tail; where a few large values carry the signal (squeeze-excitation inputs: 180 values, 70% zeros,
clipped from 14.9 to 1.15) that destroys the output. So the simulation says it: ``ActivationStats.clipped_energy``
(share of sum x^2 that the clip removes) and one note when it passes ``CLIP_NOTE_SHARE``.

Oracles: numpy ``clip`` of the raw calibration samples (not the histogram), and ORT's own entropy threshold.
"""

from __future__ import annotations

import io
import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from qcore.model.calibrate import CLIP_NOTE_SHARE, calibrate, entropy_clip_note
from qcore.model.simulate import simulate
from qcore.recipe import Recipe


def _energy_clipped(x: np.ndarray, lo: float, hi: float) -> float:
    x = x.astype(np.float64)
    return float(((np.clip(x, lo, hi) - x) ** 2).sum() / (x ** 2).sum())


def _stats(x: torch.Tensor):
    """Calibration statistics of ``x`` (rows of 4 features) as the input of one Linear layer, in two batches."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    half = len(x) // 2
    return model, calibrate(model, {"0": model[0]}, [(x[:half],), (x[half:],)])["0"]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3), tail=st.floats(0.0, 0.05),
       q_lo=st.floats(0.0, 0.2), q_hi=st.floats(0.8, 1.0))
def test_clipped_energy_is_numpys_clip_error_over_the_raw_samples(seed, scale, tail, q_lo, q_hi):
    g = np.random.default_rng(seed)
    x = g.normal(0, 1, (400, 4)) * np.where(g.random((400, 4)) < tail, 30.0, 1.0) * scale
    _, s = _stats(torch.from_numpy(x).float())
    xf = x.astype(np.float32).astype(np.float64)
    lo, hi = float(np.quantile(xf, q_lo)), float(np.quantile(xf, q_hi))
    # bin centres are within half a bin (range / 4096) of the samples: the shares agree to well under a percent
    assert s.clipped_energy(lo, hi) == pytest.approx(_energy_clipped(xf, lo, hi), abs=5e-3)
    assert s.clipped_energy(float(xf.min()), float(xf.max())) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("value", [0.0, 1e-30, 3.0, -1e30])
def test_clipped_energy_of_zero_constant_tiny_and_huge_inputs_is_finite(value):
    _, s = _stats(torch.full((10, 4), value))
    for lo, hi in ((s.min, s.max), (0.0, 0.0), (-1.0, 1.0)):
        share = s.clipped_energy(lo, hi)
        assert np.isfinite(share) and 0.0 <= share <= 1.0
    assert s.clipped_energy(s.min, s.max) == 0.0
    if value == 3.0:
        assert s.clipped_energy(-1.0, 1.0) == pytest.approx(4 / 9)  # every 3 clipped to 1: (3 - 1)^2 / 3^2


def _recipe(rng: str) -> Recipe:
    return Recipe.from_dict({"name": "t", "weights": {"format": "fp32"},
                             "activations": {"format": "int8", "symmetric": False, "range": rng}})


def _heavy_tail(seed=0) -> torch.Tensor:
    """2000 rows of 4: a bulk N(0, 0.05) and 1% outliers of +-20 that hold almost all of the energy."""
    g = np.random.default_rng(seed)
    x = g.normal(0, 0.05, (2000, 4))
    x[g.random((2000, 4)) < 0.01] = 20.0 * g.choice([-1.0, 1.0])
    return torch.from_numpy(x).float()


def test_entropy_clipping_the_energy_of_a_heavy_tail_gets_a_note_naming_the_layer():
    x = _heavy_tail()
    model, s = _stats(x)
    sim = simulate(model, _recipe("entropy"), {"0": s})
    lo, hi = s.static_range(sim.recipe.defaults.activations.fmt, sim.recipe.defaults.activations)
    share = _energy_clipped(x.double().numpy(), lo, hi)
    assert share > 0.5  # the oracle: KL cut the outliers, which carry most of the energy
    notes = [n for n in sim.notes if "range entropy" in n]
    assert len(notes) == 1 and f"0 {share:.0%}" in notes[0] and "1 of 1 layers" in notes[0]
    assert not [n for n in simulate(model, _recipe("minmax"), {"0": s}).notes if "range entropy" in n]


def test_onnxruntime_entropy_clips_the_same_heavy_tail_too():
    """The note is about the method: ORT's own KL threshold on the same samples clips the same energy away."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    x = _heavy_tail().numpy()
    ort = HistogramCollector("entropy", True, 4097, 255, None, None)
    with contextlib.redirect_stdout(io.StringIO()):
        ort.collect({"x": [x[:1000]]})
        ort.collect({"x": [x[1000:]]})
        lo, hi = ort.compute_collection_result()["x"][:2]
    assert _energy_clipped(x, float(lo), float(hi)) > 0.5


def test_entropy_on_a_gaussian_clips_little_and_says_nothing():
    x = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (2000, 4))).float()
    model, s = _stats(x)
    sim = simulate(model, _recipe("entropy"), {"0": s})
    spec = sim.recipe.defaults.activations
    assert _energy_clipped(x.double().numpy(), *s.static_range(spec.fmt, spec)) < CLIP_NOTE_SHARE / 10
    assert not [n for n in sim.notes if "range entropy" in n]


def test_the_note_lists_the_worst_three_layers_above_the_share_in_order():
    clipped = {"a": 0.05, "b": 0.3, "c": 0.9, "d": CLIP_NOTE_SHARE, "e": 0.11, "f": 0.5}
    note = entropy_clip_note(clipped)
    assert "4 of 6 layers (c 90%, f 50%, b 30%, ...)" in note  # "d" sits on the share: not above it
    assert entropy_clip_note({"a": 0.05}) is None and entropy_clip_note({}) is None
