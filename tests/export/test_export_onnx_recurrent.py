"""An uploaded ONNX LSTM / GRU exported with quantized activations: its cell unrolled (``qcore.export.onnx.recurrent``).

Oracles: ONNX Runtime's own LSTM / GRU kernels on the original file (the unrolled float graph computes
what the operator computes), and the engine's simulation (``OnnxLSTM`` / ``OnnxGRU``, a Python loop
over steps, which the file must equal at batch 1 and 8 for int8-static and int8-dynamic).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcore.errors import QcoreError
from qcore.export.graph import GraphEditor
from qcore.export.onnx.float_graph import float_graph
from qcore.export.onnx.qdq import export_qdq
from qcore.export.onnx.recurrent import unroll_recurrent
from qcore.model.task import classification_task
from qcore.model.workload import Data, Workload
from qcore.recipe import preset

HIDDEN, INPUT = 5, 3

# (op, direction, sequence length, extra node attributes / inputs): every gate formula the unrolled cell writes
CASES = {
    "lstm-bidirectional-seq4": ("LSTM", "bidirectional", 4, {}),
    "lstm-seq1-peephole-clip": ("LSTM", "forward", 1, {"peephole": True, "clip": 0.5}),
    "lstm-reverse-seq3-input-forget": ("LSTM", "reverse", 3, {"input_forget": 1}),
    "gru-seq1": ("GRU", "forward", 1, {}),
    "gru-bidirectional-seq3-linear-before-reset": ("GRU", "bidirectional", 3, {"linear_before_reset": 1}),
}


def _model(op: str, direction: str, seq: int, extra: dict, initial_state: bool = False, hidden: int = HIDDEN,
           inp: int = INPUT) -> onnx.ModelProto:
    """x (N, seq, inp) -> Transpose -> op (W, R, B[, P]) -> [Y, Y_h(, Y_c)] each moved batch first and
    flattened -> Concat: (N, features). ``initial_state``: initial_h (and initial_c) constants broadcast to
    the batch by adding zeros computed from x, so the node's state inputs are run-time values."""
    rng = np.random.default_rng(len(op) + seq)
    gates, dirs = (4 if op == "LSTM" else 3), (2 if direction == "bidirectional" else 1)
    inits = {"W": rng.standard_normal((dirs, gates * hidden, inp)).astype(np.float32) * 0.6,
             "R": rng.standard_normal((dirs, gates * hidden, hidden)).astype(np.float32) * 0.6,
             "B": rng.standard_normal((dirs, 2 * gates * hidden)).astype(np.float32) * 0.2}
    inputs = ["xt", "W", "R", "B"]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2])]  # (seq, N, in): ORT has no layout=1
    if initial_state:  # (dirs, 1, H) + (1, N, 1) zeros computed from x: run-time (dirs, N, H) states
        inits.update(h0=rng.standard_normal((dirs, 1, hidden)).astype(np.float32) * 0.5,
                     c0=rng.standard_normal((dirs, 1, hidden)).astype(np.float32) * 0.5,
                     zero=np.zeros(1, np.float32), axes=np.array([0, 2], np.int64))
        nodes += [helper.make_node("Mul", ["xt", "zero"], ["z"]),
                  helper.make_node("ReduceSum", ["z", "axes"], ["zb"], keepdims=1),
                  helper.make_node("Add", ["zb", "h0"], ["h0b"]),
                  helper.make_node("Add", ["zb", "c0"], ["c0b"])]
        inputs += ["", "h0b"] + (["c0b"] if op == "LSTM" else [])
    attrs = {"hidden_size": hidden, "direction": direction}
    if extra.get("peephole"):
        inits["P"] = rng.standard_normal((dirs, 3 * hidden)).astype(np.float32) * 0.5
        inputs += [""] * (7 - len(inputs)) + ["P"]
    attrs.update({k: v for k, v in extra.items() if k != "peephole"})
    outs = ["y", "yh"] + (["yc"] if op == "LSTM" else [])
    nodes.append(helper.make_node(op, inputs, outs, name="rnn", **attrs))
    nodes += [helper.make_node("Transpose", ["y"], ["yt"], perm=[2, 0, 1, 3]),  # (N, seq, dirs, H)
              helper.make_node("Flatten", ["yt"], ["yf"], axis=1)]
    flat = ["yf"]
    for o in outs[1:]:
        nodes += [helper.make_node("Transpose", [o], [o + "t"], perm=[1, 0, 2]),
                  helper.make_node("Flatten", [o + "t"], [o + "f"], axis=1)]
        flat.append(o + "f")
    nodes.append(helper.make_node("Concat", flat, ["out"], axis=1))
    width = dirs * hidden * (seq + len(outs) - 1)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, inp])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", width])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _workload(tmp_path, proto, seq: int, inp: int = INPUT):
    from qcore.io.models import load_model_file

    path = tmp_path / "rnn.onnx"
    path.write_bytes(proto.SerializeToString())
    module = load_model_file(str(path)).model
    x = torch.from_numpy(np.random.default_rng(seq).standard_normal((16, seq, inp)).astype(np.float32))
    width = proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    return Workload("onnx-rnn", module, Data((x[:12],)), Data((x,)), classification_task(width, False)), x, path


def _run(path_or_bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("case", list(CASES) + ["lstm-initial-state", "gru-initial-state"])
def test_unrolled_float_graph_equals_onnx_runtimes_own_operator(tmp_path, case):
    """The unrolled cell in float (no quantizer) against ONNX Runtime's LSTM / GRU kernel on the original file."""
    if case.endswith("initial-state"):
        op, direction, seq, extra, state = case.split("-")[0].upper(), "bidirectional", 3, {}, True
    else:
        (op, direction, seq, extra), state = CASES[case], False
    w, x, path = _workload(tmp_path, _model(op, direction, seq, extra, state), seq)
    graph = float_graph(w)
    ed = GraphEditor(graph.proto)
    notes = unroll_recurrent(ed, graph.weights, w.model, w, set(w.layers))
    ed.finish()
    assert not [n for n in graph.proto.graph.node if n.op_type in ("LSTM", "GRU")]
    assert f"unrolled over {seq} time step(s)" in notes[0]
    matmuls = sum(n.op_type == "MatMul" for n in graph.proto.graph.node)
    dirs = 2 if direction == "bidirectional" else 1
    per_step = 2 if op == "LSTM" or extra.get("linear_before_reset") else 3  # a GRU's R also runs on r * h
    assert matmuls == dirs * seq * per_step
    for b in (1, 8):
        expected = _run(str(path), x[:b].numpy())
        np.testing.assert_allclose(_run(graph.proto.SerializeToString(), x[:b].numpy()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["int8-static", "int8-dynamic"])
@pytest.mark.parametrize("case", list(CASES))
def test_int8_file_of_an_onnx_rnn_equals_the_simulation_at_batch_1_and_8(tmp_path, case, recipe):
    op, direction, seq, extra = CASES[case]
    w, x, _ = _workload(tmp_path, _model(op, direction, seq, extra), seq)
    r = preset(recipe, w.layer_shapes)
    e = export_qdq(w, r, str(tmp_path / "q.onnx"))
    sim = w.simulate(r).model
    for b in (1, 8):
        with torch.no_grad():
            expected = sim(x[:b]).numpy()  # a dynamic range is the batch's: the simulation runs the same batch
        got = _run(str(tmp_path / "q.onnx"), x[:b].numpy())
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the quantizers act: the file is not the float model
        assert np.abs(_run(str(tmp_path / "q.onnx"), x[:8].numpy()) - w.model(x[:8]).numpy()).max() > 1e-4
    rows = {row["layer"]: row for row in e.layers}
    for name in (n for n in w.layers if n.endswith("weight_hh")):  # the hidden state is quantized in the file
        assert rows[name]["activations"].startswith("int8 " + ("static" if recipe == "int8-static" else "dynamic"))
    assert any("unrolled" in n for n in e.notes)


@settings(max_examples=12, deadline=None)
@given(op=st.sampled_from(["LSTM", "GRU"]), direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
       seq=st.integers(1, 3), hidden=st.integers(1, 6), inp=st.integers(1, 5), batch=st.integers(1, 9),
       dynamic=st.booleans())
def test_random_rnn_shapes_int8_file_equals_the_simulation(tmp_path_factory, op, direction, seq, hidden, inp, batch,
                                                           dynamic):
    tmp = tmp_path_factory.mktemp("rnn")
    w, x, _ = _workload(tmp, _model(op, direction, seq, {}, hidden=hidden, inp=inp), seq, inp)
    r = preset("int8-dynamic" if dynamic else "int8-static", w.layer_shapes)
    export_qdq(w, r, str(tmp / "q.onnx"))
    with torch.no_grad():
        expected = w.simulate(r).model(x[:batch]).numpy()
    np.testing.assert_allclose(_run(str(tmp / "q.onnx"), x[:batch].numpy()), expected, rtol=1e-4, atol=1e-5)


def test_weight_only_keeps_the_onnx_operator(tmp_path):
    """Nothing to quantize between the steps: the file keeps the LSTM node (any sequence length)."""
    w, x, _ = _workload(tmp_path, _model("LSTM", "forward", 2, {}), 2)
    export_qdq(w, preset("int8-weight-only", w.layer_shapes), str(tmp_path / "w.onnx"))
    assert [n.op_type for n in onnx.load(str(tmp_path / "w.onnx")).graph.node].count("LSTM") == 1


def test_sequence_lens_is_refused_in_one_line(tmp_path):
    proto = _model("GRU", "forward", 2, {})
    proto.graph.initializer.extend([numpy_helper.from_array(np.array([1, 2], np.int64), "len_axes"),
                                    numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    rnn = next(n for n in proto.graph.node if n.op_type == "GRU")
    lens = [helper.make_node("ReduceSum", ["x", "len_axes"], ["xs"], keepdims=0),  # (N,): every entry 2
            helper.make_node("Mul", ["xs", "two"], ["xs0"]), helper.make_node("Sub", ["xs0", "xs0"], ["zeros"]),
            helper.make_node("Add", ["zeros", "two"], ["lf"]), helper.make_node("Cast", ["lf"], ["lens"], to=6)]
    at = list(proto.graph.node).index(rnn)
    for k, n in enumerate(lens):
        proto.graph.node.insert(at + k, n)
    rnn.input.extend(["lens"])
    w, _, _ = _workload(tmp_path, proto, 2)
    with pytest.raises(QcoreError, match="sequence_lens.*weight-only"):
        export_qdq(w, preset("int8-static", w.layer_shapes), str(tmp_path / "q.onnx"))
