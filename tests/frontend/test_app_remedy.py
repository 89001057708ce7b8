"""AppTest of the Sensitivity page's "Try a remedy" panel: try GPTQ on a layer, see before/after measured by the
engine, apply it, and the recipe (session state and link) changes to exactly that."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from qcore.analysis.remedies import try_remedy
from qcore.recipe.links import build_recipe, decode_layers

APP = str(Path(__file__).resolve().parents[2] / "app.py")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QCORE_CACHE_DIR", str(tmp_path))


def test_try_gptq_on_a_layer_then_apply_it(digits_mlp):
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"preset": "int4-weight-only"})
    at.run()
    at.switch_page("pages/sensitivity.py").run()
    assert not at.exception, at.exception
    at.selectbox(key="remedy_layer:zoo:digits-mlp").select("fc1").run()
    at.selectbox(key="remedy_name").select("gptq").run()
    at.button(key="remedy_try").click().run()
    assert not at.exception, at.exception
    expected = try_remedy(digits_mlp, build_recipe(digits_mlp, "int4-weight-only", {}), "fc1", "gptq")
    shown = {m.label: m.value for m in at.metric}
    assert shown["Layer output SQNR (calibration data, FP32 inputs)"] == f"{expected['after']['layer_sqnr_db']:.1f} dB"
    assert shown["Model accuracy (evaluation data)"] == f"{expected['after']['metric']:.4f}"
    assert expected["after"]["layer_sqnr_db"] > expected["before"]["layer_sqnr_db"]
    assert any(c.proto.spec and "Weight error" in c.proto.spec for c in at.get("plotly_chart"))

    at.button(key="remedy_apply").click().run()
    assert not at.exception, at.exception
    layers = decode_layers(at.query_params["layers"][0] if isinstance(at.query_params["layers"], list)
                           else at.query_params["layers"])
    assert layers["fc1"]["weights"]["rounding"] == "gptq" and set(layers) == {"fc1"}
    recipe = build_recipe(digits_mlp, "int4-weight-only", layers)
    assert recipe.plan("fc1").weights.rounding == "gptq" and recipe.plan("fc2").weights.rounding == "nearest"
