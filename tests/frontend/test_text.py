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


# ---- plain: nothing invisible in what a reader copies -------------------------------------------------------------
HOSTILE = ["see www.evil.com now", "mail a@evil.com now", "go http://evil.com/x?y=1 now", "https://www.evil.com/a_b",
           ":smile: :material/home: :streamlit: :red[x] :+1:", "[click](http://evil) ![i](http://e/x.png) <b>b</b>",
           "/tmp/a@b/model.onnx: not a valid ONNX file; C:\\Users\\x", "x::y a:b $x^2$ `code` *em* 1. item"]


def resolved(markdown: str) -> str:
    """The text a CommonMark reader gets from ``markdown``: escapes resolved, Streamlit's empty ``:small[]`` spans
    (which hold no text) dropped -- written here, not imported, so a change to ``plain`` cannot move both."""
    out, i = [], 0
    while i < len(markdown):
        if markdown.startswith(":small[]", i):
            i += len(":small[]")
        elif markdown[i] == "\\" and i + 1 < len(markdown) and markdown[i + 1] in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~":
            out.append(markdown[i + 1])
            i += 2
        else:
            out.append(markdown[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("text", HOSTILE)
def test_plain_adds_no_invisible_character_and_reads_back_as_the_text(text):
    from ui.text import plain

    markdown = plain(text)
    assert "\u2060" not in markdown and not [c for c in markdown if not c.isascii() and c not in text]
    assert resolved(markdown) == text


def _error_box(text):
    import streamlit as st

    from ui.text import plain

    st.error(plain(f"{text} was not loaded"))


@pytest.mark.parametrize("text", HOSTILE[:3] + HOSTILE[6:7])
def test_an_error_box_holds_the_message_a_reader_copies(text):
    at = AppTest.from_function(_error_box, args=(text,)).run()
    (box,) = at.error
    assert resolved(box.value) == f"{text} was not loaded" and "\u2060" not in box.value
