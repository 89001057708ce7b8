"""``try_remedy`` compares like with like: a rounding remedy on a recipe that already has a transform (GPTQ after
CLE) is measured by the layer's output in the whole simulated model on both sides, as the result says, and its
numbers are those of the two recipes, computed here by independent calls; SmoothQuant with a Mul on a layer no fold
reaches, its layer SQNR recomputed with plain torch."""

import math

import pytest
import torch
from test_smoothquant_mul import postln_workload

from qcore.analysis.remedies import try_remedy
from qcore.analysis.transform_remedies import layer_output_sqnr, smoothquant_mul_for
from qcore.errors import QcoreError
from qcore.model.input_scale import input_scales
from qcore.recipe import preset
from qcore.recipe.links import build_recipe


def test_gptq_after_cle_is_measured_on_the_transformed_model(digits_cnn):
    w = digits_cnn
    cle = build_recipe(w, "int8-static", {}, [{"cle": {"layers": ["features.3"]}}])
    result = try_remedy(w, cle, "features.3", "gptq")
    after = result["recipe"]
    assert after.transforms == cle.transforms and after.plan("features.3").weights.rounding == "gptq"
    assert after.plan("features.0").weights.rounding == "nearest"
    assert result["sqnr_measure"] == "the whole simulated model vs FP32, first calibration batch"
    for side, r in (("before", cle), ("after", after)):
        assert result[side]["layer_sqnr_db"] == layer_output_sqnr(w, r, "features.3")
        assert result[side]["metric"] == w.evaluate(r).quantized.metrics["accuracy"]
        steps = result[side]["weight_error_steps"]  # against that side's CLE-scaled float weights
        assert len(steps) == math.prod(w.layer_shapes["features.3"])
        assert max(map(abs, steps)) <= (0.5 + 1e-4 if side == "before" else 2)  # nearest: at most half a step


def _fc2_output_sqnr_db(w, recipe) -> float:
    """fc2's output in the simulated model vs the FP32 model's, first calibration batch: plain torch (hooks, sums)."""
    x = w.calibration.batches(w.batch_size)[0][0]
    outs = []
    for model in (w.folded[0], w.simulate(recipe).model):
        h = model.fc2.register_forward_hook(lambda m, a, o: outs.append(o.detach().double()))
        try:
            with torch.no_grad():
                model(x)
        finally:
            h.remove()
    ref, q = outs
    return 10 * math.log10(float((ref ** 2).sum()) / float(((q - ref) ** 2).sum()))


def test_smoothquant_with_a_mul_reaches_the_layer_no_fold_reaches_and_lowers_its_error():
    w = postln_workload()  # post-LN FFN: fc2 reads a GELU with outlier channels; no fold exists anywhere
    now = preset("int8-static")
    with pytest.raises(QcoreError, match="try SmoothQuant with a Mul") as e:
        try_remedy(w, now, "fc2", "smoothquant")
    assert "\n" not in str(e.value)
    result = try_remedy(w, now, "fc2", "smoothquant_mul")
    after = result["recipe"]
    assert [t.to_json() for t in after.transforms] == [
        {"smoothquant": {"alpha": "search", "unfoldable": "mul", "layers": ["fc2"]}}]
    assert set(input_scales(w.transformed(after).model)) == {"fc2"}  # one Mul, before fc2 only
    for side, r in (("before", now), ("after", after)):
        assert result[side]["layer_sqnr_db"] == pytest.approx(_fc2_output_sqnr_db(w, r), abs=1e-6)
        assert result[side]["metric"] == w.evaluate(r).quantized.metrics[w.task.headline]
        assert result[side]["weight_error_steps"] is None
    assert result["after"]["layer_sqnr_db"] > result["before"]["layer_sqnr_db"] + 1  # 11.4 -> 13.0 dB: the outliers moved


def test_smoothquant_with_a_mul_joins_a_mul_entry_and_leaves_fold_entries_alone():
    w = postln_workload()
    mul_everywhere = preset("w8a8-smoothquant-mul")  # already a Mul before every Linear no fold reaches
    assert smoothquant_mul_for(w, mul_everywhere, "fc2") == mul_everywhere
    folds = preset("w8a8-smoothquant")  # fold-only, every layer: the Mul comes as its own entry after it
    assert [t.to_json() for t in smoothquant_mul_for(w, folds, "fc2").transforms] == [
        {"smoothquant": {"alpha": 0.5}}, {"smoothquant": {"alpha": "search", "unfoldable": "mul", "layers": ["fc2"]}}]
    one = smoothquant_mul_for(w, preset("int8-static"), "fc1")
    assert [t.to_json() for t in smoothquant_mul_for(w, one, "fc2").transforms] == [
        {"smoothquant": {"alpha": "search", "unfoldable": "mul", "layers": ["fc1", "fc2"]}}]


def test_smoothquant_with_a_mul_where_a_fold_reaches_or_on_a_conv_is_one_line(digits_cnn):
    with pytest.raises(QcoreError, match="a fold reaches layer 'features.3'.*adds no op") as e:
        smoothquant_mul_for(digits_cnn, preset("int8-static"), "features.3")
    with pytest.raises(QcoreError, match=r"cannot apply to layer 'features.0' \(Conv2d\).*Linear layers") as e2:
        smoothquant_mul_for(digits_cnn, preset("int8-static"), "features.0")
    assert "\n" not in str(e.value) + str(e2.value)
