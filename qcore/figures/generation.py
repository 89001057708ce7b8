"""Side-by-side generation: two continuations of one prompt as text, token by token.

Pure function, plain data in (token strings, KL values), a Plotly figure out. Each token is drawn
at its character position in a monospace font, text wrapped at ``LINE_CHARS`` characters per line;
the figure has a fixed width so one axis unit is one character (show it at its own width, not
stretched). The prompt is grey, the first diverging token sits on a red box in both columns, tokens
after it are grey-blue (the texts have parted), and hovering a generated token shows its position
and KL(FP32 || quantized) of the next-token distributions there, in nats.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qcore.figures.viz import plain

LINE_CHARS = 44  # characters per line in each column
CHAR_PX, LINE_PX = 8.4, 22  # a 14 px monospace character's width; one line's height
PROMPT_COLOR, TEXT_COLOR, AFTER_COLOR, DIVERGE_COLOR = "#9aa5b1", "#111827", "#5b7a99", "#d62728"


def _layout_tokens(pieces: list[str]) -> list[tuple[int, int, str]]:
    """(line, column, shown text) of each piece, wrapping at LINE_CHARS; a newline inside a piece is
    shown as '↵' and ends the line. Spaces become no-break spaces (SVG would collapse them)."""
    out, line, col = [], 0, 0
    for piece in pieces:
        shown = piece.replace("\n", "↵").replace("\t", "    ").replace(" ", "\u00a0") or "∅"
        if col and col + len(shown) > LINE_CHARS:
            line, col = line + 1, 0
        out.append((line, col, shown))
        col += len(shown)
        if "\n" in piece:
            line, col = line + 1, 0
    return out


def generation_side_by_side(prompt_tokens: list[str], columns: list[tuple[str, list[str]]], kl: list[float],
                            first_divergence: int | None, title: str = "") -> go.Figure:
    """Two (or more) continuations side by side: ``columns`` = [(title, generated token strings)], the
    first usually FP32; ``kl[i]`` (nats) is shown on hover at generated position i (positions past ``kl``
    show none); ``first_divergence`` is the first generated position whose tokens differ (None: same)."""
    fig = make_subplots(rows=1, cols=len(columns), subplot_titles=[plain(t) for t, _ in columns],
                        horizontal_spacing=0.04)
    lines = 1
    for c, (_, generated) in enumerate(columns, 1):
        placed = _layout_tokens(list(prompt_tokens) + list(generated))
        lines = max(lines, placed[-1][0] + 1 if placed else 1)
        colors, hover = [], []
        for i, _ in enumerate(placed):
            g = i - len(prompt_tokens)  # generated position, negative in the prompt
            if g < 0:
                colors.append(PROMPT_COLOR)
                hover.append("prompt")
                continue
            after = first_divergence is not None and g > first_divergence
            colors.append(DIVERGE_COLOR if g == first_divergence else AFTER_COLOR if after else TEXT_COLOR)
            what = f"token {g + 1}: {plain(repr(generated[g]))}"
            hover.append(what + (f"<br>KL(FP32 ‖ quantized) {kl[g]:.4f} nats" if g < len(kl) else "")
                         + ("<br><b>first diverging token</b>" if g == first_divergence else ""))
        fig.add_trace(go.Scatter(
            x=[col + len(s) / 2 for _, col, s in placed], y=[-line for line, _, _ in placed],
            text=[plain(s) for _, _, s in placed], mode="markers+text", textposition="middle center",
            textfont=dict(family="Courier New, monospace", size=14, color=colors),
            marker=dict(size=16, symbol="square", color="rgba(0,0,0,0)"), hovertext=hover, hoverinfo="text",
            showlegend=False), row=1, col=c)
        if first_divergence is not None and len(prompt_tokens) + first_divergence < len(placed):
            line, col, s = placed[len(prompt_tokens) + first_divergence]
            fig.add_shape(type="rect", x0=col, x1=col + len(s), y0=-line - 0.45, y1=-line + 0.45, line_width=0,
                          fillcolor=DIVERGE_COLOR, opacity=0.2, row=1, col=c)
    fig.update_xaxes(range=[0, LINE_CHARS], visible=False, fixedrange=True)
    fig.update_yaxes(range=[-lines + 0.4, 0.6], visible=False, fixedrange=True)
    width = int(len(columns) * LINE_CHARS * CHAR_PX / (1 - 0.04 * (len(columns) - 1))) + 20
    fig.update_layout(title=title, width=width, height=90 + LINE_PX * lines, margin=dict(l=10, r=10, t=70, b=10),
                      plot_bgcolor="white")
    return fig
