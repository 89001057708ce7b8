"""``try_remedy`` compares like with like: a rounding remedy on a recipe that already has a transform (GPTQ after
CLE) is measured by the layer's output in the whole simulated model on both sides, as the result says, and its
numbers are those of the two recipes, computed here by independent calls."""

import math

from qcore.analysis.remedies import try_remedy
from qcore.analysis.transform_remedies import layer_output_sqnr
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
