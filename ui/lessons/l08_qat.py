"""Lesson 8: PTQ against QAT -- when rounding after training is not enough, train with the rounding in the loop."""

from __future__ import annotations

import streamlit as st

from qcore.figures import lessons as figs
from qcore.figures import qat as qat_figs
from qcore.recipe import Recipe
from qcore.training.qat import QATConfig
from ui import jobs
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


def qat_inputs() -> dict:
    """The ``qat`` job (``qcore.jobs``) of the hardest recipe: the same request from every student, so it runs once
    for the whole class (in this app process, or on the class server's workers for every replica)."""
    return {"recipe": recipe(min(BITS)).to_dict(), "epochs": QAT_CONFIG.epochs}


def show(f: dict, w) -> None:
    names = list(f["ptq"])
    st.plotly_chart(figs.labelled_bars([f"{n} per tensor (PTQ)" for n in names], [f["ptq"][n] for n in names],
                                       [f"{f['ptq'][n]:.1%} ({signed(100 * (f['ptq'][n] - f['fp32']), 1)} points)" for n in names],
                                       "Test accuracy after post-training quantization (measured)", "accuracy",
                                       reference=("FP32", f["fp32"])), width="stretch")
    hardest = f"int{min(BITS)}"
    wkey, inputs = f"zoo:{w.name}", qat_inputs()
    if jobs.asked("qat", wkey, w, inputs) or st.button(f"Fine-tune {hardest} with QAT ({QAT_CONFIG.epochs} epochs, "
                                                        "about 20 s once; then shared by the whole class)",
                                                        key=key(NUMBER, "run")):
        run = jobs.result("qat", wkey, w, inputs, "QAT run", small=True, stop=False)
        if run is None:  # still training: its progress is shown
            return
        ptq, qat = run["ptq"]["accuracy"], run["qat"]["accuracy"]
        st.plotly_chart(qat_figs.training_curve(run["history"], "accuracy", ptq), width="stretch")
        st.caption(f"{hardest} per tensor: PTQ {ptq:.1%}, after QAT {qat:.1%} (FP32 {f['fp32']:.1%}), "
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
