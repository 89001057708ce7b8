"""Generation page: one prompt continued by FP32 and by the current recipe side by side (language models only)."""

import streamlit as st

from qcore.analysis.generate import MAX_NEW_TOKENS
from qcore.errors import QcoreError
from qcore.figures.generation import generation_side_by_side
from ui import generation, keys, state
from ui.text import plain

key, w = state.active()
st.title("Generation: the same prompt, FP32 and the recipe side by side")
if w.task.kind != "causal-lm" or w.tokenizer is None:
    st.info(plain(f"{w.name} is not a language model with a tokenizer, so there is no text to generate; "
                  "choose tiny-lm in the sidebar."), icon=":material/info:")
    st.stop()
st.write(
    "The FP32 model and the simulated recipe continue one prompt, one token at a time. While their texts agree, "
    "quantization has changed nothing a reader sees; the **red** token is the first where they part. Hover a "
    "token for KL(FP32 ‖ quantized) of the two models' next-token distributions there (both reading FP32's text "
    "so far), in nats: it grows before any token flips. Typically the text stays the same at int8, drifts at "
    "int4 and breaks at int2.")
preset_name, overrides, recipe = state.current(key, w)
st.caption(plain(f"Recipe: {preset_name}" + (f" with {len(overrides)} layer override(s)" if overrides else "")
                 + " (set it on the Mixed precision page)."))

prompt = st.text_area("Prompt", "The for statement is used to", key=keys.GEN_PROMPT, max_chars=2000)
c1, c2, c3, c4 = st.columns(4)
new_tokens = c1.number_input("New tokens", 1, MAX_NEW_TOKENS, 48, key=keys.GEN_TOKENS)
mode = c2.radio("Decoding", ["greedy", "sampling"], key=keys.GEN_MODE, horizontal=True,
                help="greedy: the most likely token; sampling: both models read the same random number per step")
seed = c3.number_input("Seed", 0, 2**31 - 1, 0, key=keys.GEN_SEED, disabled=mode == "greedy")
temperature = c4.slider("Temperature", 0.1, 2.0, 1.0, 0.1, key=keys.GEN_TEMPERATURE, disabled=mode == "greedy")

try:
    g = generation.continuation(key, w, recipe.to_json(), prompt, int(new_tokens), mode == "sampling", int(seed),
                                float(temperature))
except QcoreError as e:
    st.error(plain(str(e)), icon=":material/error:")
    st.stop()

first = g["first_divergence"]
kl = g["kl"]
m1, m2, m3 = st.columns(3)
m1.metric("First diverging token", "none" if first is None else f"#{first + 1}",
          help="position among the generated tokens where the two texts first differ")
m2.metric("Mean KL per token (nats)", f"{sum(kl) / len(kl):.4f}" if kl else "–",
          help="KL(FP32 ‖ quantized) of the next-token distributions, averaged over FP32's generated tokens")
m3.metric("Max KL per token (nats)", f"{max(kl):.4f}" if kl else "–")
fig = generation_side_by_side(g["prompt_tokens"], [("FP32", g["fp32_tokens"]), (f"recipe: {preset_name}", g["quantized_tokens"])],
                              kl, first, title=f"{g['mode'].capitalize()} continuation of {len(g['prompt_ids'])} prompt tokens")
st.plotly_chart(fig, key="generation_figure", width="content")
with st.expander("Plain text"):
    st.text(f"FP32:\n{g['fp32_text']}\n\nrecipe ({preset_name}):\n{g['quantized_text']}")
st.caption("Both continuations are computed here in PyTorch: FP32 and the recipe's simulation (fake quantization), "
           "not an exported file; no KV cache (each token re-runs the whole prefix).")
