"""Export page: download the quantized model (ONNX, safetensors), the recipe, the sensitivity table and a
self-contained HTML report of the analysis."""

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from ui import charts, keys, runtime_profile, state
from qcore import report
from qcore.export import export, summary_lines
from qcore.analysis import search, summary
from qcore.figures import decide as viz_decide
from qcore.figures import profile as viz_profile
from qcore.errors import QcoreError
from qcore.recipe import preset
from qcore.model.size import float_bytes
from ui.text import delta_style, metric_label, plain

key, w = state.active()
name, overrides, recipe = state.current(key, w)
st.title(f"Export: {plain(recipe.name)}")
st.write(
    "Take the recipe you built away: as the quantized model itself (**ONNX** holds the simulated model's own integer "
    "codes, scales and zero-points and runs in ONNX Runtime; a layer ONNX Runtime has no low-precision kernel for "
    "runs there in float on the exact dequantized values, and is listed with the reason; **safetensors** holds "
    "exactly the simulated model: integer codes, scales, zero-points and the recipe), as the recipe JSON (load it on the Mixed "
    "precision page or with `python -m qcore evaluate --recipe`), as the sensitivity table, or as a report."
)
total = summary.recipe_totals(w, recipe)
result = state.evaluate(key, w, recipe.to_json())
headline = result["metric"]
m1, m2, m3 = st.columns(3)
m1.metric("Recipe", plain(name) + (f" + {len(overrides)} override(s)" if overrides else ""))
m2.metric("Theoretical size (bytes)", f"{total['size_bytes']:,}",
          **delta_style(100 * (total['size_bytes'] / total['fp32_bytes'] - 1), False, 1, "% vs FP32"))
m3.metric(f"{plain(metric_label(headline))} (simulated)", f"{result['quantized']['metrics'][headline]:.4f}",
          **delta_style(result['quantized']['metrics'][headline] - result['fp32']['metrics'][headline],
                        w.task.higher_is_better, 4, " vs FP32"))
simulation_notes = result["notes"][len(w.notes):]  # the model's own notes are on the Model page
if simulation_notes:
    with st.expander(f"What the simulation notes about this recipe ({len(simulation_notes)})", icon=":material/info:"):
        st.markdown("\n".join(f"- {plain(note)}" for note in simulation_notes))


def exported(fmt: str) -> dict:
    """Export with ``qcore.export.export`` into a temporary file; the file's bytes plus its report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{recipe.name}.{fmt}"
        rep = export(w, recipe, fmt, str(out), *state.RUNTIMES[file_runtime])
        return {**rep.to_dict(), "data": Path(rep.path).read_bytes()}


file_runtime = st.radio("Run the ONNX file in", list(state.RUNTIMES), horizontal=True, key="export_runtime",
                        help="ONNX Runtime always runs it; OpenVINO adds its own measured metric and precision")
c1, c2 = st.columns(2)
for column, fmt, mime in ((c1, "onnx", "application/octet-stream"), (c2, "safetensors", "application/octet-stream")):
    if column.button(f"Prepare {fmt}", key=f"export_{fmt}", icon=":material/build:"):
        try:
            with st.spinner(f"Exporting {fmt}…"):
                st.session_state[keys.exported(fmt, key)] = {"recipe": recipe.to_json(), **exported(fmt)}
        except QcoreError as e:
            column.error(plain(e), icon=":material/error:")
    done = st.session_state.get(keys.exported(fmt, key))
    if done and done["recipe"] == recipe.to_json():
        column.download_button(f"Download {fmt} ({done['file_size_bytes']:,} bytes)", done["data"],
                               file_name=f"{recipe.name}.{fmt}", mime=mime, on_click="ignore", icon=":material/download:",
                               key=f"download_{fmt}")
        column.caption("  \n".join(plain(line) for line in summary_lines(done)))

c3, c4 = st.columns(2)
c3.download_button("Download recipe JSON", recipe.to_json(), file_name=f"{recipe.name}.json", mime="application/json",
                   on_click="ignore", icon=":material/download:", key="download_recipe")
settings = st.session_state.get(keys.SWEEP) or {}
sweep = None
if state.small(w) or settings.get("key") == key:  # a large model's sweep only once the Sensitivity page ran it
    sweep = state.sweep(w, settings.get("candidates") or state.DEFAULT_CANDIDATES, settings.get("mode", "both"),
                        settings.get("view", "only")).to_dict()
    c4.download_button("Download sensitivity table (CSV)", pd.DataFrame(sweep["rows"]).to_csv(index=False),
                       file_name=f"{w.name}-sensitivity-{sweep['mode']}-{sweep['view']}.csv", mime="text/csv",
                       on_click="ignore", icon=":material/download:", key="download_sensitivity",
                       help=f"{plain(', '.join(sweep['candidates']))}; mode {sweep['mode']}, view {sweep['view']} "
                            "(chosen on the Sensitivity page)" + state.on_samples(sweep["samples"], sweep["evaluation_samples"]))
else:
    c4.info("Run the sweep on the Sensitivity page to export its table and charts.", icon=":material/info:")


def report_html() -> str:
    """The report: this recipe's measured numbers, size/metric against FP32 and the int8/int4 presets, the
    sweep's charts, per-class accuracy (classification with labels), latency, environment."""
    compared = {"FP32": preset("fp32"), "INT8 static": preset("int8-static", w.layer_shapes),
                "INT4 weight-only": preset("int4-weight-only", w.layer_shapes), recipe.name: recipe}
    evaluated = {label: state.evaluate(key, w, r.to_json()) for label, r in compared.items()}
    latency = state.latencies(key, w, compared)
    points = [{"label": label, "size_bytes": e["quantized"]["size_bytes"], "metric": e["quantized"]["metrics"][headline],
               "latency_ms": latency[label]["latency_ms"], "latency_source": latency[label]["source"]}
              for label, e in evaluated.items()]
    front = search.pareto_front(points, w.task.higher_is_better)
    figures = [("Size against metric", viz_decide.tradeoff_scatter(points, front, headline, w.task.higher_is_better))]
    if sweep:
        figures += [("Sensitivity per layer", viz_decide.sensitivity_heatmap(sweep["rows"])),
                    ("Layers ranked", viz_decide.ranked_drops(sweep["rows"], viz_decide.widest_spread(sweep["rows"]), headline))]
    q = result["quantized"]["metrics"]
    if "per_class_accuracy" in q:
        figures.append(("Accuracy per class", viz_decide.per_class(result["fp32"]["metrics"]["per_class_accuracy"],
                                                                   q["per_class_accuracy"], w.task.class_names, recipe.name)))
    model = {"name": w.name, "description": w.description, "source": w.source, "quantizable layers": len(w.layers),
             "parameters": sum(p.numel() for p in w.model.parameters()), "FP32 bytes": float_bytes(w.model),
             "calibration samples": len(w.calibration), "evaluation samples": len(w.evaluation)}
    return report.html_report(model, recipe.to_dict(), result, sizes={"bits per weight": total["bits_per_weight"],
                              "share of weights kept in FP32": total["float_share"]},
                              latency=[{"recipe": label, **v} for label, v in latency.items()], figures=figures,
                              notes=list(result["notes"]) + list(sweep["notes"] if sweep else []))


st.subheader("Why isn't it faster?")
prof_runtime = st.radio("Profile with", list(runtime_profile.RUNTIMES), horizontal=True, key="export_profile_runtime")
if st.button("Profile the ONNX file", key="export_profile", icon=":material/timer:"):
    with st.spinner(f"Profiling in {prof_runtime}…"):
        st.session_state[f"export_profile:{key}"] = (recipe.to_json(), prof_runtime,
                                                     runtime_profile.profile(w, recipe, prof_runtime))
done = st.session_state.get(f"export_profile:{key}")
if done and done[0] == recipe.to_json():
    charts.plot(viz_profile.time_by_op, done[2], f"{plain(recipe.name)} in {done[1]}")
    st.caption(runtime_profile.CAPTION)

st.subheader("Report")
if not state.small(w) and not st.toggle("Build the report", key=f"export_report:{key}",
                                        help="evaluates FP32, INT8, INT4 and your recipe; takes a while on this model"):
    st.stop()
# The report inlines plotly.js (4.7 MB) and builds every figure (~0.1 s), and this page reruns on every widget
# change: it is built again only when what it shows changes (the recipe, the sweep, a latency measured meanwhile).
inputs = repr((key, recipe.to_json(), sorted(settings.items()), sorted(st.session_state.get(keys.MEASURED, {}).get(key, {}).items())))
kept = st.session_state.get(keys.REPORT)
if not kept or kept[0] != inputs:
    kept = st.session_state[keys.REPORT] = (inputs, report_html())
html = kept[1]
st.download_button("Download the HTML report", html, file_name=f"{recipe.name}-report.html", mime="text/html",
                   on_click="ignore", icon=":material/description:", key="download_report", type="primary",
                   help="one file that opens offline: model, recipe, metrics, sizes, latency, charts, environment")
st.caption(f"{len(html) / 2**20:.1f} MiB, plotly.js included once so the charts work offline.")
