"""The sidebar's KV-cache choice for a language model: part of the recipe every page evaluates (``recipe.kv_cache``)."""

from __future__ import annotations

import streamlit as st

from qcore.recipe.links import encode_kv_cache
from ui import state

CHOICES = [None, "int8.per_token", "int8.per_head", "int4.per_token", "int4.per_head", "fp8_e4m3.per_token"]


def select(key: str, w) -> None:
    """A select box for workload ``key`` (language models only); a change is stored with ``state.set_kv_cache``."""
    if not w.kv_cache_slices:
        return
    _, _, recipe = state.current(key, w)
    chosen = encode_kv_cache(recipe.kv_cache)
    options = CHOICES if chosen in CHOICES else [*CHOICES, chosen]
    picked = st.selectbox(
        "KV cache", options, index=options.index(chosen), key=f"kv_cache:{key}:{chosen}",
        format_func=lambda c: "float (not quantized)" if c is None else c.replace(".", ", ").replace("_", " "),
        help="Quantize what each attention caches (its keys and values), simulated in every evaluation: per token = "
             "one scale per token and head; per head = one per head over the whole window. The memory it saves is on "
             "the Model page. ONNX exports keep the cache in float.")
    if picked != chosen:
        state.set_kv_cache(key, w, picked)
        st.rerun()
