"""Lesson 7: sensitivity and mixed precision -- which layers hurt, and keeping them in higher precision."""

from __future__ import annotations

import streamlit as st

from qcore.analysis import sensitivity
from qcore.figures import decide
from qcore.recipe import Recipe
from ui.lessons import Verdict, key
from ui.text import signed

NUMBER, TITLE = 7, "Sensitivity and mixed precision: which layers hurt"
CANDIDATE = "int3"  # sensitivity.LAYER_SPECS: 3-bit symmetric per-channel min-max weights
BITS = [3, 4, 8]
MAX_DROP, MAX_SIZE = 0.01, 0.13  # "loses under 1 point" (accuracy 0..1), "under 13% of FP32's size"
IDEA = ("Layers are not equally fragile. A **sensitivity sweep** quantizes one layer at a time (every other layer "
        "stays FP32) and measures how much the model's accuracy drops: the first and last layers, and layers with "
        "few weights per output, often hurt most. Keep those in higher precision and quantize the rest hard: a "
        "**mixed-precision** recipe.")
GOAL = (f"Every layer starts at INT3. Raise some layers' bits so the model loses under {100 * MAX_DROP:g} point of "
        f"accuracy while its weights stay under {MAX_SIZE:.0%} of FP32's size.")
HINT = "Raise the layers the sweep ranks first, one step at a time; INT8 on a big layer costs a lot of bytes."
WIDGETS = {r"lesson7_bits:[\w.]+": int}


def _base() -> dict:
    return sensitivity.LAYER_SPECS[CANDIDATE]["weights"]


def recipe(bits: dict[str, int]) -> Recipe:
    """INT3 per-channel weights (float activations), each layer in ``bits`` at its own bit width."""
    layers = {layer: {"weights": {"format": f"int{b}"}} for layer, b in bits.items() if b != 3}
    return Recipe.from_dict({"name": "lesson7", "weights": _base(), "activations": None, "layers": layers})


def facts(w) -> dict:
    rows = [r.to_dict() for r in sensitivity.sweep(w, [CANDIDATE], "weights", "only").rows]
    everywhere = w.evaluate(recipe({}))
    return {"rows": rows, "fp32": w.fp32_metrics["accuracy"], "layers": list(w.layers),
            "int3_accuracy": everywhere.quantized.metrics["accuracy"],
            "int3_size": everywhere.quantized.size_bytes / everywhere.fp32.size_bytes}


def show(f: dict, w) -> None:
    st.plotly_chart(decide.ranked_drops(f["rows"], CANDIDATE, "accuracy"), width="stretch")
    st.caption(f"Measured by the sensitivity sweep on the 360 test images: each layer alone at INT3. All layers at "
               f"INT3 together: {f['int3_accuracy']:.1%} (FP32 {f['fp32']:.1%}), {f['int3_size']:.1%} of FP32's size.")


def ask(f: dict) -> dict:
    cols = st.columns(len(f["layers"]))
    return {layer: c.select_slider(layer, BITS, value=3, key=key(NUMBER, f"bits:{layer}"))
            for c, layer in zip(cols, f["layers"])}


def reference(f: dict) -> dict:
    """The two layers the sweep ranks most sensitive at INT4, the rest at INT3."""
    top = {r["layer"] for r in sorted(f["rows"], key=lambda r: r["rank"])[:2]}
    return {layer: 4 if layer in top else 3 for layer in f["layers"]}


def check(answer, f: dict, w) -> Verdict:
    e = w.evaluate(recipe(answer))
    acc, share = e.quantized.metrics["accuracy"], e.quantized.size_bytes / e.fp32.size_bytes
    drop = f["fp32"] - acc
    said = f"{acc:.1%} accuracy ({signed(-100 * drop, 1)} points), {share:.1%} of FP32's size"
    if drop < MAX_DROP and share < MAX_SIZE:
        return Verdict(True, f"Goal met: {said}.")
    why = [] if drop < MAX_DROP else [f"it loses {100 * drop:.1f} points"]
    why += [] if share < MAX_SIZE else [f"it is over {MAX_SIZE:.0%} of FP32's size"]
    return Verdict(False, f"Not yet: {said}; " + " and ".join(why) + ".")


def reveal(f: dict) -> str:
    ref = reference(f)
    raised = [layer for layer, b in ref.items() if b != 3]
    return (f"Raise the two layers the sweep ranks first, **{' and '.join(raised)}**, to INT4 and keep the rest at "
            "INT3: the small early convolutions hurt most, and they hold few weights, so they cost few bytes.")


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/mixed_precision.py", {}


def full_recipe(f: dict, answer) -> Recipe:
    return recipe(answer)
