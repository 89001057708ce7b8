"""Figures of the decide pages: each figure carries the numbers it is given (the Pareto front itself is
computed and tested in ``analysis.search``)."""

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
