"""Plotly figures for the app: pure functions, numbers in, ``plotly.graph_objects.Figure`` out.

The numbers come from ``qcore.analysis.explain`` / ``qcore.analysis.summary``; nothing here quantizes. Conventions
every figure shares, so tests (and readers) can find things:

- a clipping range is a pair of vertical line shapes named after its range method (``minmax``,
  ``percentile``, ``mse``, ``entropy``, ``moving_average``) at ``x0 == lo`` and ``x0 == hi``;
- histograms are one ``go.Scatter`` named ``"values"`` tracing the top of the bins: bin ``i`` is the
  segment from ``x[2i]`` (its left edge) to ``x[2i + 1]`` (its right edge) at height ``y[2i] == y[2i + 1]``
  (its count), filled down to zero;
- representable values are a ``go.Scatter`` named ``"representable values"`` on a strip under the
  histogram, one vertical tick per value: value ``k`` is ``x[3k] == x[3k + 1] == x[3k + 2]``, the line going
  from y 0 up to 1 and back (at most ``MAX_DRAWN_LEVELS`` are drawn; the legend says when fewer are shown).

Figures are light to draw because a browser redraws them on every change: a trace of many items is one SVG
path (a histogram of 120 bins drawn as 120 ``go.Bar`` rectangles is 240 SVG elements, as one outline it is
one), and the base margin leaves room for the labels (``MARGIN``), so Plotly draws a figure once, not twice.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

MAX_DRAWN_LEVELS = 1024
METHOD_COLORS = {"minmax": "#1f77b4", "percentile": "#ff7f0e", "mse": "#2ca02c", "entropy": "#d62728",
                 "moving_average": "#9467bd", "static (calibrated)": "#1f77b4"}
METHOD_DASHES = {"minmax": "solid", "percentile": "dash", "mse": "dashdot", "entropy": "dot", "moving_average": "longdash"}
FIELD_COLORS = {"sign": "#d62728", "exponent": "#2ca02c", "mantissa": "#1f77b4"}
DATA_COLOR, GRID_COLOR, WORST_COLOR, BAR_COLOR = "#9aa5b1", "#111827", "#d62728", "#4c78a8"
HEIGHT = 360


def plain(name) -> str:
    """A user-derived name (layer, recipe, class) as Plotly text: Plotly renders a subset of HTML (``<b>``,
    ``<a href>``) in labels, hover text and titles, so ``<``, ``>`` and ``&`` are escaped."""
    return html.escape(str(name), quote=False)


def human_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'`` (binary units; bytes below 1 KiB are exact)."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


# The base margin (pixels) already holds the usual tick labels and axis titles. Plotly's automargin still widens
# it where labels need more, but when it has to, Plotly draws the whole figure a second time: with l=10, b=10
# every chart paid that (a third of Plotly's work when a chart is redrawn, in a Chromium profile).
MARGIN = dict(l=80, r=10, t=60, b=65)


def label_margin(labels, title: bool = False) -> int:
    """Left margin (pixels) for horizontal tick ``labels`` (and a y-axis title): ~6 px per character, a little more
    than Plotly's 12 px font takes for names like ``bert.encoder.layer.5.attention.output.dense`` (43 characters:
    229 px), so automargin rarely has to widen it (and draw the figure again); never below ``MARGIN["l"]``."""
    return max(MARGIN["l"], 16 + 6 * max((len(str(label)) for label in labels), default=0) + (40 if title else 0))


def _layout(fig: go.Figure, title: str, x_title: str = "", y_title: str = "", height: int = HEIGHT) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=MARGIN,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    fig.update_xaxes(exponentformat="power")  # 10⁻⁴, not Plotly's SI "100µ" that reads as a unit
    fig.update_yaxes(exponentformat="power")
    if x_title:
        fig.update_xaxes(title_text=x_title)
    if y_title:
        fig.update_layout(yaxis_title_text=y_title)  # the primary axis only: a secondary (yaxis2) keeps its own title
    return fig


def _below(fig: go.Figure) -> go.Figure:
    """The legend under the plot instead of above it: in a half-width column a legend of several entries wraps and
    would cover the title (or a subplot's title)."""
    return fig.update_layout(legend=dict(orientation="h", yref="container", yanchor="bottom", y=0.0, xanchor="left", x=0.0),
                             margin={**MARGIN, "b": MARGIN["b"] + 45})


def _range_lines(fig: go.Figure, ranges: dict[str, tuple[float, float]]) -> None:
    """One pair of full-height vertical lines per range method, one legend entry each."""
    for method, (lo, hi) in ranges.items():
        color = METHOD_COLORS.get(method, "#555")
        for i, x in enumerate((lo, hi)):
            fig.add_shape(type="line", x0=x, x1=x, y0=0, y1=1, xref="x", yref="paper", name=method,
                          legendgroup=method, showlegend=i == 0, line=dict(color=color, width=2, dash=METHOD_DASHES.get(method, "dash")))


def _pairs(a: np.ndarray) -> np.ndarray:
    """``[a0, a0, a1, a1, ...]``: each value twice, the two ends of a flat segment."""
    return np.repeat(a, 2)


def _histogram_outline(counts, edges, name: str = "values") -> go.Scatter:
    """Counts (B,) over edges (B+1,) as one filled outline: bin i is the segment [edges[i], edges[i+1]] at its count
    (2B points; the hover shows the bin's edges and count)."""
    e, c = _np(edges).astype(float), _np(counts).astype(float)
    bins = np.column_stack([e[:-1], e[1:]])  # (B, 2): each bin's left and right edge
    return go.Scatter(x=bins.reshape(-1), y=np.repeat(c, 2), name=name, mode="lines", fill="tozeroy",
                      fillcolor=DATA_COLOR, line=dict(color=DATA_COLOR, width=1), customdata=np.repeat(bins, 2, axis=0),
                      hovertemplate="[%{customdata[0]:.4g}, %{customdata[1]:.4g}): %{y:,.0f}<extra></extra>")


def _ticks(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x, y of one vertical tick (y 0 up to 1 and back) per level, joined along y = 0 like a ruler's:
    ``x = [l0, l0, l0, l1, l1, l1, ...]``, ``y = [0, 1, 0, 0, 1, 0, ...]``. No gaps, so Plotly draws one SVG path
    (a gap would start a new one, a marker per level is one each)."""
    return np.repeat(levels, 3), np.tile([0.0, 1.0, 0.0], len(levels))


def distribution(counts, edges, ranges: dict[str, tuple[float, float]] | None = None, levels=None,
                 title: str = "", x_title: str = "value", log_y: bool = False) -> go.Figure:
    """Histogram of values (``counts`` (B,) over ``edges`` (B+1,)) with each method's clipping range
    as vertical lines and, if ``levels`` is given, the representable values on a strip below."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.85, 0.15], vertical_spacing=0.02)
    fig.add_trace(_histogram_outline(counts, edges), row=1, col=1)
    if levels is not None:
        lv = _np(levels).astype(float)
        stride = max(1, int(np.ceil(len(lv) / MAX_DRAWN_LEVELS)))
        name = "representable values" if stride == 1 else f"representable values (every {stride}th of {len(lv):,})"
        x, y = _ticks(lv[::stride])
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name, line=dict(color=GRID_COLOR, width=1),
                                 hovertemplate="%{x:.5g}<extra>representable</extra>"), row=2, col=1)
    _range_lines(fig, ranges or {})
    fig.update_yaxes(type="log" if log_y else "linear", title_text="count", row=1, col=1)
    fig.update_yaxes(visible=False, range=[0, 1], row=2, col=1)
    fig.update_xaxes(title_text=x_title, row=2, col=1)
    return _layout(fig, title, height=HEIGHT + 60)


def bit_layout(layouts: dict[str, list[tuple[str, int]]]) -> go.Figure:
    """One horizontal bar per format (name -> [(field, bits)], most significant first), split into
    its fields; the bar's length is the bits per value."""
    fig = go.Figure()
    names = list(layouts)
    for name in names:
        start = 0
        for field, bits in layouts[name]:
            key = field.split(" ")[0]
            fig.add_trace(go.Bar(y=[name], x=[bits], base=start, orientation="h", name=field, legendgroup=field,
                                 showlegend=not any(t.name == field for t in fig.data),
                                 marker=dict(color=FIELD_COLORS.get(key, "#7f7f7f"), line=dict(color="white", width=2)),
                                 text=(f"{field} {bits}" if bits >= 2 * len(field) / 3 else str(bits)) if bits > 1 else "s",
                                 textposition="inside",  # a narrow field shows its bit count only (the legend names it)
                                 insidetextanchor="middle", hovertemplate=f"{name}: {field}, {bits} bits<extra></extra>"))
            start += bits
    fig.update_layout(barmode="overlay", yaxis=dict(autorange="reversed"))
    return _below(_layout(fig, "Bits of one stored value", "bits", height=150 + 45 * len(names)))


def sqnr_vs_bits(rows: list[dict]) -> go.Figure:
    """Error against bit width (rows of ``explain.bitwidth_sweep``): SQNR (dB) left, MSE (log) right."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("SQNR (dB, higher is better)", "mean squared error (log)"))
    for method in dict.fromkeys(r["range"] for r in rows):
        rs = [r for r in rows if r["range"] == method]
        style = dict(color=METHOD_COLORS.get(method), width=2)
        bits = [r["bits"] for r in rs]
        fig.add_trace(go.Scatter(x=bits, y=[r["sqnr_db"] for r in rs], name=method, legendgroup=method,
                                 mode="lines+markers", line=style), row=1, col=1)
        fig.add_trace(go.Scatter(x=bits, y=[r["mse"] for r in rs], name=method, legendgroup=method, showlegend=False,
                                 mode="lines+markers", line=style), row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="bits", dtick=1)
    return _below(_layout(fig, "Integer grids: error against bit width (per-tensor)", height=HEIGHT + 40))


def clipping_tradeoff(result: dict) -> go.Figure:
    """Rounding, clipping and total error against the clip threshold (``explain.clipping_tradeoff``),
    with the threshold each range method picks marked on the total."""
    fig = go.Figure()
    t = result["threshold"]
    for key, color, dash in (("rounding", "#4c78a8", "dot"), ("clipping", "#f58518", "dot"), ("total", "#111827", "solid")):
        fig.add_trace(go.Scatter(x=t, y=result[key], name=f"{key} error", mode="lines", line=dict(color=color, dash=dash, width=2)))
    for method, m in result["methods"].items():
        fig.add_trace(go.Scatter(x=[m["threshold"]], y=[m["total"]], name=method, mode="markers",  # named in the legend:
                                 marker=dict(size=12, color=METHOD_COLORS.get(method),  # methods often pick ~one t
                                             line=dict(color="white", width=1)),
                                 hovertemplate=f"{method}: t %{{x:.4g}}, total error %{{y:.3g}}<extra></extra>"))
    fig.update_yaxes(type="log")
    return _layout(fig, "Where to clip: rounding error against clipping error", "clip threshold t (range [-t, t])",
                   "mean squared error (log)")


def error_histogram(counts, edges, step: float | None = None) -> go.Figure:
    """Histogram of the quantization error w' - w; ``step`` (the grid spacing) marks +-step/2, the
    largest error rounding alone can make on a uniform grid."""
    fig = go.Figure(_histogram_outline(counts, edges))
    if step:
        for i, x in enumerate((-step / 2, step / 2)):
            fig.add_shape(type="line", x0=x, x1=x, y0=0, y1=1, yref="paper", name="± step / 2", legendgroup="half",
                          showlegend=i == 0, line=dict(color="#555", dash="dot"))
    return _layout(fig, "Quantization error w' − w", "error", "count")


def channel_ranges(result: dict, per_tensor: tuple[float, float] | None = None) -> go.Figure:
    """Each output channel's [min, max] (``explain.channel_ranges``, widest first) as a band: channel ``r`` of the
    sorted order spans x from r - 0.5 to r + 0.5, between the trace ``"channel min"`` and the filled trace
    ``"channel range"`` above it (2 points per channel each, like a histogram's outline: one SVG path per trace
    however many channels); the one range a per-tensor scale must cover is drawn across."""
    mn, mx = _np(result["min"]).astype(float), _np(result["max"]).astype(float)
    rank = np.arange(len(mn), dtype=float)
    x = np.column_stack([rank - 0.5, rank + 0.5]).reshape(-1)
    hover = np.repeat(np.column_stack([_np(result["channel"]), mn, mx]), 2, axis=0)  # (2C, 3): channel, min, max
    line = dict(color=BAR_COLOR, width=1)
    fig = go.Figure([go.Scatter(x=x, y=np.repeat(mn, 2), name="channel min", mode="lines", line=line, showlegend=False,
                                hoverinfo="skip"),
                     go.Scatter(x=x, y=np.repeat(mx, 2), name="channel range", mode="lines", line=line, fill="tonexty",
                                fillcolor=BAR_COLOR, customdata=hover,
                                hovertemplate="channel %{customdata[0]}: [%{customdata[1]:.4g}, %{customdata[2]:.4g}]"
                                              "<extra></extra>")])
    lo, hi = per_tensor if per_tensor else (result["tensor_min"], result["tensor_max"])
    for i, y in enumerate((lo, hi)):
        fig.add_shape(type="line", x0=0, x1=1, xref="paper", y0=y, y1=y, name="per-tensor range", legendgroup="tensor",
                      showlegend=i == 0, line=dict(color=WORST_COLOR, dash="dash", width=2))
    return _layout(fig, "Per-channel ranges (widest first) against the per-tensor range", "output channel (sorted)", "weight value")


def layer_sqnr(rows: list[dict]) -> go.Figure:
    """SQNR per layer (rows of ``explain.layer_sqnr``), the worst layer in red."""
    names = [plain(r["name"]) for r in rows]
    values = [r["sqnr_db"] for r in rows]
    worst = int(np.argmin(values)) if values else -1
    colors = [WORST_COLOR if i == worst else BAR_COLOR for i in range(len(rows))]
    fig = go.Figure(go.Bar(x=names, y=values, marker_color=colors, name="SQNR (dB)",
                           text=[f"{v:.1f}" for v in values], textposition="outside"))
    return _layout(fig, "Weight SQNR per layer (worst in red)", "layer", "SQNR (dB)")


def preset_sizes(rows: list[dict]) -> go.Figure:
    """Model size under each preset (rows of ``summary.preset_sizes``), labelled with the fraction of FP32: one
    horizontal bar per preset, first at the top (names stay readable however many presets there are)."""
    fp32 = max(r["size_bytes"] for r in rows)
    unit, div = ("MiB", 2**20) if fp32 >= 2**20 else ("KiB", 1024)
    fig = go.Figure(go.Bar(y=[r["preset"] for r in rows], x=[r["size_bytes"] / div for r in rows], orientation="h",
                           marker_color=BAR_COLOR, name="size", customdata=[r["size_bytes"] for r in rows],
                           text=[f"{human_bytes(r['size_bytes'])} ({100 * r['fraction_of_fp32']:.0f}%)" for r in rows],
                           textposition="outside", cliponaxis=False,
                           hovertemplate="%{y}: %{customdata:,} bytes<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(range=[0, 1.3 * fp32 / div])  # room for the labels outside the longest bar
    return _layout(fig, "Model size under each preset (share of FP32)", f"size ({unit})", "preset",
                   height=max(HEIGHT, 28 * len(rows) + 120))


def outlier_channels(result: dict) -> go.Figure:
    """Max |x| per input channel, largest first (``explain.outlier_channels``), with the median."""
    a = _np(result["absmax"]).astype(float)
    fig = go.Figure(go.Bar(x=np.arange(len(a)), y=a, name="channel max |x|", customdata=_np(result["channel"]),
                           marker=dict(color=BAR_COLOR, line=dict(width=0)),
                           hovertemplate="channel %{customdata}: %{y:.4g}<extra></extra>"))
    fig.add_shape(type="line", x0=0, x1=1, xref="paper", y0=result["median"], y1=result["median"], name="median channel",
                  showlegend=True, line=dict(color=WORST_COLOR, dash="dash", width=2))
    fig.update_layout(bargap=0.05)
    return _layout(fig, f"Channels by max |x| (largest is {result['ratio']:.1f}× the median)", "input channel (sorted)", "max |x|")


def static_vs_dynamic(batch_ranges: list[tuple[float, float]], static: dict[str, tuple[float, float]]) -> go.Figure:
    """Each batch's own [min, max] (what a dynamic quantizer uses) as bars, and the fixed ranges of
    static quantization (name -> (lo, hi)) as horizontal lines across."""
    lo = np.array([r[0] for r in batch_ranges], dtype=float)
    hi = np.array([r[1] for r in batch_ranges], dtype=float)
    fig = go.Figure(go.Bar(x=np.arange(1, len(lo) + 1), y=hi - lo, base=lo, name="dynamic: range of each batch",
                           marker=dict(color=DATA_COLOR, line=dict(width=0)),
                           hovertemplate="batch %{x}: [%{base:.4g}, +%{y:.4g}]<extra></extra>"))
    for method, (a, b) in static.items():
        for i, y in enumerate((a, b)):
            fig.add_shape(type="line", x0=0, x1=1, xref="paper", y0=y, y1=y, name=f"static: {method}", legendgroup=method,
                          showlegend=i == 0, line=dict(color=METHOD_COLORS.get(method, "#555"), dash="dash", width=2))
    fig.update_layout(bargap=0.15)
    return _layout(fig, "Static (one calibrated range) against dynamic (a range per batch)", "batch", "input value")
