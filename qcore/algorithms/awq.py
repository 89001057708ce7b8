"""Activation-aware weight quantization's scale search (Lin et al. 2024, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", section 3.2), for weight-only int4/int3.

A weight column that meets large activations matters more: scaling it up by s_j before quantizing (and the
activation down by s_j, folded into the layer that produced it) shrinks its relative rounding error. AWQ picks

    s = mean|X|^alpha  (normalised so that max(s) * min(s) = 1),   alpha in {0, 1/n, ..., (n-1)/n}

minimising the output error on calibration inputs X of every layer W reading the channels:

    L(alpha) = sum_W || X W^T - (X diag(s)^-1) Q(W diag(s))^T ||^2

alpha = 0 (s = 1) is plain round-to-nearest, so the chosen scale never does worse on X than no scale. The
reference also searches a clipping range per group afterwards; that step is not done here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIN_SCALE = 1e-4


@dataclass(frozen=True)
class AwqResult:
    """The chosen scales (C,) float32, their alpha, and the loss (summed squared output error per sample) at
    every alpha of the grid, alpha = 0 first."""

    scales: torch.Tensor
    alpha: float
    losses: tuple[float, ...]


def awq_scales(x: torch.Tensor, weights: Sequence[torch.Tensor],
               quantize: Sequence[Callable[[torch.Tensor], torch.Tensor]], grid: int = 20) -> AwqResult:
    """Search the grid for calibration inputs ``x`` (N, C) and the weights (O_k, C) reading them, each with
    its fake-quantizer (weight -> dequantized weight of the same shape)."""
    x = x.float()
    act = x.abs().mean(0)
    reference = [x @ w.float().T for w in weights]
    losses, best = [], None
    for i in range(grid):
        alpha = i / grid
        s = act.pow(alpha).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        if not torch.isfinite(s).all():
            s = torch.ones_like(act)
        xs = x / s
        loss = sum(float(((xs @ q(w.float() * s).T - ref) ** 2).sum()) for w, q, ref in zip(weights, quantize, reference))
        loss /= max(len(x), 1)
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    return AwqResult(best[2].float(), best[1], tuple(losses))
