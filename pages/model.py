"""Model page: what the model is made of, how big it is under each preset, and the data it is judged on."""

import pandas as pd
import streamlit as st

from ui import charts, formulas, state
from qcore.figures import viz
from qcore.recipe import PRESET_DESCRIPTIONS
from qcore.model.size import float_bytes
from qcore.model.task import OUTPUT_KINDS
from ui.text import delta_style, metric_label, plain

key, w = state.active()
st.title(f"Model: {plain(w.name)}")
st.write(plain(w.description) if w.description else "A model you uploaded.")
formulas.intro(
    "Quantization stores each weight in fewer bits than the 32 of a float. Only the weights of the layers "
    "below (Linear, Conv, Embedding) are quantized; biases, norms and everything else keep their float size. "
    "The table shows where the parameters are: a layer that holds most of them decides most of the size.",
    formulas.SIZE, formulas.QUANTIZE, title="Formulas: how sizes are counted; scale, zero-point, rounding, SQNR")

fp32_bytes = float_bytes(w.model)
params = sum(p.numel() for p in w.model.parameters())
with st.spinner("Counting bytes under every preset and measuring every layer's weights…"):
    sizes = state.preset_sizes(key, w)
    layers = state.layer_table(key, w)  # statistics of every weight: a few seconds on minilm-l6
smallest = min(sizes, key=lambda r: r["size_bytes"])
c1, c2, c3, c4 = st.columns(4)
c1.metric("FP32 size", viz.human_bytes(fp32_bytes), help=f"{fp32_bytes:,} bytes: every parameter and buffer")
c2.metric("Parameters", f"{params:,}")
c3.metric("Quantizable layers", len(w.layers))
c4.metric(f"Smallest preset ({smallest['preset']})", viz.human_bytes(smallest["size_bytes"]),
          **delta_style(100 * (smallest['fraction_of_fp32'] - 1), False, 0, "% vs FP32"))

st.subheader("Layers")
table = pd.DataFrame([{"layer": r["name"], "type": r["type"], "weight shape": " × ".join(map(str, r["weight_shape"])),
                       "parameters": r["params"], "share of model": r["share"], "max|w| / std": r["max_over_std"],
                       "kurtosis": r["kurtosis"]} for r in layers])
st.dataframe(table, hide_index=True, width="stretch", column_config={
    "share of model": st.column_config.ProgressColumn(format="percent", min_value=0.0, max_value=1.0),
    "max|w| / std": st.column_config.NumberColumn(format="%.1f", help="how far the largest weight sits from the bulk"),
    "kurtosis": st.column_config.NumberColumn(format="%.1f", help="0 for a normal distribution; large = heavy tails"),
})
st.caption("Large max|w|/std or kurtosis means a few weights far from the rest: they stretch a min-max range "
           "and waste grid levels (see the Weights page).")

st.subheader("Size under each preset")
charts.plot(viz.preset_sizes, sizes)
st.dataframe(pd.DataFrame([{"preset": r["preset"], "size (bytes)": r["size_bytes"], "share of FP32": r["fraction_of_fp32"],
                            "bits per weight": r["bits_per_weight"]} for r in sizes]),
             hide_index=True, width="stretch", column_config={
                 "share of FP32": st.column_config.NumberColumn(format="percent"),
                 "bits per weight": st.column_config.NumberColumn(format="%.2f", help="quantized layers only, scales included")})
with st.expander("What each preset does"):  # whole sentences: a table cell would cut them off
    st.markdown("\n".join(f"- **{r['preset']}**: {plain(PRESET_DESCRIPTIONS[r['preset']])}" for r in sizes
                           if r["preset"] in PRESET_DESCRIPTIONS))

st.subheader("Data and metric")
with st.spinner("Running the FP32 model on the evaluation data…"), formulas.error_box():
    fp32_metrics = w.fp32_metrics
headline = w.task.headline
d1, d2, d3 = st.columns(3)
d1.metric("Calibration samples", f"{len(w.calibration):,}", help="fed through the model to choose activation ranges")
d2.metric("Evaluation samples", f"{len(w.evaluation):,}", help="the quantized model is scored on these")
d3.metric(f"FP32 {metric_label(headline)}", f"{fp32_metrics[headline]:.4f}", help="the reference every quantized model is compared with")
st.write(f"The headline metric is **{metric_label(headline)}**"
         + (" (top-1 accuracy against the labels)." if headline == "accuracy" else
            " (how often the quantized model's top-1 agrees with FP32's; no labels)." if headline == "agreement" else ".")
         + f" The output is scored as **{w.task.kind}**" + (f" ({plain(w.task.why)})" if w.task.why else "")
         + f": {OUTPUT_KINDS.get(w.task.kind, '')}.")
for note in w.notes:
    st.info(plain(note), icon=":material/info:")

if w.kv_cache_slices:  # a language model: what it and the well-known sizes take in memory
    from qcore.analysis import memory
    from qcore.figures.memory import memory_bars

    st.subheader("Memory: weights and KV cache")
    m1, m2 = st.columns(2)
    context = int(m1.number_input("Context (tokens in the KV cache)", 1, 10**7, 4096, key=f"mem_context:{key}"))
    kv_formats = ["fp16", "int8", "int4", "fp8_e4m3"]
    kv_cache = state.current(key, w)[2].kv_cache
    in_recipe = kv_cache.format if kv_cache else "fp16"  # a float cache counts as fp16
    kv_format = m2.selectbox("KV-cache format", kv_formats, index=kv_formats.index(in_recipe) if in_recipe in kv_formats else 0,
                             key=f"mem_kv:{key}:{in_recipe}",  # follows the sidebar's KV cache when that changes
                             help="starts at the recipe's (the sidebar's KV cache; float counts as fp16); changing it "
                                  "here changes this table only")
    own_context = min(context, getattr(w.model, "context_length", context))
    formats = ("fp32", "fp16", "int8", "int4")
    rows = memory.memory_table(memory.workload_shape(w), formats, None, own_context, 1, kv_format)
    for shape in memory.REFERENCE_MODELS.values():
        rows += memory.memory_table(shape, formats, None, context, 1, kv_format)
    charts.plot(memory_bars, rows)
    st.dataframe(pd.DataFrame([{"model": r["model"], "format": r["format"], "parameters": r["params"],
                                "weights (GB)": r["weight_gb"], "KV cache (GB)": r["kv_cache_gb"],
                                "total (GB)": r["total_gb"]} for r in rows]), hide_index=True, width="stretch")
    st.caption(plain(f"An estimate from shapes, not a measurement; GB = 10^9 bytes. Weights: every parameter at the "
                     f"format, codes only (group scales add 4 bytes per group). KV cache: 2 x layers x KV heads x head "
                     f"size x context x batch 1 values at {kv_format}; {w.name} at {own_context} tokens (its longest "
                     "context if shorter), the others at the context above. Not counted: activations and runtime "
                     "buffers. Shapes: " + "; ".join(f"{s.name} from {s.source}" for s in memory.REFERENCE_MODELS.values())))
