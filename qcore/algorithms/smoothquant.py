"""SmoothQuant's per-input-channel smoothing scales (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", eq. 4).

A Linear ``Y = X W^T`` computes the same with ``X' = X diag(s)^-1`` and ``W' = W diag(s)``: the scale moves
range from the activation (hard to quantize: a few channels carry outliers 100x the rest) into the weight
(easy: per-output-channel scales absorb it). The paper's choice balances the two maxima per channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

so that after migration max|X'_j| = (max|X_j| max|W_j|)^(1-alpha) and max|W'_j| = (max|X_j| max|W_j|)^alpha:
at alpha = 0.5 both are sqrt(max|X_j| * max|W_j|), and the activation's max/mean ratio across channels shrinks.
Larger alpha moves more of the range into the weights. ``X diag(s)^-1`` is folded into whatever produced X (a
LayerNorm's gain and bias, or a preceding Linear's rows), so the float model is unchanged and no op is added.
"""

from __future__ import annotations

import torch

from qcore.errors import QcoreError

MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scales s (C,) float32 for input channels with activation maxima ``act_absmax`` (C,) and weight maxima
    ``weight_absmax`` (C,) (max |W[:, j]| over every layer reading the channel). A channel whose activation or
    weight is all zero (or not finite) gets s = 1: there is nothing to migrate, and 0^a / 0^b would be NaN."""
    if not 0.0 <= alpha <= 1.0:
        raise QcoreError(f"smoothquant alpha={alpha} must be between 0 and 1 (the paper uses 0.5)")
    a, w = act_absmax.double(), weight_absmax.double()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s))
    return s.clamp(min=MIN_SCALE, max=1.0 / MIN_SCALE).float()
