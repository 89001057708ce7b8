"""The Sensitivity page's "Try a remedy" panel: a remedy (``qcore.analysis.remedies.REMEDIES``: rounding or a
transform) on one layer at its current format, measured before and after (the layer's output SQNR, saying which
measure, and the model's metric, both from the simulation), the weight-error histogram for a rounding remedy, and one
click to put it in the recipe: a rounding in the layer's override, a transform in the recipe's transforms.

The trial runs as a background job (kind ``remedy``, ``ui.jobs``): identical trials from any session run once, a
large model's trial shows its progress and a Cancel button while the rest of the page stays usable."""

from __future__ import annotations

import streamlit as st

from qcore.analysis.remedies import REMEDIES
from qcore.figures.rounding import weight_error_histogram
from qcore.recipe import Recipe
from ui import charts, jobs, keys, state
from ui.text import delta_style, layer_label, plain


def _apply(key: str, w, layer: str, remedied) -> None:
    preset_name, _, _ = state.current(key, w)
    state.set_recipe(key, w, remedied, [preset_name])
    st.toast(f"{plain(layer_label(layer))}: the remedy is in the Mixed precision recipe.")
    st.rerun()  # the panel sits in a fragment (Sensitivity): the whole app reruns, so the sidebar shows the recipe


def panel(key: str, w, layers: list[str]) -> None:
    """The panel for workload ``w`` (session key ``key``), offering the ``layers`` (most sensitive first)."""
    st.subheader("Try a remedy")
    st.write("Instead of keeping a layer in float, keep its format and round its weights better, or transform the "
             "float model around it (the float output is unchanged): the remedy runs on the calibration data and is "
             "measured against the recipe as it is now.")
    a, b = st.columns(2)
    layer = a.selectbox("Layer", layers, format_func=layer_label, key=f"remedy_layer:{key}")
    name = b.selectbox("Remedy", list(REMEDIES), format_func=lambda r: REMEDIES[r].label, key="remedy_name")
    st.caption(REMEDIES[name].why)
    _, _, recipe = state.current(key, w)
    tried = st.session_state.setdefault(keys.REMEDY, {})
    slot = (key, layer, name, recipe.to_json())
    inputs = {"recipe": recipe.to_dict(), "layer": layer, "name": name}
    if slot not in tried and (jobs.asked("remedy", key, w, inputs) or st.button("Try it", key="remedy_try",
                                                                               icon=":material/science:")):
        out = jobs.result("remedy", key, w, inputs, f"{REMEDIES[name].label} trial", state.small(w), stop=False)
        if out is None:  # running (its progress and Cancel are shown) or refused (one error box)
            return
        tried[slot] = {**out, "recipe": Recipe.from_dict(out["recipe"])}
    result = tried.get(slot)
    if result is None:
        return
    before, after, metric = result["before"], result["after"], result["metric_name"]
    c1, c2 = st.columns(2)
    c1.metric(f"Layer output SQNR ({result['sqnr_measure']})", f"{after['layer_sqnr_db']:.1f} dB",
              **delta_style(after['layer_sqnr_db'] - before['layer_sqnr_db'], True, 1, " dB vs now"), help="simulation")
    c2.metric(f"Model {metric} (evaluation data)", f"{after['metric']:.4f}",
              **delta_style(after['metric'] - before['metric'], w.task.higher_is_better, 4, " vs now"),
              help="simulation, on the whole evaluation set")
    if after["weight_error_steps"] is not None:  # rounding: the same weights, on other grid points
        charts.plot(weight_error_histogram, {"now": before["weight_error_steps"], REMEDIES[name].label:
                                             after["weight_error_steps"]}, f"Weight error of {plain(layer_label(layer))}")
    st.button("Apply to the recipe", key="remedy_apply", icon=":material/check:", disabled=result["recipe"] == recipe,
              on_click=_apply, args=(key, w, layer, result["recipe"]))
