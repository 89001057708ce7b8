"""Clipping search per block on the layer's *output* error (AWQ's clip search, Lin et al. 2024, "AWQ:
Activation-aware Weight Quantization", section 3.3 and ``auto_clip_layer`` in its reference code; GPTQ's
reference quantizer does the same grid on the weight error, ``Quantizer(mse=True)``).

Min-max puts a block's grid over its extreme weights; at 4 bits one outlier in a group of 32 spreads 16 levels
so wide that the other 31 weights round coarsely. Shrinking the range by a factor p clips the outlier and
refines the rest; which p is best depends on which inputs the block's weights meet. For a block of the weights
of one output row over input columns ``c`` and its rounding error ``d = w_c - Q_p(w_c)``, the output error on
calibration inputs X is

    || X_c d ||^2  =  d^T H_cc d,     H = X^T X  (the layer's input Hessian, GPTQ's H)

so the search needs only the Hessian's diagonal blocks. For each block independently (cross-block terms are
ignored, as AWQ does) the factor is chosen from ``p in {1, 1 - 1/grid, ..., 1 - (steps-1)/grid}`` with
``steps = int(MAX_SHRINK * grid)`` (AWQ: grid 20, shrink to at most half), applied to both ends of the range
``spec.range`` chooses (``lo * p, hi * p``). p = 1 is tried first and kept on ties, so the searched block
never has a larger output error on the calibration data than the original range, and a block whose inputs
were always zero (H_cc = 0) keeps its range.
"""

from __future__ import annotations

import torch

from qcore.numerics.granularity import to_blocks
from qcore.numerics.ranges import choose_range
from qcore.numerics.spec import TensorSpec

MAX_SHRINK = 0.5  # the narrowest range tried is (1 - MAX_SHRINK) of the original, AWQ's max_shrink


def shrink_factors(grid: int) -> list[float]:
    """The factors tried, widest first: 1, 1 - 1/grid, ... (``int(MAX_SHRINK * grid)`` of them, at least 1)."""
    return [1 - i / grid for i in range(max(1, int(MAX_SHRINK * grid)))]


def hessian_blocks(hessian: torch.Tensor, spec: TensorSpec, n: int) -> torch.Tensor:
    """The diagonal blocks of ``hessian`` (n, n) that meet each block of one row: (n // g, g, g) float64 for
    per_group (g = ``spec.group_size``), (1, n, n) otherwise."""
    g = spec.group_size if spec.granularity == "per_group" else n
    h = hessian.double().reshape(n // g, g, n // g, g)
    return torch.diagonal(h, dim1=0, dim2=2).permute(2, 0, 1)


def clipped_params(spec: TensorSpec, w2: torch.Tensor, h_blocks: torch.Tensor, grid: int):
    """(lo, hi, scale, zero_point) of the blocks of ``w2`` (k, n) -- rows output channels, as
    ``grid.block_params`` -- with each block's range shrunk by the factor of ``shrink_factors(grid)`` that
    minimises its output error ``d^T H_cc d`` (``h_blocks`` from ``hessian_blocks``, float64).
    per_tensor sums the error over the whole tensor."""
    k, n = w2.shape
    fmt = spec.fmt
    blocks = w2.reshape(-1, spec.group_size) if spec.granularity == "per_group" else to_blocks(w2, spec.granularity, 0)
    lo0, hi0 = choose_range(blocks, fmt, spec)
    rows = w2.reshape(k, h_blocks.shape[0], h_blocks.shape[1]).double()  # (k, n_groups, g)
    best = None
    for p in shrink_factors(grid):
        lo, hi = lo0 * p, hi0 * p
        codes, scale, zp = fmt.encode(blocks, lo, hi, spec.symmetric, spec.scaled)
        d = rows - fmt.decode(codes, scale, zp).reshape(rows.shape).double()
        err = torch.einsum("rgi,gij,rgj->rg", d, h_blocks, d).reshape(-1)  # one per (row, group)
        if spec.granularity == "per_tensor":
            err = err.sum().reshape(1)
        if best is None:
            best = [err, lo, hi, scale, zp]
            continue
        better = err < best[0]
        best = [torch.where(better, new, old) for new, old in zip((err, lo, hi, scale, zp), best)]
    return tuple(best[1:])
