"""Trade-offs page: presets, the user's recipes and search results side by side -- size against metric
with the Pareto front, latency (measured where the runtime ran, estimated where not), per-class accuracy.
Each recipe is one row under its own label (a kept recipe's label ends in its content hash), shown once."""

import pandas as pd
import streamlit as st

from qcore.recipe.links import recipe_hash, recipe_id
from ui import charts, jobs, keys, state
from qcore import hardware
from qcore.analysis import search
from qcore.figures import decide as viz_decide
from qcore.recipe import Recipe, preset
from ui.text import delta_style, metric_label, plain

PRESET_ROWS = {"FP32": "fp32", "FP16": "fp16", "BF16": "bf16", "INT8 dynamic": "int8-dynamic", "INT8 static": "int8-static",
               "INT4 weight-only": "int4-weight-only", "NF4": "nf4", "FP8": "fp8"}

key, w = state.active()
st.title("Trade-offs: size, accuracy, speed")
st.write(
    "Every point is one recipe, its metric simulated on the evaluation data (not estimated from a sweep): the standard presets, "
    "the recipes you evaluated or searched on the Mixed precision page, and the one you are building. A recipe on "
    "the red **Pareto front** has nothing both smaller and better than it; the others are beaten on both counts."
)
recipes = {label: preset(p, w.layer_shapes) for label, p in PRESET_ROWS.items()}
candidates = list(st.session_state.get(keys.USER_RECIPES, {}).get(key, {}).items())
found = st.session_state.get(keys.SEARCH, {}).get(key)
candidates += [(f"search: {p['label']} [{recipe_hash(w, Recipe.from_dict(p['recipe']))}]", p["recipe"])
               for p in (found or {}).get("pareto", [])]
_, overrides, current = state.current(key, w)
candidates.append((f"yours (in the table): {current.name} [{recipe_hash(w, current)}]", current.to_dict()))
shown = {recipe_id(w, r) for r in recipes.values()}
for label, d in candidates:  # the first label of a recipe wins: each recipe is one row
    recipe = Recipe.from_dict(d)
    if recipe_id(w, recipe) not in shown and label not in recipes:
        recipes[label] = recipe
        shown.add(recipe_id(w, recipe))

evaluated = st.session_state.setdefault(keys.TRADEOFFS_EVALUATED, set())  # recipes this session asked to evaluate
wanted = {(key, recipe_id(w, r)) for r in recipes.values()}
ask = st.empty()  # the button, cleared once the results are drawn below it
if not state.small(w) and not wanted <= evaluated and not ask.button(f"Evaluate all {len(recipes)} recipes", type="primary"):
    st.info("This model is large: evaluating every recipe takes a while (results are cached).", icon=":material/info:")
    st.stop()
results = {}
with state.stoppable("evaluation", "Evaluating…") as advance:
    for i, (label, recipe) in enumerate(recipes.items()):
        advance(i / len(recipes), f"Evaluating {plain(label)} ({i + 1}/{len(recipes)})…")
        results[label] = state.evaluate(key, w, recipe.to_json())
evaluated |= wanted  # a later change of a widget below shows them again without asking
ask.empty()

metric, higher = w.task.headline, w.task.higher_is_better
metric_name = metric_label(metric)  # what the chart and the table call it
fp32 = results["FP32"]
profile = st.selectbox("Estimate latency for", ["this-machine"] + list(hardware.PROFILES), key="trade_profile",
                       format_func=lambda p: hardware.PROFILES[p].name if p in hardware.PROFILES else "this machine",
                       persist_state="session", help="where no latency was measured, a roofline estimate on this target")
# QAT runs of the QAT page: the same recipe on fine-tuned weights -- the same size and latency as its PTQ twin
for (run_key, _, cfg), r in st.session_state.get(keys.QAT_RUNS, {}).items():
    if run_key == key:
        label = f"QAT ({cfg.epochs} epochs, lr {cfg.lr:g}): {r.recipe.name} [{recipe_hash(w, r.recipe)}]"
        recipes[label] = r.recipe
        ptq = state.evaluate(key, w, r.recipe.to_json())
        results[label] = {**ptq, "quantized": {**ptq["quantized"], "metrics": r.qat_metrics}}
latency = state.latencies(key, w, recipes, profile)
rows = [{"recipe": label, "size (bytes)": r["quantized"]["size_bytes"],
         "share of FP32": r["quantized"]["size_bytes"] / r["fp32"]["size_bytes"],
         metric: r["quantized"]["metrics"][metric],
         "change": round(r["quantized"]["metrics"][metric] - fp32["quantized"]["metrics"][metric], 4) + 0.0,  # never "-0.0000"
         "latency (ms)": latency[label]["latency_ms"], "latency source": latency[label]["source"]}
        for label, r in results.items()]
points = [{"label": r["recipe"], "size_bytes": r["size (bytes)"], "metric": r[metric], "latency_ms": r["latency (ms)"],
           "latency_source": r["latency source"]} for r in rows]
front_order = search.pareto_front(points, higher)
charts.plot(viz_decide.tradeoff_scatter, points, front_order, metric_name, higher)
front = {points[i]["label"] for i in front_order}
st.dataframe(pd.DataFrame([{**r, "Pareto": r["recipe"] in front} for r in rows]).rename(columns={metric: metric_name}),
             hide_index=True, width="stretch",
             column_config={"share of FP32": st.column_config.NumberColumn(format="percent"),
                            metric_name: st.column_config.NumberColumn(format="%.4f"),
                            "change": st.column_config.NumberColumn(format="%+.4f", help="against FP32"),
                            "latency (ms)": st.column_config.NumberColumn(format="%.3g", help=state.LATENCY_HELP)})
st.caption(f"{state.LATENCY_HELP} Measured latencies are of this server's CPU, {plain(hardware.cpu_name())}, with "
           f"{plain(', '.join(hardware.cpu_features()) or 'no CPU flags readable')} (the flags that decide low-precision "
           "speed: AVX2, AVX-512, VNNI int8 dot products, AMX).")
runtime = st.radio("Measure with", list(state.RUNTIMES), horizontal=True, key="trade_runtime",
                   help="the same exported ONNX file in either runtime; OpenVINO's default runs float ops in bf16 "
                        "where the CPU has AMX or AVX-512 BF16, so its FP32 is not true FP32")
st.caption(jobs.threads_caption(jobs.backend_for(key)))
if st.button(f"Measure latency on this machine ({runtime})", help="exports each recipe and times it; slow, cached"):
    st.session_state[keys.MEASURING] = runtime
if (asked := st.session_state.get(keys.MEASURING)) and state.measure_latencies(key, w, recipes, asked):
    del st.session_state[keys.MEASURING]
    st.rerun()

if w.task.kind == "classification" and "per_class_accuracy" in fp32["quantized"]["metrics"]:
    st.subheader("Which classes lose most")
    st.write("A small drop in average accuracy can hide a large drop for one class. Pick a recipe to compare "
             "each class with FP32.")
    labels = [label for label in results if label != "FP32"]
    chosen = st.selectbox("Recipe", labels, index=labels.index(next((l for l in labels if l.startswith("yours")),
                                                                    "INT4 weight-only")),
                          key=f"trade_class:{key}")
    ref = fp32["quantized"]["metrics"]["per_class_accuracy"]
    got = results[chosen]["quantized"]["metrics"]["per_class_accuracy"]
    names = list(w.task.class_names or range(len(ref)))
    charts.plot(viz_decide.per_class, ref, got, names, chosen)
    per_class = [{"class": str(n), "FP32": a, chosen: b, "change": b - a} for n, a, b in zip(names, ref, got) if a is not None]
    worst = min(per_class, key=lambda r: r["change"])
    if worst["change"] < 0:  # the glossary's convention: change = quantized - FP32
        st.metric(f"Largest drop: class {plain(worst['class'])}", f"{worst[chosen]:.4f}",
                  **delta_style(worst["change"], True, 4, " vs FP32"))  # a class's accuracy: higher is better
    else:
        st.caption(f"No class lost accuracy under {plain(chosen)} (change ≥ 0 for every class; see the Glossary).")
    st.dataframe(pd.DataFrame(per_class).sort_values("change"), hide_index=True, width="stretch")
