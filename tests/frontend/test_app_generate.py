"""The Generation page (AppTest): listed for language models only; what it shows equals
``qcore.analysis.generate.generate`` run directly with the same recipe, prompt and decoding."""

from __future__ import annotations

import pytest
import streamlit as st
import torch

from qcore import zoo
from qcore.analysis.generate import generate
from qcore.recipe import preset
from test_app import metrics, open_app, rerun, visit
from ui import keys
from ui.text import plain


@pytest.fixture(scope="module", autouse=True)
def models(digits_mlp, tiny_lm):
    mp = pytest.MonkeyPatch()
    mp.setattr(zoo, "load", {"digits-mlp": digits_mlp, "tiny-lm": tiny_lm}.__getitem__)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # token-by-token decoding: one thread avoids OpenMP spinning on a busy CPU
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    mp.undo()
    torch.set_num_threads(threads)
    st.cache_resource.clear()
    st.cache_data.clear()


def expected(w, recipe_name: str, prompt: str, n: int, **kw):
    q = w.simulate(preset(recipe_name, w.layer_shapes)).model
    return generate(w.model, q, w.tokenizer.encode(prompt), n, stop_id=w.tokenizer.stop_id, **kw)


def test_generation_is_listed_for_language_models_only():
    with pytest.raises(ValueError, match="Could not find a navigation page"):  # not in digits-mlp's navigation
        open_app("digits-mlp").switch_page("pages/generate.py")
    at = visit(open_app("tiny-lm"), "generate")
    assert at.title[0].value.startswith("Generation")


def test_the_page_shows_what_generate_computes(tiny_lm):
    at = open_app("tiny-lm")
    at.session_state[keys.RECIPES] = {"zoo:tiny-lm": {"preset": "int4-weight-only", "layers": {}}}
    at = visit(at, "generate")
    at.text_area(key=keys.GEN_PROMPT).set_value("A class definition").run()
    at.number_input(key=keys.GEN_TOKENS).set_value(24).run()
    g = expected(tiny_lm, "int4-weight-only", "A class definition", 24)
    shown = metrics(at)
    assert shown["First diverging token"] == ("none" if g.first_divergence is None else f"#{g.first_divergence + 1}")
    assert shown["Mean KL per token (nats)"] == f"{sum(g.kl) / len(g.kl):.4f}" and float(shown["Mean KL per token (nats)"]) > 0
    fig = at.get("plotly_chart")[0].proto.spec
    decode = tiny_lm.tokenizer.decode
    assert plain(decode([g.fp32_ids[0]])).replace(" ", "\u00a0") in fig and "int4-weight-only" in fig
    at.radio(key=keys.GEN_MODE).set_value("sampling").run()
    at.number_input(key=keys.GEN_SEED).set_value(3).run()
    s = expected(tiny_lm, "int4-weight-only", "A class definition", 24, sample=True, seed=3)
    assert metrics(rerun(at))["Mean KL per token (nats)"] == f"{sum(s.kl) / len(s.kl):.4f}"


def test_an_empty_prompt_is_one_error_line():
    at = visit(open_app("tiny-lm"), "generate")
    at.text_area(key=keys.GEN_PROMPT).set_value("").run()
    assert not at.exception and [e.value for e in at.error] == ["the prompt is empty; type a few words to continue"]


def test_mixed_precision_target_is_a_perplexity_ceiling(tiny_lm):
    at = visit(open_app("tiny-lm"), "mixed_precision")
    at.radio(key="mp_goal").set_value("target metric").run()
    box = at.number_input(key="mp_target")
    fp32 = tiny_lm.fp32_metrics["perplexity"]
    assert box.label == "Largest acceptable perplexity" and box.value == round(fp32 * 1.05, 4) > fp32


def test_the_model_pages_kv_cache_table_starts_at_the_recipes_kv_cache(tiny_lm):
    """The Model page's memory table follows the sidebar's KV cache (the recipe's) until changed there: the KV-cache
    column is 2 x layers x KV heads x head size x context bytes at that format (oracle: the model's own shape)."""
    from qcore.analysis import memory

    at = open_app("tiny-lm")
    table = next(s for s in at.selectbox if s.label == "KV-cache format")
    assert table.value == "fp16"  # a float cache counts as fp16
    next(s for s in at.sidebar.selectbox if s.label == "KV cache").set_value("int4.per_head").run()
    table = next(s for s in at.selectbox if s.label == "KV-cache format")
    assert not at.exception and table.value == "int4"
    shape = memory.workload_shape(tiny_lm)
    context = min(4096, tiny_lm.model.context_length)
    row = at.dataframe[-1].value.iloc[0]
    assert row["KV cache (GB)"] == pytest.approx(2 * shape.layers * shape.kv_heads * shape.head_dim * context * 0.5 / 1e9)
