"""QAT page: fine-tune the model under a recipe with quantization in the forward pass (``qcore.training``),
then PTQ against QAT side by side: metric, per-class accuracy, one layer's weights before and after.

A run is kept per (model, recipe, settings) for the session: the same inputs are never trained twice."""

import tempfile
from dataclasses import asdict
from pathlib import Path

import streamlit as st

from ui import jobs, keys, state
from ui.formulas import error_box, intro
from qcore.analysis import search
from qcore.export import export
from qcore.figures import decide as viz_decide
from qcore.figures import qat as viz_qat
from qcore.numerics.quantize import fake_quantize
from qcore.recipe import PRESETS, preset
from qcore.recipe.links import recipe_id
from qcore.training import QATConfig, save, training_data
from qcore.training.transport import from_json
from ui.text import delta_style, metric_label, plain

LEARNING_RATES = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
STE = r"""
The forward pass uses the quantized weight $\hat{w} = \operatorname{fakequant}(w)$, exactly as the simulation does;
rounding has no useful gradient, so the backward pass treats it as the identity inside the clipping range and
zero outside (the **straight-through estimator**):

$$\frac{\partial \mathcal{L}}{\partial w} \approx \frac{\partial \mathcal{L}}{\partial \hat{w}} \cdot \mathbf{1}[\,lo \le w \le hi\,]$$

With learned step sizes (LSQ), the step $s$ of each block also gets a gradient:
$\partial \hat{w} / \partial s = \operatorname{round}(w/s) - w/s$ inside the range, $\pm q_{max}$ when clipped,
scaled by $g = 1/\sqrt{N\, q_{max}}$ for a block of $N$ weights.
"""

key, w = state.active()
st.title("Quantization-aware training")
intro("Post-training quantization (PTQ) rounds trained weights once and can lose accuracy at 4 bits and below. "
      "**Quantization-aware training** keeps training with the quantization in the forward pass, so the weights "
      "move to where the grid serves them. It costs training time; on these small models, seconds.",
      STE, title="Formulas: the straight-through estimator")
_, _, current = state.current(key, w)
choices = {f"yours (in the table): {current.name}": current}
choices.update({p: preset(p, w.layer_shapes) for p in PRESETS if p != "fp32"})
label = st.selectbox("Recipe", list(choices), key=f"qat_recipe:{key}", help="the recipe QAT trains under")
recipe = choices[label]
c1, c2, c3 = st.columns(3)
epochs = c1.number_input("Epochs", min_value=1, max_value=50, value=5, key="qat_epochs")
lr = c2.select_slider("Learning rate (Adam)", LEARNING_RATES, value=1e-3, key="qat_lr", format_func=lambda v: f"{v:g}")
learn = c3.checkbox("Learn the weights' step sizes (LSQ)", key="qat_lsq",
                    help="symmetric integer weights with range minmax only")
config = QATConfig(epochs=int(epochs), lr=float(lr), learn_scales=learn)
train, train_name = training_data(w)
st.caption(f"Trains on {plain(train_name)} ({len(train):,} samples), picks the epoch with the lowest loss on the "
           f"calibration split and reports on the evaluation split ({len(w.evaluation):,} samples), never trained on.")

inputs = {"recipe": recipe.to_dict(), "epochs": config.epochs, "lr": config.lr, "learn_scales": config.learn_scales}
runs = st.session_state.setdefault(keys.QAT_RUNS, {})  # (model, recipe, settings) -> QATResult, this session's
run_key = (key, recipe_id(w, recipe), config)
if run_key not in runs and not jobs.asked("qat", key, w, inputs) and not st.button("Run QAT", type="primary", key="qat_run"):
    st.stop()
if run_key not in runs:
    with error_box():
        runs[run_key] = from_json(w, jobs.result("qat", key, w, inputs, "QAT run", state.small(w)))
else:
    st.caption("Already trained with these settings in this session: the result is shown below.")
result = runs[run_key]
head = result.metric
(st.warning if result.stopped in ("diverged", "cancelled") else st.success)(
    plain(f"{result.message} in {result.seconds:.1f} s; best epoch {result.best_epoch}. Loss: {result.loss.replace('_', '-')} "
          f"({result.notes[0]})."))
cols = st.columns(3)
fp32, ptq, qat = (m[head] for m in (result.fp32_metrics, result.ptq_metrics, result.qat_metrics))
cols[0].metric(f"FP32 {metric_label(head)}", f"{fp32:.4f}")
higher = w.task.higher_is_better
cols[1].metric(f"PTQ {metric_label(head)}", f"{ptq:.4f}", **delta_style(ptq - fp32, higher, 4, " vs FP32"))
cols[2].metric(f"QAT {metric_label(head)}", f"{qat:.4f}", **delta_style(qat - ptq, higher, 4, " vs PTQ"))
st.plotly_chart(viz_qat.training_curve([asdict(h) for h in result.history], head, ptq), key="qat_curve", width="stretch")

if "per_class_accuracy" in result.qat_metrics:
    st.plotly_chart(viz_qat.per_class_three(result.fp32_metrics["per_class_accuracy"], result.ptq_metrics["per_class_accuracy"],
                                            result.qat_metrics["per_class_accuracy"], list(w.task.class_names or [])),
                    key="qat_per_class", width="stretch")

plans = recipe.resolve(w.layer_shapes)
quantized = [n for n, p in plans.items() if p.weights is not None and p.weights.format != "fp32"]
if quantized:
    layer = st.selectbox("Layer", quantized, key=f"qat_layer:{key}", help="whose weights to compare")
    before = dict(w.folded[0].named_modules())[layer].weight.detach()
    after = dict(result.workload.model.named_modules())[layer].weight.detach()
    spec = plans[layer].weights
    st.plotly_chart(viz_qat.weight_change(before, after, fake_quantize(before, spec), fake_quantize(after, spec), layer),
                    key="qat_weights", width="stretch")

size, base_size = result.workload.size(recipe), w.size(recipe)
points = [{"label": "FP32", "size_bytes": base_size["fp32_bytes"], "metric": fp32},
          {"label": f"PTQ {recipe.name}", "size_bytes": base_size["size_bytes"], "metric": ptq},
          {"label": f"QAT {recipe.name}", "size_bytes": size["size_bytes"], "metric": qat}]
front = search.pareto_front(points, w.task.higher_is_better)
st.plotly_chart(viz_decide.tradeoff_scatter(points, front, head, w.task.higher_is_better), key="qat_tradeoff", width="stretch")
st.caption(f"QAT changes the weights, not their format: {size['size_bytes']:,} bytes under {plain(recipe.name)}, PTQ "
           f"{base_size['size_bytes']:,} (a difference is the BatchNorm parameters, folded into the convolutions). The command line "
           f"reproduces the run: `python -m qcore qat MODEL --recipe FILE --epochs {config.epochs} --lr {config.lr:g}"
           f"{' --learn-scales' if learn else ''} --out DIR`.")
with tempfile.TemporaryDirectory() as tmp:
    files = save(result.workload, w, recipe, tmp)
    st.download_button("Download the fine-tuned weights (safetensors)", Path(files["weights"]).read_bytes(),
                       file_name=f"{w.name}-qat.safetensors", key="qat_download")
if st.button("Export the QAT model to ONNX", key="qat_onnx", icon=":material/download:",
             help="the fine-tuned model under the recipe, written as the file the simulation describes, then run in "
                  "ONNX Runtime on the evaluation data"):
    with tempfile.TemporaryDirectory() as tmp, st.spinner("Exporting and running the file in ONNX Runtime…"):
        report = export(result.workload, recipe, "onnx", str(Path(tmp) / "qat.onnx"))
        st.caption("  \n".join(plain(line) for line in report.summary_lines()))
        st.download_button("Download the QAT model (ONNX)", (Path(tmp) / "qat.onnx").read_bytes(),
                           file_name=f"{w.name}-qat.onnx", key="qat_onnx_download")
