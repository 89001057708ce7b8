"""Plotly figures for the app's decide pages (Sensitivity, Trade-offs, Export report): pure functions,
numbers in, ``plotly.graph_objects.Figure`` out. The explore pages' figures live in ``viz``.

Inputs are plain data from the caller: sweep rows (``SweepRow.to_dict()``) and points
``{"label", "size_bytes", "metric", "latency_ms"?, "latency_source"? ("measured" | "estimate")}``.
Sizes are bytes (axes show KiB or MiB); a metric's direction comes from ``higher_is_better``.
"""

from __future__ import annotations

import plotly.graph_objects as go

from qcore.figures.viz import BAR_COLOR, HEIGHT, MARGIN, WORST_COLOR, _layout, human_bytes, label_margin, plain

FRONT_COLOR, OTHER_COLOR, FP32_COLOR = "#d62728", "#9aa5b1", "#111827"


def _signed(v: float, digits: int = 4) -> str:
    """``v`` with its sign to ``digits`` decimals; anything that rounds to zero is "0.0000" (never "-0.0000")."""
    text = f"{v:+.{digits}f}"
    return text[1:] if float(text) == 0 else text.replace("-", "−")


def _size_unit(largest: float) -> tuple[str, float]:
    return ("MiB", 2**20) if largest >= 2**20 else ("KiB", 1024.0)


def widest_spread(rows: list[dict]) -> str:
    """The candidate whose layers' metric drops differ most (largest max - min of ``metric_drop``): the
    one whose ranking tells the layers apart. A candidate that costs nothing anywhere ranks nothing."""
    drops: dict[str, list[float]] = {}
    for r in rows:
        drops.setdefault(r["candidate"], []).append(r["metric_drop"])
    return max(drops, key=lambda c: max(drops[c]) - min(drops[c]))  # on a tie the first candidate


def sensitivity_heatmap(rows: list[dict], value: str = "metric_drop") -> go.Figure:
    """Layers (rows, in model order) × candidates (columns); each cell shows ``value`` of its sweep row
    (``metric_drop``: positive = worse). Colour is per column: the value over the column's largest
    |value| (-1..1, red = worse), so one harsh candidate does not wash out the others; the hover
    and the cell text give the value itself. Cells a candidate does not change are left blank."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    candidates = list(dict.fromkeys(r["candidate"] for r in rows))
    cell = {(r["layer"], r["candidate"]): r for r in rows}
    values = [[cell[(l, c)][value] if (l, c) in cell and cell[(l, c)]["changed"] else None for c in candidates]
              for l in layers]
    largest = [max((abs(row[j]) for row in values if row[j] is not None), default=0.0) for j in range(len(candidates))]
    z = [[None if v is None else (v / m if m else 0.0) for v, m in zip(row, largest)] for row in values]
    fig = go.Figure(go.Heatmap(z=z, zmin=-1.0, zmax=1.0, colorscale="RdBu_r", customdata=values, name=value,
                               text=[["" if v is None else _signed(v) for v in row] for row in values],
                               texttemplate="%{text}", x=[plain(c) for c in candidates], y=[plain(l) for l in layers],
                               colorbar=dict(title="share of the<br>column's largest"),
                               hovertemplate="%{y} under %{x}: %{customdata:.4g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    _layout(fig, f"{value.replace('_', ' ')} per layer and candidate (colour: per candidate; blank: changes nothing)",
            "candidate", "layer", height=max(300, 120 + 26 * len(layers)))
    # room for the layer names, the colour bar (~130 px) and the candidate names: no second draw by automargin
    return fig.update_layout(margin={**MARGIN, "l": label_margin(layers, title=True), "r": 140, "b": 75})


def ranked_drops(rows: list[dict], candidate: str, metric: str = "metric") -> go.Figure:
    """Metric drop of each layer under ``candidate``, most sensitive first (sweep ``rank`` order)."""
    rs = sorted((r for r in rows if r["candidate"] == candidate), key=lambda r: r["rank"])
    drops = [r["metric_drop"] for r in rs]
    colors = [WORST_COLOR if i == 0 else BAR_COLOR for i in range(len(rs))]
    fig = go.Figure(go.Bar(y=[plain(r["layer"]) for r in rs], x=drops, orientation="h", marker_color=colors, name="metric drop",
                           customdata=[r["sqnr_db"] for r in rs], text=[_signed(d) for d in drops], textposition="outside",
                           hovertemplate="%{y}: drop %{x:.4g}, output SQNR %{customdata:.1f} dB<extra></extra>"))
    fig.update_yaxes(autorange="reversed", type="category")
    lo, hi = min([0.0, *drops]), max([0.0, *drops])
    room = 0.18 * ((hi - lo) or 1.0)  # the bars' value labels sit outside their ends: keep them inside the plot
    fig.update_xaxes(range=[lo - room if lo < 0 else lo, hi + room if hi > 0 or lo == 0 else hi])
    _layout(fig, f"Layers ranked by {metric} drop under {plain(candidate)} (most sensitive first)",
            f"{metric} drop (positive = worse)", height=max(300, 120 + 26 * len(rs)))
    return fig.update_layout(margin={**MARGIN, "l": label_margin(r["layer"] for r in rs)})  # room for the names


# Where a point's label may go, in the order tried: Plotly ``textposition`` values.
LABEL_POSITIONS = ("top center", "bottom center", "middle right", "middle left", "top right", "bottom right",
                   "top left", "bottom left")
SCATTER_HEIGHT = HEIGHT + 40  # the trade-off scatter's figure height (px): room for its point labels
# the plotting area in pixels: a page column (~730 px) less the side margins; the height less the top/bottom margins
PLOT_PX = (640.0, float(SCATTER_HEIGHT - MARGIN["t"] - MARGIN["b"]))
LABEL_CHARS = 28  # a longer recipe label is cut to this many characters on the chart ("…" last); hover has it whole
PAD = 0.12  # each axis extends this share of the data's span beyond it on both sides: room for the outer labels
CHAR_PX, LINE_PX, GAP_PX = 7.0, 16.0, 7.0  # a 12 px label's mean character width and line height; marker radius + 1


def label_box(px: float, py: float, chars: int, position: str) -> tuple[float, float, float, float]:
    """The box ``(x0, y0, x1, y1)`` in pixels (y up) a label of ``chars`` characters takes at ``position`` beside a
    marker at ``(px, py)``."""
    width = CHAR_PX * chars
    vertical, horizontal = position.split()
    y0 = {"top": py + GAP_PX, "bottom": py - GAP_PX - LINE_PX, "middle": py - LINE_PX / 2}[vertical]
    x0 = {"center": px - width / 2, "right": px + GAP_PX, "left": px - GAP_PX - width}[horizontal]
    return x0, y0, x0 + width, y0 + LINE_PX


def padded_range(values: list[float]) -> tuple[float, float]:
    """The axis range drawn for ``values``: their span and ``PAD`` of it on each side (a flat span: 10% of the
    value, or 1)."""
    lo, hi = min(values), max(values)
    span = (hi - lo) or abs(hi) * 0.1 or 1.0
    return lo - PAD * span, hi + PAD * span


def label_positions(xs: list[float], ys: list[float], chars: list[int], order: list[int]) -> list[str | None]:
    """A ``textposition`` per point, chosen greedily in ``order`` (most important first) so that no label box
    overlaps another label, a marker, or leaves the plotting area (``PLOT_PX``; the axes span ``padded_range``);
    None where no position is free: that point is labelled on hover only."""
    def scale(vs, span):
        lo, hi = padded_range(vs)
        return [(v - lo) / (hi - lo) * span for v in vs]

    px, py = scale(xs, PLOT_PX[0]), scale(ys, PLOT_PX[1])
    taken = [(x - GAP_PX, y - GAP_PX, x + GAP_PX, y + GAP_PX) for x, y in zip(px, py)]  # the markers
    out: list[str | None] = [None] * len(xs)

    def free(box, own):
        x0, y0, x1, y1 = box
        inside = x0 >= 0 and x1 <= PLOT_PX[0] and y0 >= 0 and y1 <= PLOT_PX[1]
        return inside and not any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1
                                  for j, b in enumerate(taken) if j != own)

    for i in order:
        for position in LABEL_POSITIONS:
            box = label_box(px[i], py[i], chars[i], position)
            if free(box, i):
                out[i] = position
                taken.append(box)
                break
    return out


def tradeoff_scatter(points: list[dict], front: list[int], metric: str, higher_is_better: bool = True) -> go.Figure:
    """Size against metric, one marker per recipe; the Pareto front (``front``: indices into ``points``
    in size order, as ``analysis.search.pareto_front`` gives them) joined by a line. The hover text
    gives latency with its source: "measured" (this machine's runtime) or "estimate" (hardware profile).
    Labels (cut to ``LABEL_CHARS``) sit where they overlap no other label or marker (``label_positions``: front
    first, then by size); a point with no free place has no label on the chart, only in its hover text."""
    order, front = front, set(front)
    unit, div = _size_unit(max(p["size_bytes"] for p in points))
    short = [p["label"] if len(p["label"]) <= LABEL_CHARS else p["label"][:LABEL_CHARS - 1] + "…" for p in points]
    placed = label_positions([p["size_bytes"] for p in points], [p["metric"] for p in points], [len(t) for t in short],
                             list(order) + sorted((i for i in range(len(points)) if i not in front),
                                                  key=lambda i: points[i]["size_bytes"]))

    def hover(p):
        lat = p.get("latency_ms")
        return (f"{plain(p['label'])}<br>{human_bytes(p['size_bytes'])}, {metric} {p['metric']:.4f}"
                + (f"<br>latency {lat:.3f} ms ({p.get('latency_source', 'estimate')})" if lat is not None else ""))

    fig = go.Figure()
    for on_front, name, color in ((False, "other recipes", OTHER_COLOR), (True, "Pareto front", FRONT_COLOR)):
        ps = [(p, placed[i], short[i]) for i, p in enumerate(points) if (i in front) == on_front]
        fig.add_trace(go.Scatter(x=[p["size_bytes"] / div for p, _, _ in ps], y=[p["metric"] for p, _, _ in ps], name=name,
                                 mode="markers+text", text=[plain(t) if at else "" for _, at, t in ps],
                                 textposition=[at or "top center" for _, at, _ in ps],
                                 hovertext=[hover(p) for p, _, _ in ps], hoverinfo="text",
                                 marker=dict(size=11, color=color, line=dict(color="white", width=1))))
    fig.add_trace(go.Scatter(x=[points[i]["size_bytes"] / div for i in order], y=[points[i]["metric"] for i in order],
                             mode="lines", name="front", line=dict(color=FRONT_COLOR, dash="dot"), hoverinfo="skip",
                             showlegend=False))
    fig.update_xaxes(range=[v / div for v in padded_range([p["size_bytes"] for p in points])])
    fig.update_yaxes(range=list(padded_range([p["metric"] for p in points])))
    better = "higher" if higher_is_better else "lower"
    return _layout(fig, f"Size against {metric} (Pareto front in red: nothing is both smaller and better)",
                   f"size ({unit})", f"{metric} ({better} is better)", height=SCATTER_HEIGHT)


def per_class(fp32: list, quantized: list, class_names: list[str] | None, label: str) -> go.Figure:
    """Per-class accuracy of FP32 and of recipe ``label`` side by side (lists of floats or None per class)."""
    names = [plain(n) for n in class_names] if class_names else [str(i) for i in range(len(fp32))]
    fig = go.Figure([go.Bar(x=names, y=fp32, name="FP32", marker_color=FP32_COLOR),
                     go.Bar(x=names, y=quantized, name=plain(label), marker_color=BAR_COLOR)])
    fig.update_layout(barmode="group")
    fig.update_xaxes(type="category")
    return _layout(fig, f"Accuracy per class: FP32 against {plain(label)}", "class", "accuracy")
