"""Mixed precision page: pick each layer's format in a table, see size and an estimated metric at once,
evaluate the recipe's simulation, search one automatically, download or upload it."""

import streamlit as st

from qcore.recipe.links import compact, recipe_id
from qcore.recipe.table import FLOAT_LAYER, INPUT_CHOICES, apply_rows, table_rows
from ui import jobs, keys, recipe_table, state
from qcore.analysis import search, summary
from qcore.errors import QcoreError
from qcore.recipe import PRESET_DESCRIPTIONS, PRESETS, Recipe
from qcore.figures.viz import human_bytes
from ui.text import delta_style, metric_label, plain

key, w = state.active()
st.title("Mixed precision: a format for every layer")
st.write(
    "Start from a preset, then change any layer in the table: its weight format and options, and how its input "
    "is quantized. Layers that hurt most (see the Sensitivity page) can stay in higher precision while the rest "
    "shrink. The totals update at once; the metric next to them is an **estimate** added up from the sensitivity "
    "sweep. **Evaluate** runs the simulated (fake-quantized) model on the evaluation data: the **simulated** number. "
    "Export runs the exported file itself: the **measured** one."
)
name, overrides, recipe = state.current(key, w)

preset_key = f"mp_preset:{key}"  # the select box below; set here when the recipe changes elsewhere


def choose_preset():
    state.set_current(key, w, st.session_state[preset_key], {})


c1, c2 = st.columns([2, 3])
if st.session_state.get(preset_key) != name:
    st.session_state[preset_key] = name
c1.selectbox("Start from a preset", list(PRESETS), key=preset_key, on_change=choose_preset,
             help="choosing a preset discards the per-layer changes")
c1.caption(PRESET_DESCRIPTIONS.get(name, ""))
upload = c2.file_uploader("…or upload a recipe JSON", type=["json"], key=f"mp_upload:{key}")
if upload is not None and (problem := state.load_recipe_file(key, w, upload)):
    c2.error(plain(f"{upload.name} was not loaded, the table is unchanged: {problem}"), icon=":material/error:")

settings = st.session_state.get(keys.SWEEP) or {}
candidates = list(dict.fromkeys(settings.get("candidates", state.DEFAULT_CANDIDATES) + ([name] if name != "fp32" else [])))
estimate = None
if st.toggle("Estimate the metric from a sensitivity sweep", state.small(w), key=f"mp_estimate:{key}",
             help=f"one-layer-at-a-time sweep of {', '.join(candidates)} (weights and inputs); cached for everyone"):
    sweep = state.sweep(w, candidates, "both", "only")
    estimate = search.estimate_metric(w, recipe, sweep)

version = st.session_state.get(keys.EDITOR_VERSION, 0)
rows = table_rows(w, recipe, estimate)
table = recipe_table.shown(rows)
inputs = list(dict.fromkeys(INPUT_CHOICES + list(table["inputs"])))
edited = st.data_editor(table, key=f"mp_editor:{key}:{version}", hide_index=True, num_rows="fixed", width="stretch",
                        disabled=recipe_table.READ_ONLY, column_config=recipe_table.columns(inputs))
try:
    edited_recipe = apply_rows(w, recipe, recipe_table.filled(edited, rows))
    edited_recipe.check_against(w.layer_shapes)
    if edited_recipe != recipe:
        # Some edits are adjusted (e.g. a float format is always symmetric): then redraw the table from the recipe.
        editable = [FLOAT_LAYER, "weights", "granularity", "group size", "symmetric", "range", "inputs"]
        adjusted = not recipe_table.shown(table_rows(w, edited_recipe))[editable].astype(str).equals(
            edited[editable].astype(str))
        state.set_current(key, w, *compact(w, edited_recipe, [name]), reset_editor=adjusted)
        st.rerun()
except QcoreError as e:
    st.error(f"That change was not applied: {plain(e)}", icon=":material/error:")

total = summary.recipe_totals(w, recipe)
m1, m2, m3, m4 = st.columns(4)
m1.metric("Size (bytes)", f"{total['size_bytes']:,}", help=f"{human_bytes(total['size_bytes'])}; FP32 is "
          f"{total['fp32_bytes']:,} bytes", **delta_style(100 * (total['size_bytes'] / total['fp32_bytes'] - 1), False, 1,
                                                          "% vs FP32"))
m2.metric("Average bits per weight", f"{total['bits_per_weight']:.2f}", help="quantizable layers, scales included")
m3.metric("Weights kept in FP32", f"{100 * total['float_share']:.1f}%", help="share of the quantizable layers' weights")
if estimate and estimate["missing"]:
    m4.metric(f"{plain(w.task.headline)} (estimate)", "incomplete",
              help="a sum of single-layer drops needs every quantized layer's; Evaluate gives the simulated number")
    st.warning(plain(f"Estimate incomplete: {len(estimate['missing'])} layer(s) not swept ({', '.join(estimate['missing'])}): "
                     f"no candidate of the sweep ({', '.join(candidates)}) quantizes them as the table does. Evaluate the "
                     "recipe for the simulated number, or add a matching candidate on the Sensitivity page."),
               icon=":material/warning:")
elif estimate:
    m4.metric(f"{plain(w.task.headline)} (estimate)", f"{estimate['metric']:.4f}", help="FP32's value worsened by the sum of each "
              "layer's single-layer drop from the sweep; not a measurement" + state.on_samples(sweep.samples, sweep.evaluation_samples))
    if sweep.samples < sweep.evaluation_samples:
        m4.caption(state.on_samples(sweep.samples, sweep.evaluation_samples).strip(" ()"))

if (result := jobs.result("evaluate", key, w, {"recipe": recipe.to_dict()}, "evaluation", state.small(w), stop=False,
                          start=st.button("Evaluate this recipe (simulated)", type="primary",
                                          help="the fake-quantized model on the evaluation data; the exported file's "
                                               "own number is on Export"))) and (
        st.session_state.get(keys.MEASURED_RECIPE) or {}).get("recipe") != recipe.to_json():  # not shown yet
    state.remember(key, w, recipe, f"evaluated: {recipe.name}")
    st.session_state[keys.MEASURED_RECIPE] = {"recipe": recipe.to_json(), "result": result}
shown = st.session_state.get(keys.MEASURED_RECIPE)
if shown and shown["recipe"] == recipe.to_json():
    q, f, headline = shown["result"]["quantized"]["metrics"], shown["result"]["fp32"]["metrics"], shown["result"]["metric"]
    st.metric(f"{plain(metric_label(headline))} (simulated)", f"{q[headline]:.4f}",
              **delta_style(q[headline] - f[headline], w.task.higher_is_better, 4, f" vs FP32 {f[headline]:.4f}"))

@st.fragment
def search_section() -> None:
    """The automatic search. Its goal, budget and target do not change the recipe, so moving them reruns only this
    part; a new result or "Use this recipe" reruns the whole app (the sidebar and the table show the recipe)."""
    st.subheader("Search a recipe automatically")
    goal = st.radio("Goal", ["size budget", "target metric"], horizontal=True, key="mp_goal")
    if goal == "size budget":
        budget = st.slider("Largest size, as a share of FP32", 0.05, 1.0, 0.25, 0.05, key="mp_budget")
        target = {"max_size_fraction": budget}
    else:
        fp32_value, higher = w.fp32_metrics[w.task.headline], w.task.higher_is_better  # lower is better: a ceiling 5% above FP32
        target = {"min_metric": st.number_input(f"{'Smallest' if higher else 'Largest'} acceptable {plain(w.task.headline)}", value=round(
            fp32_value - 0.01 if higher else fp32_value * 1.05, 4), format="%.4f", key="mp_target")}
    if (found := jobs.result("search", key, w, {"candidates": candidates, **target}, "search", state.small(w), stop=False,
                             start=st.button("Search", help=f"tries per-layer mixes of {', '.join(candidates)}; every result is simulated on the evaluation data"))
            ) and found["recipe"] != st.session_state.get(keys.SEARCH, {}).get(key, {}).get("recipe"):  # a new result
        goal_text = f"size ≤ {budget:.0%} of FP32" if goal == "size budget" else f"{w.task.headline} {'≥≤'[not w.task.higher_is_better]} {target['min_metric']:.4f}"
        found["label"] = state.remember(key, w, Recipe.from_dict({**found["recipe"], "name": f"{w.name}-search"}),
                                        f"search: {goal_text}")
        st.session_state.setdefault(keys.SEARCH, {})[key] = found  # its own entry: the table's recipe is left alone
        st.rerun()
    found = st.session_state.get(keys.SEARCH, {}).get(key)
    if found:
        in_table = recipe_id(w, Recipe.from_dict(found["recipe"])) == recipe_id(w, recipe)
        (st.success if found["met"] else st.warning)(
            f"Search {'met' if found['met'] else 'did not meet'} the goal: simulated {plain(found['metric'])} "
            f"{found['measured']['metric']:.4f} at {found['measured']['size_bytes']:,} bytes (FP32 {found['fp32']['metric']:.4f}, "
            f"{found['fp32']['size_bytes']:,} bytes). Kept as **{plain(found['label'])}** (see Trade-offs)"
            + ("; it is the table's recipe. " if in_table else "; the table still holds your recipe. ")
            + plain(" ".join(found.get("notes", []))))
        if st.button("In the table" if in_table else "Use this recipe", disabled=in_table, icon=":material/input:",
                     help="replaces the table's recipe with the search's; yours is kept on Trade-offs"):
            if overrides or recipe.transforms:  # hand-made: kept (and shown on Trade-offs) before the table takes the search's recipe
                state.remember(key, w, recipe, f"replaced: {recipe.name}")
            state.set_recipe(key, w, Recipe.from_dict(found["recipe"]))
            st.rerun()


search_section()
st.download_button("Download recipe JSON", recipe.to_json(), file_name=f"{recipe.name}.json", mime="application/json",
                   on_click="ignore", icon=":material/download:")
state.sync_url(key, w)
