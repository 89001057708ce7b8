"""Outputs scored for what they are: each output kind's headline metric against a hand computation, the
inference rules, the CLI flag, several inputs matched by name in .npz data, scalar ONNX inputs, two-input .pt2."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from qcore import preset
from qcore.cli import main
from qcore.errors import QcoreError
from qcore.io.workload import infer_output_kind, load_workload
from qcore.model.task import output_task
from qcore.numerics.metrics import mean_cosine


def _sqnr(out, ref):  # numpy oracle, float64
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return 10 * np.log10((ref**2).sum() / ((out - ref) ** 2).sum())


# ---- each kind's metrics, on hand-made outputs --------------------------------------------------
def test_sigmoid_probabilities_count_decision_flips_and_mse():
    ref = torch.tensor([[0.9], [0.45], [0.55], [0.1]])
    out = torch.tensor([[0.8], [0.52], [0.55], [0.2]])  # sample 1 crosses 0.5: one flip of four
    task = output_task("probabilities", (1,), False, "test", "sigmoid")
    m = task.metrics(out, ref, None)
    assert task.headline == "decision_agreement" and m["decision_agreement"] == 0.75 and m["decision_flips"] == 1
    assert m["mse"] == pytest.approx((0.1**2 + 0.07**2 + 0 + 0.1**2) / 4)
    labelled = output_task("probabilities", (1,), True, "test", "sigmoid")
    assert labelled.headline == "accuracy"
    assert labelled.metrics(out, ref, torch.tensor([1, 0, 1, 1]))["accuracy"] == 0.5  # decisions 1,1,1,0


def test_softmax_probabilities_decide_by_argmax():
    ref = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    out = torch.tensor([[0.6, 0.3, 0.1], [0.3, 0.45, 0.25], [0.1, 0.2, 0.7]])  # row 1's argmax moves 0 -> 1
    m = output_task("probabilities", (3,), False, "test", "softmax").metrics(out, ref, None)
    assert m["decision_agreement"] == pytest.approx(2 / 3) and m["decision_flips"] == 1
    assert m["sqnr_db"] == pytest.approx(_sqnr(out, ref))


def test_regression_detection_embedding_and_sequence_headlines():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 5, generator=g)
    out = ref + 0.1 * torch.randn(6, 5, generator=g)
    reg = output_task("regression", (5,), False, "test")
    assert reg.headline == "sqnr_db" and reg.metrics(out, ref, None)["sqnr_db"] == pytest.approx(_sqnr(out, ref))
    assert reg.metrics(out, ref, None)["mse"] == pytest.approx(float(np.mean((out.numpy() - ref.numpy()) ** 2)), rel=1e-6)
    det = output_task("detection", (5,), False, "test").metrics(out, ref, None)
    assert det["sqnr_db"] == pytest.approx(_sqnr(out, ref))
    emb = output_task("embedding", (5,), False, "test")
    a, b = out.numpy().astype(np.float64), ref.numpy().astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert emb.headline == "cosine_to_fp32" and emb.metrics(out, ref, None)["cosine_to_fp32"] == pytest.approx(cos.mean())
    # sequence logits (N=1, T=3, V=2): positions 0 and 2 keep their token, position 1 flips
    seq_ref = torch.tensor([[[2.0, 1.0], [0.4, 0.6], [0.0, 3.0]]])
    seq_out = torch.tensor([[[1.5, 1.0], [0.7, 0.6], [0.5, 3.0]]])
    seq = output_task("sequence", (3, 2), False, "test")
    assert seq.headline == "token_agreement" and seq.metrics(seq_out, seq_ref, None)["token_agreement"] == pytest.approx(2 / 3)
    with pytest.raises(QcoreError, match="not logits at every position"):
        output_task("sequence", (4,), False, "test")
    with pytest.raises(QcoreError, match="not class logits"):
        output_task("classification", (1,), False, "test")


def test_inference_rules():
    assert infer_output_kind((1,), "sigmoid", False) == ("probabilities", "inferred from the final Sigmoid")
    assert infer_output_kind((10,), "softmax", True)[0] == "probabilities"
    assert infer_output_kind((10,), None, True) == ("classification", "inferred from the output shape (N, 10) "
                                                                       "and the labels in the data")
    assert infer_output_kind((1,), None, False)[0] == "regression"
    assert infer_output_kind((64,), None, False, known="embedding") == ("embedding", "the model's own task")
    assert infer_output_kind((8, 100), None, False)[0] == "embedding"
    # unit-length rows without labels: an L2-normalised embedding, not 384 "classes"; with labels, still classes
    assert infer_output_kind((384,), None, False, unit_rows=True)[0] == "embedding"
    assert infer_output_kind((384,), None, True, unit_rows=True)[0] == "classification"
    assert infer_output_kind((384,), None, False, unit_rows=False)[0] == "classification"


def test_an_l2_normalised_upload_is_scored_as_an_embedding(tmp_path):
    """A .pt2 whose output rows have unit length (speaker/sentence encoders) is scored by cosine to FP32."""
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(8, 32)

        def forward(self, x):
            return torch.nn.functional.normalize(self.fc(x), dim=1)

    x = torch.randn(4, 8)
    torch.export.save(torch.export.export(Encoder().eval(), (x,)), str(tmp_path / "enc.pt2"))
    w = load_workload(str(tmp_path / "enc.pt2"))
    assert w.task.headline == "cosine_to_fp32" and "unit length" in w.task.why


# ---- the VAD-like case: a [B, 1] sigmoid output ------------------------------------------------
class Vad(nn.Module):
    """Two linear layers and a final sigmoid; the last bias centres the FP32 logits on 0, so many
    probabilities sit near the 0.5 threshold and coarse weights flip decisions."""

    def __init__(self, x):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 1)
        with torch.no_grad():
            self.fc2.bias -= self.fc2(torch.relu(self.fc1(x))).median()

    def forward(self, x):
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(x))))


@pytest.fixture(scope="module")
def vad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vad")
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    model = Vad(x).eval()
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},)), folder / "vad.pt2")
    np.savez(folder / "vad.npz", x=x.numpy())
    return folder


def test_sigmoid_output_scores_flipped_decisions(vad_files):
    w = load_workload(str(vad_files / "vad.pt2"), str(vad_files / "vad.npz"))
    assert (w.task.kind, w.task.headline, w.task.why) == ("probabilities", "decision_agreement",
                                                          "inferred from the final Sigmoid")
    assert any("scored as probabilities (inferred from the final Sigmoid)" in n for n in w.notes)
    recipe = preset("int2-weight-only" if "int2-weight-only" in _presets() else "int4-weight-only", w.layer_shapes)
    r = w.evaluate(recipe)
    ref = w.reference_outputs.numpy()
    out = w.run(w.simulate(recipe).model, w.evaluation).numpy()
    flips = int(((out > 0.5) != (ref > 0.5)).sum())
    assert flips > 0  # the quantization flips decisions ...
    assert r.quantized.metrics["decision_flips"] == flips
    assert r.fp32.metrics["decision_agreement"] - r.quantized.metrics["decision_agreement"] == pytest.approx(flips / len(ref))
    assert mean_cosine(torch.from_numpy(out), torch.from_numpy(ref)) == pytest.approx(1.0)  # ... which cosine never saw


def test_sigmoid_sensitivity_sweep_is_not_blind(vad_files):
    from qcore.analysis.sensitivity import sweep

    w = load_workload(str(vad_files / "vad.pt2"), str(vad_files / "vad.npz"))
    result = sweep(w, ["int4-weight-only"], mode="weights")
    assert result.metric == "decision_agreement" and max(row.metric_drop for row in result.rows) > 0


def _presets():
    from qcore.recipe import PRESETS
    return PRESETS


def test_cli_output_kind_flag(vad_files, capsys):
    code = main(["evaluate", str(vad_files / "vad.pt2"), "--data", str(vad_files / "vad.npz"), "--preset",
                 "int8-weight-only", "--output-kind", "regression", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["metric"] == "sqnr_db" and "mse" in r["quantized"]["metrics"]
    assert any("scored as regression (set by you)" in n for n in r["notes"])
    with pytest.raises(SystemExit):
        main(["evaluate", str(vad_files / "vad.pt2"), "--output-kind", "nonsense"])


# ---- several inputs: a two-input .pt2 and .npz arrays matched by name -----------------------------
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, audio, state):
        return self.a(audio) + self.b(state)


@pytest.fixture(scope="module")
def two_input_pt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("two") / "two.pt2"
    batch = torch.export.Dim("batch")
    ep = torch.export.export(TwoInputs().eval(), (torch.randn(2, 4), torch.randn(2, 5)),
                             dynamic_shapes=({0: batch}, {0: batch}))  # torch writes a batch-equality guard
    torch.export.save(ep, path)
    return path


def test_two_input_pt2_with_named_npz(two_input_pt2, tmp_path):
    g = np.random.default_rng(0)
    audio, state = g.standard_normal((40, 4), dtype=np.float32), g.standard_normal((40, 5), dtype=np.float32)
    labels = g.integers(0, 3, 40)
    np.savez(tmp_path / "named.npz", state=state, audio=audio, labels=labels)  # file order differs from the model's
    w = load_workload(str(two_input_pt2), str(tmp_path / "named.npz"))
    assert w.task.headline == "accuracy"
    expected = TwoInputs().eval()(*(torch.from_numpy(a) for a in (audio, state))).detach()
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))[10:]  # the evaluation split (seed 0, 25 %)
    torch.testing.assert_close(w.reference_outputs, expected[order])
    np.savez(tmp_path / "positional.npz", x0=audio, x1=state)
    assert len(load_workload(str(two_input_pt2), str(tmp_path / "positional.npz")).evaluation) == 30


@pytest.mark.parametrize("arrays, message", [
    ({"audio": np.zeros((8, 4), np.float32)}, "has no 'state' array for the model's input of that name"),
    ({"audio": np.zeros((8, 4), np.float32), "state": np.zeros((8, 5), np.float32), "noise": np.zeros((8, 1))},
     "array 'noise' is no input of the model (its inputs: audio, state)"),
    ({"audio": np.zeros((8, 4), np.float32), "state": np.zeros((8, 7), np.float32)},
     "input 'state' has samples of shape (7,)"),
])
def test_named_npz_errors_are_one_line(two_input_pt2, tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(QcoreError) as e:
        load_workload(str(two_input_pt2), str(tmp_path / "bad.npz"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_onnx_final_sigmoid_is_inferred(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["p"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 1])],
        [numpy_helper.from_array(np.full((4, 1), 0.3, np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "p.onnx")
    w = load_workload(str(tmp_path / "p.onnx"))
    assert (w.task.kind, w.task.why) == ("probabilities", "inferred from the final Sigmoid")


# ---- a scalar (rank-0) ONNX input ----------------------------------------------------------------
@pytest.fixture(scope="module")
def scalar_onnx(tmp_path_factory):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "gain"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [numpy_helper.from_array(w, "w")])
    path = tmp_path_factory.mktemp("scalar") / "scalar.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, w


def test_scalar_onnx_input_takes_its_value_from_the_data(scalar_onnx, tmp_path):
    path, weight = scalar_onnx
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, gain=np.array(2.5, np.float32))
    w = load_workload(str(path), str(tmp_path / "d.npz"))
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))[5:].numpy()
    np.testing.assert_allclose(w.reference_outputs.numpy(), 2.5 * x[order] @ weight, rtol=1e-5)
    assert any("scalar input 'gain' is 2.5" in n for n in w.notes)
    assert w.task.kind == "classification"  # (N, 3) without a final activation


def test_scalar_onnx_input_without_a_value_is_one_line(scalar_onnx, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 4), np.float32))
    for data in (str(tmp_path / "d.npz"), None):
        with pytest.raises(QcoreError) as e:
            load_workload(str(scalar_onnx[0]), data)
        assert "input 'gain' is a scalar (rank 0)" in str(e.value) and "\n" not in str(e.value)


def test_zoo_model_with_an_output_kind_set(digits_mlp):
    w = load_workload("digits-mlp", output_kind="embedding")
    assert (w.task.kind, w.task.headline, w.task.why) == ("embedding", "cosine_to_fp32", "set by you")
    assert w.evaluation.labels is None and w.content_hash != digits_mlp.content_hash
    ref = digits_mlp.reference_outputs.double()
    assert w.fp32_metrics["cosine_to_fp32"] == pytest.approx(1.0)
    out = w.run(w.simulate(preset("int4-weight-only", w.layer_shapes)).model, w.evaluation).double()
    cos = ((out * ref).sum(1) / out.norm(dim=1) / ref.norm(dim=1)).mean()
    assert w.evaluate(preset("int4-weight-only", w.layer_shapes)).quantized.metrics["cosine_to_fp32"] == pytest.approx(float(cos))


def test_a_pt2_returning_two_outputs_is_scored_and_exported_on_its_first(tmp_path):
    """A detector-like program returning (scores, boxes): layers keep their names, the first output is
    scored and swept, and the ONNX file computes the simulation of that output."""
    import onnxruntime as ort

    from qcore.export import export
    from qcore.recipe import preset

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body, self.scores, self.boxes = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.scores(h), self.boxes(h)

    model, x = TwoHeads().eval(), torch.randn(4, 8)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "two.pt2"))
    w = load_workload(str(tmp_path / "two.pt2"))
    assert list(w.layers) == ["body", "scores", "boxes"]
    assert any("returns 2 outputs" in n for n in w.notes)
    xs = w.evaluation.inputs[0]
    with torch.no_grad():
        assert torch.allclose(w.run(w.model, w.evaluation), model(xs)[0], atol=1e-6)  # the first output, as given
    recipe = preset("int8-static", w.layer_shapes)
    export(w, recipe, "onnx", str(tmp_path / "two.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    assert len(sess.get_outputs()) == 2  # the file keeps both heads; the first is the simulated one
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0])
    with torch.no_grad():
        sim = w.simulate(recipe).model(xs)
    assert got.shape == sim.shape == (len(xs), 3) and torch.allclose(got, sim, atol=1e-4)
