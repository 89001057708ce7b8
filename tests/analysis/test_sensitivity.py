"""Per-layer sensitivity sweeps: rows are real evaluations, modes separate weights from inputs,
rankings are stable, caches return identical results and a cancelled sweep caches nothing."""

import json
import math

import pytest

from qcore import QcoreError
from qcore.analysis import layer_error, sensitivity
from qcore.numerics.metrics import SQNR_EXACT_DB, sqnr_db
from qcore.analysis.sensitivity import SweepCancelled, recipe_for, sweep
from qcore.analysis.sweep_cache import cache_key, cache_path, clear_memory_cache


def output_sqnr_db(w, recipe) -> float:
    """Output SQNR of ``recipe`` computed the slow, independent way (a fresh simulated copy)."""
    return sqnr_db(w.run(w.simulate(recipe).model, w.evaluation), w.reference_outputs)


@pytest.mark.parametrize("view", ["only", "all_but"])
def test_rows_equal_full_evaluation_of_their_recipe(digits_cnn, tmp_path, view):
    candidates = ["int8-static", "int3"] if view == "only" else ["int3"]
    r = sweep(digits_cnn, candidates, mode="both", view=view, cache_dir=tmp_path)
    assert r.samples == r.evaluation_samples == 360 and r.fp32_metric == digits_cnn.fp32_metrics["accuracy"]
    assert len(r.rows) == len(candidates) * 5 and all(row.changed for row in r.rows)
    for row in r.rows:
        recipe = recipe_for(digits_cnn, row.layer, row.candidate, "both", view)
        metric = digits_cnn.evaluate(recipe).quantized.metrics["accuracy"]
        assert row.metric == metric
        if row.candidate == "int3" and row.layer in ("features.0", "classifier.3"):
            assert row.sqnr_db == pytest.approx(output_sqnr_db(digits_cnn, recipe), abs=1e-3)
        assert row.metric_drop == pytest.approx(r.fp32_metric - metric)
        if view == "all_but":
            assert row.recovered == pytest.approx(metric - r.base[row.candidate].metric)
    # int3 weights hurt every layer more than int8 weights and activations do
    by = {(row.layer, row.candidate): row for row in r.rows}
    if view == "only":
        assert all(by[n, "int3"].layer_sqnr_db < by[n, "int8-static"].layer_sqnr_db for n in digits_cnn.layers)


def test_modes_separate_weights_from_inputs(digits_mlp, tmp_path):
    cands = ["int8-static", "int4-weight-only"]
    weights, inputs, both = (sweep(digits_mlp, cands, mode=m, cache_dir=tmp_path) for m in ("weights", "activations", "both"))
    for row in weights.rows:  # weights only: a grid on the weight, inputs untouched
        assert row.changed and row.input_format == "fp32" and row.input_rmse_over_step is None
        assert row.weight_format == {"int8-static": "int8", "int4-weight-only": "int4"}[row.candidate]
        assert 0.27 < row.rmse_over_step < 0.30 and row.clipped_fraction == 0.0  # min-max: ~1/sqrt(12)
    for row in inputs.rows:
        if row.candidate == "int4-weight-only":  # weight-only candidate: nothing to quantize in this mode
            assert not row.changed and row.metric == inputs.fp32_metric and row.metric_drop == 0
            assert row.sqnr_db == row.layer_sqnr_db == SQNR_EXACT_DB and row.input_format == "fp32"
        else:
            assert row.changed and (row.weight_format, row.input_format) == ("fp32", "int8")
            assert row.rmse_over_step is None and 0.1 < row.input_rmse_over_step < 0.5
            assert 0.0 <= row.input_clipped_fraction < 0.01
    for row_w, row_a, row_b in zip(weights.rows, inputs.rows, both.rows):
        assert row_b.rmse_over_step == row_w.rmse_over_step
        assert row_b.input_rmse_over_step == row_a.input_rmse_over_step
        if row_b.candidate == "int4-weight-only":  # weight-only: "both" is the weights sweep
            assert (row_b.metric, row_b.sqnr_db) == (row_w.metric, row_w.sqnr_db)
        else:  # quantizing weights and inputs together is noisier than either alone
            assert row_b.layer_sqnr_db < min(row_w.layer_sqnr_db, row_a.layer_sqnr_db)


def test_rankings_are_stable_and_ordered(digits_cnn, tmp_path):
    clear_memory_cache()
    first = sweep(digits_cnn, ["int3"], cache_dir=tmp_path / "a")
    clear_memory_cache()
    second = sweep(digits_cnn, ["int3"], cache_dir=tmp_path / "b")
    assert second == first
    rows = sorted(first.rows, key=lambda row: row.rank)
    assert [row.rank for row in rows] == list(range(1, 6))
    keys = [(-row.metric_drop, row.sqnr_db) for row in rows]
    assert keys == sorted(keys)  # rank 1 = largest drop, then lowest output SQNR


def test_memory_and_disk_cache_hits_are_identical(digits_mlp, tmp_path, monkeypatch):
    cold = sweep(digits_mlp, ["int3", "nf4"], mode="weights", view="all_but", cache_dir=tmp_path)
    for c in ("int3", "nf4"):  # one cache file per candidate, holding that candidate's rows
        path = cache_path(tmp_path, cache_key(digits_mlp, [c], "weights", "all_but"))
        assert json.loads(path.read_text())["rows"] == [r.to_dict() for r in cold.rows if r.candidate == c]
    computed = []
    real_compute = sensitivity._compute
    monkeypatch.setattr(sensitivity, "_compute", lambda w, cands, *a: computed.append(cands) or real_compute(w, cands, *a))
    assert sweep(digits_mlp, ["int3", "nf4"], mode="weights", view="all_but", cache_dir=tmp_path) == cold  # memory
    clear_memory_cache()
    assert sweep(digits_mlp, ["int3", "nf4"], mode="weights", view="all_but", cache_dir=tmp_path) == cold  # disk
    assert computed == []
    # more candidates: only the new one is computed; shared candidates' rows are the cached ones
    more = sweep(digits_mlp, ["nf4", "int5", "int3"], mode="weights", view="all_but", cache_dir=tmp_path)
    assert computed == [["int5"]] and more.candidates == ["nf4", "int5", "int3"]
    assert [r for r in more.rows if r.candidate != "int5"] == \
        [r for r in cold.rows if r.candidate == "nf4"] + [r for r in cold.rows if r.candidate == "int3"]


def test_cancelled_sweep_raises_and_caches_nothing(digits_mlp, tmp_path):
    calls, seen = [0], []

    def stop_after_three():
        calls[0] += 1
        return calls[0] > 3

    clear_memory_cache()
    with pytest.raises(SweepCancelled, match="cancelled"):
        sweep(digits_mlp, ["int2", "int5"], cache_dir=tmp_path, should_stop=stop_after_three,
              progress=lambda frac, msg: seen.append(frac))
    assert calls[0] == 4 and len(seen) == 3
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    seen.clear()
    done = sweep(digits_mlp, ["int2", "int5"], cache_dir=tmp_path, progress=lambda frac, msg: seen.append(frac))
    assert len(done.rows) == 6 and seen == sorted(seen) and seen[-1] == 1.0 and 0.0 <= seen[0] < 1.0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        cache_path(tmp_path, cache_key(digits_mlp, [c], "both", "only")).name for c in ("int2", "int5"))


def test_int2_is_more_sensitive_than_int5_on_every_layer(digits_mlp, tmp_path):
    r = sweep(digits_mlp, ["int2", "int5"], cache_dir=tmp_path)
    by = {(row.layer, row.candidate): row for row in r.rows}
    for n in digits_mlp.layers:
        assert by[n, "int2"].sqnr_db < by[n, "int5"].sqnr_db - 10  # ~6 dB per bit
        assert by[n, "int2"].metric_drop >= by[n, "int5"].metric_drop
        assert math.isfinite(by[n, "int2"].layer_sqnr_db)


@pytest.mark.parametrize("kwargs, message", [
    ({"candidates": ["int9"]}, "unknown candidate 'int9'"),
    ({"candidates": [" ", ""]}, "give at least one candidate"),
    ({"candidates": ["int8-static"], "mode": "inputs"}, "unknown mode 'inputs'"),
    ({"candidates": ["int8-static"], "view": "all"}, "unknown view 'all'"),
])
def test_bad_arguments_raise_one_clear_error(digits_mlp, tmp_path, kwargs, message):
    with pytest.raises(QcoreError, match=message):
        sweep(digits_mlp, cache_dir=tmp_path, **kwargs)


def test_layer_sqnr_is_the_layers_own_output_error_recomputed_by_hand(digits_mlp, tmp_path):
    """fc1 sees the flattened image: its int3 output error, computed here with torch in float64, is the row's
    ``layer_sqnr_db`` (accumulated over batches from summed squares)."""
    import torch

    from qcore.numerics.quantize import fake_quantize
    from qcore.numerics.spec import TensorSpec

    row = next(r for r in sweep(digits_mlp, ["int3"], "weights", cache_dir=tmp_path).rows if r.layer == "fc1")
    fc1 = digits_mlp.model.fc1
    x = digits_mlp.evaluation.inputs[0].reshape(360, -1)
    wq = fake_quantize(fc1.weight.detach(), TensorSpec.from_dict(sensitivity.LAYER_SPECS["int3"]["weights"]))
    with torch.no_grad():
        y, yq = fc1(x).double(), torch.nn.functional.linear(x, wq, fc1.bias).double()
    expected = 10 * math.log10(float((y ** 2).sum()) / float(((yq - y) ** 2).sum()))
    assert row.changed and row.layer_sqnr_db == pytest.approx(expected, rel=1e-6)


def test_sweep_json_is_the_documented_schema_and_rebuilds_the_same_sweep(digits_mlp, tmp_path):
    from qcore.analysis.sweep_result import Sweep

    for view in ("only", "all_but"):
        s = sweep(digits_mlp, ["int3", "int4-weight-only"], "activations", view, cache_dir=tmp_path)
        d = json.loads(json.dumps(s.to_dict()))
        assert list(d) == ["model", "metric", "higher_is_better", "fp32_metric", "candidates", "mode", "view", "samples",
                           "evaluation_samples", "base", "notes", "rows"]
        assert d["base"] == {c: {"metric": s.base[c].metric, "sqnr_db": s.base[c].sqnr_db} for c in s.candidates}
        row_keys = ["layer", "kind", "candidate", "mode", "view", "changed", "weight_format", "input_format", "metric",
                    "metric_drop", "sqnr_db", "layer_sqnr_db", "input_rmse_over_step", "input_clipped_fraction",
                    "rmse_over_step", "clipped_fraction"] + (["recovered"] if view == "all_but" else []) + ["rank"]
        assert all(list(r) == row_keys for r in d["rows"]) and len(d["rows"]) == 6
        assert [r["metric_drop"] for r in d["rows"]] == [r.metric_drop for r in s.rows]
        assert Sweep.from_dict(d) == s


def test_weight_rmse_over_step_in_float32_equals_a_float64_numpy_computation():
    """A 2M-entry table whose rows span six decades of magnitude: the float32 statistic equals int4 per-channel
    min-max codes recomputed by hand in numpy float64 within 1e-5 relative."""
    import numpy as np
    import torch

    from qcore.numerics.quantize import quantize
    from qcore.numerics.spec import TensorSpec

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 1024, generator=g) * torch.logspace(-3, 3, 2048)[:, None]
    spec = TensorSpec.from_dict({"format": "int4", "granularity": "per_channel", "symmetric": True, "range": "minmax"})
    got = layer_error.rmse_over_step(quantize(w, spec), w)
    x = w.numpy().astype(np.float64)
    scale = np.abs(x).max(axis=1, keepdims=True) / 7  # symmetric int4: codes -7..7 (qmax 7), min-max range
    step_err = (np.clip(np.round(x / scale), -8, 7) * scale - x) / scale
    expected = float(np.sqrt(np.mean(step_err ** 2)))
    assert 0.27 < expected < 0.30 and got == pytest.approx(expected, rel=1e-5)


def test_nf4_rmse_over_step_equals_a_numpy_computation_on_the_codebook():
    """NF4 (absmax per block of 64, a 16-value codebook): each value's nearest code found by argmin in numpy
    float64, its step the code's mean spacing to its neighbours (one neighbour at the ends) times the block's
    absmax; the statistic (read from the codes, no search) equals it within 1e-5 relative."""
    import numpy as np
    import torch

    from qcore.numerics.quantize import quantize
    from qcore.numerics.spec import TensorSpec

    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=g) * torch.logspace(-2, 2, 512)[:, None]
    spec = TensorSpec.from_dict({"format": "nf4", "granularity": "per_group", "group_size": 64})
    qt = quantize(w, spec)
    got = layer_error.rmse_over_step(qt, w)
    assert got == layer_error.rmse_over_step(qt, w, qt.dequantize())  # given the dequantized tensor: the same
    cb = np.array(spec.fmt.codebook, dtype=np.float64)
    x = w.numpy().astype(np.float64).reshape(-1, 64)  # groups of 64 along the input dimension
    absmax = np.abs(x).max(axis=1, keepdims=True)
    code = np.abs(x[:, :, None] / absmax[:, :, None] - cb).argmin(axis=2)
    spacing = np.array([(cb[min(k + 1, 15)] - cb[max(k - 1, 0)]) / ((k > 0) + (k < 15)) for k in range(16)])
    expected = float(np.sqrt(np.mean(((cb[code] * absmax - x) / (spacing[code] * absmax)) ** 2)))
    assert 0.2 < expected < 0.4 and got == pytest.approx(expected, rel=1e-5)
