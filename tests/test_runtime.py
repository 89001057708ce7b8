"""Real execution: exported files compute the simulated model, sizes add up, unsupported layers are
named exactly, measurements are self-consistent (no timed assertions)."""

import json
import math
import struct

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from qcore import QcoreError, Recipe, preset
from qcore.cli import main as cli_main
from qcore.runtime import (bench, executable_recipe, export, input_names, latency_ms, load_safetensors,
                           unsupported_layers)

# The exported file must compute the simulated model (with unsupported layers in FP32) up to float32
# accumulation order and fp16 rounding of those tiny differences: max |difference| <= 1e-4 x max |output|.
OUTPUT_RTOL = 1e-4


def _reference_outputs(path: str, workload, x: torch.Tensor, dynamic: bool) -> np.ndarray:
    """The exported file evaluated op by op as specified: ONNX Runtime with graph optimizations off,
    or, for dynamic int8, onnx's reference evaluator (ORT's MatMulInteger kernel on AVX2 without VNNI
    saturates 16-bit sums, a kernel property bench() measures, not a property of the file)."""
    if dynamic:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(path).run(None, {"input_0": x.numpy()})[0]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, {"input_0": x.numpy()})[0]


@pytest.mark.parametrize("model", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("name", ["int8-static", "int8-dynamic", "int8-weight-only", "int4-weight-only", "fp16", "bf16"])
def test_onnx_export_computes_the_simulated_model(request, tmp_path, model, name):
    w = request.getfixturevalue(model)
    recipe = preset(name, w.layer_shapes)
    path = tmp_path / "m.onnx"
    info = export(w, recipe, "onnx", str(path))
    x = w.evaluation.inputs[0][:64]
    with torch.no_grad():
        sim = w.simulate(executable_recipe(w, recipe)).model(x).numpy()
    out = _reference_outputs(str(path), w, x, dynamic=name == "int8-dynamic")
    assert np.abs(out - sim).max() <= OUTPUT_RTOL * np.abs(sim).max()
    assert info["size_bytes"] == path.stat().st_size
    executed = [n for n, p in info["paths"].items() if "unsupported" not in p]
    assert len(executed) + len(info["unsupported"]) == len(w.layers)
    if not info["unsupported"]:  # (per-channel dynamic Conv and 4-bit Conv cannot run: listed, kept FP32)
        assert info["size_bytes"] < 0.6 * info["fp32_theoretical_size_bytes"]


def test_unsupported_lists_exactly_the_layers_that_cannot_run(digits_cnn, tmp_path):
    recipe = preset("int8-static", digits_cnn.layer_shapes).with_layer("features.3", {"weights": {"format": "int3"}})
    rows = unsupported_layers(digits_cnn, recipe)
    assert [r["layer"] for r in rows] == ["features.3"]
    assert rows[0]["format"] == "int3/int8"
    assert rows[0]["theoretical_size_bytes"] == math.ceil(32 * 16 * 9 * 3 / 8) + 32 * 4  # codes + per-channel scales
    info = export(digits_cnn, recipe, "onnx", str(tmp_path / "m.onnx"))
    assert [r["layer"] for r in info["unsupported"]] == ["features.3"]
    assert info["paths"]["features.0"] == "int8-static" and "unsupported" in info["paths"]["features.3"]
    assert {r["layer"] for r in unsupported_layers(digits_cnn, preset("nf4", digits_cnn.layer_shapes))} == set(digits_cnn.layers)
    assert {r["layer"] for r in unsupported_layers(digits_cnn, preset("fp8", digits_cnn.layer_shapes))} == set(digits_cnn.layers)
    assert unsupported_layers(digits_cnn, preset("int8-static", digits_cnn.layer_shapes)) == []


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
    assert info["size_bytes"] == 8 + header + sum(nbytes.values())
    # the recipe's theoretical size counts the same codes and scales, but zero-points at 4 bits
    shapes = ((128, 64), (64, 128), (10, 64))
    theoretical = sum(o * i // 2 + 4 * (o * i // 32) + math.ceil(o * i // 32 * 4 / 8) + 4 * o for o, i in shapes)
    assert info["theoretical_size_bytes"] == theoretical


def test_load_safetensors_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(QcoreError, match="not written by"):
        load_safetensors(str(path))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(QcoreError, match="not a readable safetensors"):
        load_safetensors(str(tmp_path / "junk.safetensors"))


def test_bench_measures_sizes_latency_and_metrics(digits_mlp):
    r = bench(digits_mlp, preset("int8-static", digits_mlp.layer_shapes), batch_size=16, threads=1, budget_s=0.05)
    assert (r["threads"], r["batch_size"], r["unsupported"]) == (1, 16, [])
    for key in ("fp32", "quantized"):
        for lat in (r[key]["latency_ms"], r[key]["latency_ms_batch1"]):
            assert 0 < lat["p10"] <= lat["median"] <= lat["p90"] and lat["runs"] >= 10
    assert r["quantized"]["size_bytes"] < 0.4 * r["fp32"]["size_bytes"]
    assert r["fp32"]["theoretical_size_bytes"] == 4 * (64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10)
    assert r["fp32"]["metric"] == pytest.approx(digits_mlp.fp32_metrics["accuracy"], abs=1e-9)
    q = r["quantized"]
    assert q["metric_difference"] == pytest.approx(q["metric_measured"] - q["metric_simulated"])
    assert abs(q["metric_difference"]) < 0.03  # real int8 kernels land within 3 points of the simulation
    assert r["speedup"] == pytest.approx(r["fp32"]["latency_ms"]["median"] / q["latency_ms"]["median"])
    assert r["versions"]["onnxruntime"] == ort.__version__ and "avx2" in r["cpu_features"]


def test_latency_statistics_are_ordered():
    calls = []
    stats = latency_ms(lambda: calls.append(sum(range(1000))), warmup=2, min_runs=12, budget_s=0.0)
    assert len(calls) == 14 and stats["runs"] == 12
    assert 0 < stats["p10"] <= stats["median"] <= stats["p90"]


def test_cli_export_writes_the_file(digits_mlp, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert cli_main(["export", "digits-mlp", "--preset", "int8-dynamic", "--format", "onnx", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["size_bytes"] == out.stat().st_size and r["unsupported"] == []
    assert cli_main(["export", "digits-mlp", "--preset", "int8-dynamic", "--format", "onnx",
                     "--out", str(tmp_path / "missing" / "m.onnx")]) == 2


def test_minilm_int8_dynamic_export_runs_every_layer(minilm, tmp_path):
    recipe = preset("int8-dynamic", minilm.layer_shapes)
    info = export(minilm, recipe, "onnx", str(tmp_path / "m.onnx"))
    assert info["unsupported"] == []
    assert sum(p == "int8-dynamic" for p in info["paths"].values()) == 36  # 6 blocks x 6 Linear
    assert sum(p == "int8-weight" for p in info["paths"].values()) == 3  # the embedding tables
    assert info["size_bytes"] < 0.3 * info["fp32_theoretical_size_bytes"]


def test_bench_labels_latency_of_unsupported_layers_as_estimate(digits_mlp):
    recipe = preset("int8-weight-only", digits_mlp.layer_shapes).with_layer("fc2", {"weights": {"format": "int3"}})
    r = bench(digits_mlp, recipe, batch_size=4, threads=1, budget_s=0.0)
    assert [u["layer"] for u in r["unsupported"]] == ["fc2"] and r["paths"]["fc1"] == "int8-weight"
    assert r["estimate"]["label"] == "estimate" and r["estimate"]["latency_ms"] > 0
    q = r["quantized"]
    # weight-only int8 runs in float after dequantizing: the real model matches its simulation
    assert q["metric_measured"] == pytest.approx(q["metric_simulated_as_exported"], abs=0.01)


@pytest.mark.parametrize("weights", [{"format": "int8", "granularity": "per_channel"},
                                     {"format": "int8", "granularity": "per_channel", "symmetric": False},
                                     {"format": "int8", "granularity": "per_tensor", "symmetric": False}])
def test_embedding_rows_are_dequantized_as_simulated(tmp_path, weights):
    """Embedding tables export as int8 rows looked up first and dequantized after the lookup."""
    from qcore.workload import Data, Workload, classification_task

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 4)).eval()
    ids = torch.randint(0, 50, (12, 7))
    w = Workload("tiny", model, Data((ids,)), Data((ids,)), classification_task(4, False))
    recipe = Recipe.from_dict({"name": "w8", "weights": weights})
    path = tmp_path / "m.onnx"
    info = export(w, recipe, "onnx", str(path))
    assert info["paths"] == {"0": "int8-weight", "1": "int8-weight"}
    with torch.no_grad():
        sim = w.simulate(recipe).model(ids).numpy()
    out = _reference_outputs(str(path), w, ids, dynamic=False)
    assert np.abs(out - sim).max() <= OUTPUT_RTOL * np.abs(sim).max()
