"""Formats page: the values a format can represent, its bits, and how bits and clipping set the error."""

import streamlit as st

from ui import charts, formulas, state
from qcore.analysis import explain
from qcore.figures import viz
from qcore.numerics.formats import FORMATS, choices
from qcore.numerics.ranges import RANGE_METHODS
from ui.text import html_plain, layer_label, plain

FAMILIES: dict[str, list[str]] = {}  # the list's entries -> their formats: a group (the integers) is one entry + Bits
for _name in choices("formats"):
    FAMILIES.setdefault(FORMATS[_name].group or _name, []).append(_name)
LAYER = "a layer of the loaded model"
FORMATS_VALUES = 2**16  # a layer's weights are sampled down to this many values here

key, w = state.active()
st.title("Formats: which numbers can a quantized value take?")
formulas.intro(
    "A quantized number can only take a few values: the **grid** of its format. Below, the grey histogram is a "
    "set of numbers (a made-up distribution or a real layer's weights) and the black ticks under it are the "
    "values the format can represent after scaling. Every number is replaced by its nearest tick; numbers beyond "
    "the clipping range (coloured lines) are pulled to its edge. Change the format, the bits or the range method "
    "and watch the ticks, the error and the SQNR move.",
    formulas.QUANTIZE, formulas.FLOAT, formulas.RANGES,
    title="Formulas: scale, zero-point, rounding, clipping, SQNR")

c1, c2, c3, c4 = st.columns(4)
source = c1.selectbox("Values to quantize", [*explain.DISTRIBUTIONS, LAYER], key="formats_source", persist_state="session")
if source == LAYER:
    layer = c1.selectbox("Layer", list(w.layers), key=f"formats_layer:{key}", persist_state="session",
                         format_func=layer_label)
    x, sampled = explain.sample_values(state.layer_weight(w, layer), FORMATS_VALUES)
    what = f"layer:{layer}"
else:
    x, sampled, what = explain.sample_distribution(source), None, source
scope = key if source == LAYER else "distributions"  # a made-up distribution's curves serve every model
family = c2.selectbox("Format", list(FAMILIES), format_func=lambda f: FORMATS[FAMILIES[f][0]].label, key="formats_family",
                      persist_state="session")
spec = {"granularity": "per_tensor", "format": FAMILIES[family][0]}
if len(FAMILIES[family]) > 1:
    by_bits = {FORMATS[n].bits: n for n in FAMILIES[family]}
    bits = c2.select_slider("Bits", list(by_bits), value=4, key="formats_bits", persist_state="session")
    spec["format"] = by_bits[bits]
fmt = FORMATS[spec["format"]]
if fmt.can_be_affine:
    spec["symmetric"] = c3.toggle("Symmetric (zero-point 0)", True, key="formats_symmetric", persist_state="session")
elif fmt.can_be_scaled:
    spec["scaled"] = c3.toggle("Scale into the format's range", fmt.scaled_by_default, key=f"formats_scaled:{family}",
                               persist_state="session", help="FP8 recipes scale; FP16/BF16 are usually a plain cast")
uses_range = fmt.uses_range(spec.get("scaled", False))
if uses_range:
    spec["range"] = c4.selectbox("Clipping range", list(RANGE_METHODS), key="formats_range", persist_state="session")
    if spec["range"] == "percentile":
        spec["percentile"] = c4.select_slider("Percentile of |x|", [99.0, 99.9, 99.99, 99.999, 100.0], value=99.99,
                                              key="formats_percentile", persist_state="session")
spec = state.spec_from(spec)
if sampled:
    st.caption(plain(sampled))

with formulas.error_box():  # a layer's weights holding NaN/Inf cannot be given a range
    numbers = explain.format_numbers(x, spec)
m1, m2, m3, m4, m5 = st.columns(5)
m1.metric("Levels", f"{numbers['levels']:,}", help="how many different codes the format has")
if numbers["smallest_step"] is None:
    m2.metric("Step size", "—")
elif numbers["smallest_step"] == numbers["largest_step"]:
    m2.metric("Step size", f"{numbers['smallest_step']:.4g}", help="the same everywhere: an integer grid is uniform")
else:
    m2.metric("Step size", f"{numbers['smallest_step']:.2g} … {numbers['largest_step']:.2g}",
              help="smallest and largest gap between neighbouring values in range: fine near 0, coarse far out")
m3.metric("Dynamic range", f"{numbers['dynamic_range_db']:.0f} dB",
          help="20·log10(largest / smallest non-zero magnitude the format holds)")
m4.metric("Clip range", "none (plain cast)" if numbers["lo"] is None else f"[{numbers['lo']:.3g}, {numbers['hi']:.3g}]",
          help=f"{100 * numbers['clipped_fraction']:.3f}% of the values are clipped")
m5.metric("SQNR", f"{numbers['sqnr_db']:.1f} dB", help=f"mean squared error {numbers['mse']:.3g}")

g = explain.grid(x, spec)
counts, edges = explain.histogram(x, 150)
ranges = {spec.range: (numbers["lo"], numbers["hi"])} if uses_range else {}
charts.plot(viz.distribution, counts, edges, ranges, explain.visible_levels(g, float(x.min()), float(x.max())),
            title=f"{fmt.name} over {html_plain(what.removeprefix('layer:'))}: the grid under the data")

left, right = st.columns([2, 3])
with left:
    charts.plot(viz.bit_layout, {"fp32": explain.bit_layout(FORMATS["fp32"]), fmt.name: explain.bit_layout(fmt)})
    st.caption("Integers spend their bits on evenly spaced steps; floats split them into an exponent (how far from "
               "zero) and a mantissa (how finely), so their steps grow with the value.")
with right:
    sym = spec.symmetric if fmt.can_be_affine else True
    charts.plot(viz.sqnr_vs_bits, state.bitwidth_sweep(scope, what, sym, x))

st.subheader("Where to clip")
if uses_range:
    st.write("Clipping at a smaller threshold makes the step finer (less rounding error for the bulk) but cuts off "
             "the tails (more clipping error). The total is lowest in between; each range method picks a point.")
    charts.plot(viz.clipping_tradeoff, state.clipping_tradeoff(scope, what, spec.to_dict(), x))
else:
    st.info(f"{fmt.name} as a plain cast has no scale and no clipping range: every value is rounded to the nearest "
            f"{fmt.name} number, and only values beyond ±{fmt.describe()['max']:.4g} saturate. Switch on "
            "'Scale into the format's range' to give it one.", icon=":material/info:")
