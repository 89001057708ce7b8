"""Figures of quantization-aware training (plain data in, Plotly figure out).

- ``training_curve``: per epoch, the evaluation metric (left axis) and the training / calibration losses
  (right axis), PTQ's metric as a dashed line; epoch 0 is PTQ itself.
- ``weight_change``: histograms of one layer's weights before and after fine-tuning (same bins), and the
  PTQ / QAT quantized values they become.
- ``per_class_three``: per-class accuracy of FP32, PTQ and QAT side by side.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from qcore.figures.decide import FP32_COLOR
from qcore.figures.viz import BAR_COLOR, _layout, plain

QAT_COLOR = "#2ca02c"


def training_curve(history: list[dict], metric: str, ptq_metric: float) -> go.Figure:
    """``history``: rows with ``epoch``, ``metric``, ``train_loss`` (None at epoch 0), ``calibration_loss``."""
    epochs = [h["epoch"] for h in history]
    fig = go.Figure([
        go.Scatter(x=epochs, y=[h["metric"] for h in history], name=f"{plain(metric)} (evaluation)", mode="lines+markers",
                   line={"color": QAT_COLOR}),
        go.Scatter(x=epochs, y=[h["train_loss"] for h in history], name="training loss", mode="lines+markers",
                   yaxis="y2", line={"color": BAR_COLOR, "dash": "dot"}),
        go.Scatter(x=epochs, y=[h["calibration_loss"] for h in history], name="calibration loss", mode="lines+markers",
                   yaxis="y2", line={"color": "#9467bd", "dash": "dot"}),
    ])
    fig.add_hline(y=ptq_metric, line_dash="dash", line_color=FP32_COLOR, name="PTQ",
                  annotation_text=f"PTQ {ptq_metric:.4f}", annotation_position="bottom right")
    fig.update_layout(yaxis2={"title": "loss", "overlaying": "y", "side": "right", "rangemode": "tozero"})
    fig.update_xaxes(dtick=1)
    return _layout(fig, "Training curve (epoch 0 = PTQ)", "epoch", plain(metric))


def weight_change(before, after, before_q, after_q, layer: str, bins: int = 60) -> go.Figure:
    """Histograms (shared bins) of a layer's float weights before and after QAT, and of the quantized values
    each becomes under the recipe (``before_q`` = PTQ's, ``after_q`` = QAT's). Arrays of any shape."""
    arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in (before, after, before_q, after_q)]
    lo, hi = min(a.min() for a in arrays), max(a.max() for a in arrays)
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    centers = (edges[1:] + edges[:-1]) / 2
    fig = go.Figure()
    for a, name, color, kind in ((arrays[0], "before (FP32)", FP32_COLOR, "bar"), (arrays[1], "after QAT (float)", QAT_COLOR, "bar"),
                                 (arrays[2], "PTQ quantized", FP32_COLOR, "line"), (arrays[3], "QAT quantized", QAT_COLOR, "line")):
        counts = np.histogram(a, edges)[0]
        if kind == "bar":
            fig.add_trace(go.Bar(x=centers, y=counts, name=name, marker_color=color, opacity=0.55))
        else:
            fig.add_trace(go.Scatter(x=centers, y=counts, name=name, mode="lines", line={"color": color, "dash": "dot"}))
    fig.update_layout(barmode="overlay", bargap=0)
    return _layout(fig, f"Weights of {plain(layer)} before and after fine-tuning", "weight value", "count")


def per_class_three(fp32: list, ptq: list, qat: list, class_names: list[str] | None) -> go.Figure:
    names = [plain(n) for n in class_names] if class_names else [str(i) for i in range(len(fp32))]
    fig = go.Figure([go.Bar(x=names, y=v, name=n, marker_color=c)
                     for v, n, c in ((fp32, "FP32", FP32_COLOR), (ptq, "PTQ", BAR_COLOR), (qat, "QAT", QAT_COLOR))])
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category")
    return _layout(fig, "Accuracy per class: FP32, PTQ and QAT", "class", "accuracy")
