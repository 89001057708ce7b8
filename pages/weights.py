"""Weights page: one layer's weights under a spec -- grid, clipping, error, per-channel ranges -- and every layer's SQNR."""

import streamlit as st

from ui import charts, formulas, keys, remedies, state
from qcore.analysis import explain
from qcore.figures import viz
from qcore.numerics.formats import FORMATS
from qcore.numerics.granularity import GRANULARITIES
from qcore.numerics.ranges import RANGE_METHODS
from ui.text import delta_style, html_plain, layer_label, plain

AUTO_ALL_LAYERS = 2_000_000  # models with more weights compute the all-layers view on request

key, w = state.active()
st.title("Weights: what quantization does to one layer")
formulas.intro(
    "Pick a layer and a way to quantize it. The histogram shows its weights, the black ticks the grid of one "
    "scale for the whole tensor (per-channel and per-group scales give each channel or group its own, finer grid; "
    "the numbers above the chart use the granularity you pick), and the coloured lines the clipping range each "
    "range method would choose. Below: the error each weight gets, why one scale per output channel usually beats "
    "one per tensor, and which layer of the model suffers most.",
    formulas.QUANTIZE, formulas.RANGES, formulas.GRANULARITY,
    title="Formulas: scale, zero-point, rounding, clipping, SQNR, granularity")


@st.fragment
def explore() -> None:
    """Everything under the introduction. A change of layer or spec reruns only this part: the sidebar, the title
    and the formulas stay as the browser has them instead of being sent and redrawn again."""
    c1, c2, c3, c4 = st.columns(4)
    layer = c1.selectbox("Layer", list(w.layers), key=keys.weights_layer(key), persist_state="session",
                         format_func=lambda n: f"{layer_label(n)}  ({w.layers[n].kind} {'×'.join(map(str, w.layers[n].weight_shape))})")
    names = [name for name, f in FORMATS.items() if f.quantizes]
    spec = {"format": c2.selectbox("Format", names, index=names.index("int4"), key="weights_format", persist_state="session")}
    fmt = FORMATS[spec["format"]]
    if fmt.can_be_affine:
        spec["symmetric"] = c2.toggle("Symmetric (zero-point 0)", True, key="weights_symmetric", persist_state="session")
    elif fmt.can_be_scaled:
        spec["scaled"] = c2.toggle("Scale into the format's range", True, key="weights_scaled", persist_state="session")
    if fmt.uses_range(spec.get("scaled", False)):
        spec["range"] = c3.selectbox("Range method", list(RANGE_METHODS), key="weights_range", persist_state="session")
        if spec["range"] == "percentile":
            spec["percentile"] = c3.select_slider("Percentile of |w|", [99.0, 99.9, 99.99, 99.999, 100.0], value=99.99,
                                                  key="weights_percentile", persist_state="session")
    spec["granularity"] = c4.selectbox("Granularity", GRANULARITIES, index=1, key="weights_granularity", persist_state="session")
    if spec["granularity"] == "per_group":
        spec["group_size"] = c4.select_slider("Group size", [16, 32, 64, 128], value=64, key="weights_group", persist_state="session")
    spec = state.spec_from(spec)

    with formulas.error_box():  # e.g. an uploaded weight holding NaN/Inf
        report = state.weight_report(key, w, layer, spec.to_dict())
    for note in (report["note"], report["fallback"] and f"For this layer the {report['fallback']}."):
        if note:
            st.info(plain(note), icon=":material/info:")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("SQNR", f"{report['sqnr_db']:.1f} dB", help=f"{spec.format}, {report['spec']['granularity']}, {spec.range}")
    m2.metric("Clipped weights", f"{100 * report['clipped_fraction']:.2f}%", help="outside the clip range, pulled to its edge")
    m3.metric("Largest error", f"{report['max_abs_error']:.3g}", help="max |w' − w|")
    m4.metric("Values", f"{report['numel']:,}")

    counts, edges = report["hist"]
    grid = report["grid"]
    charts.plot(viz.distribution, counts, edges, report["ranges"],
                explain.visible_levels(grid, float(edges[0]), float(edges[-1])),
                title=f"{html_plain(layer_label(layer))}: weights, " + (
                    f"the {spec.format} grid of one per-tensor scale ({spec.range}) and each method's clip range"
                    if fmt.uses_range(spec.scaled) else f"the {spec.format} values near them (a plain cast, no scale)"),
                x_title="weight value")
    step = grid["scale"] if fmt.step_is_scale and spec.granularity == "per_tensor" else None
    charts.plot(viz.error_histogram, *report["error_hist"], step=step)
    st.caption("Rounding alone moves a weight by at most half a step (dotted lines, shown for per-tensor integer "
               "grids); errors beyond come from clipping.")

    st.subheader("Per-tensor or per-channel?")
    st.write(
        "Each bar is one output channel's range of weights, widest first; the red lines are the range a single "
        "per-tensor scale must cover. Channels much narrower than the red band waste most of the grid's levels under "
        "one shared scale; with a scale per channel each uses all of them."
    )
    p1, p2, p3 = st.columns(3)
    p1.metric("SQNR per-tensor", f"{report['sqnr_per_tensor']:.1f} dB")
    p2.metric("SQNR per-channel", f"{report['sqnr_per_channel']:.1f} dB",
              **delta_style(report['sqnr_per_channel'] - report['sqnr_per_tensor'], True, 1, " dB vs per-tensor"))
    p3.metric("Widest / median channel", f"{report['channels']['absmax_ratio']:.1f}×", help="max |w| of the widest channel over the median channel's")
    charts.plot(viz.channel_ranges, report["channels"])

    st.subheader("Every layer under this spec")
    total = sum(info.params for info in w.layers.values())
    if st.toggle(f"Quantize all {len(w.layers)} layers", total <= AUTO_ALL_LAYERS, key=f"weights_all:{key}",
                 help="on by default for small models; big models take a while, mse and entropy longest"):
        with formulas.error_box():
            rows = state.layer_sqnr(key, w, spec.to_dict())
        worst = min(rows, key=lambda r: r["sqnr_db"])
        charts.plot(viz.layer_sqnr, rows)
        st.write(f"Worst layer: **{plain(layer_label(worst['name']))}** at {worst['sqnr_db']:.1f} dB. Weight SQNR says how much each "
                 "layer's weights change, not how much the model's output suffers.")

    remedies.cle_panel(key, w, layer)


explore()
