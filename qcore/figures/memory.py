"""The memory calculator's figure: weights and KV cache in GB per format, one panel per model.

Data in (``qcore.analysis.memory.memory_table`` rows: ``model``, ``format``, ``weight_gb``, ``kv_cache_gb``), a
Plotly figure out. Each panel has its own y axis (a 1B and a 70B model differ 70-fold); the bars stack the
weights (trace ``"weights"``) and the KV cache (trace ``"KV cache"``), both in GB = 10^9 bytes.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

WEIGHT_COLOR, KV_COLOR = "#4c78a8", "#f58518"


def memory_bars(rows: list[dict], height: int = 340) -> go.Figure:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, horizontal_spacing=0.06)
    for i, model in enumerate(models, start=1):
        mine = [r for r in rows if r["model"] == model]
        x = [r["format"] for r in mine]
        for name, key, color in (("weights", "weight_gb", WEIGHT_COLOR), ("KV cache", "kv_cache_gb", KV_COLOR)):
            fig.add_trace(go.Bar(x=x, y=[r[key] for r in mine], name=name, marker_color=color, showlegend=i == 1,
                                 legendgroup=name, hovertemplate=f"{model} %{{x}}: %{{y:.4g}} GB {name}<extra></extra>"),
                          row=1, col=i)
    fig.update_layout(barmode="stack", height=height, margin=dict(t=40, b=30, l=40, r=10),
                      legend=dict(orientation="h", y=-0.15))
    fig.update_yaxes(title_text="GB (10^9 bytes)", row=1, col=1)
    return fig
