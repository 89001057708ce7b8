"""Lesson 1: why quantize -- bytes per value, model size and memory bandwidth."""

from __future__ import annotations

import streamlit as st

from qcore.analysis import summary
from qcore.figures import lessons as figs
from qcore.figures import viz
from qcore.hardware import PROFILES
from qcore.numerics.formats import FORMATS
from ui.lessons import Verdict, key

NUMBER, TITLE = 1, "Why quantize: bytes, model size, memory bandwidth"
IDEA = ("A model is mostly numbers: its weights. Stored as FP32 each one takes 4 bytes, so one billion parameters "
        "take 4 GB; FP16 halves that, INT8 takes 1 byte per weight, INT4 half a byte. Smaller weights fit on smaller "
        "devices, and because generating one token reads every weight once, a model that is 8x smaller can also be "
        "read 8x faster from memory.")
GOAL = "How many GB (10⁹ bytes) do the weights of a 70-billion-parameter model take in INT4 (ignore the scales)?"
HINT = "Bytes per value = bits / 8. Multiply by the number of parameters and divide by 10⁹."
WIDGETS = {r"lesson1_gb": float}
FORMAT_NAMES = ["fp32", "fp16", "bf16", "int8", "int4"]
PARAMS_1B, PARAMS_70B = 1e9, 70e9
BANDWIDTH_PROFILE = "apple-m3"  # a laptop: the memory bandwidth every token's weights must pass through


def facts(w) -> dict:
    bits = {n: FORMATS[n].bits for n in FORMAT_NAMES}
    bandwidth = PROFILES[BANDWIDTH_PROFILE].memory_bandwidth_gb_s
    return {"bits": bits, "gb_1b": {n: PARAMS_1B * b / 8 / 1e9 for n, b in bits.items()},
            "gb_70b": {n: PARAMS_70B * b / 8 / 1e9 for n, b in bits.items()},
            "bandwidth_gbs": bandwidth, "profile": PROFILES[BANDWIDTH_PROFILE].name,
            "seconds_per_token_70b": {n: PARAMS_70B * b / 8 / 1e9 / bandwidth for n, b in bits.items()},
            "preset_sizes": summary.preset_sizes(w), "model": w.name}


def show(f: dict, w) -> None:
    names = list(f["bits"])
    st.plotly_chart(figs.labelled_bars([n.upper() for n in names], [f["gb_1b"][n] for n in names],
                                       [f"{f['bits'][n]} bits: {f['gb_1b'][n]:g} GB" for n in names],
                                       "Weights of a 1-billion-parameter model", "GB (10⁹ bytes)"), width="stretch")
    rows = [f"| {n.upper()} | {f['gb_70b'][n]:g} GB | {f['seconds_per_token_70b'][n]:.2f} s |" for n in names]
    st.markdown(f"A 70B model on a laptop whose memory moves {f['bandwidth_gbs']:g} GB/s ({f['profile']}, its "
                "spec-sheet bandwidth): reading every weight once per token takes at least\n\n"
                "| format | 70B weights | time to read them once (estimate) |\n|---|---|---|\n" + "\n".join(rows))
    st.plotly_chart(viz.preset_sizes(f["preset_sizes"]), width="stretch")
    st.caption(f"The lessons' model, {f['model']}, under each preset (sizes computed by the engine, scales included).")


def ask(f: dict):
    return st.number_input("Your answer (GB)", min_value=0.0, value=0.0, step=0.5, key=key(NUMBER, "gb"))


def reference(f: dict) -> float:
    return f["gb_70b"]["int4"]


def check(answer, f: dict, w=None) -> Verdict:
    want = f["gb_70b"]["int4"]
    if answer is not None and abs(float(answer) - want) <= 0.02 * want:
        return Verdict(True, f"Right: 70 × 10⁹ weights × {f['bits']['int4']} bits / 8 = {want:g} GB, an eighth of "
                             f"FP32's {f['gb_70b']['fp32']:g} GB.")
    for name, gb in f["gb_70b"].items():
        if answer is not None and abs(float(answer) - gb) <= 0.02 * gb:
            return Verdict(False, f"{gb:g} GB is the size in {name.upper()} ({f['bits'][name]} bits per weight); "
                                  f"INT4 has {f['bits']['int4']} bits.")
    return Verdict(False, f"Not quite: {float(answer or 0):g} GB is not what {f['bits']['int4']} bits per weight give.")


def reveal(f: dict) -> str:
    return (f"70 × 10⁹ × {f['bits']['int4']} / 8 = **{f['gb_70b']['int4']:g} GB** (FP32: {f['gb_70b']['fp32']:g} GB). "
            "Real INT4 files are a little larger: every group of weights also stores a scale.")


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/model.py", {}
