"""Real execution: the exported file is measured (size from disk, metric from ONNX Runtime on the
evaluation data), labelled next to the simulated numbers, gaps explained; bench times FP32 and the
quantized file interleaved. No timed assertions.

Oracles: ``os.path.getsize`` and hand-computed byte counts for sizes; an ONNX Runtime session opened
here and accuracy recomputed as argmax == label for the measured metric; ``workload.evaluate`` for the
simulated one; a recording fake for the order and batch of timed calls.
"""

import json
import math
import os
import struct

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from qcore import QcoreError, Recipe, preset
from qcore.export import bench as bench_module, export, summary_lines
from qcore.export.bench import BenchResult, bench, interleaved_times_ms, speedup
from qcore.export.policy import metric_differences
from qcore.export.safetensors import load_safetensors
from qcore.hardware import cpu_features


def crash_recipe(w) -> Recipe:
    """The issue's recipe: FP32, fc1 int4 weight-only, fc2 int8 static."""
    return preset("fp32", w.layer_shapes).with_layer(
        "fc1", {"weights": {"format": "int4", "granularity": "per_group", "group_size": 32, "symmetric": False}}
    ).with_layer("fc2", {"weights": {"format": "int8", "granularity": "per_channel"},
                         "activations": {"format": "int8", "symmetric": False}})


def accuracy_in_onnxruntime(path: str, w) -> float:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input_0": w.evaluation.inputs[0].numpy()})[0]  # the whole set as one batch
    return float((logits.argmax(1) == w.evaluation.labels.numpy()).mean())


# ---- old defects ---------------------------------------------------------------------------------
def test_tensor_quant_overrides_crash_recipe_exports_and_benches(digits_mlp, tmp_path):
    """The old ORT-quantizer chain crashed on this recipe (TensorQuantOverrides named a tensor
    quantize_static had not created)."""
    recipe = crash_recipe(digits_mlp)
    path = tmp_path / "m.onnx"
    r = export(digits_mlp, recipe, "onnx", str(path))
    assert r.file_size_bytes == os.path.getsize(path) and r.to_dict()["file_size_bytes"] == r.file_size_bytes
    rows = {row["layer"]: row for row in r.layers}
    assert rows["fc1"]["executes"] == "MatMulNBits" and rows["fc3"]["executes"] == "float"
    b = bench(digits_mlp, recipe, batch_size=8, threads=1, budget_s=0.0)
    assert b.quantized.file_size_bytes == r.file_size_bytes  # the same exporter wrote the same file
    assert b.quantized.metrics["onnxruntime"] == pytest.approx(accuracy_in_onnxruntime(str(path), digits_mlp))


@pytest.mark.parametrize("recipe", [
    {"name": "nf4", "weights": {"format": "nf4", "granularity": "per_group", "group_size": 32}},
    {"name": "fp8", "weights": {"format": "fp8_e4m3", "scaled": True},
     "activations": {"format": "fp8_e4m3", "scaled": True}},
    {"name": "int3-dyn", "weights": {"format": "int3", "granularity": "per_channel"},
     "activations": {"format": "int8", "dynamic": True, "range": "percentile", "percentile": 99.9}},
])
def test_layers_no_kernel_runs_are_exported_as_simulated_not_kept_fp32(digits_mlp, tmp_path, recipe):
    """The old export kept such layers in FP32, so the file computed another model than the page showed."""
    recipe = Recipe.from_dict(recipe)
    path = str(tmp_path / "m.onnx")
    r = export(digits_mlp, recipe, "onnx", path)
    simulated = digits_mlp.evaluate(recipe).quantized.metrics["accuracy"]
    assert r.metrics["simulated"]["accuracy"] == simulated
    assert r.metrics["onnxruntime"]["accuracy"] == pytest.approx(accuracy_in_onnxruntime(path, digits_mlp), abs=1e-12)
    assert abs(r.metrics["onnxruntime"]["accuracy"] - simulated) <= 1 / 360 + 1e-12
    assert r.file_size_bytes < 0.4 * r.fp32_file_size_bytes  # low-precision values really are in the file
    for row in r.layers:
        assert row["executes"] != "float" and (row["executes"] != "float (dequantized)" or row["reason"])


def test_bench_times_the_batch_size_it_reports(digits_mlp, monkeypatch):
    """The old bench timed the first workload.batch_size (128) samples at --batch-size 200."""
    shapes = []
    real = bench_module.session

    class Recording:
        def __init__(self, sess):
            self.sess = sess

        def run(self, outputs, inputs):
            shapes.append(inputs["input_0"].shape[0])
            return self.sess.run(outputs, inputs)

        def get_inputs(self):
            return self.sess.get_inputs()

    monkeypatch.setattr(bench_module, "session", lambda path, threads, *rest: Recording(real(path, threads, *rest)))
    r = bench(digits_mlp, preset("int8-dynamic", digits_mlp.layer_shapes), batch_size=200, threads=1, budget_s=0.0)
    timed = 2 * (3 + r.speedup["rounds"])  # warm-up and timed rounds, both files
    assert r.batch_size == 200 and shapes[-timed:] == [200] * timed


def test_interleaved_timing_alternates_the_models_round_by_round():
    """The old bench timed all FP32 runs, then all quantized runs: its speed-up swung 1.35x-3x."""
    calls = []
    times = interleaved_times_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                 budget_s=0.0, warmup=2, min_rounds=7)
    assert calls == ["a", "b"] * 9 and [len(t) for t in times.values()] == [7, 7]


def test_speedup_is_the_ratio_of_medians_with_the_per_round_spread():
    s = speedup([2.0, 4.0, 6.0, 8.0, 100.0], [1.0, 1.0, 2.0, 2.0, 50.0])
    assert s["median_ratio"] == 3.0  # 6 / 2
    ratios = sorted([2.0, 4.0, 3.0, 4.0, 2.0])  # per round; p10 / p90 by linear interpolation
    assert s["p10"] == pytest.approx(2.0) and s["p90"] == pytest.approx(4.0) and s["rounds"] == len(ratios)


# ---- the numbers export reports ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int8-static", "int4-weight-only"])
def test_cnn_metric_in_onnxruntime_is_the_simulated_metric(digits_cnn, tmp_path, name):
    recipe = preset(name, digits_cnn.layer_shapes)
    path = str(tmp_path / "m.onnx")
    r = export(digits_cnn, recipe, "onnx", path)
    measured, simulated = r.metrics["onnxruntime"]["accuracy"], r.metrics["simulated"]["accuracy"]
    assert measured == pytest.approx(accuracy_in_onnxruntime(path, digits_cnn), abs=1e-12)
    assert simulated == digits_cnn.evaluate(recipe).quantized.metrics["accuracy"]
    assert abs(measured - simulated) <= 1 / 360 + 1e-12  # within one of the 360 test images
    assert r.file_size_bytes == os.path.getsize(path)
    assert r.theoretical_size_bytes == digits_cnn.size(recipe)["size_bytes"]
    gap = abs(r.file_size_bytes / r.theoretical_size_bytes - 1)
    size_lines = [d for d in r.differences if d.startswith("outside the layers' weights")]
    assert bool(size_lines) == (gap > 0.10)  # a gap beyond 10 % is explained, a smaller one is not
    assert not [d for d in r.differences if f"{r.file_size_bytes:,}" in d]  # the sizes: summary_lines' first line
    assert not [d for d in r.differences if d.startswith("ONNX Runtime")]


def test_size_differences_name_the_layer_stored_wider_and_why(digits_mlp, tmp_path):
    """int3 per channel, affine, and fc3 in FP32: MatMulNBits keeps 3-bit codes in 4-bit slots."""
    recipe = Recipe.from_dict({"name": "w3", "weights": {"format": "int3", "granularity": "per_channel",
                                                         "symmetric": False}}).with_layer("fc3", None)
    r = export(digits_mlp, recipe, "onnx", str(tmp_path / "m.onnx"))
    assert r.file_size_bytes > 1.1 * r.theoretical_size_bytes
    (fc1,) = [d for d in r.differences if d.startswith("fc1:")]
    n = 128 * 64  # fc1's weights
    assert f"codes {n * 4 // 8:,} vs {math.ceil(n * 3 / 8):,} B" in fc1 and "4-bit slots for 3-bit codes" in fc1
    assert any(d.startswith("outside the layers' weights") for d in r.differences)
    assert [d for d in r.differences if d.startswith("fc2:")]
    assert not [d for d in r.differences if d.startswith("fc3:")]  # an FP32 layer is stored as theory says


def test_metric_difference_is_explained_beyond_one_sample():
    rows = [{"layer": "conv", "executes": "int8 kernel"}, {"layer": "fc", "executes": "float (dequantized)"}]
    assert metric_differences("accuracy", 0.99, 0.99 - 1 / 360, 360, rows) == []  # one image: noise
    assert len(metric_differences("accuracy", 0.99, 0.99 - 2 / 360, 360, rows)) == 1  # two: explained
    (line,) = metric_differences("accuracy", 0.99, 0.98, 360, rows)
    assert "0.9900 vs simulated 0.9800" in line and "conv run in ONNX Runtime's fused int8 kernels" in line


def test_export_refuses_bad_formats_and_directories(digits_mlp, tmp_path):
    with pytest.raises(QcoreError, match="unknown export format"):
        export(digits_mlp, preset("fp16"), "pdf", str(tmp_path / "m.pdf"))
    with pytest.raises(QcoreError, match="does not exist"):
        export(digits_mlp, preset("fp16"), "onnx", str(tmp_path / "missing" / "m.onnx"))


# ---- bench -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 8])
def test_bench_reports_interleaved_latency_sizes_and_both_metrics(digits_cnn, batch_size):
    r = bench(digits_cnn, preset("int8-static", digits_cnn.layer_shapes), batch_size=batch_size, threads=1,
              budget_s=0.05)
    assert isinstance(r, BenchResult)
    assert (r.batch_size, r.threads, r.metric) == (batch_size, 1, "accuracy")
    for side in (r.fp32, r.quantized):
        lat = side.latency_ms
        assert 0 < lat["p10"] <= lat["median"] <= lat["p90"] and lat["runs"] == r.speedup["rounds"] >= 20
    s = r.speedup
    assert s["median_ratio"] == pytest.approx(r.fp32.latency_ms["median"] / r.quantized.latency_ms["median"])
    assert 0 < s["p10"] <= s["median_ratio"] <= s["p90"]
    assert r.cpu["features"] == cpu_features() and r.versions["onnxruntime"] == ort.__version__
    assert r.fp32.theoretical_size_bytes == digits_cnn.size(preset("fp32"))["fp32_bytes"]
    assert r.quantized.file_size_bytes < 0.4 * r.fp32.file_size_bytes
    q = r.quantized.metrics
    assert abs(q["onnxruntime"] - q["simulated"]) <= 1 / 360 + 1e-12
    assert r.fp32.metrics["onnxruntime"] == pytest.approx(digits_cnn.fp32_metrics["accuracy"], abs=1 / 360)
    assert [row["layer"] for row in r.layers] == list(digits_cnn.layers)
    # the CLI's bench --json: exactly these keys, in this order, nested as before BenchResult existed
    d = r.to_dict()
    assert list(d) == ["model", "recipe", "backend", "threads", "batch_size", "metric", "timing", "cpu", "versions",
                       "fp32", "quantized", "speedup", "layers", "differences", "notes", "runtime", "language_model"]
    for key in ("fp32", "quantized"):
        assert list(d[key]) == ["file_size_bytes", "theoretical_size_bytes", "latency_ms", "metrics"]
        assert list(d[key]["latency_ms"]) == ["median", "p10", "p90", "runs", "best"]
        assert d[key]["latency_ms"]["best"] <= d[key]["latency_ms"]["p10"]
        assert set(d[key]["metrics"]) == {"onnxruntime", "simulated"}
    assert list(d["speedup"]) == ["median_ratio", "p10", "p90", "rounds"] and list(d["cpu"]) == ["name", "features"]
    assert d["quantized"]["latency_ms"]["median"] == r.quantized.latency_ms["median"] and d["layers"] == r.layers
    assert json.loads(json.dumps(d)) == d  # plain JSON types only


def test_bench_refuses_non_positive_sizes(digits_mlp):
    with pytest.raises(QcoreError, match="positive"):
        bench(digits_mlp, preset("fp16"), batch_size=0)


# ---- safetensors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int8-static", "int4-weight-only", "nf4"])
def test_safetensors_round_trip_is_exact(digits_cnn, tmp_path, name):
    recipe = preset(name, digits_cnn.layer_shapes)
    path = tmp_path / "m.safetensors"
    export(digits_cnn, recipe, "safetensors", str(path))
    loaded_recipe, model = load_safetensors(str(path), digits_cnn)
    assert loaded_recipe.to_dict() == recipe.to_dict()
    x = digits_cnn.evaluation.inputs[0]
    with torch.no_grad():
        assert torch.equal(model(x), digits_cnn.simulate(recipe).model(x))


def test_safetensors_sizes_add_up(digits_mlp, tmp_path):
    """int4 affine in groups of 32: codes at 4 bits, one float32 scale and one int8 zero-point per group,
    every other tensor float32; the file is exactly those bytes plus its JSON header."""
    recipe = preset("int4-weight-only", digits_mlp.layer_shapes)
    path = tmp_path / "m.safetensors"
    info = export(digits_mlp, recipe, "safetensors", str(path))
    with safe_open(str(path), "pt") as f:
        nbytes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}
    for layer, (out, inp) in {"fc1": (128, 64), "fc2": (64, 128), "fc3": (10, 64)}.items():
        groups = out * inp // 32
        assert nbytes[f"{layer}.weight.codes"] == out * inp // 2
        assert nbytes[f"{layer}.weight.scale"] == 4 * groups
        assert nbytes[f"{layer}.weight.zero_point"] == groups
        assert nbytes[f"{layer}.bias"] == 4 * out
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert info.file_size_bytes == 8 + header + sum(nbytes.values())
    # the recipe's theoretical size counts the same codes and scales, but zero-points at 4 bits
    shapes = ((128, 64), (64, 128), (10, 64))
    theoretical = sum(o * i // 2 + 4 * (o * i // 32) + math.ceil(o * i // 32 * 4 / 8) + 4 * o for o, i in shapes)
    assert info.theoretical_size_bytes == theoretical
    assert "metrics" in info.to_dict() and set(info.metrics) == {"simulated"}


def test_load_safetensors_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(QcoreError, match="not written by"):
        load_safetensors(str(path))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(QcoreError, match="not a readable safetensors"):
        load_safetensors(str(tmp_path / "junk.safetensors"))


# ---- embeddings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [{"format": "int8", "granularity": "per_channel"},
                                     {"format": "int8", "granularity": "per_tensor", "symmetric": False}])
def test_embedding_tables_export_as_simulated(tmp_path, weights):
    from qcore.model.workload import Data, Workload
    from qcore.model.task import classification_task

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 4)).eval()
    ids = torch.randint(0, 50, (12, 7))
    w = Workload("tiny", model, Data((ids,)), Data((ids,)), classification_task(4, False))
    recipe = Recipe.from_dict({"name": "w8", "weights": weights})
    path = tmp_path / "m.onnx"
    r = export(w, recipe, "onnx", str(path))
    with torch.no_grad():
        sim = w.simulate(recipe).model(ids).numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_0": ids.numpy()})[0]
    assert np.abs(out - sim).max() <= 1e-4 * np.abs(sim).max()
    assert [row["layer"] for row in r.layers] == ["0", "1"]
    table = r.layers[0]  # the Gather reads the table's codes; only the rows looked up are dequantized
    assert table["executes"] == "quantized Gather" and "rows gathered then dequantized" in table["weights"]


def test_summary_lines_label_every_number_and_state_a_shared_reason_once():
    """The lines the Export page and ``export`` print: the file's bytes and the theoretical size, the metric measured
    in ONNX Runtime and the simulated one, and one line per reason naming every layer it applies to."""
    report = {"metric": "accuracy", "file_size_bytes": 21192, "theoretical_size_bytes": 18640,
              "fp32_theoretical_size_bytes": 68904,
              "metrics": {"onnxruntime": {"accuracy": 0.975}, "simulated": {"accuracy": 0.9722}},
              "differences": ["d"], "notes": ["n"],
              "layers": [{"layer": "fc1", "executes": "float (dequantized)", "reason": "r1"},
                         {"layer": "fc2", "executes": "int8 kernel", "reason": ""},
                         {"layer": "fc3", "executes": "float (dequantized)", "reason": "r1"},
                         {"layer": "fc4", "executes": "float (dequantized)", "reason": "r2"}]}
    assert summary_lines(report) == [
        "file on disk: 21,192 bytes (+14% against the theoretical size 18,640 bytes; FP32 68,904 bytes)",  # 1.1369
        "accuracy: 0.9750 measured by running this file in ONNX Runtime on the evaluation data; 0.9722 simulated",
        "d", "n", "fc1, fc3 run in float in ONNX Runtime: r1", "fc4 runs in float in ONNX Runtime: r2"]
