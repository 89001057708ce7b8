"""Where a runtime spent its time: ``time_by_op(rows, title)`` -> a horizontal bar per op type, coloured by the
precision it computed in (rows as ``qcore.export.profile.group_ops`` returns them: op, precision, nodes, ms, share)."""

from __future__ import annotations

import plotly.graph_objects as go

COLOURS = {"int8": "#2a9d8f", "int4/int8 weights, float compute": "#e9c46a", "(de)quantize": "#f4a261",
           "bf16": "#8ab17d", "f16": "#8ab17d", "f32": "#e76f51", "data movement": "#adb5bd"}


def time_by_op(rows: list[dict], title: str) -> go.Figure:
    """Milliseconds per run for each (op, precision), largest at the top; one legend entry per precision."""
    fig = go.Figure()
    ordered = sorted(rows, key=lambda r: r["ms"])
    for precision in dict.fromkeys(r["precision"] for r in ordered):
        mine = [r for r in ordered if r["precision"] == precision]
        fig.add_bar(y=[f"{r['op']} ({r['precision']})" for r in mine], x=[r["ms"] for r in mine], orientation="h",
                    name=precision, marker_color=COLOURS.get(precision, "#6c757d"),
                    customdata=[[r["nodes"], 100 * r["share"]] for r in mine],
                    hovertemplate="%{y}: %{x:.3g} ms per run, %{customdata[0]} node(s), %{customdata[1]:.1f}%<extra></extra>")
    fig.update_layout(title=title, xaxis_title="ms per run (measured)", barmode="stack",
                      height=max(260, 26 * len(rows) + 120), margin=dict(l=10, r=10, t=50, b=40),
                      yaxis=dict(categoryorder="array", categoryarray=[f"{r['op']} ({r['precision']})" for r in ordered]))
    return fig
