"""The weight error of nearest rounding vs a rounding algorithm (GPTQ, AdaRound): a pure figure.

Nearest rounding's error is spread evenly over half a step either side (|w' - w| <= 0.5 step, except
where it clips); GPTQ and AdaRound accept larger errors on single weights (beyond half a step) so that
the layer's *output* error is smaller -- the histogram shows where the rounding changed.
"""

from __future__ import annotations

import plotly.graph_objects as go

from qcore.figures.viz import _layout

COLORS = ("#9aa5b1", "#d62728")


def weight_error_histogram(errors: dict[str, list[float]], title: str = "Weight error") -> go.Figure:
    """Overlaid histograms of each named list of weight errors ``w' - w`` in steps (the block's scale);
    the first list is the reference (grey), the second the remedy (red)."""
    fig = go.Figure()
    for (name, values), color in zip(errors.items(), COLORS * len(errors)):
        fig.add_trace(go.Histogram(x=values, name=name, marker_color=color, opacity=0.6, xbins={"size": 0.05},
                                   hovertemplate="error %{x} steps: %{y} weights<extra>" + name + "</extra>"))
    fig.update_layout(barmode="overlay")
    return _layout(fig, title, "w' - w (steps of the block's scale)", "weights")
