"""The integer grid a rounding algorithm rounds onto, element by element.

Rounding algorithms change which grid point each weight goes to, never the grid itself: the blocks,
clipping ranges, scales and zero-points are those ``numerics.quantize.quantize(weight, spec)`` chooses
(``spec.range`` on each block of ``spec.granularity``). A weight is viewed as ``(out, in)``: rows are
output channels, columns the fan-in (a Conv's ``C_in*kh*kw``, as ``granularity`` flattens it).

    q = clamp(round(w / s) + z, qmin, qmax),   w' = (q - z) * s       (z = 0 when symmetric)

Rounding applies to integer formats only (a uniform grid); per_channel must be along axis 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcore.errors import QcoreError
from qcore.numerics.granularity import fan_in, to_blocks
from qcore.numerics.quantize import QuantizedTensor, check_finite
from qcore.numerics.ranges import choose_range
from qcore.numerics.spec import TensorSpec


@dataclass
class Grid:
    """Per-block grid parameters of a weight, and the same expanded to every element.

    lo, hi, scale, zero_point : (n_blocks,) float32, in ``to_blocks`` order
    s, z                      : (out, in) float32: each element's scale and zero-point
    qmin, qmax                : the code range
    """

    spec: TensorSpec
    shape: tuple[int, ...]
    lo: torch.Tensor
    hi: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    qmin: int
    qmax: int

    def codes(self, w: torch.Tensor, cols=slice(None)) -> torch.Tensor:
        """Nearest codes of ``w`` (out, k) on columns ``cols`` of the grid (float64 division, as ``encode``)."""
        s, z = self.s[:, cols], self.z[:, cols]
        return torch.clamp(torch.round(w.double() / s.double()).float() + z, self.qmin, self.qmax)

    def value(self, codes: torch.Tensor, cols=slice(None)) -> torch.Tensor:
        return (codes - self.z[:, cols]) * self.s[:, cols]

    def result(self, codes: torch.Tensor) -> QuantizedTensor:
        """``codes`` (out, in) as the ``QuantizedTensor`` ``quantize`` would return for this grid."""
        zp = None if self.spec.symmetric else self.zero_point
        return QuantizedTensor(codes.reshape(self.shape), self.scale, zp, self.lo, self.hi, self.spec)


def check_roundable(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    if not spec.fmt.can_be_affine:
        raise QcoreError(f"rounding {spec.rounding!r} applies to integer formats (int2..int8, int16), not {spec.format}")
    if len(shape) < 2:
        raise QcoreError(f"rounding {spec.rounding!r} applies to weights of Linear and Conv layers (2-D or more), "
                         f"not a tensor of shape {tuple(shape)}")
    if spec.granularity == "per_channel" and spec.axis % len(shape) != 0:
        raise QcoreError(f"rounding {spec.rounding!r} needs per_channel along axis 0 (output channels), not axis {spec.axis}")


def block_params(spec: TensorSpec, w2: torch.Tensor):
    """(lo, hi, scale, zero_point) of the blocks of ``w2`` (k, n) as ``quantize`` chooses them."""
    # (k, n) rows are output channels: per_channel is one block per row, per_group cuts rows into groups
    blocks = w2.reshape(-1, spec.group_size) if spec.granularity == "per_group" else to_blocks(w2, spec.granularity, 0)
    lo, hi = choose_range(blocks, spec.fmt, spec)
    _, scale, zp = spec.fmt.encode(blocks[:, :1], lo, hi, spec.symmetric, spec.scaled)
    return lo, hi, scale, zp


def expand(per_block: torch.Tensor, spec: TensorSpec, out: int, n_in: int) -> torch.Tensor:
    """A per-block value (n_blocks,) as (out, in): each element gets its block's value."""
    if spec.granularity == "per_tensor":
        return per_block.reshape(1, 1).expand(out, n_in).clone()
    if spec.granularity == "per_channel":
        return per_block.reshape(out, 1).expand(out, n_in).clone()
    return per_block.reshape(out, n_in // spec.group_size).repeat_interleave(spec.group_size, dim=1)


def nearest_grid(weight: torch.Tensor, spec: TensorSpec) -> Grid:
    """The grid ``quantize(weight, spec)`` rounds onto (ranges from ``weight`` itself)."""
    shape = tuple(weight.shape)
    spec = spec.for_shape(shape)
    check_roundable(spec, shape)
    check_finite(weight, "the weight")
    w2 = weight.detach().float().reshape(shape[0], fan_in(shape))
    lo, hi, scale, zp = block_params(spec, w2)
    return make_grid(spec, shape, lo, hi, scale, zp)


def make_grid(spec: TensorSpec, shape, lo, hi, scale, zp) -> Grid:
    out, n_in = shape[0], fan_in(tuple(shape))
    fmt = spec.fmt
    return Grid(spec, tuple(shape), lo, hi, scale, zp, expand(scale, spec, out, n_in), expand(zp, spec, out, n_in),
                fmt.qmin, fmt.qmax)
