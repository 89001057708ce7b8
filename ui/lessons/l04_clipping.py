"""Lesson 4: clipping and outliers -- rounding error against clipping error; min-max, percentile, MSE."""

from __future__ import annotations

import math

import streamlit as st

from qcore.analysis import explain
from qcore.figures import viz
from qcore.numerics.metrics import SQNR_EXACT_DB
from qcore.numerics.spec import TensorSpec
from ui.lessons import Verdict, key, teaching_weight

NUMBER, TITLE = 4, "Clipping and outliers: where to put the range"
LAYER = "features.7"
SPEC = {"format": "int4", "granularity": "per_tensor", "symmetric": True, "range": "minmax"}
TOLERANCE_DB = 0.5
IDEA = (f"A min-max range covers every weight, so one outlier stretches the grid and every other weight gets a coarse "
        f"step (**rounding error**). Clipping at a smaller threshold t makes the step finer but pulls the weights "
        f"beyond ±t to the edge (**clipping error**). The total is lowest in between. Below: {LAYER}'s weights at INT4, "
        "per tensor; each range method (min-max, percentile, MSE, entropy) picks its own t.")
GOAL = (f"Choose a clip threshold (as a share of max|w|) that brings {LAYER}'s weight SQNR at INT4 within "
        f"{TOLERANCE_DB} dB of the best threshold.")
HINT = "The black 'total error' curve has a minimum: read its threshold and divide by the largest one on the axis."
WIDGETS = {r"lesson4_clip": int}
POINTS = 50  # thresholds max|w| * k / 50, k = 1..50: the slider's steps of 2 %
PERCENTS = [100 * k // POINTS for k in range(1, POINTS + 1)]


def facts(w) -> dict:
    """The clipping trade-off of the layer's weights (``explain.clipping_tradeoff``: mean squared error at each
    threshold) and the SQNR it gives at each of the slider's thresholds: 10·log10(mean x² / total error)."""
    x = teaching_weight(w, LAYER).reshape(-1).float()
    tradeoff = explain.clipping_tradeoff(x, TensorSpec.from_dict(SPEC, "spec"), points=POINTS)
    power = float((x.double() ** 2).mean())
    sqnr = {p: 10 * math.log10(power / total) if total > 0 else SQNR_EXACT_DB
            for p, total in zip(PERCENTS, tradeoff["total"])}
    best = max(sqnr, key=sqnr.get)
    return {"amax": float(x.abs().max()), "sqnr_by_percent": sqnr, "best_percent": best, "best_sqnr_db": sqnr[best],
            "minmax_sqnr_db": sqnr[100], "tradeoff": tradeoff, "numel": x.numel()}


def show(f: dict, w) -> None:
    st.plotly_chart(viz.clipping_tradeoff(f["tradeoff"]), width="stretch")
    st.caption(f"{LAYER}: {f['numel']:,} weights, max|w| = {f['amax']:.4g}; errors computed by the engine, "
               "quantizing the weights at each threshold.")


def ask(f: dict):
    return st.select_slider("Clip threshold, % of max|w|", PERCENTS, value=100, key=key(NUMBER, "clip"))


def reference(f: dict) -> int:
    return f["best_percent"]


def check(answer, f: dict, w=None) -> Verdict:
    got, best = f["sqnr_by_percent"][int(answer)], f["best_sqnr_db"]
    if got >= best - TOLERANCE_DB:
        return Verdict(True, f"Yes: clipping at {int(answer)}% gives {got:.2f} dB, within {TOLERANCE_DB} dB of the best "
                             f"{best:.2f} dB (at {f['best_percent']}%); min-max gives {f['minmax_sqnr_db']:.2f} dB.")
    side = "wide: rounding error dominates" if int(answer) > f["best_percent"] else "tight: clipping error dominates"
    return Verdict(False, f"{int(answer)}% gives {got:.2f} dB, {best - got:.2f} dB below the best; too {side}.")


def reveal(f: dict) -> str:
    return (f"The best threshold is **{f['best_percent']}%** of max|w| ({f['best_sqnr_db']:.2f} dB), "
            f"{f['best_sqnr_db'] - f['minmax_sqnr_db']:.2f} dB better than min-max. The MSE range method finds it "
            "automatically.")


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/formats.py", {"formats_source": "a layer of the loaded model", "formats_layer:zoo:digits-cnn": LAYER,
                                "formats_family": "integer", "formats_bits": 4, "formats_symmetric": True,
                                "formats_range": "mse"}
