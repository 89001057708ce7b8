"""ONNX -> torch: converted models compute what the source model computes, layers keep the source
module paths, single operators agree with onnxruntime, and an unsupported operator is named in one line."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcore import preset
from qcore.errors import QcoreError
from qcore.io.models import load_model_file
from qcore.io.onnx.convert import convert
from qcore.io.onnx.names import module_path_from_node_name
from qcore.io.workload import load_workload
from qcore.model.simulate import find_layers


def _export(model, args, path, names, dynamic_shapes, external_data=False):
    torch.onnx.export(model, args, str(path), input_names=names, dynamo=True, dynamic_shapes=dynamic_shapes,
                      external_data=external_data)
    return path


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory, minilm):
    """minilm-l6 exported once (dynamic batch and sequence length), then loaded."""
    ids, mask = (t[:2, :8] for t in minilm.calibration.inputs)
    dims = ({0: "batch", 1: "seq"}, {0: "batch", 1: "seq"})
    path = _export(minilm.model, (ids, mask), tmp_path_factory.mktemp("onnx") / "minilm.onnx",
                   ["input_ids", "attention_mask"], dims)
    return load_model_file(path)


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory, digits_cnn):
    x = digits_cnn.calibration.inputs[0][:4]
    return _export(digits_cnn.model, (x,), tmp_path_factory.mktemp("onnx") / "cnn.onnx", ["x"], ({0: "batch"},))


def outputs(model, *xs):
    with torch.no_grad():
        return model(*xs)


def test_cnn_from_onnx_matches_the_source_model_with_module_paths(cnn_onnx, digits_cnn):
    loaded = load_model_file(cnn_onnx)
    x = digits_cnn.evaluation.inputs[0][:100]
    diff = (outputs(loaded.model, x) - outputs(digits_cnn.model, x)).abs().max().item()
    assert diff < 1e-4  # the exporter folds BatchNorm into the convs: float rounding only (measured ~6e-6)
    # The exporter folded each BatchNorm into its conv: the layers still carry the source module paths.
    assert {n: i.weight_shape for n, i in find_layers(loaded.model).items()} == \
        {n: i.weight_shape for n, i in digits_cnn.layers.items()}
    assert (loaded.format, loaded.inputs[0].sample_shape, loaded.inputs[0].dynamic) == ("onnx", (1, 8, 8), frozenset())


def test_onnx_cnn_evaluates_like_the_zoo_model(cnn_onnx, digits_cnn):
    """Same data and recipe: the converted CNN's int8 result is the zoo model's up to float rounding."""
    w = load_workload(str(cnn_onnx), None)
    assert w.task.headline == "agreement" and w.fp32_metrics["agreement"] == 1.0
    recipe = preset("int8-weight-only", digits_cnn.layer_shapes)
    got, expected = w.simulate(recipe).model, digits_cnn.simulate(recipe).model
    x = digits_cnn.evaluation.inputs[0]
    assert (outputs(got, x) - outputs(expected, x)).abs().max().item() < 1e-4
    # The export folded BatchNorm away and stored two int64 shape operands (Reshape's shape, ReduceMean's axes) as
    # initializers: the ONNX model is smaller by exactly the BatchNorm tensors less those constants.
    bn_bytes = sum(t.numel() * t.element_size() for m in digits_cnn.model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                   for t in [*m.parameters(), *m.buffers()])
    shape_bytes = sum(t.numel() * t.element_size() for n, t in w.model.named_buffers() if n.startswith("constants."))
    assert (bn_bytes, shape_bytes) == (1816, 2 * 2 * 8)
    assert digits_cnn.size(recipe)["size_bytes"] - w.size(recipe)["size_bytes"] == bn_bytes - shape_bytes


def test_mlp_from_the_dynamo_exporter_with_a_separate_weight_file(tmp_path, digits_mlp):
    x = digits_mlp.evaluation.inputs[0][:16]
    path = _export(digits_mlp.model, (x,), tmp_path / "mlp.onnx", ["x"], ({0: "batch"},), external_data=True)
    assert (tmp_path / "mlp.onnx.data").is_file()  # torch.onnx.export's default: weights beside the graph
    loaded = load_model_file(path)
    x = digits_mlp.evaluation.inputs[0][:50]
    assert torch.allclose(outputs(loaded.model, x), outputs(digits_mlp.model, x), rtol=0, atol=1e-5)
    assert list(find_layers(loaded.model)) == ["fc1", "fc2", "fc3"]
    moved = tmp_path / "alone"
    moved.mkdir()
    (moved / "mlp.onnx").write_bytes(path.read_bytes())
    with pytest.raises(QcoreError, match=r"mlp.onnx: initializer '.+' keeps its data in a separate file 'mlp.onnx.data', "
                                         r"which is not beside it; export a single file with "
                                         r"torch.onnx.export\(..., external_data=False\)"):
        load_model_file(moved / "mlp.onnx")


def test_minilm_from_onnx_matches_the_source_encoder(minilm_onnx, minilm):
    ids, mask = (t[:4] for t in minilm.evaluation.inputs)  # other batch size and sequence length than the export
    got, expected = outputs(minilm_onnx.model, ids, mask), outputs(minilm.model, ids, mask)
    assert got.shape == expected.shape == (4, 384)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)  # measured max abs diff ~1e-7
    layers = find_layers(minilm_onnx.model)
    assert {n: i.weight_shape for n, i in layers.items()} == {n: i.weight_shape for n, i in minilm.layers.items()}
    assert layers["bert.encoder.layer.5.intermediate.dense"].kind == "Linear"
    assert minilm_onnx.inputs[0].dtype == torch.int64 and minilm_onnx.inputs[0].int_range == (0, 30521)


@pytest.mark.parametrize("name, path", [
    ("/features/features.0/Conv", "features.0"),
    ("/bert/encoder/layer.0/attention/self/query/MatMul", "bert.encoder.layer.0.attention.self.query"),
    ("/block/seq/seq.0/seq.0.1/Conv", "block.seq.0.1"),
    ("/Gemm", None),
    ("node_MatMul_95", None),
])
def test_module_path_from_node_name(name, path):
    assert module_path_from_node_name(name) == path


# ---- single operators against onnxruntime ---------------------------------------------------------------
def _graph(node, inputs: dict, consts: dict | None = None, opset=17):
    consts = consts or {}
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                      for k, v in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
OP_CASES = {
    "GatherND": (helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=1),
                 {"x": X, "i": np.array([[[1, -2]], [[0, 4]]], np.int64)}, {}, 17),
    "Slice with negative step": (helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"]), {"x": X},
                                 {"s": np.array([4, -1]), "e": np.array([0, -100]), "a": np.array([2, 3]),
                                  "t": np.array([-2, -1])}, 17),
    "Pad reflect": (helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect"), {"x": X},
                    {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1])}, 17),
    "Softmax opset 11": (helper.make_node("Softmax", ["x"], ["y"], axis=1), {"x": X}, {}, 11),
    "ReduceL2": (helper.make_node("ReduceL2", ["x", "a"], ["y"], keepdims=1), {"x": X}, {"a": np.array([-1])}, 18),
    "MaxPool asymmetric": (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 3], pads=[0, 1, 1, 0], strides=[2, 1]),
                           {"x": X}, {}, 17),
    "Gemm transB": (helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1),
                    {"x": X[0, 0]}, {"w": X[1, 1, :4], "b": X[1, 2, 0, :4]}, 17),
}


@pytest.mark.parametrize("case", OP_CASES)
def test_operators_agree_with_onnxruntime(case):
    node, inputs, consts, opset = OP_CASES[case]
    model = _graph(node, inputs, consts, opset)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, inputs)[0]
    got = outputs(convert(model), *(torch.from_numpy(v) for v in inputs.values())).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5


def test_unsupported_operator_is_named_in_one_line(tmp_path, capsys):
    from test_cli import run

    node = helper.make_node("NonMaxSuppression", ["x", "s"], ["y"], name="/detector/nms")
    model = _graph(node, {"x": np.zeros((1, 4, 4), np.float32), "s": np.zeros((1, 1, 4), np.float32)})
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.INT64, [1, 3]))
    with pytest.raises(QcoreError) as e:
        convert(model)
    message = str(e.value)
    assert message.startswith("ONNX operator 'NonMaxSuppression' (node '/detector/nms') is not supported")
    assert "\n" not in message and "torch.export program (.pt2)" in message
    onnx.save(model, tmp_path / "nms.onnx")
    code, out, err = run(capsys, "evaluate", str(tmp_path / "nms.onnx"), "--preset", "int8-dynamic")
    assert (code, out) == (2, "") and "'NonMaxSuppression' (node '/detector/nms')" in err and err.count("\n") == 1
    custom = helper.make_node("Fancy", ["x"], ["y"], domain="com.example", name="n1")
    model = helper.make_model(helper.make_graph([custom], "g", [helper.make_tensor_value_info("x", 1, [1, 4])],
                                                [helper.make_tensor_value_info("y", 1, [1, 4])]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(QcoreError, match="ONNX operator 'Fancy' from domain 'com.example' \\(node 'n1'\\)"):
        convert(model)
    with pytest.raises(QcoreError, match="opset 9; the importer needs opset 11 or newer"):
        convert(_graph(helper.make_node("Relu", ["x"], ["y"]), {"x": X}, opset=9))


# ---- output sizes found before folding (the bound that stops folding bombs) -----------------------------
def _t(*shape, dtype=torch.float32):
    return torch.arange(math.prod(shape)).reshape(shape).to(dtype)


SIZE_CASES = {
    "Add broadcast": ("Add", [_t(3, 1), _t(1, 4)], {}),
    "Equal to bool": ("Equal", [_t(2, 3), _t(3)], {}),
    "Where": ("Where", [_t(2, 1, dtype=torch.bool), _t(1, 5), _t(5, dtype=torch.float64)], {}),
    "Sum variadic": ("Sum", [_t(4), _t(2, 1), _t(3, 1, 1)], {}),
    "MatMul batched": ("MatMul", [_t(2, 1, 3, 4), _t(5, 4, 6)], {}),
    "MatMul 1-D left": ("MatMul", [_t(4), _t(2, 4, 6)], {}),
    "MatMul 1-D right": ("MatMul", [_t(2, 3, 4), _t(4)], {}),
    "MatMul vectors": ("MatMul", [_t(4), _t(4)], {}),
    "Gemm transposed": ("Gemm", [_t(4, 3), _t(5, 4), _t(5)], {"transA": 1, "transB": 1}),
    "Gather axis -1": ("Gather", [_t(2, 3, 4), torch.tensor([[0, -1, 2]])], {"axis": -1}),
    "GatherElements": ("GatherElements", [_t(3, 4), torch.zeros(5, 4, dtype=torch.int64)], {"axis": 0}),
    "GatherND batch_dims": ("GatherND", [_t(2, 3, 4, 5), torch.zeros(2, 7, 2, dtype=torch.int64)], {"batch_dims": 1}),
    "Concat": ("Concat", [_t(2, 3), _t(2, 5)], {"axis": 1}),
    "Tile": ("Tile", [_t(2, 3, dtype=torch.int8), torch.tensor([3, 2])], {}),
    "Range float": ("Range", [torch.tensor(0.5), torch.tensor(3.0), torch.tensor(0.7)], {}),
    "Range empty": ("Range", [torch.tensor(5), torch.tensor(1), torch.tensor(1)], {}),
    "ConstantOfShape": ("ConstantOfShape", [torch.tensor([2, 3])], {"value": torch.tensor([7], dtype=torch.int32)}),
    "Expand": ("Expand", [_t(3, 1), torch.tensor([2, 1, 4])], {}),
    "Pad": ("Pad", [_t(2, 3), torch.tensor([1, 0, 2, 3])], {}),
    "Reshape -1": ("Reshape", [_t(2, 6), torch.tensor([3, -1])], {}),
    "Cast widens": ("Cast", [_t(2, 3, dtype=torch.bool)], {"to": 11}),
}


@pytest.mark.parametrize("case", SIZE_CASES)
def test_output_sizes_match_running_the_operator(case):
    """The oracle is the operator itself: every output's shape (flattened for Concat, Tile and Range,
    whose rules give the value count) and bytes per value, found without allocating it."""
    from qcore.model.onnx_ops import OPS, output_sizes

    op, xs, attrs = SIZE_CASES[case]
    attrs = {"_opset": 17, "_n_out": 1, **attrs}
    out = OPS[op](xs, attrs)
    real = [(tuple(o.shape), o.element_size()) for o in (out if isinstance(out, tuple) else (out,))]
    got = output_sizes(op, xs, attrs)
    if op in ("Concat", "Tile", "Range"):
        real = [((math.prod(shape),), size) for shape, size in real]
    assert got == real


# ---- operator families real models use, against onnxruntime on the same inputs ------------------------
def _model(nodes, inputs: dict, outputs: list[str], consts: dict | None = None, opset=17, subgraphs=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                     for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in (consts or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _branch(name, node_list, outputs):
    return helper.make_graph(node_list, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                    for o in outputs])


def _agree(model, inputs: dict, atol=1e-5):
    """All outputs of our module equal onnxruntime's (shape and values); returns the module."""
    expected = ort.InferenceSession(model.SerializeToString()).run(None, inputs)
    module = convert(model)
    got = outputs(module.run, *(torch.from_numpy(np.asarray(v)) for v in inputs.values()))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and np.abs(g.numpy() - e).max() <= atol, (g.shape, e.shape)
    return module


H, I, T, B = 5, 4, 6, 3
SEQ = rng.standard_normal((T, B, I)).astype(np.float32)


def _rnn_weights(gates, dirs, peepholes=False):
    w = {"W": rng.standard_normal((dirs, gates * H, I)).astype(np.float32) * 0.5,
         "R": rng.standard_normal((dirs, gates * H, H)).astype(np.float32) * 0.5,
         "B": rng.standard_normal((dirs, 2 * gates * H)).astype(np.float32) * 0.5}
    if peepholes:
        w["P"] = rng.standard_normal((dirs, 3 * H)).astype(np.float32)
    return w


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lstm_is_a_layer_and_agrees_with_onnxruntime(direction):
    from qcore.model.onnx_graph import OnnxLSTM

    dirs = 2 if direction == "bidirectional" else 1
    w = _rnn_weights(4, dirs, peepholes=True)
    state = {"h0": rng.standard_normal((dirs, B, H)).astype(np.float32),
             "c0": rng.standard_normal((dirs, B, H)).astype(np.float32)}
    node = helper.make_node("LSTM", ["x", "W", "R", "B", "lens", "h0", "c0", "P"], ["y", "yh", "yc"],
                            hidden_size=H, direction=direction)
    model = _model([node], {"x": SEQ, "lens": np.array([6, 3, 1], np.int32), **state}, ["y", "yh", "yc"], w)
    module = _agree(model, {"x": SEQ, "lens": np.array([6, 3, 1], np.int32), **state})
    (lstm,) = [m for m in module.modules() if isinstance(m, OnnxLSTM)]
    assert lstm.weight_ih.weight.shape == (dirs * 4 * H, I) and lstm.weight_ih.graph_shape == (dirs, 4 * H, I)
    assert torch.equal(lstm.weight_hh.weight, torch.from_numpy(w["R"]).reshape(dirs * 4 * H, H))
    assert {n: i.kind for n, i in find_layers(module).items() if i.kind == "LSTM"} == \
        {f"{n}.{m}": "LSTM" for n, mod in module.named_modules() if mod is lstm for m in ("weight_ih", "weight_hh")}


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_gru_agrees_with_onnxruntime(linear_before_reset):
    w = _rnn_weights(3, 2)
    node = helper.make_node("GRU", ["x", "W", "R", "B"], ["y", "yh"], hidden_size=H, direction="bidirectional",
                            linear_before_reset=linear_before_reset)
    _agree(_model([node], {"x": SEQ}, ["y", "yh"], w), {"x": SEQ})


def test_if_with_a_constant_condition_is_inlined_and_a_run_time_one_runs_its_branch():
    then = _branch("then", [helper.make_node("Mul", ["x", "two"], ["t"])], ["t"])
    other = _branch("else", [helper.make_node("Neg", ["x"], ["e"])], ["e"])
    two = {"two": np.float32(2) * np.ones(1, np.float32)}
    const = _model([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(False))),
                    helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                   {"x": X}, ["y"], two)
    module = _agree(const, {"x": X})
    assert [s.op for s in module.steps] == ["Neg", "Identity"]  # the else branch, inlined (and named y)
    # Data-dependent: the sign of x's sum picks the branch at run time (both outcomes checked).
    dynamic = _model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                      helper.make_node("Greater", ["s", "zero"], ["c"]),
                      helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                     {"x": X}, ["y"], {**two, "zero": np.zeros((), np.float32)})
    for x in (np.abs(X), -np.abs(X)):
        _agree(dynamic, {"x": x})


@pytest.mark.parametrize("mode, coordinates, scales", [
    ("nearest", "asymmetric", [1, 1, 2, 1.5]), ("nearest", "half_pixel", [1, 1, 0.6, 0.5]),
    ("linear", "half_pixel", [1, 1, 2, 1.5]), ("linear", "align_corners", [1, 1, 1.7, 0.5]),
    ("linear", "pytorch_half_pixel", [1, 1, 0.2, 3]), ("cubic", "half_pixel", [1, 1, 1.5, 0.75]),
])
def test_resize_agrees_with_onnxruntime(mode, coordinates, scales):
    node = helper.make_node("Resize", ["x", "", "s"], ["y"], mode=mode, coordinate_transformation_mode=coordinates)
    _agree(_model([node], {"x": X}, ["y"], {"s": np.array(scales, np.float32)}), {"x": X})


def test_resize_to_sizes_read_at_run_time():
    """sizes from a graph input: the output shape is decided at run time (and checked against the bound)."""
    node = helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="linear")
    _agree(_model([node], {"x": X, "sz": np.array([2, 3, 9, 4], np.int64)}, ["y"]),
           {"x": X, "sz": np.array([2, 3, 9, 4], np.int64)})
    with pytest.raises(QcoreError, match="'Resize' .* would create a tensor above 2.0 GiB at run time"):
        outputs(convert(_model([node], {"x": X, "sz": np.array([2, 3, 9, 4], np.int64)}, ["y"])),
                torch.from_numpy(X), torch.tensor([2, 3, 10**5, 10**5]))


@pytest.mark.parametrize("pads, output_padding, strides", [
    ([1, 1, 1, 1], [0, 0], [2, 2]), ([0, 2, 1, 0], [1, 0], [2, 3]), ([0, 0, 0, 0], [1, 1], [2, 2])])
def test_conv_transpose_is_a_layer_and_agrees_with_onnxruntime(pads, output_padding, strides):
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(2).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], pads=pads, output_padding=output_padding,
                            strides=strides)
    module = _agree(_model([node], {"x": X}, ["y"], {"w": w, "b": b}), {"x": X})
    (layer,) = [m for m in module.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert torch.equal(layer.weight, torch.from_numpy(w))


def test_prelu_pad_split_and_dynamic_slice_agree_with_onnxruntime():
    slope = rng.standard_normal((3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("PRelu", ["x", "slope"], ["p"]),
             helper.make_node("Pad", ["p", "pads"], ["padded"], mode="edge"),
             helper.make_node("Split", ["padded"], ["a", "b", "c"], axis=3, num_outputs=3),
             helper.make_node("Shape", ["x"], ["shape"]),  # dynamic Slice: the end is x's own size - 1
             helper.make_node("Gather", ["shape", "three"], ["w"]),
             helper.make_node("Sub", ["w", "one"], ["end"]),
             helper.make_node("Slice", ["a", "one", "end", "three"], ["s"])]
    consts = {"slope": slope, "pads": np.array([0, 0, 1, 2, 0, 0, 0, 3]), "one": np.array([1]), "three": np.array([3])}
    model = _model(nodes, {"x": X}, ["s", "b", "c"], consts, opset=18)
    _agree(model, {"x": X})


def test_several_inputs_and_outputs_and_a_scalar_input():
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"]), helper.make_node("Add", ["y", "z"], ["w"])]
    inputs = {"x": X, "k": np.array(3.0, np.float32), "z": X[:, :, :1]}
    module = _agree(_model(nodes, inputs, ["w", "y"]), inputs)
    assert module.input_names == ["x", "k", "z"] and module.output_names == ["w", "y"]
    x, k, z = (torch.from_numpy(v) for v in inputs.values())
    assert torch.equal(outputs(module, x, k, z), outputs(module.run, x, k, z)[0])  # forward: the first output
