"""The side-by-side generation figure: tokens where the text puts them, the first divergence marked, KL on hover."""

from __future__ import annotations

from qcore.figures.generation import DIVERGE_COLOR, LINE_CHARS, PROMPT_COLOR, generation_side_by_side


def test_tokens_the_divergence_and_kl_are_drawn_where_they_belong():
    prompt = ["The", " for"]
    fp32 = [" statement", " is", " used", "\n", "to"]
    quant = [" statement", " is", " a", " loop", "<b>"]
    kl = [0.001, 0.002, 0.75, 0.1, 0.2]
    fig = generation_side_by_side(prompt, [("FP32", fp32), ("int4", quant)], kl, 2)
    left, right = fig.data
    assert [t.replace("\u00a0", " ") for t in left.text] == ["The", " for", " statement", " is", " used", "↵", "to"]
    assert right.text[-1] == "&lt;b&gt;"  # model text is escaped, never rendered as HTML
    # x is each token's centre in characters: "The" covers 0..3, " for" 3..7, " statement" 7..17
    assert list(left.x[:3]) == [1.5, 5.0, 12.0]
    assert list(left.y) == [0, 0, 0, 0, 0, 0, -1]  # the newline token ends the line
    for trace in (left, right):
        colors = list(trace.textfont.color)
        assert colors[:2] == [PROMPT_COLOR] * 2 and colors.count(DIVERGE_COLOR) == 1 and colors[4] == DIVERGE_COLOR
    assert "0.7500 nats" in left.hovertext[4] and "first diverging token" in right.hovertext[4]
    assert "0.0010 nats" in left.hovertext[2] and left.hovertext[0] == "prompt"
    boxes = [s for s in fig.layout.shapes if s.fillcolor == DIVERGE_COLOR]
    assert [(b.x0, b.x1) for b in boxes] == [(20, 25), (20, 22)]  # " used" and " a", after "The for statement is" (20 characters)


def test_long_text_wraps_and_identical_texts_mark_nothing():
    words = [" word"] * 40  # 5 characters each: 8 per line of 44
    fig = generation_side_by_side(["Go"], [("FP32", words), ("same", words)], [0.0] * 40, None)
    for trace in fig.data:
        ends = [x + len(t) / 2 for x, t in zip(trace.x, trace.text)]
        assert max(ends) <= LINE_CHARS and DIVERGE_COLOR not in trace.textfont.color
    assert min(fig.data[0].y) == -((2 + 40 * 5) // LINE_CHARS) and not fig.layout.shapes
