"""SmoothQuant's per-input-channel smoothing scales (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", eq. 4).

A Linear ``Y = X W^T`` computes the same with ``X' = X diag(s)^-1`` and ``W' = W diag(s)``: the scale moves
range from the activation (hard to quantize: a few channels carry outliers 100x the rest) into the weight
(easy: per-output-channel scales absorb it). The paper's choice balances the two maxima per channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

so that after migration max|X'_j| = (max|X_j| max|W_j|)^(1-alpha) and max|W'_j| = (max|X_j| max|W_j|)^alpha:
at alpha = 0.5 both are sqrt(max|X_j| * max|W_j|), and the activation's max/mean ratio across channels shrinks.
Larger alpha moves more of the range into the weights. ``X diag(s)^-1`` is folded into whatever produced X (a
LayerNorm's gain and bias, or a preceding Linear's rows), so the float model is unchanged and no op is added
(or, where no fold exists and the recipe asks for it, into an explicit Mul before the layer:
``qcore.model.transforms``).

A single alpha for every layer is the paper's default; ``search_alpha`` picks one per layer on calibration data,
minimising the layer's quantized output error (with "no smoothing" among the candidates).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


ALPHA_GRID = tuple(i / 20 for i in range(21))  # the alphas "alpha": "search" tries: 0, 0.05, ..., 1


@dataclass(frozen=True)
class AlphaSearch:
    """The chosen scales (C,) float32 and their alpha (None: no smoothing, s = 1), and the loss (summed squared
    output error per input row) of no smoothing first, then of every alpha of the grid."""

    scales: torch.Tensor
    alpha: float | None
    losses: tuple[float, ...]


def search_alpha(x: torch.Tensor, act_absmax: torch.Tensor, weights: Sequence[torch.Tensor],
                 quantize_weight: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                 quantize_input: Callable[[torch.Tensor], torch.Tensor], grid: Sequence[float] = ALPHA_GRID) -> AlphaSearch:
    """SmoothQuant's alpha chosen per layer on calibration data (as the reference's and Intel Neural Compressor's
    auto-alpha do): for calibration input rows ``x`` (N, C) with per-channel maxima ``act_absmax`` (C,) over all the
    calibration data, and the weights (O_k, C) reading them with their fake-quantizers, the alpha of ``grid``
    minimising

        L(alpha) = sum_W || X W^T - Q_x(X diag(s)^-1) Q_W(W diag(s))^T ||^2 / N,   s = smoothing_scales(alpha)

    ``quantize_input`` fake-quantizes a whole (N, C) input (its range taken from that input). s = 1 (no smoothing)
    is tried first, so the choice never does worse on ``x`` than not smoothing."""
    x = x.float()
    wmax = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0)
    reference = [x @ w.float().T for w in weights]
    candidates = [(None, torch.ones(x.shape[1]))] + [(a, smoothing_scales(act_absmax, wmax, a)) for a in grid]
    losses, best = [], None
    for alpha, s in candidates:
        xq = quantize_input(x / s)
        loss = sum(float(((xq @ q(w.float() * s).T - ref) ** 2).sum())
                   for w, q, ref in zip(weights, quantize_weight, reference)) / max(len(x), 1)
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    return AlphaSearch(best[2].float(), best[1], tuple(losses))
