"""Activations page: each layer's calibrated inputs, the range each method picks, outlier channels, static vs dynamic."""

import pandas as pd
import streamlit as st

from ui import charts, formulas, keys, remedies, state
from qcore.analysis import explain
from qcore.figures import viz
from qcore.numerics.formats import FORMATS, choices
from ui.text import html_plain, layer_label

ACTIVATION_FORMATS = choices("activations")

key, w = state.active()
st.title("Activations: what each layer receives")
formulas.intro(
    "Weights are known before the model runs; activations (the inputs of each layer) are not. **Static** "
    f"quantization runs {len(w.calibration):,} calibration samples through the model once, records what every "
    "layer receives, and fixes each input's clipping range from that. Below, pick a layer to see its inputs, the "
    "range each method would fix, the channels that stretch the range, and how a **dynamic** range (re-measured "
    "on every batch) moves compared with one static range.",
    formulas.QUANTIZE, formulas.RANGES, formulas.CALIBRATION,
    title="Formulas: scale, zero-point, clipping, SQNR, calibration")

bar, advance = state.progress_bar("Calibrating: running the calibration data through the model…")
with formulas.error_box():  # an uploaded model's data can produce NaN/Inf inputs
    stats = w.calibration_stats(progress=advance)
bar.empty()
layers = [n for n, s in stats.items() if s.numel > 0]
if not layers:
    st.warning("No layer received floating-point inputs from the calibration data (embedding inputs are token "
               "indices and are never quantized).")
    st.stop()

c1, c2, c3, c4 = st.columns(4)
layer = c1.selectbox("Layer (its input)", layers, index=min(1, len(layers) - 1), key=keys.activations_layer(key),
                     persist_state="session", format_func=layer_label,
                     help="starts at the second layer: the first sees the raw model input, whose range the data's "
                          "preprocessing fixes (e.g. pixels in [0, 1])")
spec = {"format": c2.selectbox("Format", ACTIVATION_FORMATS, key="act_format", persist_state="session")}
fmt = FORMATS[spec["format"]]
if fmt.can_be_affine:
    spec["symmetric"] = c2.toggle("Symmetric (zero-point 0)", False, key="act_symmetric", persist_state="session",
                                  help="off (affine) suits inputs after a ReLU, which are never negative")
else:
    spec["scaled"] = c2.toggle("Scale into the format's range", True, key="act_scaled", persist_state="session")
spec["percentile"] = c3.select_slider("Percentile (for percentile)", [99.0, 99.9, 99.99, 99.999], value=99.99,
                                      key="act_percentile", persist_state="session")
chosen = c3.selectbox("Draw the grid of", explain.ACTIVATION_METHODS, key="act_grid", persist_state="session")
log_y = c4.toggle("Log counts", True, key="act_log", persist_state="session", help="shows the rare large values")
spec = state.spec_from(spec, activation=True)

s = stats[layer]
rows = explain.activation_ranges(s, spec)
ranges = {r["range"]: (r["lo"], r["hi"]) for r in rows}
counts, edges = explain.rebin(s.hist, s.edges, 8)
centers = ((edges[1:] + edges[:-1]) / 2).float()
levels = explain.visible_levels(explain.grid(centers, spec, *ranges[chosen]), s.min, s.max) \
    if fmt.uses_range(spec.scaled) else None
m1, m2, m3 = st.columns(3)
m1.metric("Values seen", f"{s.numel:,}")
m2.metric("Smallest input", f"{s.min:.4g}")
m3.metric("Largest input", f"{s.max:.4g}")
charts.plot(viz.distribution, counts, edges, ranges if fmt.uses_range(spec.scaled) else {}, levels, log_y=log_y,
            title=f"Input of {html_plain(layer_label(layer))}: calibration histogram, each method's range, {chosen} grid",
            x_title="input value")
st.dataframe(pd.DataFrame([{"method": r["range"], "lo": r["lo"], "hi": r["hi"], "step (scale)": r["step"],
                            "clipped": r["clipped_fraction"]} for r in rows]),
             hide_index=True, width="stretch", column_config={
                 "lo": st.column_config.NumberColumn(format="%.4g"), "hi": st.column_config.NumberColumn(format="%.4g"),
                 "step (scale)": st.column_config.NumberColumn(format="%.4g"),
                 "clipped": st.column_config.NumberColumn(format="percent", help="share of calibration values outside")})

st.subheader("Outlier channels")
outliers = explain.outlier_channels(s)
st.write("Each bar is one input channel's largest magnitude over the calibration data, largest first. A few "
         "channels far above the median force a wide range on all the others, which then share a coarse grid; "
         "this is why transformer activations are hard to quantize per tensor.")
st.metric("Largest channel / median channel", f"{outliers['ratio']:.1f}×")
charts.plot(viz.outlier_channels, outliers)

st.subheader("Static or dynamic?")
sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= len(w.calibration)]
batch = st.select_slider("Batch size for the dynamic view", sizes, value=min(16, sizes[-1]), key="act_batch",
                         persist_state="session")
with formulas.error_box():
    per_batch = state.batch_ranges(key, w, batch)[layer]
st.write(f"Each grey bar is the range a dynamic quantizer would use for one batch of {batch} calibration samples; "
         "the lines are the one range static quantization fixes for all of them. A dynamic range fits each batch "
         "(finer steps) at the cost of measuring it at run time.")
charts.plot(viz.static_vs_dynamic, per_batch, {"minmax": ranges["minmax"], chosen: ranges[chosen]})

remedies.smoothquant_panel(key, w, layer)
