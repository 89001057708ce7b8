"""The ONNX export is the simulation: ONNX Runtime running the file computes the simulated model.

Oracles: the simulated model (``workload.simulate(recipe).model``, PyTorch) for the outputs; a
hand-written per-channel int8 quantizer (absmax / 127, round half to even) for the stored codes;
``os.path.getsize`` and ``workload.size`` for the size.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from qcore import zoo
from qcore.export import export_qdq
from qcore.numerics.granularity import fan_in
from qcore.recipe import Recipe, preset

# ONNX Runtime without graph optimizations computes the same float ops as PyTorch (only summation
# order differs, and a rare round-half tie of x / scale in float32 vs the engine's float64); with
# its default optimizations, fused integer kernels (QLinearConv) requantize int32 accumulators and
# quantize the bias, which costs a little more.
MIN_SQNR_DB = {ort.GraphOptimizationLevel.ORT_DISABLE_ALL: 60.0, ort.GraphOptimizationLevel.ORT_ENABLE_ALL: 30.0}
WORST = {level: float("inf") for level in MIN_SQNR_DB}


@functools.cache
def workload(name: str):
    return zoo.load(name)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = ((out - ref) ** 2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10((ref ** 2).sum() / noise))


def check_matches(workload, recipe: Recipe, path: str) -> float:
    """Export, run in ONNX Runtime at batch 1 and 8 and both optimization levels; returns the worst
    SQNR (dB) per optimization level."""
    result = export_qdq(workload, recipe, path)
    assert result.size_bytes == os.path.getsize(path)
    sim = workload.simulate(recipe).model
    x = workload.evaluation.inputs[0]
    batches = [x[i:i + 1] for i in range(3)] + [x[i:i + 8] for i in range(0, 32, 8)]
    with torch.no_grad():
        refs = [sim(b) for b in batches]
    worst = {}
    for level, min_db in MIN_SQNR_DB.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        for b, ref in zip(batches, refs):
            out = torch.from_numpy(sess.run(None, {"input_0": b.numpy()})[0])
            assert out.shape == ref.shape
            db = sqnr_db(out, ref)
            assert db >= min_db, f"{recipe.to_json()} at {level}, batch {len(b)}: {db:.1f} dB"
            worst[level] = min(worst.get(level, float("inf")), db)
    return worst


# ---- random recipes -------------------------------------------------------------------------------
WEIGHT_FORMATS = ["int8", "int4", "int3", "int2", "nf4", "fp8_e4m3", "fp16", "fp32"]
INPUT_FORMATS = ["int8", "int4", "fp8_e4m3", "fp16", "bf16"]


@st.composite
def weight_spec(draw, shape):
    fmt = draw(st.sampled_from(WEIGHT_FORMATS))
    spec = {"format": fmt, "range": draw(st.sampled_from(["minmax", "percentile", "mse"]))}
    groups = [g for g in (4, 8, 16, 32, 64) if fan_in(shape) % g == 0]
    gran = draw(st.sampled_from(["per_tensor", "per_channel"] + (["per_group"] if groups else [])))
    spec["granularity"] = gran
    if gran == "per_group":
        spec["group_size"] = draw(st.sampled_from(groups))
    if fmt.startswith("int"):
        spec["symmetric"] = draw(st.booleans())
    if fmt.startswith("fp8"):
        spec["scaled"] = True
    return spec


@st.composite
def input_spec(draw):
    fmt = draw(st.sampled_from(INPUT_FORMATS))
    dynamic = draw(st.booleans())
    ranges = ["minmax", "percentile", "mse"] + ([] if dynamic else ["entropy", "moving_average"])
    spec = {"format": fmt, "dynamic": dynamic, "range": draw(st.sampled_from(ranges))}
    if fmt.startswith("int"):
        spec["symmetric"] = draw(st.booleans())
    if fmt.startswith("fp8"):
        spec["scaled"] = True
    return spec


@st.composite
def recipes(draw, workload):
    layers = {}
    for name, shape in workload.layer_shapes.items():
        layers[name] = {"weights": draw(st.none() | weight_spec(shape)),
                        "activations": draw(st.none() | input_spec())}
    return Recipe.from_dict({"name": "drawn", "weights": None, "activations": None, "layers": layers})


@pytest.mark.parametrize("model", ["digits-mlp", "digits-cnn"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_recipes_export_and_match_the_simulation(tmp_path, model, data):
    w = workload(model)
    recipe = data.draw(recipes(w))
    for level, db in check_matches(w, recipe, str(tmp_path / "model.onnx")).items():
        WORST[level] = min(WORST[level], db)
    print("\nworst SQNR so far vs simulation (dB): " + ", ".join(f"{lv.name} {db:.1f}" for lv, db in WORST.items()))


# ---- hand-checked cases -----------------------------------------------------------------------------
def test_int4_weight_only_then_int8_static_exports_and_matches(tmp_path):
    """The recipe that broke the old exporter (TensorQuantOverrides on a missing tensor)."""
    w = workload("digits-mlp")
    recipe = preset("fp32", w.layer_shapes).with_layer(
        "fc1", {"weights": {"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False}}
    ).with_layer("fc2", {"weights": {"format": "int8", "granularity": "per_channel"},
                         "activations": {"format": "int8", "symmetric": False}})
    assert min(check_matches(w, recipe, str(tmp_path / "m.onnx")).values()) > 60
    rows = {r["layer"]: r for r in export_qdq(w, recipe, str(tmp_path / "m.onnx")).layers}
    assert rows["fc1"]["executes"] == "MatMulNBits"
    assert rows["fc2"]["activations"].startswith("int8 static")
    assert rows["fc3"]["executes"] == "float"


def test_stored_int8_codes_are_the_engines_codes(tmp_path):
    """features.3's int8 per-channel symmetric codes, recomputed by hand: absmax / 127 per output channel."""
    w = workload("digits-cnn")
    recipe = preset("int8-static", w.layer_shapes)
    path = str(tmp_path / "m.onnx")
    export_qdq(w, recipe, path)
    proto = onnx.load(path)
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "features.3.weight")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    codes, scale = inits[dq.input[0]], inits[dq.input[1]]
    weight = dict(w.folded[0].named_modules())["features.3"].weight.detach().double().numpy()
    amax = np.abs(weight).reshape(weight.shape[0], -1).max(1)
    expected_scale = (amax / 127).astype(np.float32)
    expected = np.clip(np.round(weight / expected_scale.astype(np.float64)[:, None, None, None]), -128, 127)
    assert codes.dtype == np.int8 and codes.shape == weight.shape
    np.testing.assert_array_equal(scale, expected_scale)
    np.testing.assert_array_equal(codes.astype(np.int64), expected.astype(np.int64))
    assert len(dq.input) == 2 or not inits[dq.input[2]].any()  # symmetric: zero-point 0


def test_int8_per_channel_file_size_is_the_theoretical_size(tmp_path):
    w = workload("digits-cnn")
    recipe = preset("int8-weight-only", w.layer_shapes)
    q = export_qdq(w, recipe, str(tmp_path / "q.onnx"))
    f = export_qdq(w, preset("fp32"), str(tmp_path / "f.onnx"))
    theory = w.size(recipe)["size_bytes"]
    assert abs(q.size_bytes / theory - 1) < 0.06, (q.size_bytes, theory)
    assert q.size_bytes < 0.3 * f.size_bytes


def test_every_layer_says_how_it_executes(tmp_path):
    w = workload("digits-cnn")
    recipe = preset("nf4", w.layer_shapes)
    result = export_qdq(w, recipe, str(tmp_path / "m.onnx"))
    assert result.opset == 21 and result.to_dict()["size_bytes"] == result.size_bytes
    for row in result.layers:
        assert row["executes"] == "float (dequantized)" and "NF4" in row["reason"]


def test_export_is_fast_once_the_float_graph_exists(tmp_path):
    w = workload("digits-mlp")
    export_qdq(w, preset("int8-dynamic", w.layer_shapes), str(tmp_path / "a.onnx"))
    t = time.perf_counter()
    export_qdq(w, preset("int4-weight-only", w.layer_shapes), str(tmp_path / "b.onnx"))
    assert time.perf_counter() - t < 2.0
