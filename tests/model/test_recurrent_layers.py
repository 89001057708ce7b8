"""Every layer that holds weights is a quantizable layer: LSTM, GRU (torch and ONNX-imported),
ConvTranspose, grouped and depthwise convolutions.

Oracles: torch's fused ``nn.LSTM`` / ``nn.GRU`` for the unrolled cells in float; a hand-written LSTM
step loop with torch's own ``fake_quantize_per_channel_affine`` / ``fake_quantize_per_tensor_affine``
(round half to even) for the quantized simulation; ``F.conv_transpose2d`` / ``F.conv2d`` with weights
quantized per output channel by hand; ONNX Runtime running the exported file; the parameter counts
torch reports; a whole-model evaluation for one sensitivity row.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qcore.export.onnx.qdq import export_qdq
from qcore.export.safetensors import export_safetensors, load_safetensors
from qcore.model.recurrent import UnrolledGRU, UnrolledLSTM
from qcore.model.simulate import find_layers, fold_batchnorm
from qcore.model.workload import Data, Workload
from qcore.model.task import classification_task
from qcore.recipe import Recipe, preset

INT8_W = {"format": "int8", "granularity": "per_channel", "symmetric": True}
INT8_STATIC = {"format": "int8", "granularity": "per_tensor", "symmetric": True, "range": "minmax", "dynamic": False}


class Speech(nn.Module):
    """Depthwise conv -> grouped ConvTranspose (T -> 2T) -> bidirectional LSTM -> GRU -> Linear."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv1d(4, 4, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1, groups=2)
        self.lstm = nn.LSTM(6, 8, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(16, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x (B, 4, T)
        y = self.up(torch.relu(self.dw(x))).transpose(1, 2)  # (B, 2T, 6)
        y, _ = self.lstm(y)
        _, h = self.gru(y)
        return self.head(h[0])


def _speech_workload(n=24, t=2):
    torch.manual_seed(0)
    x = torch.randn(n, 4, t)
    return Workload("speech", Speech().eval(), Data((x,)), Data((x,)), classification_task(3, False))


@pytest.fixture(scope="module")
def speech():
    return _speech_workload()


# ---- the unrolled cells are torch's in float -------------------------------------------------------
@pytest.mark.parametrize("cls,unrolled", [(nn.LSTM, UnrolledLSTM), (nn.GRU, UnrolledGRU)])
def test_unrolled_cell_equals_torch_in_float(cls, unrolled):
    torch.manual_seed(1)
    for kw in ({"num_layers": 2, "bidirectional": True, "batch_first": True}, {"bias": False}):
        rnn = cls(5, 7, **kw).eval()
        x = torch.randn(3, 6, 5)
        h0 = torch.randn((2 * 2 if kw.get("bidirectional") else 1), 3, 7)  # (layers * directions, batch, hidden)
        hx = (h0, torch.randn_like(h0)) if cls is nn.LSTM else h0
        xin = x if kw.get("batch_first") else x.transpose(0, 1)
        with torch.no_grad():
            (y, hn), (y2, hn2) = rnn(xin, hx), unrolled(rnn)(xin, hx)
        assert (y - y2).abs().max() < 1e-6
        for a, b in zip(hn if isinstance(hn, tuple) else (hn,), hn2 if isinstance(hn2, tuple) else (hn2,)):
            assert (a - b).abs().max() < 1e-6
    with torch.no_grad():  # unbatched input (seq, in)
        rnn = cls(5, 7).eval()
        assert (rnn(x[0])[0] - unrolled(rnn)(x[0])[0]).abs().max() < 1e-6


# ---- inspect: every weight is in a layer -----------------------------------------------------------
def test_inspect_finds_every_weight_matrix(speech):
    layers = speech.layers
    torch_names = {n.rsplit(".", 1)[0] if n.startswith(("dw", "up", "head")) else n
                   for n, _ in speech.model.named_parameters() if "bias" not in n}
    assert set(layers) == torch_names  # lstm.weight_ih_l0, ..., lstm.weight_hh_l0_reverse, gru.weight_ih_l0, dw, up, head
    assert {layers[n].kind for n in layers} == {"Conv1d", "ConvTranspose1d", "LSTM", "GRU", "Linear"}
    assert layers["lstm.weight_hh_l0_reverse"].weight_shape == (32, 8)
    assert layers["gru.weight_ih_l0"].weight_shape == (15, 16)
    assert layers["up"].weight_shape == (6, 2, 4)  # Conv layout (C_out, C_in / groups, k): output channel first
    assert layers["dw"].weight_shape == (4, 1, 3)
    # 100 % of the weights (and biases) are in quantizable layers
    assert sum(i.params for i in layers.values()) == sum(p.numel() for p in speech.model.parameters())


def test_size_counts_one_scale_per_output_channel(speech):
    r = Recipe.from_dict({"name": "w8", "weights": INT8_W, "activations": None})
    rows = {row["name"]: row for row in speech.size(r)["layers"]}
    assert rows["lstm.weight_ih_l0"]["size_bytes"] == 32 * 6 + 32 * 4  # int8 codes + one float32 scale per gate row
    assert rows["up"]["size_bytes"] == 6 * 2 * 4 + 6 * 4  # ConvTranspose: C_out = 6 scales, not C_in = 4
    assert rows["dw"]["size_bytes"] == 4 * 3 + 4 * 4


# ---- quantized simulation vs a hand computation -----------------------------------------------------
def _q_rows(w):  # symmetric int8 per output channel (axis 0), absmax / 127, round half to even
    scale = w.abs().reshape(w.shape[0], -1).amax(1) / 127
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(w.shape[0], dtype=torch.int32), 0, -128, 127)


def _q_static(x, amax):
    return torch.fake_quantize_per_tensor_affine(x, amax / 127, 0, -128, 127)


def test_int8_lstm_simulation_equals_hand_computation():
    torch.manual_seed(2)
    model = nn.Sequential(nn.LSTM(4, 6, batch_first=True)).eval()
    x = torch.randn(16, 5, 4)
    w = Workload("lstm", model, Data((x,)), Data((x,)), Task3)
    r = Recipe.from_dict({"name": "w8a8", "weights": INT8_W, "activations": INT8_STATIC})
    sim = w.simulate(r).model
    lstm = model[0]
    with torch.no_grad():
        y_fp32, _ = lstm(x)
        amax_x = x.abs().max()
        amax_h = y_fp32[:, :-1].abs().max()  # h_{t-1} over every step (h_0 = 0)
        w_ih, w_hh = _q_rows(lstm.weight_ih_l0), _q_rows(lstm.weight_hh_l0)
        h = c = torch.zeros(16, 6)
        ys = []
        for t in range(5):  # torch's gate order i, f, g, o
            gates = _q_static(x[:, t], amax_x) @ w_ih.T + lstm.bias_ih_l0 + _q_static(h, amax_h) @ w_hh.T + lstm.bias_hh_l0
            i, f, g, o = gates.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            ys.append(h)
        expected = torch.stack(ys, 1)
        got, _ = sim(x)
    assert (got - expected).abs().max() < 1e-5
    assert (got - y_fp32).abs().max() > 1e-3  # the quantization did something


Task3 = classification_task(6, False)


def test_conv_transpose_and_depthwise_quantize_per_output_channel():
    torch.manual_seed(3)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    model = nn.Sequential(up, nn.ReLU(), dw).eval()
    x = torch.randn(2, 4, 5, 5)
    w = Workload("dec", model, Data((x,)), Data((x,)), classification_task(6, False))
    assert {n: i.kind for n, i in w.layers.items()} == {"0": "ConvTranspose2d", "2": "Conv2d"}
    r = Recipe.from_dict({"name": "w8", "weights": INT8_W, "activations": None})
    with torch.no_grad():
        # output channel o of group j: rows j*2:(j+1)*2, column o % 3 of the (C_in, C_out / g, k, k) weight
        wt = up.weight.clone()
        for o in range(6):
            j, oo = divmod(o, 3)
            block = wt[2 * j:2 * j + 2, oo]
            wt[2 * j:2 * j + 2, oo] = torch.round(block / (block.abs().max() / 127)) * (block.abs().max() / 127)
        y = F.conv_transpose2d(x, wt, up.bias, 2, 1, 1, 2)
        expected = F.conv2d(torch.relu(y), _q_rows(dw.weight), dw.bias, padding=1, groups=6)
        got = w.simulate(r).model(x)
    assert (got - expected).abs().max() < 1e-5


# ---- sensitivity and search see them ---------------------------------------------------------------
def test_sweep_and_search_run_on_recurrent_layers(speech):
    from qcore.analysis.search import search
    from qcore.analysis.sensitivity import sweep

    result = sweep(speech, ["int4-weight-only"], mode="weights", view="only")
    rows = {row.layer: row for row in result.rows}
    assert {"lstm.weight_hh_l0", "gru.weight_ih_l0", "up", "dw"} <= set(rows)
    # oracle: the whole model evaluated with only that matrix quantized
    one = Recipe.from_dict({"name": "one", "weights": None, "activations": None,
                            "layers": {"lstm.weight_hh_l0": {"weights": preset("int4-weight-only").weights.to_dict()}}})
    assert rows["lstm.weight_hh_l0"].changed
    assert rows["lstm.weight_hh_l0"].metric == pytest.approx(speech.evaluate(one).quantized.metrics["agreement"])
    found = search(speech, ["int8-weight-only", "int4-weight-only"], max_size_fraction=0.5)
    assert found.met and found.measured.size_bytes <= 0.5 * speech.size(preset("fp32"))["fp32_bytes"]


# ---- export: the file is the simulation ------------------------------------------------------------
def test_onnx_export_of_torch_recurrent_model_equals_simulation_at_batch_1_and_8(speech, tmp_path):
    r = preset("int8-static")
    e = export_qdq(speech, r, str(tmp_path / "speech.onnx"))
    sim = speech.simulate(r).model
    sess = ort.InferenceSession(str(tmp_path / "speech.onnx"), providers=["CPUExecutionProvider"])
    x = speech.evaluation.inputs[0]
    for b in (1, 8):
        with torch.no_grad():
            expected = sim(x[:b]).numpy()
        assert np.abs(sess.run(None, {"input_0": x[:b].numpy()})[0] - expected).max() < 1e-4
    rows = {row["layer"]: row for row in e.layers}
    assert rows["lstm.weight_hh_l0_reverse"]["activations"].startswith("int8 static")
    assert "recurrent matrix" in rows["gru.weight_hh_l0"]["reason"]
    assert "ConvTranspose" in rows["up"]["reason"]


def test_safetensors_round_trip_of_recurrent_and_transposed_layers(speech, tmp_path):
    r = preset("int8-static")
    export_safetensors(speech, r, str(tmp_path / "s.safetensors"))
    recipe, model = load_safetensors(str(tmp_path / "s.safetensors"), speech)
    x = speech.evaluation.inputs[0]
    with torch.no_grad():
        assert torch.equal(model(x), speech.simulate(r).model(x))
    assert recipe == r


# ---- an uploaded ONNX LSTM: weights into W / R; quantized activations unroll its cell ---------------
def _onnx_lstm_workload(tmp_path, op="LSTM"):
    from qcore.io.models import load_model_file

    rng = np.random.default_rng(0)
    hidden, inp, gates = 5, 3, 4 if op == "LSTM" else 3
    inits = {"W": rng.standard_normal((2, gates * hidden, inp)).astype(np.float32) * 0.5,
             "R": rng.standard_normal((2, gates * hidden, hidden)).astype(np.float32) * 0.5,
             "B": rng.standard_normal((2, 2 * gates * hidden)).astype(np.float32) * 0.1}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),  # (seq, N, in): ORT has no layout=1
             helper.make_node(op, ["xt", "W", "R", "B"], ["y", "yh"], hidden_size=hidden,
                              direction="bidirectional", name="enc"),
             helper.make_node("Transpose", ["yh"], ["yht"], perm=[1, 0, 2]),
             helper.make_node("Flatten", ["yht"], ["out"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, inp])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2 * hidden])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    path = tmp_path / "lstm.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
    module = load_model_file(str(path))
    module = module.model
    x = torch.from_numpy(rng.standard_normal((16, 4, inp)).astype(np.float32))
    return Workload("onnx-lstm", module, Data((x,)), Data((x,)), classification_task(2 * hidden, False)), x


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_uploaded_onnx_rnn_exports_weights_and_its_hidden_state_quantization(tmp_path, op):
    w, x = _onnx_lstm_workload(tmp_path, op)
    (ih,) = [n for n in w.layers if n.endswith("weight_ih")]
    gates = 4 if op == "LSTM" else 3
    assert w.layer_shapes[ih] == (2 * gates * 5, 3) and w.layers[ih].kind == op  # both directions' W rows stacked
    weight_only = Recipe.from_dict({"name": "w8", "weights": INT8_W, "activations": None})
    x_only = Recipe.from_dict({"name": "w8", "weights": INT8_W, "activations": None,
                               "layers": {n: {"weights": INT8_W, "activations": INT8_STATIC}
                                          for n in w.layers if n.endswith("weight_ih")}})
    all_static = Recipe.from_dict({"name": "a8", "weights": INT8_W, "activations": INT8_STATIC})
    for r in (weight_only, x_only, all_static):  # the last two unroll the cell (tests/export/test_export_onnx_recurrent.py)
        export_qdq(w, r, str(tmp_path / "q.onnx"))
        sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = w.simulate(r).model(x[:8]).numpy()
        for b in (1, 8):
            assert np.abs(sess.run(None, {"input_0": x[:b].numpy()})[0] - expected[:b]).max() < 1e-4


def test_fold_step_unrolls_a_model_that_is_only_an_lstm_wrapper():
    model = nn.Sequential(nn.GRU(3, 4))
    fold_batchnorm(model)
    assert isinstance(model[0], UnrolledGRU) and set(find_layers(model)) == {"0.weight_ih_l0", "0.weight_hh_l0"}


def test_uploaded_onnx_conv_transpose_exports_in_its_layout(tmp_path):
    from qcore.io.models import load_model_file

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # (C_in, C_out / groups, k, k), groups 2: C_out 6
    nodes = [helper.make_node("ConvTranspose", ["x", "up.weight", "up.bias"], ["y"], group=2, strides=[2, 2],
                              pads=[1, 1, 1, 1], name="up"),
             helper.make_node("Relu", ["y"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 6, 9, 9])],
                              [numpy_helper.from_array(w, "up.weight"),
                               numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "up.bias")])
    path = tmp_path / "up.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
    x = torch.from_numpy(rng.standard_normal((16, 4, 5, 5)).astype(np.float32))
    work = Workload("up", load_model_file(str(path)).model, Data((x,)), Data((x,)), classification_task(6, False))
    assert work.layer_shapes == {"up": (6, 2, 3, 3)}
    r = preset("int8-static")
    e = export_qdq(work, r, str(tmp_path / "q.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = work.simulate(r).model(x[:8]).numpy()
    for b in (1, 8):
        assert np.abs(sess.run(None, {"input_0": x[:b].numpy()})[0] - expected[:b]).max() < 1e-4
    assert e.layers[0]["executes"] == "float (dequantized)" and "ConvTranspose" in e.layers[0]["reason"]


@pytest.mark.parametrize("dynamic", [False, True])  # a dynamic batch passes its size symbol to the LSTM's leaf
def test_pt2_program_with_lstm_and_gru_loads_them_as_layers(tmp_path, dynamic):
    from qcore.io.models import load_model_file

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.gru = nn.LSTM(3, 4, num_layers=2, batch_first=True), nn.GRU(4, 2, bidirectional=True)

        def forward(self, x):
            y, _ = self.lstm(x)
            z, h = self.gru(y.transpose(0, 1))
            return z[-1] + h.sum(0).repeat(1, 2)

    torch.manual_seed(4)
    model = Encoder().eval()
    program = torch.export.export(model, (torch.randn(2, 5, 3),),
                                  dynamic_shapes=({0: torch.export.Dim.DYNAMIC},) if dynamic else None)
    torch.export.save(program, str(tmp_path / "enc.pt2"))
    loaded = load_model_file(str(tmp_path / "enc.pt2")).model
    x = torch.randn(7, 5, 3)  # another batch than the traced one: the traced zero states are not kept
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() < 1e-5
    w = Workload("enc", loaded, Data((x,)), Data((x,)), classification_task(4, False))
    assert {n: i.kind for n, i in w.layers.items()} == {
        **{f"lstm.weight_{m}_l{k}": "LSTM" for k in (0, 1) for m in ("ih", "hh")},
        **{f"gru.weight_{m}_l0{s}": "GRU" for s in ("", "_reverse") for m in ("ih", "hh")}}
