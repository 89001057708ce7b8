"""Fake quantization that can be trained through: the straight-through estimator (STE) and LSQ.

Rounding has zero gradient almost everywhere, so quantization-aware training replaces its gradient:

- ``ste_fake_quantize(x, spec, lo, hi)``: forward = exactly ``quantize.fake_quantize(x, spec, lo, hi)``
  (the values a simulated model computes with); backward = the *clipped* straight-through estimator

      d x' / d x = 1   where lo <= x <= hi  (the block's clipping range, as ``quantize`` chose or was given it)
                   0   outside               (a clipped value does not move the output)

  The range itself is treated as a constant (no gradient flows into how ``minmax`` etc. chose it).
  Formats without a range (fp32, an unscaled fp16 cast) pass every gradient through.

- ``lsq_fake_quantize(x, step, qmax)``: Learned Step Size Quantization (Esser et al., 2019) for symmetric
  integers with codes in [-qmax, qmax]:  x' = clamp(round(x / s), -qmax, qmax) * s,  with ``s`` one step
  per block (learned). Gradients: d x'/d x as above (1 inside, 0 clipped); d x'/d s = round(x/s) - x/s
  inside, +-qmax clipped, scaled by g = 1 / sqrt(block_len * qmax) so the step learns at the pace of the
  weights.
"""

from __future__ import annotations

import math

import torch

from qcore.numerics.granularity import from_blocks, to_blocks
from qcore.numerics.quantize import quantize
from qcore.numerics.spec import TensorSpec


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, lo, hi):
        q = quantize(x, spec, lo, hi)
        if q.lo is None:
            ctx.save_for_backward(None)
        else:
            s = q.spec
            blocks = to_blocks(x.detach().float(), s.granularity, s.axis, s.group_size)
            inside = (blocks >= q.lo[:, None]) & (blocks <= q.hi[:, None])
            ctx.save_for_backward(from_blocks(inside, tuple(x.shape), s.granularity, s.axis))
        return q.dequantize().to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return (grad if inside is None else grad * inside), None, None, None


def ste_fake_quantize(x: torch.Tensor, spec: TensorSpec, lo=None, hi=None) -> torch.Tensor:
    """``fake_quantize(x, spec, lo, hi)`` whose gradient is the clipped straight-through estimator."""
    return _FakeQuantizeSTE.apply(x, spec, lo, hi)


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()  # forward: round; backward: identity


def _grad_scaled(t: torch.Tensor, g: float) -> torch.Tensor:
    return (t - t * g).detach() + t * g  # forward: t; backward: g * grad


def lsq_fake_quantize(x: torch.Tensor, step: torch.Tensor, qmax: int, granularity: str = "per_channel",
                      axis: int = 0, group_size: int = 128) -> torch.Tensor:
    """LSQ fake quantization of ``x`` with ``step`` (n_blocks,) (see the module docstring). Same shape as x."""
    blocks = to_blocks(x, granularity, axis, group_size)
    s = _grad_scaled(step, 1.0 / math.sqrt(blocks.shape[1] * qmax))[:, None]
    q = torch.clamp(_round_ste(blocks / s), -qmax, qmax) * s
    return from_blocks(q, tuple(x.shape), granularity, axis)
