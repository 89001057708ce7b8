"""The Generation page's cached computation: one prompt continued by FP32 and by the recipe's simulation."""

from __future__ import annotations

from dataclasses import asdict

import streamlit as st

from qcore.analysis.generate import generate
from qcore.recipe import Recipe


@st.cache_data(show_spinner="Generating with FP32 and with the recipe…", max_entries=64)
def continuation(key: str, _w, recipe_json: str, prompt: str, new_tokens: int, sample: bool, seed: int,
                 temperature: float) -> dict:
    """``qcore.analysis.generate.generate`` for workload ``key`` under the recipe, as a dict, with the
    token strings: ``prompt_tokens``, ``fp32_tokens``, ``quantized_tokens`` (each id decoded alone)."""
    codec = _w.tokenizer
    sim = _w.simulate(Recipe.from_json(recipe_json))
    g = generate(_w.model, sim.model, codec.encode(prompt), new_tokens, sample=sample, seed=seed,
                 temperature=temperature, stop_id=codec.stop_id)
    pieces = {name: [codec.decode([i]) for i in ids] for name, ids in
              (("prompt_tokens", g.prompt_ids), ("fp32_tokens", g.fp32_ids), ("quantized_tokens", g.quantized_ids))}
    return {**asdict(g), **pieces, "fp32_text": codec.decode(g.fp32_ids), "quantized_text": codec.decode(g.quantized_ids)}
