"""What every page shows the same way: a few plain sentences on what the user is looking at, an
expander with the formulas behind it (Markdown with LaTeX), and user errors as an error box.

Not a page (``app.py`` lists the pages). A page starts with ``intro(text, QUANTIZE, RANGES, ...)`` and
wraps engine calls that can fail on the user's input in ``with error_box():``.
"""

from contextlib import contextmanager

import streamlit as st

from qcore.errors import QcoreError
from ui.text import plain


def intro(text: str, *formulas: str, title: str = "Formulas: scale, zero-point, rounding, clipping, SQNR") -> None:
    """``text`` (Markdown), a link to the glossary of the metrics and, below, a collapsed expander
    holding the ``formulas`` parts in order."""
    from ui import glossary

    st.write(text)
    glossary.link("sqnr", "kl", "cosine", "agreement", "drop")
    with st.expander(title):
        st.markdown("\n".join(formulas))


@contextmanager
def error_box():
    """Show a ``QcoreError`` raised inside as one error box (its message says what to do) and stop
    the page there; what was loaded before stays as it was. Programming errors are not caught."""
    try:
        yield
    except QcoreError as e:
        st.error(plain(e), icon=":material/error:")
        st.stop()


QUANTIZE = r"""
**Scale and zero-point.** A clip range $[lo, hi]$ is mapped onto the $2^b$ integer codes
$q_{min} = -2^{b-1} \dots q_{max} = 2^{b-1}-1$:

| | scale $s$ | zero-point $z$ |
|---|---|---|
| symmetric | $s = \dfrac{\max(\lvert lo\rvert, \lvert hi\rvert)}{2^{b-1}-1}$ | $z = 0$ |
| affine | $s = \dfrac{hi - lo}{2^b - 1}$ (range stretched to contain 0) | $z = \operatorname{round}\!\left(q_{min} - \dfrac{lo}{s}\right)$ |

**Quantize, then dequantize** (rounding is round-half-to-even):

$$q = \operatorname{clamp}\!\left(\operatorname{round}\!\left(\tfrac{x}{s}\right) + z,\ q_{min},\ q_{max}\right), \qquad \hat{x} = (q - z)\, s$$

**Two kinds of error.** Inside the range, rounding moves a value by at most half a step:
$\lvert \hat{x} - x \rvert \le s/2$ (mean squared error about $s^2/12$). Outside it, the value is
**clipped** to the edge: the error is $\lvert x \rvert - hi$, which can be large. A wider range
means fewer clipped values but a larger step $s$ for everything else.

**SQNR** (signal-to-quantization-noise ratio, higher is better):

$$\text{SQNR} = 10 \log_{10} \frac{\sum x^2}{\sum (\hat{x} - x)^2}\ \text{dB}$$

One more bit halves $s$, which divides the squared error by 4: about **+6 dB per bit**.
"""

FLOAT = r"""
**Floating point** (FP16, BF16, FP8): a value is $(-1)^{\text{sign}} \cdot 2^{e - \text{bias}} \cdot (1 + m / 2^M)$
with $E$ exponent bits and $M$ mantissa bits. The step between neighbours is $2^{e-\text{bias}-M}$: small
near zero, large for big numbers, so the *relative* error stays about $2^{-M-1}$ everywhere. More
exponent bits buy dynamic range, more mantissa bits buy precision. A **plain cast** has no scale
(values beyond the largest representable number saturate); a **scaled** float first divides by
$s = \max\lvert x \rvert / \text{max}_{\text{format}}$, as FP8 recipes do.

**NF4** stores a 4-bit index into 16 fixed levels in $[-1, 1]$ (placed at quantiles of a normal
distribution), scaled by $s = \max \lvert x \rvert$ of each block.
"""

RANGES = r"""
**Range methods** choose $[lo, hi]$:
- **minmax**: the smallest and largest value; nothing is clipped, one outlier stretches the grid.
- **percentile**: the $p$-th percentile of $\lvert x \rvert$ (e.g. 99.99%): the rarest values are clipped.
- **mse**: shrink the min-max range by the factor in $\{1/50, \dots, 1\}$ that minimises $\sum (\hat{x}-x)^2$.
- **entropy**: the threshold whose quantized histogram is closest (KL divergence) to the clipped
  original (TensorRT's calibration).
"""

GRANULARITY = r"""
**Granularity** decides how many values share one scale: **per-tensor** (one $s$ for the whole weight),
**per-channel** (one $s$ per output channel $c$: $s_c = \max_j \lvert w_{c,j} \rvert / q_{max}$), or
**per-group** (one $s$ per $g$ consecutive input weights). A channel with small weights gets a small
step of its own instead of the step the largest channel forces on everyone. Each extra scale costs
4 bytes.
"""

CALIBRATION = r"""
**Static** quantization fixes each layer's input range once, from **calibration** data: the model runs
on a few batches and the pages below record min/max, a histogram and per-channel maxima. Every range
method then works on that histogram (values $x_i$ = bin centres, weighted by their counts).
**moving_average** is the exponential moving average of the per-batch min/max
($m \leftarrow m + 0.01\,(m_{\text{batch}} - m)$, as PyTorch's observer).
**Dynamic** quantization computes $[lo, hi]$ from each batch at run time: no calibration, always
fitted to the batch, but it costs a min/max pass per batch and cannot be folded ahead of time.
"""

SIZE = r"""
**Size.** A weight tensor with $n$ values quantized to $b$ bits in $B$ blocks (1 per tensor, one per
output channel, or one per group of $g$ values) costs

$$\text{bytes} = \left\lceil \tfrac{n\,b}{8} \right\rceil + 4B\ (\text{float32 scales}) + \left\lceil \tfrac{B\,b}{8} \right\rceil\ (\text{zero-points, affine only})$$

so the **bits per weight** are $b + 32B/n$ plus the zero-points: int4 in groups of 32 costs $4 + 32/32 = 5$
bits before zero-points. FP16/BF16 are plain casts: 16 bits and no scale. Sizes are theoretical storage,
not a file on disk.
"""
