"""Sensitivity page: which layers hurt when quantized -- a sweep over layers × candidates, a heatmap, a
ranked chart, and one click from a layer to its Weights / Activations view, to keeping it in float
(weights and inputs), or to trying a remedy on it (``ui.remedy``). The ranking and the summary start under the candidate whose drops differ most
between layers (``viz_decide.widest_spread``): the one that tells the layers apart."""

import statistics

import pandas as pd
import streamlit as st

from ui import charts, glossary, jobs, keys, remedy, state
from qcore.figures import decide as viz_decide
from qcore.recipe import PRESETS
from qcore.analysis.sensitivity import LAYER_SPECS
from ui.text import AGAINST_FP32, DROP_CONVENTION, layer_label, metric_label, plain, signed

MODES = {"both": "weights and inputs", "weights": "weights only", "activations": "inputs only"}
VIEWS = {"only": "one layer quantized", "all_but": "all but one layer quantized"}

key, w = state.active()
st.title("Sensitivity: which layers hurt")
st.caption(DROP_CONVENTION)
glossary.link("drop", "sqnr")
st.write(
    "Each layer is quantized on its own (every other layer stays FP32) and the model is scored on the evaluation "
    "data: the **drop** in the metric says how much that layer costs. In the *all but one* view every layer is "
    "quantized except one, and the drop says how much is lost with that layer quantized as well (small = keeping it "
    "in float does not help). Quantizing only the weights or only the inputs shows which of the two is the problem. "
    "Results are cached: a sweep someone already ran on this server appears at once."
)
settings = st.session_state.get(keys.SWEEP) or {}
c1, c2, c3 = st.columns([3, 1, 1])
candidates = c1.multiselect("Candidates", list(PRESETS)[1:] + list(LAYER_SPECS), key="sens_candidates",
                            default=settings.get("candidates", state.DEFAULT_CANDIDATES), persist_state="session",
                            help="presets, or intN = N-bit per-channel weights with float inputs")
mode = c2.radio("Quantize", list(MODES), format_func=MODES.get, key="sens_mode", persist_state="session")
view = c3.radio("View", list(VIEWS), format_func=VIEWS.get, key="sens_view", persist_state="session")
if not candidates:
    st.info("Choose at least one candidate.", icon=":material/info:")
    st.stop()
settings = {"key": key, "candidates": candidates, "mode": mode, "view": view}
inputs = {"candidates": candidates, "mode": mode, "view": view}
ask = st.empty()  # the button, cleared once the sweep is under way
if not state.small(w) and st.session_state.get(keys.SWEEP) != settings and not jobs.asked("sweep", key, w, inputs) and not ask.button(
        f"Run the sweep ({len(w.layers)} layers × {len(candidates)} candidates)", type="primary"):
    st.info("This model is large: the sweep takes a while (it is cached once run).", icon=":material/info:")
    st.stop()
ask.empty()
result = jobs.result("sweep", key, w, inputs, "sweep", state.small(w))
st.session_state[keys.SWEEP] = settings  # read by Mixed precision and Export; cached, so shown at once next time
for note in result["notes"]:
    st.info(plain(note), icon=":material/info:")

metric = metric_label(result["metric"])  # plain words: "similarity to FP32 (cosine)"
widest = viz_decide.widest_spread(result["rows"])


def open_layer(page: str, layer_key: str, layer: str) -> None:
    st.session_state[layer_key] = layer
    state.switch_page(page)


def keep_in_float(layer: str) -> None:
    name, overrides, _ = state.current(key, w)
    state.set_current(key, w, name, {**overrides, layer: None})
    st.toast(f"{plain(layer_label(layer))}: weights and inputs stay float in the Mixed precision table.")
    st.rerun()  # the button sits in the fragment below: the whole app reruns, so the sidebar shows the recipe


@st.fragment
def ranking() -> None:
    """Everything that follows the ranked candidate. Choosing another reruns only this part (the sweep's settings,
    the sidebar and the rows table stay as the browser has them)."""
    chosen = st.selectbox("Rank the layers under", candidates, index=candidates.index(widest),
                          key=f"sens_rank_candidate:{mode}:{view}",
                          help=f"starts at {plain(widest)}: its drops differ most between layers, so its ranking tells them apart")
    ranked = sorted((r for r in result["rows"] if r["candidate"] == chosen), key=lambda r: r["rank"])
    subset = state.on_samples(result["samples"], result["evaluation_samples"])
    trivial = result["metric"] in AGAINST_FP32  # FP32 scores the best value against itself: no headline of its own
    reference = (f"drops from FP32's {metric}, {result['fp32_metric']:.4f}" + (" by definition (scored against FP32 "
                 "itself)" if trivial else "") + f", on the {result['samples']} samples swept")
    columns = iter(st.columns(3 if trivial else 4))
    if not trivial:
        next(columns).metric(f"FP32 {metric}", f"{result['fp32_metric']:.4f}", help=f"on the {result['samples']} samples swept")
    next(columns).metric("Most sensitive layer", plain(layer_label(ranked[0]["layer"])), help=f"under {plain(chosen)}")
    drop_name = f"{metric} drop" if view == "only" else f"{metric} drop with only it in float"
    next(columns).metric(f"Its {metric} drop" if view == "only" else drop_name, signed(ranked[0]['metric_drop']),
                         help=f"under {plain(chosen)}; positive = worse than FP32; {reference}" + ("" if view == "only" else
                              "; in this view the most sensitive layer is the one whose drop is SMALLEST: keeping it alone "
                              "in float recovers the most"))
    next(columns).metric(f"Median layer's {drop_name}", signed(statistics.median(r["metric_drop"] for r in ranked)),
                         help=f"under {plain(chosen)}, over all {len(ranked)} layers: how far the most sensitive one "
                              f"stands out; {reference}")
    if view != "only":
        st.caption("In this view a layer matters more the *smaller* its drop: everything else is quantized, so a small "
                   "drop with only that layer kept in float means keeping it recovers most of the loss.")
    if subset:
        st.caption(f"Every number of this sweep is {subset.strip(' ()')} (evenly spaced), to keep it fast; Evaluate on "
                   "Mixed precision simulates a recipe on all of them.")

    charts.plot(viz_decide.ranked_drops, result["rows"], chosen, metric)
    charts.plot(viz_decide.sensitivity_heatmap, result["rows"])

    st.subheader("Act on a layer")
    st.write("Open a layer's weights or inputs, or keep the layer in float (weights and inputs: not quantized at all) "
             "in the Mixed precision recipe.")
    _, _, recipe = state.current(key, w)
    by_layer = {r["layer"]: r for r in ranked}
    # One picker and three buttons, not a row of them per layer: a rerun of this fragment sends and draws 4 elements
    # instead of 4 per layer (156 on minilm-l6), which was most of the browser's work on a ranking change.
    layer = st.selectbox("Layer (most sensitive first)", list(by_layer), key=f"sens_act_layer:{key}",
                         format_func=lambda n: f"{by_layer[n]['rank']}. {layer_label(n)} ({by_layer[n]['kind']}): drop "
                                               f"{signed(by_layer[n]['metric_drop'])}, output SQNR {by_layer[n]['sqnr_db']:.1f} dB")
    b, c, d = st.columns(3)  # under the picker, one third each: every label fits, all three equally wide
    if b.button("Weights", key=f"sens_w:{layer}", icon=":material/bar_chart:", width="stretch"):
        open_layer("pages/weights.py", keys.weights_layer(key), layer)
    if c.button("Inputs", key=f"sens_a:{layer}", icon=":material/bolt:", disabled=w.layers[layer].kind == "Embedding",
                width="stretch"):
        open_layer("pages/activations.py", keys.activations_layer(key), layer)
    in_float = recipe.plan(layer).is_float
    d.button("Layer in float" if in_float else "Keep layer in float", key=f"sens_f:{layer}", icon=":material/lock:",
             disabled=in_float, on_click=keep_in_float, args=(layer,), help="weights and inputs stay float", width="stretch")

    remedy.panel(key, w, [r["layer"] for r in ranked if r["kind"] != "Embedding"])


ranking()
with st.expander("All sweep rows"):
    st.dataframe(pd.DataFrame(result["rows"]), hide_index=True, width="stretch")
state.sync_url(key, w)  # a "Keep layer in float" click changed the recipe: keep the link in step
