"""Figures of the workshop lessons (plain data in, Plotly figure out); the explore pages' figures live in ``viz``.

- ``labelled_bars``: one bar per option with its value printed on it (sizes, SQNRs, accuracies, speed-ups);
- ``number_line``: the grid a value is rounded to, the value and where it lands.

Every figure keeps its labels apart at 1280x720: category names go on the y axis of horizontal bars (never
rotated x ticks), titles are short and the value texts sit inside or just outside their bars.
"""

from __future__ import annotations

import plotly.graph_objects as go

from qcore.figures.viz import BAR_COLOR, GRID_COLOR, WORST_COLOR, _layout, plain

HIGHLIGHT_COLOR = "#2ca02c"


def labelled_bars(labels: list[str], values: list[float], texts: list[str], title: str, x_title: str,
                  highlight: str | None = None, reference: tuple[str, float] | None = None) -> go.Figure:
    """Horizontal bars, ``labels`` top to bottom, each with its ``texts`` entry; the ``highlight`` label in green;
    ``reference`` ``(name, value)`` a dashed vertical line (e.g. FP32's accuracy)."""
    colors = [HIGHLIGHT_COLOR if label == highlight else BAR_COLOR for label in labels]
    fig = go.Figure(go.Bar(y=[plain(l) for l in labels], x=values, orientation="h", marker_color=colors, name=x_title,
                           text=[plain(t) for t in texts], textposition="auto", cliponaxis=False,
                           hovertemplate="%{y}: %{x:.4g}<extra></extra>"))
    if reference is not None:
        fig.add_shape(type="line", x0=reference[1], x1=reference[1], y0=0, y1=1, yref="paper", name=plain(reference[0]),
                      showlegend=True, line=dict(color=WORST_COLOR, dash="dash", width=2))
    fig.update_yaxes(autorange="reversed", type="category", automargin=True)
    return _layout(fig, title, x_title, height=max(260, 110 + 42 * len(labels)))


def number_line(levels: list[float], x: float, x_hat: float, lo: float, hi: float, title: str) -> go.Figure:
    """The representable values ``levels`` (ticks), the clip range ``[lo, hi]``, the value ``x`` (red) and the
    level it is rounded to, ``x_hat`` (green), on one horizontal axis."""
    fig = go.Figure([
        go.Scatter(x=levels, y=[0] * len(levels), mode="markers", name="representable values",
                   marker=dict(symbol="line-ns-open", size=22, color=GRID_COLOR, line=dict(width=2)),
                   hovertemplate="%{x:.4g}<extra>representable</extra>"),
        go.Scatter(x=[x], y=[0.35], mode="markers", name=f"x = {x:.4g}", marker=dict(size=14, color=WORST_COLOR),
                   hovertemplate="x = %{x:.4g}<extra></extra>"),
        go.Scatter(x=[x_hat], y=[-0.35], mode="markers", name=f"x̂ = {x_hat:.4g}",
                   marker=dict(size=14, color=HIGHLIGHT_COLOR, symbol="diamond"),
                   hovertemplate="x̂ = %{x:.4g}<extra></extra>"),
    ])
    for i, edge in enumerate((lo, hi)):
        fig.add_shape(type="line", x0=edge, x1=edge, y0=0, y1=1, yref="paper", name="clip range", legendgroup="clip",
                      showlegend=i == 0, line=dict(color="#1f77b4", dash="dash", width=2))
    fig.update_yaxes(visible=False, range=[-1, 1])
    return _layout(fig, title, "value", height=240)
