"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.2; Banner et al. 2019): quantizing W to W_hat shifts the layer's mean output by
E[(W_hat - W) x] = (W_hat - W) E[x], a bias the next layers see on every input. Adding (W - W_hat) E[x] to the
bias, with E[x] the per-channel mean of the layer's input over the calibration data, makes the mean output error
on that data zero (exactly for a Linear; for a Conv up to the zero padding at the borders).
"""

from __future__ import annotations

import torch


def corrected_bias(bias: torch.Tensor | None, weight: torch.Tensor, weight_q: torch.Tensor,
                   input_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The bias (C_out,) float32 after correction, for a Linear ``weight`` (C_out, C_in) or a Conv weight
    (C_out, C_in / groups, k...), its quantized ``weight_q`` (same shape) and the mean of the layer's input
    per channel ``input_mean`` (C_in,). ``bias`` None counts as zeros."""
    dw = (weight.double() - weight_q.double()).flatten(2).sum(2) if weight.dim() > 2 else \
        (weight.double() - weight_q.double())  # (C_out, C_in / groups): kernel positions summed
    c_out, per_group = dw.shape
    mean = input_mean.double().reshape(groups, per_group)[torch.arange(c_out) // (c_out // groups)]
    shift = (dw * mean).sum(1)
    base = torch.zeros(c_out, dtype=torch.float64) if bias is None else bias.double()
    return (base + shift).float()
