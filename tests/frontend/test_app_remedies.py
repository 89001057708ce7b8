"""The remedy panels: "Try cross-layer equalization" on the Weights page and "Try SmoothQuant" on the Activations
page show before/after numbers and, in one click, put the transform into the session's recipe."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest
from test_app import open_app, rerun, visit, zoo_models  # noqa: F401 -- the fixture the app's loader uses

from qcore.analysis import transform_remedies as remedies
from qcore.recipe import preset
from ui.text import plain


def _click(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label.startswith(label)).click()
    return rerun(at)


def test_cle_panel_shows_ranges_and_applies_cle_to_the_recipe(zoo_models):  # noqa: F811
    at = visit(open_app("digits-cnn"), "weights")
    at.selectbox(key=next(s.key for s in at.selectbox if s.label == "Layer")).set_value("features.3")
    at = rerun(at)
    at = _click(at, "Try CLE")
    assert any("channel ranges" in plain(c.proto.spec) for c in at.get("plotly_chart")) or len(at.get("plotly_chart"))
    assert any(m.label.startswith("model accuracy") for m in at.metric)
    at = _click(at, "Apply CLE")
    entry = next(iter(at.session_state["recipes"].values())) if "recipes" in at.session_state else None
    assert entry is not None and entry["transforms"] == [{"cle": {"layers": ["features.3"]}}]


def test_smoothquant_preview_numbers_are_the_simulation(zoo_models):  # noqa: F811
    w = zoo_models[0]["digits-cnn"]
    recipe = preset("int8-static", w.layer_shapes)
    p = remedies.smoothquant_preview(w, recipe, "features.3")
    assert p["recipe"].transforms[0].layers == ("features.3",)
    assert p["metric_after"] == w.evaluate(p["recipe"]).quantized.metrics["accuracy"]
    assert max(p["act_after"]) / (sum(p["act_after"]) / len(p["act_after"])) < \
        max(p["act_before"]) / (sum(p["act_before"]) / len(p["act_before"]))


def test_smoothquant_panel_where_no_fold_reaches_offers_the_mul(zoo_models):  # noqa: F811
    """digits-mlp's fc1 reads the image: no layer holds a scale, so the panel previews the Mul variant."""
    w = zoo_models[0]["digits-mlp"]
    p = remedies.smoothquant_preview(w, preset("int8-static", w.layer_shapes), "fc1")
    mul = [{"smoothquant": {"alpha": "search", "unfoldable": "mul", "layers": ["fc1"]}}]
    assert p["mul"] and [t.to_json() for t in p["recipe"].transforms] == mul
    assert p["metric_after"] == w.evaluate(p["recipe"]).quantized.metrics["accuracy"]
    at = visit(open_app("digits-mlp"), "activations")
    at.selectbox(key=next(s.key for s in at.selectbox if s.label == "Layer (its input)")).set_value("fc1")
    at = _click(rerun(at), "Try SmoothQuant")
    assert not at.error, [e.value for e in at.error]
    assert any("No fold reaches this layer" in c.value for c in at.caption)
    at = _click(at, "Apply SmoothQuant")
    assert next(iter(at.session_state["recipes"].values()))["transforms"] == mul
