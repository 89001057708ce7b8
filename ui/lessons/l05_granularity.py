"""Lesson 5: granularity -- per-tensor, per-channel, per-group scales and what each costs."""

from __future__ import annotations

import streamlit as st

from qcore.analysis import explain
from qcore.figures import lessons as figs
from qcore.figures import viz
from qcore.numerics.metrics import sqnr_db
from qcore.numerics.quantize import quantize
from qcore.numerics.spec import TensorSpec
from ui.lessons import Verdict, key, teaching_weight

NUMBER, TITLE = 5, "Granularity: how many values share one scale"
LAYER = "features.3"
GROUP = 32
WITHIN_DB = 3.0
OPTIONS = {"per_tensor": "per tensor (one scale)", "per_channel": "per output channel",
           "per_group": f"per group of {GROUP} inputs"}
IDEA = (f"One scale for a whole tensor must cover its widest output channel, so narrow channels use only a few of "
        f"the grid's levels. A scale per channel (or per group of {GROUP} consecutive weights) fits each slice, at "
        "4 bytes per extra scale. Below: the range of every output channel of "
        f"{LAYER} against the one range a per-tensor scale must cover, and the INT4 weight SQNR of each choice.")
GOAL = (f"Pick the granularity that brings {LAYER}'s INT4 weight SQNR within {WITHIN_DB:g} dB of the best one while "
        "storing the fewest scale bytes.")
HINT = "Compare each bar with the best one, then pick the cheapest that is close enough: fewer blocks, fewer scales."
WIDGETS = {r"lesson5_granularity": str}


def facts(w) -> dict:
    x = teaching_weight(w, LAYER)
    rows = {}
    for g in OPTIONS:
        spec = TensorSpec.from_dict({"format": "int4", "granularity": g, "group_size": GROUP, "symmetric": True,
                                     "range": "minmax"}, "spec")
        q = quantize(x, spec)
        rows[g] = {"sqnr_db": sqnr_db(q.dequantize(), x), "scale_bytes": 4 * q.scale.numel()}
    return {"rows": rows, "channels": explain.channel_ranges(x), "shape": list(x.shape)}


def show(f: dict, w) -> None:
    rows = f["rows"]
    st.plotly_chart(figs.labelled_bars([OPTIONS[g] for g in rows], [r["sqnr_db"] for r in rows.values()],
                                       [f"{r['sqnr_db']:.1f} dB, {r['scale_bytes']:,} B of scales" for r in rows.values()],
                                       f"{LAYER} at INT4: weight SQNR by granularity", "SQNR (dB, higher is better)"),
                    width="stretch")
    st.plotly_chart(viz.channel_ranges(f["channels"]), width="stretch")


def ask(f: dict):
    return st.radio("Granularity", list(OPTIONS), index=None, format_func=OPTIONS.get, key=key(NUMBER, "granularity"))


def reference(f: dict) -> str:
    best = max(r["sqnr_db"] for r in f["rows"].values())
    close = [g for g, r in f["rows"].items() if r["sqnr_db"] >= best - WITHIN_DB]
    return min(close, key=lambda g: f["rows"][g]["scale_bytes"])


def check(answer, f: dict, w=None) -> Verdict:
    if answer not in f["rows"]:
        return Verdict(False, "Pick one of the three granularities first.")
    r, best = f["rows"][answer], max(x["sqnr_db"] for x in f["rows"].values())
    ref = reference(f)
    if answer == ref:
        return Verdict(True, f"Yes: {OPTIONS[answer]} reaches {r['sqnr_db']:.1f} dB ({best - r['sqnr_db']:.1f} dB "
                             f"below the best) with {r['scale_bytes']:,} bytes of scales.")
    if r["sqnr_db"] < best - WITHIN_DB:
        return Verdict(False, f"{OPTIONS[answer]} gives {r['sqnr_db']:.1f} dB, {best - r['sqnr_db']:.1f} dB below the best.")
    return Verdict(False, f"{OPTIONS[answer]} is close enough but stores {r['scale_bytes']:,} bytes of scales; "
                          f"{OPTIONS[ref]} needs only {f['rows'][ref]['scale_bytes']:,}.")


def reveal(f: dict) -> str:
    ref = reference(f)
    return (f"**{OPTIONS[ref]}**: {f['rows'][ref]['sqnr_db']:.1f} dB with {f['rows'][ref]['scale_bytes']:,} bytes of "
            "scales. " + "; ".join(f"{OPTIONS[g]}: {r['sqnr_db']:.1f} dB, {r['scale_bytes']:,} B" for g, r in f["rows"].items()))


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/weights.py", {"weights_layer:zoo:digits-cnn": LAYER, "weights_format": "int4",
                                "weights_symmetric": True, "weights_range": "minmax",
                                "weights_granularity": answer if answer in OPTIONS else "per_channel", "weights_group": GROUP}
