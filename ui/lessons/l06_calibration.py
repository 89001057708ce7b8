"""Lesson 6: calibration -- static against dynamic activation ranges, on inputs where they differ."""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from qcore.analysis import explain
from qcore.figures import lessons as figs
from qcore.figures import viz
from qcore.recipe import preset
from qcore.zoo.teaching import DIM_FACTOR, dim_calibration
from ui.lessons import Verdict, key
from ui.text import signed

NUMBER, TITLE = 6, "Calibration: static or dynamic activation ranges"
LAYER = "features.3"
BATCH = 32
MAX_DROP = 0.01  # accuracy (0..1): "loses under 1 point"
OPTIONS = {"int8-static": "INT8, static ranges (fixed by calibration)",
           "int8-dynamic": "INT8, dynamic ranges (measured on every batch)"}
IDEA = ("Weights are known in advance; a layer's inputs are not. **Static** quantization runs a calibration set "
        "through the model once and fixes every input range; **dynamic** quantization measures each batch's range "
        "while the model runs. Static is cheaper at run time, but only as good as the calibration set. Here the "
        f"calibration images were scanned at {DIM_FACTOR:.0%} brightness while the real (test) images are not: the "
        "static range of every layer is too narrow and the real inputs get clipped.")
GOAL = f"Pick the recipe that loses under {100 * MAX_DROP:g} point of accuracy when calibrated on the dim images."
HINT = "Look at the chart: which range covers the real batches, the static lines or the grey bars?"
WIDGETS = {r"lesson6_recipe": str}


def facts(w) -> dict:
    dim = dim_calibration(w)
    fp32 = w.fp32_metrics["accuracy"]
    acc = {name: dim.evaluate(preset(name, w.layer_shapes)).quantized.metrics["accuracy"] for name in OPTIONS}
    matched = w.evaluate(preset("int8-static", w.layer_shapes)).quantized.metrics["accuracy"]
    real = replace(w, calibration=w.evaluation, content_hash=w.content_hash + ":evaluation-as-calibration")
    s = dim.calibration_stats()[LAYER]
    return {"fp32": fp32, "accuracy": acc, "static_on_matching_images": matched,
            "static_range": (s.min, s.max), "real_batches": explain.batch_ranges(real, BATCH)[LAYER]}


def show(f: dict, w) -> None:
    st.plotly_chart(viz.static_vs_dynamic(f["real_batches"], {"minmax": f["static_range"]}), width="stretch")
    st.caption(f"Input of {LAYER}: grey bars, the range of each batch of {BATCH} test images (what a dynamic quantizer "
               f"uses); dashed lines, the static min-max range calibrated on the dim images.")
    labels = [OPTIONS["int8-static"] + ", dim calibration", OPTIONS["int8-dynamic"],
              OPTIONS["int8-static"] + ", matching calibration"]
    values = [f["accuracy"]["int8-static"], f["accuracy"]["int8-dynamic"], f["static_on_matching_images"]]
    st.plotly_chart(figs.labelled_bars(labels, values, [f"{v:.1%} ({signed(100 * (v - f['fp32']), 1)} points)" for v in values],
                                       "Test accuracy (measured on 360 images)", "accuracy",
                                       reference=("FP32", f["fp32"])), width="stretch")


def ask(f: dict):
    return st.radio("Recipe", list(OPTIONS), index=None, format_func=OPTIONS.get, key=key(NUMBER, "recipe"))


def reference(f: dict) -> str:
    return min(OPTIONS, key=lambda n: f["fp32"] - f["accuracy"][n])


def check(answer, f: dict, w=None) -> Verdict:
    if answer not in OPTIONS:
        return Verdict(False, "Pick one of the two recipes first.")
    drop = f["fp32"] - f["accuracy"][answer]
    if drop < MAX_DROP:
        return Verdict(True, f"Yes: {answer} reaches {f['accuracy'][answer]:.1%} (FP32 {f['fp32']:.1%}): its ranges "
                             "come from the real batches, not from the dim calibration images.")
    return Verdict(False, f"{answer} loses {100 * drop:.1f} points ({f['accuracy'][answer]:.1%}): its ranges were fixed on "
                          "images dimmer than the real ones, so real inputs are clipped.")


def reveal(f: dict) -> str:
    return (f"**int8-dynamic**: {f['accuracy']['int8-dynamic']:.1%} against static's {f['accuracy']['int8-static']:.1%}. "
            f"With a calibration set like the real data, static reaches {f['static_on_matching_images']:.1%} too: "
            "calibrate on data that looks like what the model will see.")


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/activations.py", {"act_layer:zoo:digits-cnn": LAYER, "act_format": "int8", "act_batch": BATCH}
