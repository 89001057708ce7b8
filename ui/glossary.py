"""The glossary: every metric a page or lesson shows, explained once, and the one sign convention for "drop" and
"change". ``link(*terms)`` is the link a page puts next to its metrics (the Glossary page has one anchor per term,
``/glossary#sqnr``)."""

from __future__ import annotations

from ui.text import DROP_CONVENTION

PAGE = "pages/glossary.py"
URL = "glossary"

TERMS: dict[str, tuple[str, str]] = {  # anchor -> (term, explanation in Markdown)
    "sqnr": ("SQNR (signal-to-quantization-noise ratio)",
             "How large the values are compared with the error quantization adds, in decibels: "
             "10·log10(Σx² / Σ(x̂ − x)²). Higher is better; each extra bit of an integer grid adds about 6 dB. "
             "*Weight SQNR* compares a layer's weights; *output SQNR* compares the whole model's outputs with FP32's."),
    "kl": ("KL divergence",
           "How far the quantized model's predicted class probabilities are from FP32's (Kullback–Leibler, in nats, "
           "averaged over samples). 0 means identical predictions; lower is better."),
    "cosine": ("similarity to FP32 (cosine)",
               "The cosine of the angle between each quantized output vector and FP32's, averaged over samples: "
               "1 means the same direction. Used where outputs are embeddings, not classes; higher is better."),
    "agreement": ("agreement with FP32",
                  "The share of samples whose top-1 class is the same as the FP32 model's, whatever the label. "
                  "Higher is better; 1 means the quantized model decides exactly like FP32."),
    "accuracy": ("accuracy",
                 "The share of test samples whose top-1 class equals the label. Higher is better."),
    "kurtosis": ("kurtosis",
                 "How heavy a distribution's tails are: E[(x − mean)⁴] / variance². A normal distribution has 3; "
                 "weights with large outliers have much more, and stretch a min-max range."),
    "perplexity": ("perplexity",
                   "A language model's surprise at the true next token: exp(mean negative log-likelihood). "
                   "Lower is better; quantization usually raises it."),
    "drop": ("drop and change (the sign convention)", DROP_CONVENTION + " A drop shown as 0.0000 means nothing "
             "measurable changed; then no \"largest drop\" is named."),
}


def link(*anchors: str) -> None:
    """A link to the Glossary page (``st.page_link``: a navigation element, so no Markdown link is ever rendered --
    pages keep every Markdown text plain) labelled with the terms of ``anchors`` (KeyError for an unknown one)."""
    import streamlit as st

    terms = ", ".join(TERMS[a][0] for a in anchors)
    st.page_link(PAGE, label=f"Glossary: {terms}" if terms else "Glossary", icon=":material/menu_book:")
