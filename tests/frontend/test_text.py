"""ui.text: the metric deltas' arrow and colour (better / worse), and user text as Markdown that neither links nor
carries invisible characters into what a reader copies."""

import pytest
from streamlit.proto.Metric_pb2 import Metric as MetricProto
from streamlit.testing.v1 import AppTest

from ui.text import delta_style

MINUS = "\u2212"
# change, higher_is_better, digits, suffix -> (delta text, colour, arrow), written out by hand
CASES = [
    (0.0123, True, 4, "", ("+0.0123", "green", "up")),  # accuracy rose: better
    (-0.0123, True, 4, " vs FP32", (f"{MINUS}0.0123 vs FP32", "red", "down")),  # accuracy fell: worse
    (0.31, False, 2, "", ("+0.31", "red", "up")),  # perplexity / KL / MSE rose: worse
    (-0.5, False, 1, "", (f"{MINUS}0.5", "green", "down")),  # perplexity fell: better
    (-72.9, False, 1, "% vs FP32", (f"{MINUS}72.9% vs FP32", "green", "down")),  # a smaller file: better
    (12.5, False, 1, "% vs FP32", ("+12.5% vs FP32", "red", "up")),  # a larger one: worse
    (3.3, True, 1, " dB vs per-tensor", ("+3.3 dB vs per-tensor", "green", "up")),  # SQNR rose
    (0.0, True, 4, " vs FP32", ("0.0000 vs FP32", "gray", "off")),  # exactly equal
    (0.00004, True, 4, "", ("0.0000", "gray", "off")),  # shows as zero: no arrow, no colour
    (-0.00004, False, 4, "", ("0.0000", "gray", "off")),  # ... and no "-0.0000"
    (-0.04, True, 1, " dB", ("0.0 dB", "gray", "off")),
    (3.0, None, 1, "", ("+3.0", "gray", "up")),  # no quality: which way, not whether better
    (-3.0, None, 1, "", (f"{MINUS}3.0", "gray", "down")),
]


@pytest.mark.parametrize("change, higher, digits, suffix, expected", CASES)
def test_delta_style_against_a_hand_table(change, higher, digits, suffix, expected):
    text, color, arrow = expected
    assert delta_style(change, higher, digits, suffix) == {"delta": text, "delta_color": color, "delta_arrow": arrow}


def _metrics(cases):
    import streamlit as st

    from ui.text import delta_style

    for i, (change, higher, digits, suffix, _) in enumerate(cases):
        st.metric(f"m{i}", "1", **delta_style(change, higher, digits, suffix))


def test_streamlit_draws_the_colour_and_arrow_the_table_says():
    """Streamlit's own reading of the keywords: the proto's colour and direction (a true minus sign would make
    Streamlit's default read a fall as a rise)."""
    at = AppTest.from_function(_metrics, args=(CASES,)).run()
    assert not at.exception
    colours = {"green": MetricProto.GREEN, "red": MetricProto.RED, "gray": MetricProto.GRAY}
    arrows = {"up": MetricProto.UP, "down": MetricProto.DOWN, "off": MetricProto.NONE}
    for shown, (*_, (text, colour, arrow)) in zip(at.metric, CASES):
        assert (shown.delta, shown.proto.color, shown.proto.direction) == (text, colours[colour], arrows[arrow])
