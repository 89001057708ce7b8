"""Exported files run at any batch size, and int8-dynamic convolutions run as the simulation computes them.

Sources: zoo models (digits-mlp, digits-cnn), a ``.onnx`` upload exported by torch at a fixed batch of 2
(its flatten is a Reshape to ``[2, 512]``) and a ``.pt2`` program saved at a fixed batch of 2 (its
``view(x.shape[0], -1)`` is a literal ``view(x, [2, 512])``). Each file, run in ONNX Runtime at batch 1,
3 and 8, gives the simulated model's outputs (``workload.simulate(recipe).model``, the independent
oracle: PyTorch, not the file). A graph whose batch cannot be freed (a constant ``(2, 6)`` added to
the output) is declared at batch 2 and said so; bench at another batch is one QcoreError line.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qcore import zoo
from qcore.errors import QcoreError
from qcore.export import export_qdq
from qcore.export.bench import bench
from qcore.io.workload import load_workload
from qcore.recipe import preset

FAMILIES = ["fp32", "int8-static", "int8-dynamic", "int4-weight-only", "fp16"]
BATCHES = (1, 3, 8)


class FlattenCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(x.shape[0], -1))


def _sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float(10 * torch.log10((ref ** 2).sum() / ((out.double() - ref) ** 2).sum().clamp_min(1e-300)))


@functools.cache
def _workload(folder, source: str):
    if source in zoo.ZOO:
        return zoo.load(source)
    torch.manual_seed(0)
    model, x = FlattenCNN().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "onnx-batch2":
            torch.onnx.export(model, (x,), str(folder / "b2.onnx"), dynamo=True, external_data=False)
            return load_workload(str(folder / "b2.onnx"))
        torch.export.save(torch.export.export(model, (x,)), str(folder / "b2.pt2"))
        return load_workload(str(folder / "b2.pt2"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("batch")


def _outputs(path: str, w, b: int) -> torch.Tensor:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {f"input_{i}": t[:b].numpy() for i, t in enumerate(w.evaluation.inputs)}
    return torch.from_numpy(sess.run(None, feed)[0]).float()


@pytest.mark.parametrize("source", ["digits-mlp", "digits-cnn", "onnx-batch2", "pt2-batch2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_file_runs_every_batch_size_as_simulated(folder, source, family):
    w = _workload(folder, source)
    recipe = preset(family, w.layer_shapes)
    path = str(folder / f"{source}-{family}.onnx")
    result = export_qdq(w, recipe, path)
    declared = onnx.load(path).graph
    assert declared.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic: any batch
    assert declared.output[0].type.tensor_type.shape.dim[0].dim_param
    sim = w.simulate(recipe).model
    int8_kernels = any(r["executes"] == "int8 kernel" for r in result.layers)
    for b in BATCHES:
        if w.batch_size == 2 and family == "int8-dynamic" and b != 2:
            continue  # the imported batch-2 model simulates pairs; dynamic ranges depend on the batch
        with torch.no_grad():
            # the batch-2 uploads simulate in pairs (their PyTorch graph fixes 2): per-sample outputs
            ref = w.run(sim, w.evaluation.subset(slice(0, 8)))[:b] if w.batch_size == 2 else \
                sim(*(t[:b] for t in w.evaluation.inputs)).float()
        out = _outputs(path, w, b)
        assert out.shape == ref.shape == (b, 10)
        db = _sqnr_db(out, ref)
        assert db >= (30 if int8_kernels else 60), f"{source} {family} batch {b}: {db:.1f} dB"


@pytest.mark.parametrize("source", ["onnx-batch2", "pt2-batch2"])
def test_shapes_writing_the_traced_batch_are_rewritten_and_said(folder, source):
    w = _workload(folder, source)
    result = export_qdq(w, preset("fp32"), str(folder / f"{source}-note.onnx"))
    assert result.notes == ["the model's graph was traced at batch 2: 1 shape(s) writing 2 now read the batch of "
                            "each run, so the file runs any batch size (checked at 1, 2 and 8)"]


def _unfreeable(path) -> str:
    """MatMul then Add of a constant (2, 6): the batch of 2 is in a tensor, not a shape."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "c"], ["y"], name="per_row")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
                              [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w1"),
                               numpy_helper.from_array(rng.standard_normal((2, 6)).astype(np.float32), "c")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_a_graph_that_fixes_its_batch_is_declared_at_it_and_bench_says_so(tmp_path):
    w = load_workload(_unfreeable(tmp_path / "fixed.onnx"))
    recipe = preset("int8-static", w.layer_shapes)
    result = export_qdq(w, recipe, str(tmp_path / "out.onnx"))
    assert len(result.notes) == 1 and "declared and runs at batch 2 only" in result.notes[0]
    graph = onnx.load(result.path).graph
    assert [v.type.tensor_type.shape.dim[0].dim_value for v in (graph.input[0], graph.output[0])] == [2, 2]
    out = _outputs(result.path, w, 2)
    with torch.no_grad():
        ref = w.simulate(recipe).model(w.evaluation.inputs[0][:2])
    assert _sqnr_db(out, ref) > 40
    with pytest.raises(QcoreError, match=r"runs only batches of 2 .* use --batch-size 2$"):
        bench(w, recipe, batch_size=3, budget_s=0.01)
    assert bench(w, recipe, batch_size=2, budget_s=0.01).batch_size == 2


# ---- int8-dynamic convolutions: float Conv on the dequantized values, the weight decoded at load -------
@functools.cache
def _conv_upload(folder, kind: str):
    torch.manual_seed(0)
    model, x = {"conv2d": (nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 8, 8)),
                "depthwise": (nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.randn(2, 8, 8, 8)),
                "conv1d": (nn.Conv1d(4, 6, 5, stride=2), torch.randn(2, 4, 32))}[kind]
    path, model = str(folder / f"{kind}.pt2"), nn.Sequential(model)
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    return load_workload(path)


def _optimized(path: str, tmp) -> onnx.ModelProto:
    """ONNX Runtime's graph of ``path`` after its optimizations short of the layout change (level "extended":
    constant folding and fusions; "all" then also moves Conv weights into its blocked NCHWc layout)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath, opts.log_severity_level = str(tmp / "optimized.onnx"), 3
    ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return onnx.load(opts.optimized_model_filepath)


@pytest.mark.parametrize("kind", ["conv2d", "depthwise", "conv1d"])
def test_int8_dynamic_conv_layer_is_the_simulation_with_its_weight_decoded_at_load(folder, tmp_path, kind):
    """One conv per model (the file's output is the layer's). The file stores the simulated int8 codes
    (no float weight), no DequantizeLinear or ConvInteger reads them, and ONNX Runtime folds their decoding
    into a constant when it loads the file: the Conv it runs takes an initializer weight equal to
    (codes - zero-point) * scale computed here in numpy."""
    w = _conv_upload(folder, kind)
    recipe = preset("int8-dynamic", w.layer_shapes)
    result = export_qdq(w, recipe, str(folder / f"{kind}-dyn.onnx"))
    (row,) = result.layers
    assert row["executes"] == "float (dequantized)" and "ConvInteger" in row["reason"]
    proto = onnx.load(result.path)
    assert not {"ConvInteger", "DequantizeLinear"} & {n.op_type for n in proto.graph.node
                                                        if any(i.startswith("codes") for i in n.input)}
    q = w.simulate(recipe).weights[row["layer"]]
    (codes,) = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.startswith("codes")]
    assert codes.dtype == np.int8 and np.array_equal(codes, q.codes.numpy())
    assert not [i for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT and i.dims == list(codes.shape)]
    scale = q.scale.numpy().astype(np.float32).reshape((-1,) + (1,) * (codes.ndim - 1))
    expected = codes.astype(np.float32) * scale  # symmetric per-channel int8: zero-point 0
    opt = _optimized(result.path, tmp_path)
    inits = {i.name: numpy_helper.to_array(i) for i in opt.graph.initializer}
    (conv,) = [n for n in opt.graph.node if "Conv" in n.op_type]
    assert conv.input[1] in inits and np.array_equal(inits[conv.input[1]], expected)
    sim = w.simulate(recipe).model
    for b in BATCHES:
        with torch.no_grad():
            ref = sim(w.evaluation.inputs[0][:b])
        out = _outputs(result.path, w, b)
        assert float((out - ref).abs().max()) <= 1e-4 * (1 + float(ref.abs().max())), (kind, b)


def test_int8_dynamic_cnn_holds_int8_convs_computed_in_float_and_is_smaller_than_fp32(folder):
    w = _workload(folder, "digits-cnn")
    dyn = export_qdq(w, preset("int8-dynamic", w.layer_shapes), str(folder / "cnn-dyn.onnx"))
    fp32 = export_qdq(w, preset("fp32"), str(folder / "cnn-fp32.onnx"))
    convs = [r for r in dyn.layers if r["kind"] == "Conv2d"]
    assert convs and all(r["executes"] == "float (dequantized)" and "int8" in r["weights"] for r in convs)
    assert all(r["stored_bytes"]["codes"] * 4 == fp32_row["stored_bytes"]["codes"]
               for r, fp32_row in zip(convs, [r for r in fp32.layers if r["kind"] == "Conv2d"]))
    assert dyn.size_bytes < 0.5 * fp32.size_bytes, (dyn.size_bytes, fp32.size_bytes)


@pytest.mark.parametrize("unknown", [-1, 0])
def test_an_upload_declaring_batch_minus_one_or_zero_runs_any_batch(tmp_path, unknown):
    """Some exporters write -1 or 0 as the batch of an input ("any"): that is not a fixed batch of -1/0
    (it crashed the batch check and the session feeder); the file runs at batch 1 and 8 as simulated."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [unknown, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [unknown, 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    w = load_workload(str(path))
    recipe = preset("int8-static", w.layer_shapes)
    out = str(tmp_path / "q.onnx")
    export_qdq(w, recipe, out)
    with torch.no_grad():
        sim = w.simulate(recipe).model(w.evaluation.inputs[0][:8]).float()
    for b in (1, 8):
        assert _sqnr_db(_outputs(out, w, b), sim[:b]) >= 30.0
    assert bench(w, recipe, batch_size=3, threads=1, budget_s=0.05).quantized.latency_ms["median"] > 0
