"""Lesson 8: PTQ against QAT -- when rounding after training is not enough, train with the rounding in the loop."""

from __future__ import annotations

import threading

import streamlit as st

from qcore.figures import lessons as figs
from qcore.figures import qat as qat_figs
from qcore.recipe import Recipe
from qcore.training.qat import QATConfig, finetune
from ui.lessons import Verdict, key
from ui.text import signed

NUMBER, TITLE = 8, "PTQ or QAT: training with the rounding in the loop"
BITS = [8, 4, 3]
MAX_PTQ_DROP = 0.05  # "loses more than 5 points" (accuracy 0..1)
QAT_CONFIG = QATConfig(epochs=3)
IDEA = ("**Post-training quantization** (PTQ) rounds a trained model's weights once; nothing adapts to the rounding. "
        "**Quantization-aware training** (QAT) fine-tunes the model with the rounding inside the forward pass (the "
        "gradient passes straight through it), so the weights move to places where rounding hurts less. It costs a "
        "training run and training data, so it is worth it only where PTQ loses too much.")
GOAL = f"Which of these per-tensor weight recipes loses more than {100 * MAX_PTQ_DROP:g} points with PTQ, so needs QAT?"
HINT = "Compare each bar with the FP32 line; every bit less doubles the step of the grid."
WIDGETS = {r"lesson8_recipe": str}


def recipe(bits: int) -> Recipe:
    """INT-``bits`` symmetric per-tensor min-max weights, float activations."""
    return Recipe.from_dict({"name": f"int{bits}-per-tensor", "activations": None, "weights": {
        "format": f"int{bits}", "granularity": "per_tensor", "symmetric": True, "range": "minmax"}})


def facts(w) -> dict:
    return {"fp32": w.fp32_metrics["accuracy"],
            "ptq": {f"int{b}": w.evaluate(recipe(b)).quantized.metrics["accuracy"] for b in BITS}}


_QAT_LOCK = threading.Lock()
_QAT_DONE: dict[str, dict] = {}  # content hash of the workload -> the QAT run's result (one per server)


def qat_run(w) -> dict:
    """QAT of the hardest recipe on ``w``, run once per server (later callers wait for it and share it)."""
    with _QAT_LOCK:
        if w.content_hash not in _QAT_DONE:
            r = finetune(w, recipe(min(BITS)), QAT_CONFIG)
            _QAT_DONE[w.content_hash] = {"history": [vars(h) for h in r.history], "ptq": r.ptq_metrics["accuracy"],
                                         "qat": r.qat_metrics["accuracy"], "seconds": r.seconds, "message": r.message}
        return _QAT_DONE[w.content_hash]


def show(f: dict, w) -> None:
    names = list(f["ptq"])
    st.plotly_chart(figs.labelled_bars([f"{n} per tensor (PTQ)" for n in names], [f["ptq"][n] for n in names],
                                       [f"{f['ptq'][n]:.1%} ({signed(100 * (f['ptq'][n] - f['fp32']), 1)} points)" for n in names],
                                       "Test accuracy after post-training quantization (measured)", "accuracy",
                                       reference=("FP32", f["fp32"])), width="stretch")
    hardest = f"int{min(BITS)}"
    if w.content_hash in _QAT_DONE or st.button(f"Fine-tune {hardest} with QAT ({QAT_CONFIG.epochs} epochs, about 20 s "
                                                "once; then shared by the whole class)", key=key(NUMBER, "run")):
        with st.spinner("Quantization-aware training…"):
            run = qat_run(w)
        st.plotly_chart(qat_figs.training_curve(run["history"], "accuracy", run["ptq"]), width="stretch")
        st.caption(f"{hardest} per tensor: PTQ {run['ptq']:.1%}, after QAT {run['qat']:.1%} (FP32 {f['fp32']:.1%}), "
                   f"measured on the test images; training took {run['seconds']:.0f} s on this server.")


def ask(f: dict):
    return st.radio("Recipe", list(f["ptq"]), index=None, horizontal=True, format_func=lambda n: f"{n} per tensor",
                    key=key(NUMBER, "recipe"))


def reference(f: dict) -> str:
    return max(f["ptq"], key=lambda n: f["fp32"] - f["ptq"][n])


def check(answer, f: dict, w=None) -> Verdict:
    if answer not in f["ptq"]:
        return Verdict(False, "Pick one of the recipes first.")
    drop = f["fp32"] - f["ptq"][answer]
    if drop > MAX_PTQ_DROP:
        return Verdict(True, f"Yes: {answer} per tensor loses {100 * drop:.1f} points with PTQ; QAT can win most back.")
    return Verdict(False, f"{answer} per tensor loses only {100 * max(drop, 0):.1f} points with PTQ: "
                          "PTQ is good enough there.")


def reveal(f: dict) -> str:
    ref = reference(f)
    return (f"**{ref}**: PTQ reaches {f['ptq'][ref]:.1%} against FP32's {f['fp32']:.1%}. Run QAT above to see how much "
            "a few epochs win back.")


def full_page(f: dict, answer) -> tuple[str, dict]:
    return "pages/qat.py", {}


def full_recipe(f: dict, answer) -> Recipe:
    return recipe(int(str(answer or f"int{min(BITS)}").removeprefix("int")))
