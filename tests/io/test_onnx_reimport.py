"""Quantized ONNX files re-imported (``qcore.io.onnx.quantized``, ``qcore.model.onnx_quant_ops``).

Oracles: ONNX Runtime running the file with its optimizer off (it then runs the file's own nodes: QuantizeLinear,
DequantizeLinear, MatMulNBits, GatherBlockQuantized as written), ``onnx.reference`` for the decode functions, and
a QuantizeLinear/DequantizeLinear case computed by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from qcore.errors import QcoreError
from qcore.export import export_qdq
from qcore.io.onnx.file import load_onnx_file
from qcore.model.onnx_quant_ops import dequantize_linear, dynamic_quantize_linear, quantize_linear
from qcore.recipe import preset

LIMIT = 2**30


def ort_run(path: str, xs: list[np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the file's nodes, as written
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return s.run(None, dict(zip([i.name for i in s.get_inputs()], xs)))[0]


def compare(path: str, inputs, batches=(1, 8)) -> list[tuple[float, float]]:
    """(cosine, max abs error) of the imported model's output against ONNX Runtime's, per batch size."""
    model = load_onnx_file(Path(path), LIMIT).model
    out = []
    for b in batches:
        xs = [t[:b] for t in inputs]
        ref = ort_run(path, [x.numpy() for x in xs])
        with torch.no_grad():
            got = model(*xs).numpy()
        cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
        out.append((cos, float(np.abs(got - ref).max())))
    return out


# ---- every preset exported from a zoo model, re-imported, against ONNX Runtime on the file -------------------

PRESETS = ["int8-static", "int8-dynamic", "int8-weight-only", "int4-weight-only", "int4-int8compute"]


@pytest.mark.parametrize("name", PRESETS + ["w8a8-smoothquant-mul"])
def test_reimported_export_computes_what_onnx_runtime_computes(name, digits_cnn, tmp_path):
    w = digits_cnn
    path = str(tmp_path / f"{name}.onnx")
    export_qdq(w, preset(name, w.layer_shapes), path)
    loaded = load_onnx_file(Path(path), LIMIT)
    layers = [m for m in loaded.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == len(w.layer_shapes)  # every layer is an ordinary layer again
    assert any(n.startswith("the file is already quantized") for n in loaded.notes), loaded.notes
    # measured: cosine >= 0.9999998, max abs error <= 2e-5 (float32 summation order) at batch 1 and 8
    for cos, err in compare(path, w.evaluation.inputs):
        assert cos > 0.99999 and err < 1e-4, (name, cos, err)


def test_int8_weights_decode_onto_the_files_grid(digits_cnn, tmp_path):
    """The imported Conv weight is the file's codes times its scales, read here with onnx's numpy_helper."""
    path = str(tmp_path / "m.onnx")
    export_qdq(digits_cnn, preset("int8-weight-only", digits_cnn.layer_shapes), path)
    proto = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "features.0.weight")
    codes, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
    model = load_onnx_file(Path(path), LIMIT).model
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    np.testing.assert_array_equal(conv.weight.detach().numpy(), codes * scale.reshape(-1, 1, 1, 1))


@pytest.fixture(scope="module")
def minilm_int4(minilm, tmp_path_factory):
    """minilm-l6 exported with int4-int8compute (MatMulNBits accuracy_level 4, GatherBlockQuantized embeddings), and
    the same file with accuracy_level 0 (= int4-weight-only's graph: float compute)."""
    folder = tmp_path_factory.mktemp("minilm")
    path = str(folder / "acc4.onnx")
    export_qdq(minilm, preset("int4-int8compute", minilm.layer_shapes), path)
    proto = onnx.load(path)
    for n in proto.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    onnx.save(proto, str(folder / "acc0.onnx"))
    return path, str(folder / "acc0.onnx")


def test_minilm_int4_matmulnbits_and_gather_block_quantized(minilm, minilm_int4):
    acc4, acc0 = minilm_int4
    ops = {n.op_type for n in onnx.load(acc0).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    # float compute: measured cosine 1.0000000, max abs error 1.4e-7 (batch 1 and 8)
    for cos, err in compare(acc0, minilm.evaluation.inputs):
        assert cos > 0.99999 and err < 1e-5, (cos, err)
    # int8 compute: A is re-quantized before every Linear, so an input differing by one float32 ulp (summation
    # order) at a rounding boundary flips a code and the flips compound over 36 layers: measured cosine 0.99991-0.99994
    for cos, err in compare(acc4, minilm.evaluation.inputs):
        assert cos > 0.9999, cos
    notes = load_onnx_file(Path(acc4), LIMIT).notes
    assert any("accuracy_level 4: 36 layers" in n for n in notes), notes


# ---- hand-computed and reference-checked decode functions ---------------------------------------------------

def _qdq_file(tmp_path, scale: float, zp: int) -> str:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                              [numpy_helper.from_array(np.array(scale, np.float32), "s"),
                               numpy_helper.from_array(np.array(zp, np.uint8), "z")])
    path = str(tmp_path / "qdq.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def test_quantize_dequantize_by_hand(tmp_path):
    # x / 0.25 = -4, 1, 1.5, 2.5, 10.4, -0.5 -> round half to even: -4, 1, 2, 2, 10, -0 -> + 3, saturated to
    # [0, 255]: 0, 4, 5, 5, 13, 3 -> (q - 3) * 0.25
    x = torch.tensor([[-1.0, 0.25, 0.375, 0.625, 2.6, -0.125]])
    loaded = load_onnx_file(Path(_qdq_file(tmp_path, 0.25, 3)), LIMIT)
    with torch.no_grad():
        y = loaded.model(x)
    np.testing.assert_array_equal(y.numpy(), [[-0.75, 0.25, 0.5, 0.5, 2.5, 0.0]])
    assert any("1 QuantizeLinear with fixed scales" in n for n in loaded.notes), loaded.notes


@st.composite
def _quantized(draw):
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    kind = draw(st.sampled_from(["tensor", "axis", "block"]))
    block = draw(st.integers(1, 4)) if kind == "block" else 0
    n = shape[axis]
    pshape = () if kind == "tensor" else (n,) if kind == "axis" else tuple(
        -(-n // block) if d == axis % rank else s for d, s in enumerate(shape))
    dtype = draw(st.sampled_from([np.uint8, np.int8]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    scale = rng.uniform(0.01, 2.0, pshape).astype(np.float32)
    zp = rng.integers(info.min, info.max + 1, pshape).astype(dtype)
    x = (rng.standard_normal(shape) * 100).astype(np.float32)
    x.flat[0] = float(scale.flat[0]) * 2.5  # a tie
    return x, scale, zp, axis, block


def _reference(op: str, inputs: list[np.ndarray], **attrs) -> np.ndarray:
    names = [f"i{k}" for k in range(len(inputs))]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in names],
                              [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ReferenceEvaluator(model).run(None, dict(zip(names, inputs)))[0]


@settings(max_examples=80)
@given(_quantized())
def test_quantize_and_dequantize_match_onnx_reference(case):
    x, scale, zp, axis, block = case
    attrs = {"axis": axis, **({"block_size": block} if block else {})}
    q = quantize_linear(torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp), axis, block)
    expected_q = _reference("QuantizeLinear", [x, scale, zp], **attrs)
    np.testing.assert_array_equal(q.numpy(), expected_q)
    y = dequantize_linear(q, torch.from_numpy(scale), torch.from_numpy(zp), axis, block)
    np.testing.assert_array_equal(y.numpy(), _reference("DequantizeLinear", [expected_q, scale, zp], **attrs))


@settings(max_examples=40)
@given(st.integers(0, 2**31 - 1), st.sampled_from([-1.0, 0.0, 1.0]))
def test_dynamic_quantize_linear_matches_onnx_reference(seed, shift):
    x = (np.random.default_rng(seed).standard_normal((3, 7)) + shift).astype(np.float32)
    names = ["x"]
    node = helper.make_node("DynamicQuantizeLinear", names, ["y", "s", "z"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in "ysz"])
    expected = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])).run(None, {"x": x})
    for got, want in zip(dynamic_quantize_linear(torch.from_numpy(x)), expected):
        np.testing.assert_array_equal(got.numpy(), want)


def _nbits_file(tmp_path, rng, bits: int, K: int, N: int, block: int, zero_points: bool, **extra) -> str:
    kb = -(-K // block)
    packed = rng.integers(0, 256, (N, kb, block * bits // 8), dtype=np.uint8)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(rng.uniform(0.01, 0.1, (N, kb)).astype(np.float32), "s")]
    inputs = ["A", "B", "s"]
    if zero_points:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (N, -(-kb * bits // 8)), dtype=np.uint8), "z"))
        inputs.append("z")
    inputs += extra.pop("more_inputs", [])
    if "g" in inputs:  # act-order group indices
        inits.append(numpy_helper.from_array(np.arange(K, dtype=np.int32) // block, "g"))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", name="mm", K=K, N=N, bits=bits,
                            block_size=block, **extra)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], inits)
    path = str(tmp_path / f"nbits_{bits}_{K}_{N}_{block}_{zero_points}.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]), path)
    return path


@settings(max_examples=12)
@given(bits=st.sampled_from([2, 4, 8]), block=st.sampled_from([16, 32]), K=st.integers(1, 70), N=st.integers(1, 9),
       zero_points=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matmul_nbits_decodes_as_onnx_runtime(bits, block, K, N, zero_points, seed, tmp_path_factory):
    """Packing (low bits first), per-block scales, packed zero-points (default 2**(bits-1)), K not a multiple of
    the block: the imported Linear against ONNX Runtime's MatMulNBits kernel."""
    rng = np.random.default_rng(seed)
    path = _nbits_file(tmp_path_factory.mktemp("nbits"), rng, bits, K, N, block, zero_points)
    a = torch.from_numpy(rng.standard_normal((3, K)).astype(np.float32))
    with torch.no_grad():
        got = load_onnx_file(Path(path), LIMIT).model(a).numpy()
    np.testing.assert_allclose(got, ort_run(path, [a.numpy()]), rtol=1e-5, atol=1e-5)


def test_unsupported_quantized_inputs_are_one_line(tmp_path):
    rng = np.random.default_rng(0)
    path = _nbits_file(tmp_path, rng, 4, 32, 4, 32, False, more_inputs=["", "g"])
    with pytest.raises(QcoreError, match=r"MatMulNBits \(node 'mm'\) has a g_idx input") as e:
        load_onnx_file(Path(path), LIMIT)
    assert "\n" not in str(e.value)
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q4", output_dtype=TensorProto.INT4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("q", TensorProto.INT4, ["N", 2])],
                              [numpy_helper.from_array(np.array(0.5, np.float32), "s")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "q4.onnx"))
    with pytest.raises(QcoreError, match=r"QuantizeLinear \(node 'q4'\) quantizes to a type other than"):
        load_onnx_file(tmp_path / "q4.onnx", LIMIT)
