"""Figures of the decide pages: each figure carries the numbers it is given (the Pareto front itself is
computed and tested in ``analysis.search``)."""

import pytest

from qcore.analysis import search
from qcore.figures import decide as viz_decide

ROWS = [{"layer": l, "candidate": c, "changed": changed, "metric_drop": d, "rank": r, "sqnr_db": s}
        for l, c, changed, d, r, s in [("fc1", "int8", True, 0.01, 2, 40.0), ("fc2", "int8", True, 0.05, 1, 30.0),
                                       ("fc1", "int4", True, 0.2, 1, 12.0), ("fc2", "int4", False, 0.0, 2, 200.0)]]


def test_heatmap_cells_show_the_sweep_drops_coloured_per_candidate_and_unchanged_cells_are_blank():
    fig = viz_decide.sensitivity_heatmap(ROWS)
    h = fig.data[0]
    assert list(h.y) == ["fc1", "fc2"] and list(h.x) == ["int8", "int4"]
    assert [list(r) for r in h.customdata] == [[0.01, 0.2], [0.05, None]]
    assert h.texttemplate == "%{text}" and [list(r) for r in h.text] == [["+0.0100", "+0.2000"], ["+0.0500", ""]]
    # colour: each column over its own largest |drop| (int8: 0.05, int4: 0.2), so int4 does not wash out int8
    assert [list(r) for r in h.z] == [[0.01 / 0.05, 1.0], [1.0, None]] and (h.zmin, h.zmax) == (-1.0, 1.0)


def test_widest_spread_is_the_candidate_whose_drops_differ_most_between_layers():
    rows = [{"layer": l, "candidate": c, "metric_drop": d} for l, c, d in
            [("a", "int8", 0.0), ("b", "int8", 0.0), ("a", "int2", 0.3), ("b", "int2", 0.5), ("a", "int4", -0.1), ("b", "int4", 0.2)]]
    assert viz_decide.widest_spread(rows) == "int4"  # 0.3 apart; int2's drops are larger but only 0.2 apart
    assert viz_decide.widest_spread([r for r in rows if r["candidate"] == "int8"]) == "int8"


def test_ranked_drops_orders_by_rank_and_colours_the_worst():
    bar = viz_decide.ranked_drops(ROWS, "int8").data[0]
    assert list(bar.y) == ["fc2", "fc1"] and list(bar.x) == [0.05, 0.01]
    assert bar.marker.color[0] == viz_decide.WORST_COLOR != bar.marker.color[1]


@pytest.mark.parametrize("drops", [[0.05, 0.01], [0.4885, 0.3, -0.02], [-0.3, -0.1], [0.0, 0.0]])
def test_ranked_drops_leave_room_for_the_value_labels_past_the_bar_ends(drops):
    """The labels sit outside each bar's end: the x range holds zero and every bar with a margin of at least 15 %
    of the bars' span (at least 0.15 when every drop is 0) past the largest and below the smallest negative one."""
    rows = [{"layer": f"l{i}", "candidate": "c", "metric_drop": d, "rank": i + 1, "sqnr_db": 10.0} for i, d in enumerate(drops)]
    lo, hi = viz_decide.ranked_drops(rows, "c").layout.xaxis.range
    span = (max([0, *drops]) - min([0, *drops])) or 1.0
    assert lo <= min([0, *drops]) and hi >= max(drops) + (0.15 * span if max(drops) >= 0 else 0)
    if min(drops) < 0:
        assert lo <= min(drops) - 0.15 * span


def test_tradeoff_scatter_puts_the_front_in_its_own_trace_with_latency_sources():
    points = [{"label": "fp32", "size_bytes": 4096, "metric": 0.98, "latency_ms": 1.5, "latency_source": "measured"},
              {"label": "int8", "size_bytes": 1024, "metric": 0.97, "latency_ms": 0.2, "latency_source": "estimate (x)"},
              {"label": "bad", "size_bytes": 2048, "metric": 0.9}]
    fig = viz_decide.tradeoff_scatter(points, [1, 0], "accuracy")  # the front as the caller computed it
    others, front, line = fig.data
    assert list(front.text) == ["fp32", "int8"] and list(others.text) == ["bad"]
    assert list(front.x) == [4.0, 1.0]  # KiB
    assert "1.500 ms (measured)" in front.hovertext[0] and "(estimate (x))" in front.hovertext[1]
    assert list(line.x) == [1.0, 4.0] and list(line.y) == [0.97, 0.98]


def test_per_class_bars_hold_both_series():
    fig = viz_decide.per_class([1.0, 0.5, None], [0.9, 0.25, None], ["a", "b", "c"], "int4")
    assert [t.name for t in fig.data] == ["FP32", "int4"]
    assert list(fig.data[1].y) == [0.9, 0.25, None] and list(fig.data[0].x) == ["a", "b", "c"]


def test_user_names_reach_plotly_escaped_so_no_markup_renders():
    """Plotly renders <b>, <a href> in labels, hover text and titles: a layer, class or recipe name is shown as text."""
    evil = '<a href="http://evil">x</a>'
    rows = [{"layer": evil, "candidate": evil, "metric_drop": 0.1, "changed": True, "rank": 0, "sqnr_db": 10.0,
             "metric": 0.9}]
    figs = [viz_decide.sensitivity_heatmap(rows), viz_decide.ranked_drops(rows, evil),
            viz_decide.tradeoff_scatter([{"label": evil, "size_bytes": 10, "metric": 0.5}], [0], "accuracy"),
            viz_decide.per_class([1.0], [0.5], [evil], evil)]
    for fig in figs:
        text = fig.to_json()
        assert "<a href" not in text and "&lt;a href=" in text, text[:200]


def test_drop_labels_never_show_minus_zero_and_use_a_true_minus_sign():
    rows = [{**ROWS[0], "metric_drop": -0.00004}, {**ROWS[1], "metric_drop": -0.25}]
    h = viz_decide.sensitivity_heatmap(rows).data[0]
    assert [list(r) for r in h.text] == [["0.0000"], ["\u22120.2500"]]


def test_label_margin_holds_what_plotly_measured_in_chromium():
    """The oracle is Chromium: on a ranked-drops chart whose longest layer name was
    ``bert.encoder.layer.5.attention.output.dense`` (43 characters), Plotly's automargin widened the left margin
    to 239 px (headless Chromium, Streamlit's theme); digits-cnn's names (``classifier.1``) took 71 px. A margin at
    least that wide means Plotly draws the chart once instead of twice."""
    from qcore.figures.viz import MARGIN, label_margin

    assert label_margin(["features.0", "bert.encoder.layer.5.attention.output.dense"]) >= 239
    assert 71 <= label_margin(["features.0", "classifier.1"]) <= 100  # room, not much more
    assert label_margin(["fc1"]) == MARGIN["l"]
    long = [{"layer": "bert.encoder.layer.5.attention.output.dense", "candidate": "int8", "rank": 1, "metric_drop": 0.1,
             "sqnr_db": 20.0, "changed": True, "kind": "Linear"}]
    assert viz_decide.ranked_drops(long, "int8").layout.margin.l >= 239
    assert viz_decide.sensitivity_heatmap(long).layout.margin.l >= 239 + 40  # and the y-axis title "layer"


# ---- labels of the size-metric scatter do not overlap ------------------------------------------------------------
def _shown_boxes(fig):
    """Every drawn label's box and every marker's, in pixels, recomputed from the figure: the axis ranges mapped
    onto the plotting area, a label of n characters 7 px a character and 16 px high, 7 px from its marker."""
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    width, height = viz_decide.PLOT_PX
    labels, markers = [], []
    for trace in fig.data[:2]:
        for x, y, text, position in zip(trace.x, trace.y, trace.text, trace.textposition):
            px, py = (x - x0) / (x1 - x0) * width, (y - y0) / (y1 - y0) * height
            markers.append((px - 7, py - 7, px + 7, py + 7))
            if not text:
                continue
            w = 7 * len(text)
            vertical, horizontal = position.split()
            bottom = py + 7 if vertical == "top" else py - 23 if vertical == "bottom" else py - 8
            left = px - w / 2 if horizontal == "center" else px + 7 if horizontal == "right" else px - 7 - w
            labels.append((text, (left, bottom, left + w, bottom + 16)))
    return labels, markers, (width, height)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _presets(metric_of: dict) -> list[dict]:
    """digits-mlp's presets as Trade-offs shows them (FP16/BF16 and INT8 static/dynamic/FP8 share a size) and a
    recipe of the user's between them (a recipe equal to a preset is not shown twice)."""
    sizes = {"FP32": 68_904, "FP16": 34_856, "BF16": 34_856, "INT8 dynamic": 18_640, "INT8 static": 18_640,
             "FP8": 18_640, "INT4 weight-only": 11_714, "NF4": 10_384, "yours (in the table): int8-static [1a2b3c4d]": 14_000}
    return [{"label": k, "size_bytes": v, "metric": metric_of.get(k, 0.9736 if k.startswith("yours") else 0.975)}
            for k, v in sizes.items()]


@pytest.mark.parametrize("metric_of", [{}, {"INT4 weight-only": 0.9722, "FP8": 0.9722, "NF4": 0.9694}])
def test_tradeoff_labels_overlap_no_other_label_marker_or_edge(metric_of):
    points = _presets(metric_of)
    front = search.pareto_front(points, True)
    fig = viz_decide.tradeoff_scatter(points, front, "accuracy")
    labels, markers, (width, height) = _shown_boxes(fig)
    for i, (text, box) in enumerate(labels):
        assert 0 <= box[0] and box[2] <= width and 0 <= box[1] and box[3] <= height, (text, box)
        assert not any(_overlap(box, other) for _, other in labels[i + 1:]), text
        assert not any(_overlap(box, m) for m in markers), text
    shown = {text for text, _ in labels}
    cut = {p["label"]: p["label"] if len(p["label"]) <= 28 else p["label"][:27] + "…" for p in points}
    assert cut["yours (in the table): int8-static [1a2b3c4d]"] == "yours (in the table): int8-…"
    assert {cut[points[i]["label"]] for i in front} <= shown  # here every point of the front is labelled
    assert {"INT8 dynamic", "INT8 static"} <= shown  # one point, two recipes: both named, on different sides
    hovers = " ".join(h for trace in fig.data[:2] for h in trace.hovertext)
    assert all(p["label"] in hovers for p in points)  # a label left off the chart is still on hover


def test_tradeoff_labels_of_points_far_apart_sit_above_them():
    points = [{"label": f"r{i}", "size_bytes": 1000 * (i + 1), "metric": 0.5 + 0.1 * (i % 2)} for i in range(4)]
    fig = viz_decide.tradeoff_scatter(points, search.pareto_front(points, True), "accuracy")
    positions = [p for trace in fig.data[:2] for p in trace.textposition]
    texts = [t for trace in fig.data[:2] for t in trace.text]
    assert all(texts) and set(positions) <= {"top center", "bottom center"}


def test_tradeoff_labels_of_many_recipes_on_one_point_fall_back_to_hover():
    points = [{"label": f"recipe number {i}", "size_bytes": 1000, "metric": 0.9} for i in range(12)]
    fig = viz_decide.tradeoff_scatter(points, [0], "accuracy")
    labels, _, _ = _shown_boxes(fig)
    assert 1 <= len(labels) < 12 and "recipe number 0" in {t for t, _ in labels}
