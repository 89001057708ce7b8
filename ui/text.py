"""User text into Streamlit's Markdown: shown as the characters it is, never as links, images or directives.

Streamlit renders Markdown in ``st.markdown``/``st.write``/``st.caption``/``st.title``, alert and toast bodies,
spinner and progress texts, and widget and metric labels (and ``help`` tooltips). An uploaded file name,
layer name, link parameter or an error message quoting one must go through ``plain`` first, or
``[click](http://evil)`` becomes a live link inside the app's own box. Select-box options and data
frames are plain text already (do not escape them). Plotly renders a subset of HTML in titles, tick
labels, legends and hover text: user names that go into a figure go through ``html_plain``.
"""

from __future__ import annotations

import html
import re

# CommonMark lets a backslash escape any ASCII punctuation; these are the ones Markdown, GFM, KaTeX ($) and
# Streamlit's directives (:red[...], :material/icon:, :smile:) give a meaning to.
_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&])")


# Streamlit's emoji (:smile:), icons (:material/home:, :streamlit:) and GFM's autolinks (www.x.com, a@x.com,
# http://x.com) are found in the text *after* backslash escapes are resolved: each is a regular expression run over
# one Markdown text node. An empty ``:small[]`` (Streamlit's documented small-text directive, holding nothing) after
# ``:``, ``@`` and ``www`` ends the text node there, so no such pattern spans it; it renders as an empty <span>:
# nothing on the page, nothing in what a reader copies (an invisible character, the former fix, was copied along).
BREAK = ":small[]"
_AUTOLINK = re.compile(r"(www|\\:|@)(?=\S)", re.IGNORECASE)


def plain(text) -> str:
    """``text`` (anything; ``str()`` of it) as Markdown that shows exactly those characters on one line: every
    Markdown character backslash-escaped, and an empty ``:small[]`` (``BREAK``) after ``:``, ``@`` and ``www``
    where a character follows, which stops autolinks, emoji and icons without adding a visible or copied one."""
    one_line = " ".join(str(text).splitlines())
    return _AUTOLINK.sub(r"\1" + BREAK, _SPECIAL.sub(r"\\\1", one_line))


def html_plain(text) -> str:
    """``text`` for Plotly titles, labels and hover text: ``<``, ``>``, ``&`` and quotes as HTML entities."""
    return html.escape(str(text), quote=True)


def layer_label(name: str) -> str:
    """A layer's name for prose and chart titles: a bare index (``nn.Sequential`` names its children ``"0"``,
    ``"2"``) reads ``"layer 0"``; any other name stays as it is. Display only: tables and recipes keep ``name``."""
    return f"layer {name}" if str(name).isdigit() else str(name)


# ---- metrics as students read them -----------------------------------------------------------------
METRIC_LABELS = {  # the engine's metric names -> what a page calls them (the glossary explains each)
    "accuracy": "accuracy",
    "agreement": "agreement with FP32",
    "cosine": "similarity to FP32 (cosine)",
    "cosine_to_fp32": "similarity to FP32 (cosine)",
    "sqnr_db": "output SQNR (dB)",
    "kl_div": "KL divergence from FP32",
    "perplexity": "perplexity",
}
# Headline metrics that score a model against FP32's own outputs: FP32 gets the best value by definition
# (1.0, 0.0 or the 200 dB stand-in for an exact match), so "FP32's <metric>" says nothing.
AGAINST_FP32 = frozenset({"agreement", "decision_agreement", "token_agreement", "cosine", "cosine_to_fp32", "sqnr_db",
                          "kl_div"})
DROP_CONVENTION = ("**drop** = FP32's value minus the quantized model's, oriented so that a positive drop is worse; "
                   "**change** = quantized minus FP32, as measured (its sign says which way the number moved).")


def metric_label(name: str) -> str:
    """A metric's plain label (``"cosine_to_fp32"`` -> ``"similarity to FP32 (cosine)"``); unknown names as given."""
    return METRIC_LABELS.get(name, str(name))


def signed(value: float, digits: int = 4) -> str:
    """``value`` with an explicit sign and ``digits`` decimals, where anything that rounds to zero is ``"0.0…"``
    without a sign (never ``"-0.0000"``) and the minus is a true minus sign (U+2212)."""
    text = f"{value:+.{digits}f}"
    if float(text) == 0.0:
        return f"{0.0:.{digits}f}"
    return text.replace("-", "\u2212")


def delta_style(change: float, higher_is_better: bool | None, digits: int = 4, suffix: str = "") -> dict:
    """``st.metric``'s delta keywords for a number that moved by ``change`` (new minus old, in the unit shown, to
    ``digits`` decimals): ``delta`` is ``signed(change, digits) + suffix``; the arrow says which way the number
    moved, the colour whether that is better: green better, red worse, grey when the shown change is zero (it
    rounds to 0 at ``digits``) or when the number is no quality (``higher_is_better`` None). Sizes are
    lower-is-better (a smaller file is the point of quantizing). The colour and arrow are passed explicitly
    (``delta_color="green"``, ``delta_arrow="up"``): Streamlit reads a delta's sign from a leading ASCII ``-``,
    and ``signed`` writes a true minus."""
    text = signed(change, digits)
    if float(f"{change:.{digits}f}") == 0.0:
        return {"delta": text + suffix, "delta_color": "gray", "delta_arrow": "off"}
    rose = change > 0
    color = "gray" if higher_is_better is None else ("green" if rose == higher_is_better else "red")
    return {"delta": text + suffix, "delta_color": color, "delta_arrow": "up" if rose else "down"}

