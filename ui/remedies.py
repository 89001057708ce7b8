"""The "Try SmoothQuant" (Activations page) and "Try cross-layer equalization" (Weights page) panels: before/after
numbers and pictures from ``qcore.analysis.transform_remedies``, and one click to put the transform into the recipe."""

from __future__ import annotations

import streamlit as st

from qcore.figures import remedies as figures
from qcore.recipe import Recipe
from ui import charts, jobs, state
from ui.text import delta_style, html_plain, layer_label

PREVIEWS = "remedy_previews"  # session key: (workload, layer, transform, recipe JSON) -> preview dict


def _preview(key: str, w, layer: str, name: str, job_name: str) -> dict | None:
    """The ``preview`` job's result (kind ``preview``, ``ui.jobs``: identical previews from any session run once, a
    large model's shows its progress and a Cancel button), kept for the session; None until asked and finished."""
    _, _, recipe = state.current(key, w)
    cache = st.session_state.setdefault(PREVIEWS, {})
    ck = (key, layer, name, recipe.to_json())
    inputs = {"recipe": recipe.to_dict(), "layer": layer, "name": job_name}
    if ck not in cache:
        if not jobs.asked("preview", key, w, inputs) and not st.button(f"Try {name} on this layer",
                                                                        key=f"try_{name}_{key}_{layer}"):
            return None
        out = jobs.result("preview", key, w, inputs, f"{name} preview", state.small(w), stop=False)
        if out is None:  # running (its progress is shown) or refused (one error box)
            return None
        cache[ck] = {**out, "recipe": Recipe.from_dict(out["recipe"])}
    return cache[ck]


def _apply(key: str, w, p: dict, name: str) -> None:
    st.metric(f"model {p['metric']} (simulated)", f"{p['metric_after']:.4f}",
              **delta_style(p['metric_after'] - p['metric_before'], w.task.higher_is_better, 4, " vs now"))
    st.button(f"Apply {name} to the recipe", key=f"apply_{name}_{key}", on_click=_put_in_recipe, args=(key, w, p, name))


def _put_in_recipe(key: str, w, p: dict, name: str) -> None:
    preset_name, _, _ = state.current(key, w)
    state.set_recipe(key, w, p["recipe"], [preset_name])
    st.toast(f"{name} is now part of the recipe (Sensitivity, Mixed precision and Export use it).")
    st.rerun()  # the panel may sit in a fragment (Weights): the whole app reruns, so the sidebar shows the recipe


def smoothquant_panel(key: str, w, layer: str) -> None:
    st.subheader("Try SmoothQuant")
    st.write("SmoothQuant divides each input channel by s = max|x|^α / max|W|^(1−α) and multiplies the weight's "
             "column by the same s, folded into the LayerNorm or Linear that produced the input: the float model is "
             "unchanged, the outliers move into the weights, whose per-channel scales absorb them.")
    p = _preview(key, w, layer, "SmoothQuant", "smoothquant")
    if p is None:
        return
    if p.get("mul"):
        st.caption("No fold reaches this layer (its input comes after a GELU, or from a LayerNorm that also feeds a "
                   "residual add): an explicit Mul by 1/s before it holds the scale -- one op more in the exported "
                   "graph -- with α searched on the layer's output error.")
    charts.plot(figures.smoothquant_channels, p["act_before"], p["act_after"], p["weight_before"], p["weight_after"],
                f"Input channels of {html_plain(layer_label(layer))}")
    c1, c2 = st.columns(2)
    c1.metric("layer output SQNR (simulated, dB)", f"{p['sqnr_after']:.1f}",
              **delta_style(p['sqnr_after'] - p['sqnr_before'], True, 1, " dB vs now"))
    with c2:
        _apply(key, w, p, "SmoothQuant")


def cle_panel(key: str, w, layer: str) -> None:
    st.subheader("Try cross-layer equalization")
    st.write("For a layer reading another Linear/Conv through a ReLU, CLE divides the first layer's output channel "
             "by s = sqrt(r1/r2) and multiplies this layer's input column by s: both ranges become sqrt(r1·r2), so a "
             "per-tensor grid is no longer set by one wide channel. The float model is unchanged.")
    p = _preview(key, w, layer, "CLE", "cle")
    if p is None:
        return
    charts.plot(figures.cle_ranges, p["producer_before"], p["producer_after"], p["consumer_before"], p["consumer_after"],
                f"{html_plain(layer_label(p['producer']))} → {html_plain(layer_label(layer))}: channel ranges")
    _apply(key, w, p, "CLE")
