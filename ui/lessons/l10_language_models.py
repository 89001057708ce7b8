"""Lesson 10: language models -- INT4/NF4 weights, the KV cache, and what perplexity says (on tiny-lm)."""

from __future__ import annotations

import copy

import streamlit as st

from qcore.analysis.memory import REFERENCE_MODELS, kv_cache_bytes, memory_table
from qcore.figures import lessons as figs
from qcore.figures.memory import memory_bars
from qcore.model.kv_cache import apply_kv_cache
from qcore.recipe import Recipe, preset
from qcore.recipe.kv_cache import KVCacheSpec
from ui.lessons import Verdict, key
from ui.text import signed

NUMBER, TITLE = 10, "Language models: INT4/NF4 weights, the KV cache, perplexity"
MODEL = "tiny-lm"  # the zoo model this lesson uses instead of the teaching model
GLOSSARY = ("perplexity", "kl", "agreement")  # the terms the page links to (default: SQNR, agreement, drop)
WINDOWS = 2  # evaluation windows of 128 tokens: 256 scored tokens, enough to rank the formats, fast in class
TOLERANCE = 0.05  # "perplexity within 5 % of FP32's"
KV_GRANULARITY = "per_token"
_GROUP32 = {"granularity": "per_group", "group_size": 32, "symmetric": False, "range": "minmax"}
WEIGHTS = {  # label -> preset name or recipe JSON (weights only, activations float)
    "fp16": "fp16", "int8": "int8-weight-only", "int4 g32": "int4-weight-only", "nf4": "nf4",
    "int3 g32": {"name": "int3-g32", "weights": {"format": "int3", **_GROUP32}, "activations": None},
    "int2 g32": {"name": "int2-g32", "weights": {"format": "int2", **_GROUP32}, "activations": None},
}
KV = {"fp16": None, "int8": "int8", "int4": "int4"}  # label -> KV-cache format (None: float, stored as FP16)
MEMORY_MODELS, MEMORY_FORMATS, MEMORY_CONTEXT = ("1B", "7B", "70B"), ("fp32", "fp16", "int8", "int4", "nf4"), 4096
IDEA = ("A language model's memory is its **weights** (parameters x bytes per parameter: 4 for FP32, 2 for FP16, "
        "1 for INT8, 0.5 for INT4 and NF4, plus a scale per group) and its **KV cache**: for every token it has read, "
        "each layer keeps the keys and values of its attention, 2 x layers x KV heads x head size values per token. "
        "**NF4** puts its 16 levels where a normal distribution's values are dense, which suits LLM weights. "
        "Quality is **perplexity** = exp(mean cross-entropy of the next token): the model is as unsure as a uniform "
        "choice among that many tokens, **lower is better**. **KL(FP32 ‖ quantized)** per token moves before "
        "perplexity does.")
GOAL = (f"For {MODEL}, pick the weight format and KV-cache format with the smallest memory (weights + a full "
        f"128-token KV cache) whose perplexity stays within {TOLERANCE:.0%} of FP32's.")
HINT = ("Start from the smallest weights and go up until perplexity is within bounds; the KV cache of a short context "
        "is small, but a 4-bit cache still saves bytes at almost no perplexity.")
WIDGETS = {r"lesson10_(weights|kv)": str}


def _recipe_dict(w, weights: str, kv: str) -> dict:
    """Recipe JSON: ``WEIGHTS[weights]`` with the KV cache at ``KV[kv]`` (per token)."""
    p = WEIGHTS[weights]
    d = preset(p, w.layer_shapes).to_dict() if isinstance(p, str) else dict(p)
    if KV[kv] is not None:
        d["kv_cache"] = {"format": KV[kv], "granularity": KV_GRANULARITY}
    return d


def _kv_bytes(w, kv: str) -> int:
    """Bytes of the KV cache over tiny-lm's whole context at batch 1 (the memory calculator; FP16 when float)."""
    keys = [s for s in w.kv_cache_slices if s.role == "key"]
    return kv_cache_bytes(len(keys), keys[0].heads, keys[0].head_dim, w.model.context_length, 1, KV[kv] or "fp16",
                          KV_GRANULARITY if KV[kv] else None)


def facts(w) -> dict:
    """On ``w`` = tiny-lm: every weights x KV-cache combination's perplexity and KL on the first ``WINDOWS`` test
    windows (the simulation), its memory in bytes; and the memory calculator's reference models."""
    data = w.evaluation.subset(slice(0, WINDOWS))
    ref = w.run(w.model, data)
    fp32 = w.task.metrics(ref, ref, data.labels)["perplexity"]
    rows = []
    for wname in WEIGHTS:
        weights_only = Recipe.from_dict(_recipe_dict(w, wname, "fp16"))
        sim, weight_bytes = w.simulate(weights_only).model, w.size(weights_only)["size_bytes"]
        for kv, fmt in KV.items():
            model = sim if fmt is None else copy.deepcopy(sim)
            if fmt is not None:
                apply_kv_cache(model, w.kv_cache_slices, KVCacheSpec(fmt, KV_GRANULARITY))
            m = w.task.metrics(w.run(model, data), ref, data.labels)
            rows.append({"weights": wname, "kv": kv, "perplexity": m["perplexity"], "kl": m["kl_divergence"],
                         "weight_bytes": weight_bytes, "kv_bytes": _kv_bytes(w, kv),
                         "total_bytes": weight_bytes + _kv_bytes(w, kv), "recipe": _recipe_dict(w, wname, kv)})
    memory = [r for m in MEMORY_MODELS for r in memory_table(REFERENCE_MODELS[m], MEMORY_FORMATS, context=MEMORY_CONTEXT)]
    return {"fp32": fp32, "rows": rows, "tokens": int((data.labels != -100).sum()), "memory": memory}


def _row(f: dict, weights, kv) -> dict | None:
    return next((r for r in f["rows"] if r["weights"] == weights and r["kv"] == kv), None)


def show(f: dict, w) -> None:
    st.plotly_chart(memory_bars(f["memory"]), width="stretch")
    big = {r["format"]: r for r in f["memory"] if r["model"] == REFERENCE_MODELS["70B"].name}
    st.caption(f"The memory calculator (an estimate from each model's public shapes, nothing run): weights as codes "
               f"only, KV cache in FP16 for {MEMORY_CONTEXT:,} tokens at batch 1. GB = 10⁹ bytes. "
               f"{REFERENCE_MODELS['70B'].name}: {big['fp16']['weight_gb']:.1f} GB of weights in FP16, "
               f"{big['int4']['weight_gb']:.1f} GB in INT4, plus a {big['fp16']['kv_cache_gb']:.2f} GB KV cache.")
    picks = [_row(f, wn, "fp16") for wn in WEIGHTS] + [_row(f, "fp16", kv) for kv in KV if KV[kv]]
    labels = [f"weights {r['weights']}" if r["kv"] == "fp16" else f"KV cache {r['kv']}" for r in picks]
    ppl = [r["perplexity"] for r in picks]
    fig = figs.labelled_bars(labels, ppl, [f"{p:.2f} ({signed(100 * (p / f['fp32'] - 1), 1)} %, KL {r['kl']:.4f})"
                                           for p, r in zip(ppl, picks)],
                             f"{MODEL}: perplexity, lower is better (simulated)", "perplexity (the axis starts near FP32's)",
                             reference=(f"the exercise's bound: FP32 + {TOLERANCE:.0%}", (1 + TOLERANCE) * f["fp32"]))
    fig.update_xaxes(range=[0.95 * min(ppl), 1.02 * max(*ppl, (1 + TOLERANCE) * f["fp32"])])  # the differences show
    st.plotly_chart(fig, width="stretch")
    st.caption(f"Measured by the simulation on {f['tokens']} held-out tokens of {MODEL} ({WINDOWS} windows): FP32 "
               f"perplexity {f['fp32']:.2f}. Each KV-cache bar keeps the weights in FP16; KL(FP32 ‖ quantized) in nats "
               "per token. Changes under about 0.1 % are noise on this few tokens.")


def ask(f: dict) -> dict:
    c1, c2 = st.columns([3, 2])
    return {"weights": c1.radio("Weights", list(WEIGHTS), index=None, horizontal=True, key=key(NUMBER, "weights")),
            "kv": c2.radio("KV cache", list(KV), index=None, horizontal=True, key=key(NUMBER, "kv"))}


def _within(f: dict, r: dict) -> bool:
    return r["perplexity"] <= (1 + TOLERANCE) * f["fp32"]


def reference(f: dict) -> dict:
    best = min((r for r in f["rows"] if _within(f, r)), key=lambda r: r["total_bytes"])
    return {"weights": best["weights"], "kv": best["kv"]}


def check(answer, f: dict, w=None) -> Verdict:
    r = _row(f, (answer or {}).get("weights"), (answer or {}).get("kv"))
    if r is None:
        return Verdict(False, "Pick a weight format and a KV-cache format first.")
    ref = _row(f, **reference(f))
    change = signed(100 * (r["perplexity"] / f["fp32"] - 1), 1)
    said = (f"weights {r['weights']} + KV cache {r['kv']}: perplexity {r['perplexity']:.2f} ({change} % vs FP32's "
            f"{f['fp32']:.2f}), {r['total_bytes'] / 1e6:.3f} MB")
    if not _within(f, r):
        return Verdict(False, f"Too far: {said}; perplexity rose more than {TOLERANCE:.0%}.")
    if r["total_bytes"] > ref["total_bytes"]:
        return Verdict(False, f"Within bounds but not the smallest: {said}; a smaller combination also stays within "
                              f"{TOLERANCE:.0%}.")
    return Verdict(True, f"Goal met: {said}.")


def reveal(f: dict) -> str:
    ref = _row(f, **reference(f))
    fails = sorted({r["weights"] for r in f["rows"] if not _within(f, r)})
    return (f"**Weights {ref['weights']} + KV cache {ref['kv']}**: perplexity {ref['perplexity']:.2f} against FP32's "
            f"{f['fp32']:.2f}, {ref['total_bytes'] / 1e6:.3f} MB ({ref['weight_bytes'] / 1e6:.3f} MB weights, "
            f"{ref['kv_bytes'] / 1e6:.3f} MB cache)."
            + (f" Weights {', '.join(fails)} lose more than {TOLERANCE:.0%}." if fails else "")
            + " The KV cache tolerates 4 bits well here: one scale per token and head fits each head vector.")


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/generate.py", {}


def full_recipe(f: dict, answer) -> Recipe:
    """The answer's recipe (the reference's while the answer is incomplete): what the Generation page runs."""
    r = _row(f, (answer or {}).get("weights"), (answer or {}).get("kv")) or _row(f, **reference(f))
    return Recipe.from_dict(r["recipe"])
