"""Lesson 2: number formats -- FP32, FP16, BF16, FP8, INT8, INT4, NF4: range, precision, bit layout."""

from __future__ import annotations

import math

import streamlit as st

from qcore.analysis import explain
from qcore.figures import viz
from qcore.numerics.formats import FORMATS
from ui.lessons import Verdict, key

NUMBER, TITLE = 2, "Number formats: range, precision, bit layout"
IDEA = ("Every format spends its bits differently. Integers (INT8, INT4) spread their 2ᵇ values evenly: "
        "fine steps, small range, and a scale must stretch them over the data. Floats split their bits into an "
        "exponent (how far from zero: the range) and a mantissa (how finely: the precision); FP16 and BF16 both have "
        "16 bits but BF16 keeps FP32's exponent. NF4 is a codebook: 16 levels placed where normally distributed "
        "weights are dense.")
GOAL = "Which 16-bit format reaches the larger numbers, and how many different values can INT8 hold?"
HINT = "Look at the exponent field in the bit layout: more exponent bits, larger range. An n-bit integer has 2ⁿ codes."
WIDGETS = {r"lesson2_(wider)": str, r"lesson2_levels": int}
FORMAT_NAMES = ["fp32", "fp16", "bf16", "fp8_e4m3", "int8", "int4", "nf4"]
SIXTEEN_BIT = ["fp16", "bf16"]


def facts(w) -> dict:
    out = {}
    for n in FORMAT_NAMES:
        d = FORMATS[n].describe()
        step = d["smallest_step_near_zero"]
        out[n] = {"bits": d["bits"], "levels": d["levels"], "max": d["max"], "smallest": step,
                  "dynamic_range_db": 20 * math.log10(d["max"] / step) if step > 0 else None,
                  "layout": explain.bit_layout(FORMATS[n])}
    return {"formats": out}


def show(f: dict, w) -> None:
    st.plotly_chart(viz.bit_layout({n: v["layout"] for n, v in f["formats"].items()}), width="stretch")
    rows = [f"| {n} | {v['bits']} | {v['levels']:,} | {v['max']:.4g} | {v['smallest']:.3g} |"
            for n, v in f["formats"].items() if n != "fp32"]
    st.markdown("| format | bits | different values | largest value | smallest positive value |\n|---|---|---|---|---|\n"
                + "\n".join(rows))
    st.caption("Integer and NF4 values are codes before scaling: a scale per tensor, channel or group maps them onto "
               "the data. Numbers from the engine's format registry.")


def ask(f: dict):
    wider = st.radio("The 16-bit format with the larger range", SIXTEEN_BIT, index=None, horizontal=True,
                     key=key(NUMBER, "wider"))
    levels = st.number_input("Different values INT8 can hold", min_value=0, value=0, step=1, key=key(NUMBER, "levels"))
    return {"wider": wider, "levels": levels}


def reference(f: dict) -> dict:
    return {"wider": max(SIXTEEN_BIT, key=lambda n: f["formats"][n]["max"]), "levels": f["formats"]["int8"]["levels"]}


def check(answer, f: dict, w=None) -> Verdict:
    ref = reference(f)
    fm = f["formats"]
    if answer.get("wider") != ref["wider"]:
        other = answer.get("wider") or "no format"
        return Verdict(False, f"Not {other}: FP16 reaches {fm['fp16']['max']:.4g}, BF16 {fm['bf16']['max']:.4g}.")
    if int(answer.get("levels") or 0) != ref["levels"]:
        return Verdict(False, f"{ref['wider']} is right; but INT8 has 8 bits, so 2⁸ codes, not {int(answer.get('levels') or 0)}.")
    return Verdict(True, f"Right: {ref['wider']} reaches {fm[ref['wider']]['max']:.4g} and INT8 holds "
                         f"{ref['levels']} values (−128 … 127).")


def reveal(f: dict) -> str:
    fm = f["formats"]
    return (f"**BF16** has 8 exponent bits like FP32 (largest {fm['bf16']['max']:.3g}); FP16 has 5 (largest "
            f"{fm['fp16']['max']:.4g}) but 3 more mantissa bits, so finer steps. **INT8** has 2⁸ = "
            f"{fm['int8']['levels']} values.")


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/formats.py", {"formats_source": "normal", "formats_family": "bf16"}
