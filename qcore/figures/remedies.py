"""Figures of the remedies: per-channel maxima before and after SmoothQuant, channel ranges before and after CLE.
Plain lists in, a Plotly figure out."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def smoothquant_channels(act_before, act_after, weight_before, weight_after, title: str) -> go.Figure:
    """Two panels over the input channels (in channel order): max |x| of the activation and max |W| of the weight
    column, before and after SmoothQuant migrates range from the one into the other."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("activation: max |x| per input channel", "weight: max |W| per input channel"))
    x = list(range(len(act_before)))
    for row, (before, after) in enumerate([(act_before, act_after), (weight_before, weight_after)], start=1):
        fig.add_trace(go.Bar(x=x, y=before, name="before", marker_color="#c0392b", showlegend=row == 1,
                             legendgroup="before"), row=row, col=1)
        fig.add_trace(go.Bar(x=x, y=after, name="after SmoothQuant", marker_color="#2471a3", showlegend=row == 1,
                             legendgroup="after"), row=row, col=1)
    fig.update_layout(title=title, barmode="overlay", height=460, margin={"t": 70, "b": 40})
    fig.update_traces(opacity=0.7)
    fig.update_xaxes(title_text="input channel", row=2, col=1)
    return fig


def cle_ranges(producer_before, producer_after, consumer_before, consumer_after, title: str) -> go.Figure:
    """Per channel between the two layers: the range (max |W|) of the first layer's output row and of the second
    layer's input column, before and after equalization (after: both equal their geometric mean)."""
    x = list(range(len(producer_before)))
    fig = go.Figure()
    for y, name, color, dash in [(producer_before, "first layer, before", "#c0392b", "dot"),
                                 (consumer_before, "second layer, before", "#e67e22", "dot"),
                                 (producer_after, "first layer, after CLE", "#2471a3", "solid"),
                                 (consumer_after, "second layer, after CLE", "#17a589", "solid")]:
        fig.add_trace(go.Scatter(x=x, y=y, name=name, mode="lines+markers", line={"color": color, "dash": dash}))
    fig.update_layout(title=title, xaxis_title="channel", yaxis_title="max |W|", yaxis_type="log", height=380)
    return fig
