"""AppTest of the Sensitivity page's "Try a remedy" panel with a transform (CLE on digits-cnn): the numbers shown
are ``Workload.evaluate`` / the layer-output SQNR of the two recipes, computed here independently; "Apply" puts the
transform in the recipe's transforms and the link, a fresh session from that link has the same recipe, a remedy that
does not fit the layer is one line, and a preset change or a search result replaces the transforms."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest
from test_app import APP, TIMEOUT, open_app, rerun, visit, zoo_models  # noqa: F401 -- the fixture the app's loader uses

from qcore.analysis.transform_remedies import layer_output_sqnr
from qcore.recipe.links import build_recipe, decode_transforms, encode_transforms

CLE = [{"cle": {"layers": ["features.3"]}}]


def _param(at: AppTest, name: str):
    value = at.query_params.get(name)
    return value[0] if isinstance(value, list) else value


def _click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click()
    return rerun(at)


def _try(at: AppTest, layer: str, remedy: str) -> AppTest:
    at.selectbox(key="remedy_layer:zoo:digits-cnn").select(layer).run()
    at.selectbox(key="remedy_name").select(remedy).run()
    return _click(at, "remedy_try")


def change_text(x: float, digits: int) -> str:
    """A change as the panels write it: a sign always (a true minus), none on a change that rounds to zero."""
    text = f"{x:+.{digits}f}"
    return text[1:] if float(text) == 0 else text.replace("-", "\u2212")


def _assert_before_after(at, w, layer: str, transforms: list) -> None:
    """The panel's two metrics against a second computation: the layer's output SQNR and the model's accuracy of
    int8-static with ``transforms`` vs without, each shown with its change from now."""
    now, after = build_recipe(w, "int8-static", {}), build_recipe(w, "int8-static", {}, transforms)
    shown = {m.label: m for m in at.metric}
    sqnr = shown["Layer output SQNR (the whole simulated model vs FP32, first calibration batch)"]
    before_db, after_db = layer_output_sqnr(w, now, layer), layer_output_sqnr(w, after, layer)
    assert sqnr.value == f"{after_db:.1f} dB" and sqnr.delta == f"{change_text(after_db - before_db, 1)} dB vs now"
    acc0, acc1 = (w.evaluate(r).quantized.metrics["accuracy"] for r in (now, after))
    metric = shown["Model accuracy (evaluation data)"]
    assert metric.value == f"{acc1:.4f}" and metric.delta == f"{change_text(acc1 - acc0, 4)} vs now"


def test_cle_from_the_sensitivity_panel_is_measured_applied_and_shared(zoo_models):  # noqa: F811
    w = zoo_models[0]["digits-cnn"]
    at = visit(open_app("digits-cnn"), "sensitivity")
    at = _try(at, "features.3", "cle")
    _assert_before_after(at, w, "features.3", CLE)
    assert not any("Weight error" in (c.proto.spec or "") for c in at.get("plotly_chart"))  # rounding only

    at = _click(at, "remedy_apply")
    assert at.session_state["recipes"]["zoo:digits-cnn"]["transforms"] == CLE
    assert decode_transforms(_param(at, "transforms")) == CLE and _param(at, "layers") is None

    fresh = AppTest.from_file(APP, default_timeout=TIMEOUT)  # the shared link, in a new session
    fresh.query_params.update({"model": "digits-cnn", "transforms": _param(at, "transforms")})
    fresh = visit(rerun(fresh), "mixed_precision")
    entry = fresh.session_state["recipes"]["zoo:digits-cnn"]
    assert build_recipe(w, entry["preset"], entry["layers"], entry.get("transforms")) == build_recipe(
        w, "int8-static", {}, CLE)

    # "Keep layer in float" edits the recipe the user has: CLE stays; a preset change brings the preset's (none)
    at.selectbox(key="sens_act_layer:zoo:digits-cnn").select("classifier.1").run()
    at = _click(at, "sens_f:classifier.1")
    assert at.session_state["recipes"]["zoo:digits-cnn"]["transforms"] == CLE
    at = visit(at, "mixed_precision")
    at.selectbox(key="mp_preset:zoo:digits-cnn").select("int4-weight-only").run()
    assert "transforms" not in at.session_state["recipes"]["zoo:digits-cnn"] and _param(at, "transforms") is None


def test_a_remedy_that_does_not_fit_the_layer_is_one_line(zoo_models):  # noqa: F811
    at = visit(open_app("digits-cnn"), "sensitivity")
    at = _try(at, "features.0", "cle")  # the first conv reads the image: no layer before it to equalize with
    assert [e.value.count("\n") for e in at.error] == [0] and "cle cannot apply" in at.error[0].value
    assert "transforms" not in (at.session_state["recipes"].get("zoo:digits-cnn") or {})


def test_a_corrupted_transforms_link_is_one_line_and_the_recipe_is_the_preset(zoo_models):  # noqa: F811
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update({"model": "digits-cnn", "transforms": encode_transforms(CLE)[:-3] + "%%"})
    at = rerun(rerun(rerun(at).switch_page("pages/mixed_precision.py")))
    assert any("transforms= parameter" in e.value and "\n" not in e.value for e in at.error), [e.value for e in at.error]


def _edit_then_take_a_search_result(w, search_json: str) -> None:
    import streamlit as st

    from qcore.recipe import Recipe
    from ui import state

    key = "zoo:digits-cnn"
    state.set_current(key, w, "int8-static", {}, transforms=[{"cle": {"layers": ["features.3"]}}])  # a panel's Apply
    state.set_current(key, w, "int8-static", {"classifier.1": None})  # a table edit / "Keep layer in float"
    st.session_state["after_edit"] = state.current(key, w)[2]
    state.set_recipe(key, w, Recipe.from_json(search_json))  # "Use this recipe" of a search measured without CLE
    st.session_state["after_search"] = state.current(key, w)[2]


def test_a_search_result_replaces_the_transforms_with_what_was_measured(digits_cnn):
    found = build_recipe(digits_cnn, "int8-static", {"features.0": None})  # same preset, measured without CLE
    at = AppTest.from_function(_edit_then_take_a_search_result, args=(digits_cnn, found.to_json()), default_timeout=60)
    at = rerun(at)
    edited = at.session_state["after_edit"]
    assert [t.to_json() for t in edited.transforms] == CLE and edited.plan("classifier.1").is_float
    taken = at.session_state["after_search"]
    assert taken.transforms == () and taken.plan("features.0").is_float and not taken.plan("classifier.1").is_float


def test_smoothquant_with_a_mul_from_the_sensitivity_panel_is_measured_and_applied(zoo_models):  # noqa: F811
    """digits-mlp's fc1 reads the image: no layer before it holds a scale, so only the Mul variant reaches it."""
    w = zoo_models[0]["digits-mlp"]
    at = visit(open_app("digits-mlp"), "sensitivity")
    at.selectbox(key="remedy_layer:zoo:digits-mlp").select("fc1").run()
    at.selectbox(key="remedy_name").select("smoothquant").run()
    at = _click(at, "remedy_try")
    assert [e.value.count("\n") for e in at.error] == [0] and "try SmoothQuant with a Mul" in at.error[0].value
    at.selectbox(key="remedy_name").select("smoothquant_mul").run()
    at = _click(at, "remedy_try")
    assert not at.error, [e.value for e in at.error]
    mul = [{"smoothquant": {"alpha": "search", "unfoldable": "mul", "layers": ["fc1"]}}]
    _assert_before_after(at, w, "fc1", mul)
    at = _click(at, "remedy_apply")
    assert at.session_state["recipes"]["zoo:digits-mlp"]["transforms"] == mul
    assert decode_transforms(_param(at, "transforms")) == mul
