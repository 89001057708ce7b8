"""Weight rounding on a model: the layer inputs it learns from, the simulation holding its codes, the files
holding exactly those codes, the CLI, and one-line errors where rounding cannot apply."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcore.algorithms.gptq import gptq_quantize
from qcore.cli import main
from qcore.errors import QcoreError
from qcore.export.onnx.qdq import export_qdq
from qcore.export.safetensors import export_safetensors, load_safetensors
from qcore.model.rounding import input_rows
from qcore.model.simulate import simulate
from qcore.numerics.quantize import quantize
from qcore.recipe import Recipe, preset


@pytest.mark.parametrize("conv", [
    nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, (2, 3), stride=2, dilation=(1, 2), padding=(1, 0)),
    nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), nn.Conv1d(2, 3, 3, stride=2, padding=2),
])
def test_conv_input_rows_times_the_flattened_weight_is_the_convolution(conv):
    x = torch.randn(2, 2, 7, 9) if isinstance(conv, nn.Conv2d) else torch.randn(2, 2, 11)
    rows = input_rows(conv, type(conv).__name__, x)
    with torch.no_grad():
        y = conv(x) - conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))  # torch's own convolution: the oracle
    got = rows @ conv.weight.reshape(3, -1).T  # (N * positions, C_out)
    want = y.reshape(2, 3, -1).transpose(1, 2).reshape(-1, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_simulation_holds_gptq_codes_from_the_calibration_inputs(digits_mlp):
    sim = digits_mlp.simulate(preset("int4-gptq", digits_mlp.layer_shapes))
    X = digits_mlp.calibration.inputs[0].reshape(len(digits_mlp.calibration), -1).float()  # fc1 sees the pixels
    W = dict(digits_mlp.folded[0].named_modules())["fc1"].weight.detach()
    spec = preset("int4-gptq").weights
    want = gptq_quantize(W, X.T @ X, spec, damp=spec.gptq.damp)
    assert torch.equal(sim.weights["fc1"].codes, want.codes)
    torch.testing.assert_close(sim.model.fc1.weight.detach(), want.dequantize())
    assert not torch.equal(want.codes, quantize(W, preset("int4-gptq").weights).codes)


def test_exported_onnx_and_safetensors_hold_the_simulated_gptq_codes(digits_mlp, tmp_path):
    recipe = preset("int4-gptq", digits_mlp.layer_shapes)
    sim = digits_mlp.simulate(recipe)
    x = digits_mlp.evaluation.inputs[0][:64]
    with torch.no_grad():
        simulated = sim.model(x).numpy()
    path = str(tmp_path / "gptq.onnx")
    result = export_qdq(digits_mlp, recipe, path)
    assert {r["executes"] for r in result.layers} == {"MatMulNBits"}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, simulated, rtol=1e-4, atol=1e-4 * np.abs(simulated).max())
    near = digits_mlp.simulate(preset("int4-weight-only", digits_mlp.layer_shapes))
    with torch.no_grad():
        assert np.abs(near.model(x).numpy() - simulated).max() > 100 * np.abs(got - simulated).max()
    export_safetensors(digits_mlp, recipe, str(tmp_path / "gptq.safetensors"))
    _, loaded = load_safetensors(str(tmp_path / "gptq.safetensors"), digits_mlp)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), simulated)


def test_cli_evaluate_with_the_gptq_preset(capsys, digits_mlp):
    code = main(["evaluate", "digits-mlp", "--preset", "int4-gptq", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["recipe"]["weights"]["rounding"] == "gptq"
    want = digits_mlp.evaluate(preset("int4-gptq", digits_mlp.layer_shapes)).quantized.metrics["accuracy"]
    assert r["quantized"]["metrics"]["accuracy"] == pytest.approx(want)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_default_rounding_skips_an_embedding_an_explicit_one_is_a_one_line_error():
    model, ids = Tagger(), (torch.randint(0, 10, (4, 5)),)
    gptq = preset("int4-gptq")
    sim = simulate(model, gptq, calibration_batches=[ids])
    assert sim.weights["head"].spec.rounding == "gptq" and sim.weights["embed"].spec.rounding == "nearest"
    assert torch.equal(sim.weights["embed"].codes, quantize(model.embed.weight, preset("int4-weight-only").weights).codes)
    asked = gptq.with_layer("embed", {"weights": {"rounding": "gptq"}})
    with pytest.raises(QcoreError) as e:
        simulate(model, asked, calibration_batches=[ids])
    assert str(e.value).startswith("layer 'embed' is an Embedding: rounding gptq applies to Linear and ungrouped Conv")
    assert "\n" not in str(e.value)
    with pytest.raises(QcoreError, match="learns from calibration data") as e:
        simulate(model, gptq)
    assert "\n" not in str(e.value)


class Reordered(nn.Module):
    """Registered fc2 first, run fc1 first: the order is the one the model runs, not the registration order."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.fc2, self.fc1 = nn.Linear(32, 16), nn.Linear(16, 32)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_sequential_gptq_rounds_each_layer_from_the_already_rounded_layers_output():
    """Oracle: the two layers written out by hand -- fc1 by GPTQ on X, then fc2 by GPTQ on relu(X W1q^T + b1)
    with fc1's *rounded* weight; without ``sequential`` fc2 learns from the float fc1's output instead."""
    from qcore.model.rounding import Rounder
    from qcore.numerics.spec import TensorSpec

    model = Reordered().eval()
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(6)) @ torch.randn(16, 16)
    seq = TensorSpec.from_dict({"format": "int4", "granularity": "per_group", "group_size": 8, "symmetric": False,
                                "rounding": "gptq", "gptq": {"sequential": True}})
    rounder = Rounder(model, {"fc1": "Linear", "fc2": "Linear"}, lambda: [(x[:150],), (x[150:],)])
    got = rounder.weights({"fc2": seq, "fc1": seq})
    q1 = gptq_quantize(model.fc1.weight.detach(), (x.T @ x).double(), seq)
    with torch.no_grad():
        h = torch.relu(x @ q1.dequantize().T + model.fc1.bias)
        h_float = torch.relu(model.fc1(x))
    q2 = gptq_quantize(model.fc2.weight.detach(), (h.T @ h).double(), seq)
    assert torch.equal(got["fc1"].codes, q1.codes) and torch.equal(got["fc2"].codes, q2.codes)
    plain = Rounder(model, {"fc1": "Linear", "fc2": "Linear"}, lambda: [(x,)]).weights(
        {"fc2": TensorSpec.from_dict({**seq.to_dict(), "gptq": {}})})
    independent = gptq_quantize(model.fc2.weight.detach(), (h_float.T @ h_float).double(), seq)
    assert torch.equal(plain["fc2"].codes, independent.codes) and not torch.equal(q2.codes, independent.codes)
    assert rounder.weights({"fc1": seq, "fc2": seq})["fc2"] is got["fc2"]  # cached by (layer, spec, earlier layers)


def test_the_exported_onnx_of_a_clipped_sequential_gptq_recipe_matches_the_simulation(digits_mlp, tmp_path):
    """The searched grid (its scales and zero-points, not only its codes) reaches the MatMulNBits file."""
    base = preset("int4-gptq", digits_mlp.layer_shapes).to_dict()
    recipe = Recipe.from_dict({**base, "name": "clipped", "weights": {**base["weights"],
                                                                      "gptq": {"clip": 20, "sequential": True}}})
    sim = digits_mlp.simulate(recipe)
    plain = digits_mlp.simulate(preset("int4-gptq", digits_mlp.layer_shapes))
    assert not torch.equal(sim.weights["fc1"].scale, plain.weights["fc1"].scale)  # the clip search moved the grid
    x = digits_mlp.evaluation.inputs[0][:64]
    with torch.no_grad():
        simulated = sim.model(x).numpy()
    path = str(tmp_path / "clipped.onnx")
    assert {r["executes"] for r in export_qdq(digits_mlp, recipe, path).layers} == {"MatMulNBits"}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, simulated, rtol=1e-4, atol=1e-4 * np.abs(simulated).max())
