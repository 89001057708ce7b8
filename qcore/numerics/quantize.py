"""Quantize one tensor: ``quantize(x, spec) -> QuantizedTensor`` and ``fake_quantize(x, spec)``.

The three choices of a spec compose in order: ``granularity`` cuts ``x`` into blocks, ``ranges``
picks a clipping range per block, ``formats`` maps each block onto its grid. ``fake_quantize`` is
quantize-then-dequantize: a float32 tensor of ``x``'s shape holding only values the format can
represent (what a simulated model computes with).

Non-finite input (NaN or +-Inf) raises ``QcoreError``: a clipping range cannot be chosen for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from qcore.errors import QcoreError
from qcore.numerics.granularity import from_blocks, to_blocks
from qcore.numerics.ranges import choose_range
from qcore.numerics.spec import TensorSpec


@dataclass
class QuantizedTensor:
    """A quantized tensor.

    codes      : x's shape, float32 holding integer codes (int formats, NF4 codebook indices) or
                 the format's float values (float formats; fp32 = the values themselves)
    scale      : (n_blocks,) float32, or None for an unscaled float cast / fp32
    zero_point : (n_blocks,) float32 integer values, or None when symmetric
    lo, hi     : (n_blocks,) float32 clipping range that was chosen (None if the format ignores ranges)
    spec       : the spec as applied to x (``TensorSpec.for_shape``: per_group holds the resolved group size)
    """

    codes: torch.Tensor
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    spec: TensorSpec

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return to_blocks(t, s.granularity, s.axis, s.group_size)

    def dequantize(self) -> torch.Tensor:
        s = self.spec
        blocks = s.fmt.decode(self._blocks(self.codes), self.scale, self.zero_point)
        return from_blocks(blocks, self.shape, s.granularity, s.axis)

    def clipped_fraction(self, x: torch.Tensor) -> float:
        """Share of x's elements outside the chosen clipping range (0 when no range applies)."""
        if self.lo is None or x.numel() == 0:
            return 0.0
        b = self._blocks(x.float())
        outside = (b < self.lo[:, None]) | (b > self.hi[:, None])
        return float(outside.float().mean())


def as_spec(spec: TensorSpec | Mapping[str, Any], activation: bool = False) -> TensorSpec:
    return spec if isinstance(spec, TensorSpec) else TensorSpec.from_dict(spec, "spec", activation)


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    if not torch.isfinite(x).all():
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise QcoreError(
            f"{what} contains {n_nan} NaN and {n_inf} infinite values; quantization needs finite numbers "
            "(check the model's weights or inputs)"
        )


def quantize(x: torch.Tensor, spec: TensorSpec | Mapping[str, Any], lo=None, hi=None) -> QuantizedTensor:
    """Quantize ``x`` under ``spec``. ``lo``/``hi`` (per block) fix the range instead of ``spec.range``
    (how calibrated activation ranges are applied)."""
    x = x.detach().to(torch.float32)
    spec = as_spec(spec).for_shape(tuple(x.shape))  # per_group: the group size this tensor's fan-in takes
    check_finite(x)
    fmt = spec.fmt
    if spec.granularity == "per_channel" and x.dim() > 0 and not -x.dim() <= spec.axis < x.dim():
        raise QcoreError(f"axis={spec.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    blocks = to_blocks(x, spec.granularity, spec.axis, spec.group_size)
    if not fmt.uses_range(spec.scaled) or blocks.numel() == 0:
        lo = hi = None
    elif lo is None:
        lo, hi = choose_range(blocks, fmt, spec)
    else:
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1).expand(blocks.shape[0])
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).expand(blocks.shape[0])
    if lo is None:
        zeros = torch.zeros(blocks.shape[0])
        codes, scale, zp = fmt.encode(blocks, zeros, zeros, spec.symmetric, spec.scaled)
    else:
        codes, scale, zp = fmt.encode(blocks, lo, hi, spec.symmetric, spec.scaled)
    if zp is not None and spec.symmetric:
        zp = None
    codes = from_blocks(codes, tuple(x.shape), spec.granularity, spec.axis)
    return QuantizedTensor(codes, scale, zp, lo, hi, spec)


def fake_quantize(x: torch.Tensor, spec: TensorSpec | Mapping[str, Any], lo=None, hi=None) -> torch.Tensor:
    """Quantize then dequantize: float32, same shape as ``x``, values on the format's grid."""
    return quantize(x, spec, lo, hi).dequantize()
