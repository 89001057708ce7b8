"""The recipe's transforms on a model: where a per-channel scale folds (found by testing), that SmoothQuant,
AWQ and CLE leave the float outputs unchanged, what they change, bias correction in ``simulate``, the recipe
key's validation, and the exports of ``w8a8-smoothquant`` and ``int4-awq`` in ONNX Runtime.

Oracles: the untransformed float model's outputs; hand formulas for the ranges; the float model's mean
output computed directly; ONNX Runtime running the exported file; node-type counts of the nearest export."""

from __future__ import annotations

import collections
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qcore.errors import QcoreError
from qcore.model.workload import Data, Workload
from qcore.model.task import output_task
from qcore.recipe import Recipe, preset
from qcore.recipe.links import build_recipe, compact, recipe_id


class Block(nn.Module):
    """A pre-LN block: ln -> (fc1, fc3); fc1 -> relu -> fc2; fc3 -> gelu -> fc4; out = fc2 + fc4."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.fc3, self.fc4 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        h = self.ln(x)
        return self.fc2(torch.relu(self.fc1(h))) + self.fc4(nn.functional.gelu(self.fc3(h)))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x


@functools.cache
def block_workload() -> Workload:
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():  # outlier channels after the LayerNorm meeting small weights, as in transformers
        gain = torch.ones(16) + torch.tensor([60.0, 0, 0, 30.0] + [0] * 12)
        m.ln.weight.copy_(gain)
        m.ln.bias.copy_(torch.randn(16) * 0.1)
        for fc in (m.fc1, m.fc3):
            fc.weight.div_(gain)
    calib, ev = _data(64, 1), _data(96, 2)
    return Workload("block", m, Data((calib,)), Data((ev,)), output_task("regression", (16,), False, "test"),
                    batch_size=32)


def test_groups_are_the_folds_that_keep_the_model_exact():
    w = block_workload()
    groups = {g.producer: g.consumers for g in w.groups}
    # ln feeds fc1 and fc3 only; fc1 -> relu -> fc2 folds; fc3 -> gelu -> fc4 does not; fc2/fc4 feed the output
    assert groups == {"ln": ("fc1", "fc3"), "fc1": ("fc2",)}


def test_smoothquant_leaves_the_float_outputs_unchanged_and_migrates_the_ranges():
    w = block_workload()
    recipe = Recipe.from_dict({**preset("w8a8-smoothquant").to_dict()})
    done = w.transformed(recipe)
    x = w.evaluation.inputs[0]
    with torch.no_grad():
        ref, out = w.folded[0](x), done.model(x)
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    # the hand formula: s_j = sqrt(max|X_j| / max_j|W|) over fc1 and fc3, X the LayerNorm's output on calibration
    m = w.folded[0]
    with torch.no_grad():
        h = m.ln(w.calibration.inputs[0])
    act = h.abs().amax(0)
    wmax = torch.maximum(m.fc1.weight.abs().amax(0), m.fc3.weight.abs().amax(0))
    s = torch.sqrt(act / wmax)
    assert torch.allclose(done.scales["ln"], s, rtol=1e-5)
    assert torch.allclose(done.model.ln.weight, m.ln.weight / s, rtol=1e-5)
    assert torch.allclose(done.model.fc3.weight, m.fc3.weight * s, rtol=1e-5)  # fc1 is also smoothed as fc2's producer
    with torch.no_grad():
        h2 = done.model.ln(w.calibration.inputs[0])
    ratio = lambda a: float(a.max() / a.mean())
    assert ratio(h2.abs().amax(0)) < ratio(act) * 0.6
    assert torch.allclose(h2.abs().amax(0), torch.sqrt(act * wmax), rtol=1e-4)
    assert [n for n in done.notes if "(fc4)" in n]  # the skipped layer (after a GELU) is named; fc2 was smoothed


def test_smoothquant_lowers_the_w8a8_error_of_the_outlier_block():
    w = block_workload()
    nearest = w.evaluate(preset("int8-static")).quantized.metrics["sqnr_db"]
    smooth = w.evaluate(preset("w8a8-smoothquant")).quantized.metrics["sqnr_db"]
    assert smooth > nearest + 3


def test_cle_keeps_outputs_and_equalises_ranges_as_the_formula_says():
    w = block_workload()
    recipe = Recipe.from_dict({"weights": {"format": "int8"}, "transforms": [{"cle": {}}]})
    done = w.transformed(recipe)
    x = w.evaluation.inputs[0]
    with torch.no_grad():
        assert torch.allclose(done.model(x), w.folded[0](x), atol=1e-5)
    m = w.folded[0]
    r1, r2 = m.fc1.weight.abs().amax(1), m.fc2.weight.abs().amax(0)  # fc1's rows, fc2's columns
    after1, after2 = done.model.fc1.weight.abs().amax(1), done.model.fc2.weight.abs().amax(0)
    assert torch.allclose(after1, torch.sqrt(r1 * r2), rtol=1e-4) and torch.allclose(after2, torch.sqrt(r1 * r2), rtol=1e-4)
    assert "ln" not in done.scales  # a LayerNorm is not a CLE pair


def test_bias_correction_makes_the_mean_output_error_on_calibration_data_zero():
    w = block_workload()
    base = {"weights": {"format": "int4", "granularity": "per_tensor"}, "activations": None}
    plain = w.simulate(Recipe.from_dict(base))
    corrected = w.simulate(Recipe.from_dict({**base, "transforms": [{"bias_correction": {"layers": ["fc2"]}}]}))
    assert corrected.bias_corrected == ["fc2"]
    x = w.calibration.inputs[0]
    m = w.folded[0]
    with torch.no_grad():  # fc2's input in the float model, its float output, computed directly
        hidden = torch.relu(m.fc1(m.ln(x)))
        want = (hidden @ m.fc2.weight.T + m.fc2.bias).mean(0)
        before = (hidden @ plain.model.fc2.weight.T + plain.model.fc2.bias).mean(0)
        after = (hidden @ corrected.model.fc2.weight.T + corrected.model.fc2.bias).mean(0)
    assert (before - want).abs().max() > 1e-3
    assert (after - want).abs().max() < 1e-5


@pytest.mark.parametrize("transforms,needle", [
    ([{"smoothquant": {"alpha": 2}}], "transforms[0].smoothquant.alpha=2 must be a number from 0 to 1"),
    ([{"smoothquant": {}, "awq": {}}], "transforms[0] must be an object with one key"),
    ([{"gptq": {}}], "unknown transform 'gptq'"),
    ([{"cle": {"iters": 3}}], "unknown option transforms[0].cle.'iters'"),
    ([{"awq": {"grid": 1.5}}], "transforms[0].awq.grid=1.5 must be an integer"),
    ([{"cle": {"layers": "fc1"}}], "transforms[0].cle.layers must be a non-empty list"),
    ({"cle": {}}, "recipe.transforms must be a list"),
])
def test_bad_transforms_are_one_line_errors(transforms, needle):
    with pytest.raises(QcoreError) as e:
        Recipe.from_dict({"transforms": transforms})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_transform_on_a_layer_it_cannot_apply_to_names_the_layer_and_what_it_applies_to():
    w = block_workload()
    for t, layer in [("smoothquant", "fc4"), ("cle", "fc3"), ("awq", "fc2")]:
        recipe = Recipe.from_dict({"weights": {"format": "int8"}, "transforms": [{t: {"layers": [layer]}}]})
        if t == "awq":  # fc2 reads fc1 through a ReLU: AWQ may scale it; fc4 (after a GELU) it may not
            w.simulate(recipe)
            recipe = Recipe.from_dict({"weights": {"format": "int8"}, "transforms": [{t: {"layers": ["fc4"]}}]})
            layer = "fc4"
        with pytest.raises(QcoreError) as e:
            w.simulate(recipe)
        msg = str(e.value)
        assert f"'{layer}'" in msg and "applies to" in msg and "\n" not in msg
    with pytest.raises(QcoreError, match="not a quantizable layer"):
        w.simulate(Recipe.from_dict({"transforms": [{"smoothquant": {"layers": ["nope"]}}]}))


def test_recipes_without_transforms_write_what_they_wrote_and_transforms_round_trip():
    r = preset("int8-static")
    assert "transforms" not in r.to_dict()
    sq = preset("w8a8-smoothquant")
    assert sq.to_dict()["transforms"] == [{"smoothquant": {"alpha": 0.5}}]
    again = Recipe.from_json(sq.to_json())
    assert again == sq and hash(again) == hash(sq)
    w = block_workload()
    assert recipe_id(w, sq) != recipe_id(w, preset("int8-static"))
    name, layers = compact(w, sq)
    assert name == "w8a8-smoothquant" and build_recipe(w, name, layers).transforms == sq.transforms


def _run_onnx(path, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the same float ops as PyTorch
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name,nearest", [("w8a8-smoothquant", "int8-static"), ("int4-awq", "int4-weight-only")])
def test_exports_of_the_transform_presets_run_in_onnx_runtime_as_simulated_with_no_extra_ops(tmp_path, name, nearest):
    from qcore.export import export_qdq

    w = block_workload()
    recipe, plain = preset(name, w.layer_shapes), preset(nearest, w.layer_shapes)
    export_qdq(w, recipe, str(tmp_path / "t.onnx"))
    export_qdq(w, plain, str(tmp_path / "n.onnx"))
    x = w.evaluation.inputs[0]
    with torch.no_grad():
        sim = w.simulate(recipe).model(x).numpy()
    got = _run_onnx(str(tmp_path / "t.onnx"), x)
    with np.errstate(divide="ignore"):  # an exact match is infinite dB
        assert 10 * np.log10((sim ** 2).sum() / ((got - sim) ** 2).sum()) > 60  # dB, as tests/export's check
    ops = lambda p: collections.Counter(n.op_type for n in onnx.load(p).graph.node)
    assert ops(str(tmp_path / "t.onnx")) == ops(str(tmp_path / "n.onnx"))
    if name == "w8a8-smoothquant":  # the scales live in the LayerNorm's gain
        gain = {i.name: i for i in onnx.load(str(tmp_path / "t.onnx")).graph.initializer}["ln.weight"]
        assert np.allclose(onnx.numpy_helper.to_array(gain), w.transformed(recipe).model.ln.weight.detach().numpy())


def test_smoothquant_and_bias_correction_reach_the_onnx_and_safetensors_files(tmp_path):
    from qcore.export import export_qdq
    from qcore.export.safetensors import export_safetensors, load_safetensors

    w = block_workload()  # the same SmoothQuant as w8a8-smoothquant: its float graph is built once per session
    recipe = Recipe.from_dict({"weights": {"format": "int4", "granularity": "per_tensor"}, "activations": None,
                               "transforms": [{"smoothquant": {"alpha": 0.5}}, {"bias_correction": {}}]})
    sim = w.simulate(recipe)
    assert set(sim.bias_corrected) == {"fc1", "fc2", "fc3", "fc4"}
    x = w.evaluation.inputs[0]
    with torch.no_grad():
        want = sim.model(x)
    export_qdq(w, recipe, str(tmp_path / "m.onnx"))
    got = _run_onnx(str(tmp_path / "m.onnx"), x)
    assert 10 * np.log10((want.numpy() ** 2).sum() / ((got - want.numpy()) ** 2).sum()) > 60
    export_safetensors(w, recipe, str(tmp_path / "m.safetensors"))
    _, loaded = load_safetensors(str(tmp_path / "m.safetensors"), w)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
