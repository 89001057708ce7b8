"""A format is one registry entry: a NEW toy format registered here, in one place, works unchanged in the recipe
parser, model sizes, the safetensors round trip, the ONNX export, the explain numbers and the Formats page.

The toy is "ternary": codes {-1, 0, +1} times an absmax scale per block (a three-level codebook, 2 bits per code).
Every number below is computed by hand from that definition, not by the code under test.
"""

import math

import numpy as np
import pytest
import torch

from qcore.errors import QcoreError
from qcore.numerics.formats import FORMATS, CodebookFormat, choices
from qcore.numerics.spec import TensorSpec
from qcore.recipe import Recipe

TERNARY = CodebookFormat("ternary", 2, "codebook", "UINT4", (), (("weights", 12), ("formats", 106)),
                         "Ternary (-1, 0, +1)", "", (-1.0, 0.0, 1.0))


@pytest.fixture
def ternary(monkeypatch):
    monkeypatch.setitem(FORMATS, "ternary", TERNARY)  # the one place the format is registered
    return TERNARY


def by_hand(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, scales, dequantized) of ternary per group of ``group`` along each row of a 2-D ``x``:
    scale = max |x| of the group; index 0, 1, 2 for x/scale below -1/2, in [-1/2, 1/2], above 1/2."""
    rows, cols = x.shape
    g = x.reshape(rows * cols // group, group)
    s = g.abs().amax(dim=1)
    r = g / s[:, None]
    idx = torch.where(r > 0.5, 2, torch.where(r < -0.5, 0, 1))
    return idx.reshape(rows, cols), s, ((idx - 1).float() * s[:, None]).reshape(rows, cols)


def test_the_recipe_parser_takes_it_with_its_traits(ternary):
    r = Recipe.from_dict({"weights": {"format": "ternary"}, "activations": None})
    assert r.weights == TensorSpec(format="ternary", granularity="per_group", group_size=64)  # a codebook's default
    assert r.resolve({"fc": (4, 96)})["fc"].weights.group_size == 48
    with pytest.raises(QcoreError, match=r"activations.format='ternary' is a weight-only format"):
        Recipe.from_dict({"activations": {"format": "ternary", "granularity": "per_tensor"}})
    with pytest.raises(QcoreError, match=r"allowed: fp32, .*, nf4, ternary$"):
        Recipe.from_dict({"weights": {"format": "quaternary"}})
    assert choices("weights")[-1] == "ternary" and choices("formats")[-1] == "ternary"


def test_weight_bytes_by_hand(ternary):
    from qcore.model.size import weight_bytes

    # 96 values x 2 bits = 24 bytes of codes; per group of 4: 24 float32 scales = 96 bytes; no zero-points
    assert weight_bytes((8, 12), TensorSpec(format="ternary", granularity="per_group", group_size=4)) == {
        "codes": 24, "scales": 96, "zero_points": 0, "total": 120}
    # per channel: 8 scales; 7 x 5 = 35 values -> 70 bits -> 9 bytes
    assert weight_bytes((7, 5), TensorSpec(format="ternary", granularity="per_channel")) == {
        "codes": 9, "scales": 28, "zero_points": 0, "total": 37}


def test_safetensors_round_trip_holds_the_hand_codes_and_scales(ternary, digits_mlp, tmp_path):
    from safetensors.torch import load_file

    from qcore.export.safetensors import export_safetensors, load_safetensors

    w = digits_mlp
    recipe = Recipe.from_dict({"name": "ternary", "weights": {"format": "ternary", "group_size": 16}, "activations": None})
    path = str(tmp_path / "t.safetensors")
    export_safetensors(w, recipe, path)
    stored = load_file(path)
    folded = dict(w.folded[0].named_modules())
    for name in w.layers:
        weight = folded[name].weight.detach()
        idx, scale, _ = by_hand(weight, 16)
        bits = np.unpackbits(stored[f"{name}.weight.codes"].numpy())[: weight.numel() * 2].reshape(-1, 2)
        assert (bits[:, 0] * 2 + bits[:, 1]).tolist() == idx.reshape(-1).tolist(), name  # MSB first, 2 bits each
        assert torch.equal(stored[f"{name}.weight.scale"], scale), name
        assert stored[f"{name}.weight.codes"].numel() == math.ceil(weight.numel() * 2 / 8)
    loaded_recipe, model = load_safetensors(path, w)
    assert loaded_recipe == recipe
    x = w.evaluation.inputs[0][:32]
    with torch.no_grad():
        assert torch.equal(model(x), w.simulate(recipe).model(x))
        assert torch.equal(model.get_submodule("fc1").weight, by_hand(folded["fc1"].weight.detach(), 16)[2])


def test_onnx_export_runs_the_hand_weights_in_onnx_runtime(ternary, digits_mlp, tmp_path):
    """Weight-only ternary on fc2: the file stores the hand indices (UINT4) and the three levels, and ONNX
    Runtime computes the FP32 model with fc2's weight replaced by the hand-dequantized one (and so the simulation)."""
    import copy

    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from qcore.export.onnx import export_qdq

    w = digits_mlp
    recipe = Recipe.from_dict({"name": "t", "weights": None, "activations": None}).with_layer(
        "fc2", {"weights": {"format": "ternary", "group_size": 16}})
    path = str(tmp_path / "t.onnx")
    result = export_qdq(w, recipe, path)
    rows = {r["layer"]: r for r in result.layers}
    assert rows["fc2"]["weights"] == "ternary indices as UINT4 + Gather(codebook) + Mul(scale)"
    assert rows["fc2"]["executes"] == "float (dequantized)" and "codebook-lookup kernel" in rows["fc2"]["reason"]
    assert rows["fc1"]["weights"] == rows["fc3"]["weights"] == "fp32"
    assert result.notes == ["fc2: ternary codes are stored in a 4-bit container (ONNX has no narrower integer type), "
                            "so the file is larger than the theoretical size"]

    hand = copy.deepcopy(w.folded[0])
    idx, scale, dequantized = by_hand(hand.fc2.weight.detach(), 16)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    (indices,) = [v for k, v in inits.items() if k.startswith("indices")]
    (levels,) = [v for k, v in inits.items() if k.startswith("codebook")]
    assert indices.dtype.name == "uint4" and indices.astype(np.int64).reshape(-1).tolist() == idx.reshape(-1).tolist()
    assert levels.tolist() == [-1.0, 0.0, 1.0]
    with torch.no_grad():
        hand.fc2.weight.copy_(dequantized)
        x = w.evaluation.inputs[0][:64]
        expected, simulated = hand(x), w.simulate(recipe).model(x)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    out = torch.from_numpy(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(
        None, {"input_0": x.numpy()})[0])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, simulated, rtol=0, atol=1e-5)


def test_explain_numbers_by_hand(ternary):
    from qcore.analysis import explain

    x = torch.tensor([0.9, -0.2, 0.55, -1.6, 0.1, 1.2, -0.7, 0.3])
    numbers = explain.format_numbers(x, TensorSpec(format="ternary", granularity="per_tensor"))
    s = 1.6  # max |x|; x / s = .5625 -.125 .34375 -1 .0625 .75 -.4375 .1875
    xq = torch.tensor([s, 0, 0, -s, 0, s, 0, 0], dtype=torch.float64)
    sqnr = 10 * math.log10(float((x.double() ** 2).sum()) / float(((xq - x.double()) ** 2).sum()))
    assert numbers["levels"] == 3
    assert numbers["smallest_step"] == pytest.approx(s) and numbers["largest_step"] == pytest.approx(s)
    assert numbers["scale"] == pytest.approx(s) and numbers["dynamic_range_db"] == 0.0  # 20 log10(1 / 1)
    assert numbers["sqnr_db"] == pytest.approx(sqnr)
    assert numbers["clipped_fraction"] == 0.0
    assert explain.bit_layout(ternary) == [("codebook index", 2)]


def test_the_formats_page_lists_and_renders_it(ternary, zoo_models):
    from qcore.analysis import explain
    from test_app import metrics, open_app, rerun, visit

    at = visit(open_app("digits-mlp"), "formats")
    assert at.selectbox(key="formats_family").options[-1] == "Ternary (-1, 0, +1)"  # shown by its label
    at.selectbox(key="formats_family").set_value("ternary")
    rerun(at)
    assert not at.error
    x = explain.sample_distribution("normal")
    s = float(x.abs().max())
    xq = torch.where(x / s > 0.5, s, torch.where(x / s < -0.5, -s, 0.0)).double()
    shown = metrics(at)
    assert shown["Levels"] == "3" and shown["Step size"] == f"{s:.4g}"
    assert shown["SQNR"] == f"{10 * math.log10(float((x.double() ** 2).sum() / ((xq - x.double()) ** 2).sum())):.1f} dB"


from test_app import zoo_models  # noqa: E402,F401  (the app's zoo loader pointed at the session fixtures)
