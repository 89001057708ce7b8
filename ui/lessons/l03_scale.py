"""Lesson 3: scale and zero-point -- one value quantized by hand, x -> q -> x̂, symmetric vs affine."""

from __future__ import annotations

import streamlit as st
import torch

from qcore.figures import lessons as figs
from qcore.numerics.quantize import quantize
from ui.lessons import Verdict, key

NUMBER, TITLE = 3, "Scale and zero-point: one value by hand"
IDEA = ("INT4 has 16 codes, −8 … 7. To store real numbers, a **scale** s says how far apart neighbouring codes are, "
        "and a **zero-point** z which code stands for 0. Symmetric: s = max|x| / 7, z = 0 (half the codes may go "
        "unused when the data is lopsided). Affine: the range [min, max] is spread over all 16 codes, "
        "s = (max − min) / 15 and z = round(−8 − min / s). Then q = clamp(round(x / s) + z, −8, 7) and "
        "x̂ = (q − z) · s.")
TENSOR = [-0.6, 0.0, 0.37, 1.5]  # the tensor the scale is computed over
VALUE = 0.37  # the value the student quantizes
GOAL = (f"The tensor {TENSOR} is quantized to INT4, affine, min-max range. Which integer code q does x = {VALUE} get?")
HINT = "s = (1.5 − (−0.6)) / 15 = 0.14. Then z = round(−8 + 0.6 / 0.14), and q = round(0.37 / s) + z."
WIDGETS = {r"lesson3_q": int, r"lesson3_symmetric": bool}


def _spec(symmetric: bool) -> dict:
    return {"format": "int4", "granularity": "per_tensor", "symmetric": symmetric, "range": "minmax"}


def facts(w) -> dict:
    x = torch.tensor(TENSOR)
    out = {}
    for name, sym in (("symmetric", True), ("affine", False)):
        q = quantize(x, _spec(sym))
        s, z = float(q.scale[0]), float(q.zero_point[0]) if q.zero_point is not None else 0.0
        i = TENSOR.index(VALUE)
        out[name] = {"scale": s, "zero_point": z, "q": int(q.codes[i]), "x_hat": float(q.dequantize()[i]),
                     "lo": float(q.lo[0]), "hi": float(q.hi[0]),
                     "levels": [(c - z) * s for c in range(-8, 8)]}
    return out


def show(f: dict, w) -> None:
    sym = st.toggle("Symmetric (zero-point 0)", False, key=key(NUMBER, "symmetric"))
    g = f["symmetric" if sym else "affine"]
    st.plotly_chart(figs.number_line(g["levels"], VALUE, g["x_hat"], g["lo"], g["hi"],
                                     f"INT4 {'symmetric' if sym else 'affine'}: the 16 values x can become"),
                    width="stretch")
    c = st.columns(4)
    c[0].metric("scale s", f"{g['scale']:.4g}")
    c[1].metric("zero-point z", f"{g['zero_point']:.0f}")
    c[2].metric("x̂ for x = 0.37", f"{g['x_hat']:.4g}")
    c[3].metric("error |x̂ − x|", f"{abs(g['x_hat'] - VALUE):.4g}", help="at most s / 2 inside the range")
    st.caption(f"Computed by the engine's quantize() on the tensor {TENSOR}; switch the toggle to compare.")


def ask(f: dict):
    return st.number_input("Your code q", min_value=-8, max_value=7, value=0, step=1, key=key(NUMBER, "q"))


def reference(f: dict) -> int:
    return f["affine"]["q"]


def check(answer, f: dict, w=None) -> Verdict:
    a = f["affine"]
    if int(answer) == a["q"]:
        return Verdict(True, f"Right: q = {a['q']}, which dequantizes to ({a['q']} − ({a['zero_point']:.0f})) × "
                             f"{a['scale']:.4g} = {a['x_hat']:.4g}.")
    if int(answer) == a["q"] - int(a["zero_point"]):
        return Verdict(False, f"{int(answer)} is round(x / s); the affine code also adds the zero-point "
                              f"z = {a['zero_point']:.0f}.")
    if int(answer) == f["symmetric"]["q"]:
        return Verdict(False, f"{int(answer)} is the symmetric code (s = {f['symmetric']['scale']:.4g}); this one is affine.")
    return Verdict(False, f"Not {int(answer)}: recompute s and z from the range [{a['lo']:g}, {a['hi']:g}].")


def reveal(f: dict) -> str:
    a = f["affine"]
    return (f"s = 2.1 / 15 = {a['scale']:.4g}; z = round(−8 + 0.6 / {a['scale']:.4g}) = {a['zero_point']:.0f}; "
            f"q = round(0.37 / {a['scale']:.4g}) + z = **{a['q']}**; x̂ = {a['x_hat']:.4g}.")


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/formats.py", {"formats_source": "normal", "formats_family": "integer", "formats_bits": 4,
                                "formats_symmetric": False, "formats_range": "minmax"}
