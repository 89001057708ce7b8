"""Lesson 9: hardware decides the speed-up -- a roofline estimate against latency measured in ONNX Runtime."""

from __future__ import annotations

import streamlit as st

from qcore.analysis.roofline import roofline
from qcore.figures import lessons as figs
from qcore.hardware import PROFILES, cpu_features, cpu_name
from qcore.recipe import preset
from ui import jobs
from ui.lessons import Verdict, key

NUMBER, TITLE = 9, "Hardware decides the speed-up"
RECIPE = "int8-static"
PROFILE_NAMES = ["this-machine", *PROFILES]
IDEA = ("INT8 weights are 4x smaller than FP32, but a model runs faster only where the chip has faster INT8 "
        "arithmetic (or the layer is waiting on memory) **and** the runtime has INT8 kernels for it. A **roofline** "
        "estimate takes each layer's time as max(bytes moved / bandwidth, operations / peak throughput) from a "
        "hardware profile; a **measurement** runs the exported file. On a small model, per-layer overheads "
        "(quantize and dequantize steps) can make INT8 slower than FP32.")
GOAL = f"On which hardware profile does the roofline estimate the largest {RECIPE} speed-up over FP32 for this model?"
HINT = "Compare the bars: a profile whose INT8 peak is many times its FP32 peak, and whose memory is slow, gains most."
WIDGETS = {r"lesson9_profile": str}


def facts(w) -> dict:
    rec = preset(RECIPE, w.layer_shapes)
    fp32 = preset("fp32")
    est = {}
    for p in PROFILE_NAMES:
        a, b = roofline(w, fp32, p), roofline(w, rec, p)
        est[p] = {"fp32_ms": a.total.latency_ms, "int8_ms": b.total.latency_ms,
                  "speedup": a.total.latency_ms / b.total.latency_ms, "source": b.profile_source}
    return {"estimates": est, "cpu": cpu_name(), "flags": cpu_features()}


def bench_inputs(w) -> dict:
    """The ``bench`` job (``qcore.jobs``) timing FP32 against ``RECIPE`` at batch 1 in ONNX Runtime: the same
    request from every student, so it runs once for the whole class and queues behind other jobs."""
    return {"recipe": preset(RECIPE, w.layer_shapes).to_dict(), "runtime": "onnxruntime", "batch_size": 1}


def measured(r: dict) -> dict:
    """What the lesson shows of a ``bench`` result (``BenchResult.to_dict()``)."""
    return {"fp32_ms": r["fp32"]["latency_ms"]["median"], "int8_ms": r["quantized"]["latency_ms"]["median"],
            "speedup": r["speedup"]["median_ratio"], "threads": r["threads"],
            "in_float": sum(x["executes"] == "float (dequantized)" for x in r["layers"])}


def show(f: dict, w) -> None:
    est = f["estimates"]
    st.plotly_chart(figs.labelled_bars(list(est), [e["speedup"] for e in est.values()],
                                       [f"{e['speedup']:.2f}x (estimate)" for e in est.values()],
                                       f"Roofline estimate: {RECIPE} speed-up over FP32, batch 1", "speed-up (x, estimate)"),
                    width="stretch")
    flags = ", ".join(f["flags"]) or "none found"
    wkey, inputs = f"zoo:{w.name}", bench_inputs(w)
    asked = jobs.asked("bench", wkey, w, inputs) or st.button(
        "Measure on this machine (ONNX Runtime, a few seconds once; then shared)", key=key(NUMBER, "measure"))
    result = jobs.result("bench", wkey, w, inputs, "measurement", small=True, stop=False) if asked else None
    if result is not None:
        m = measured(result)
        st.markdown(f"**Measured** on this machine ({f['cpu']}; CPU flags: {flags}), batch 1, {m['threads']} thread(s): "
                    f"FP32 {m['fp32_ms']:.3f} ms, {RECIPE} {m['int8_ms']:.3f} ms, speed-up **{m['speedup']:.2f}x** "
                    f"(median of interleaved rounds). The roofline estimate for this machine said "
                    f"{est['this-machine']['speedup']:.2f}x."
                    + (f" {m['in_float']} layer(s) ran in float (no INT8 kernel)." if m["in_float"] else ""))
    else:
        st.caption(f"This CPU: {f['cpu']}; flags that decide low-precision speed: {flags}.")


def ask(f: dict):
    return st.radio("Profile", list(f["estimates"]), index=None, horizontal=True, key=key(NUMBER, "profile"))


def reference(f: dict) -> str:
    return max(f["estimates"], key=lambda p: f["estimates"][p]["speedup"])


def check(answer, f: dict, w=None) -> Verdict:
    if answer not in f["estimates"]:
        return Verdict(False, "Pick one of the profiles first.")
    ref, est = reference(f), f["estimates"]
    if est[answer]["speedup"] >= est[ref]["speedup"]:
        return Verdict(True, f"Yes: {answer}, {est[answer]['speedup']:.2f}x estimated. An estimate is not a measurement: "
                             "measure on this machine to see the difference.")
    return Verdict(False, f"{answer} is estimated at {est[answer]['speedup']:.2f}x; another profile gains more.")


def reveal(f: dict) -> str:
    ref = reference(f)
    return (f"**{ref}**: {f['estimates'][ref]['speedup']:.2f}x estimated. Its INT8 units are the fastest relative to "
            "FP32 and its memory is slow, so 4x fewer bytes pay off; on the GPUs both paths are fast already.")


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/tradeoffs.py", {}
