"""Cross-layer equalization of two layers through a ReLU or identity (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", section 4.1).

``y = W2 relu(W1 x + b1)`` equals ``W2 S relu(S^-1 W1 x + S^-1 b1)`` for any positive diagonal S, since
relu(s t) = s relu(t) for s > 0. With r1_i the range (max |.|) of W1's output channel i and r2_i the range of W2's
input channel i, the choice maximising the per-tensor precision of both layers is

    s_i = sqrt(r1_i / r2_i)

after which both ranges equal sqrt(r1_i * r2_i): a per-tensor quantizer no longer wastes its grid on the one
channel with the widest weights. Scales fold into W1 (rows and bias divided) and W2 (columns multiplied).
"""

from __future__ import annotations

import torch

MIN_SCALE = 1e-5


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s (C,) float32 from the producer's output-channel ranges ``r1`` (C,) and the consumer's input-channel
    ranges ``r2`` (C,). A channel with a zero (or non-finite) range on either side gets s = 1."""
    r1, r2 = r1.double(), r2.double()
    s = torch.sqrt(r1 / r2)
    ok = (r1 > 0) & (r2 > 0) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s))
    return s.clamp(min=MIN_SCALE, max=1.0 / MIN_SCALE).float()
